"""Reference files of the paper's FID protocol (fetched into the download cache) and dataset statistics.

EDM's FID references (``mu`` ``[2048]``, ``sigma`` ``[2048, 2048]`` of the training set's Inception features; SiD's
``--data_stat``); OpenAI's ``VIRTUAL_imagenet64_labeled.npz`` (``arr_0`` uint8 ``[N, 64, 64, 3]``), SiD's ImageNet-64
precision/recall reference; :func:`dataset_statistics` of a dataset in EDM's ``dataset_tool.py`` layout (EDM's
``fid.py ref``) and its :func:`label_frequencies`.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml

from ..io.atomic import atomic_open
from ..io.download import download
from ..io.registry import is_url

__all__ = ["FEATURE_DIM", "FID_REFERENCES", "PR_REFERENCES", "ReferenceFileError", "reference_url", "fetch_reference",
           "load_reference_stats", "save_reference_stats", "load_reference_images", "DatasetImages",
           "dataset_statistics", "label_frequencies"]

#: Dimension of the Inception-v3 pool features the EDM references hold.
FEATURE_DIM = 2048

#: EDM FID reference statistics, name -> URL (NVlabs/edm README; the ADM "baseline" one is not used by SiD).
FID_REFERENCES: dict[str, str] = {
    n: f"https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/{n}.npz"
    for n in ("cifar10-32x32", "imagenet-64x64", "imagenet-64x64-baseline", "ffhq-64x64", "afhqv2-64x64")}

#: Precision/recall reference image batches, name -> URL (OpenAI guided-diffusion evaluation batch).
PR_REFERENCES: dict[str, str] = {
    "imagenet64-openai": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/64/"
                         "VIRTUAL_imagenet64_labeled.npz",
}


class ReferenceFileError(ValueError):
    """A reference file is missing, unknown, or does not have the expected keys/shapes."""


def reference_url(name: str) -> str:
    """URL of a known reference (a key of :data:`FID_REFERENCES` or :data:`PR_REFERENCES`)."""
    names = {**FID_REFERENCES, **PR_REFERENCES}
    if name not in names:
        raise ReferenceFileError(f"unknown reference {name!r}; known references: {sorted(names)}")
    return names[name]


def fetch_reference(source: str | os.PathLike, *, cache_dir=None, sha256: str | None = None,
                    progress: bool = True) -> Path:
    """Local path of a reference: an existing file, a URL (downloaded once), or a known reference name."""
    text = os.fspath(source)
    if Path(text).expanduser().is_file():
        return Path(text).expanduser()
    try:
        url = text if is_url(text) else reference_url(text)
    except ReferenceFileError as e:
        raise ReferenceFileError(f"reference {text!r} is not an existing file, a URL, or a known name. {e}") from None
    return download(url, sha256=sha256, cache_dir=cache_dir, progress=progress)


def _read_npz(path: Path, keys, hint: str = "") -> list[np.ndarray]:
    if not path.is_file():
        raise ReferenceFileError(f"reference file not found: {path}")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ReferenceFileError(f"{path}: not a readable .npz file ({e})") from e
    with data:
        for key in keys:
            if key not in data.files:
                raise ReferenceFileError(f"{path}: key {key!r} missing (found keys {data.files}){hint}")
        return [data[key] for key in keys]


def load_reference_stats(path: str | os.PathLike, *, dim: int | None = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """``mu`` ``[dim]`` and ``sigma`` ``[dim, dim]`` (float64) of an EDM-style ``.npz``; ``dim=None`` accepts any
    consistent width. Wrong keys or shapes raise :class:`ReferenceFileError` naming the file, key and shapes."""
    path = Path(path)
    hint = "; an FID reference needs 'mu' [D] and 'sigma' [D, D]"
    mu, sigma = (np.asarray(a, dtype=np.float64) for a in _read_npz(path, ("mu", "sigma"), hint))
    if mu.ndim != 1 or (dim is not None and mu.shape[0] != dim):
        raise ReferenceFileError(f"{path}: key 'mu' has shape {mu.shape}, expected ({'D' if dim is None else dim},)")
    d = mu.shape[0]
    if sigma.shape != (d, d):
        raise ReferenceFileError(f"{path}: key 'sigma' has shape {sigma.shape}, expected ({d}, {d})")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ReferenceFileError(f"{path}: 'mu' or 'sigma' contains non-finite values")
    return mu, sigma


def save_reference_stats(path: str | os.PathLike, mu, sigma, **extra) -> Path:
    """Write ``{'mu', 'sigma', **extra}`` as an EDM-style ``.npz`` atomically; returns the path."""
    path = Path(path)
    mu, sigma = np.asarray(mu, dtype=np.float64), np.asarray(sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu must be [D] and sigma [D, D], got {mu.shape} and {sigma.shape}")
    with atomic_open(path, "wb") as f:
        np.savez(f, mu=mu, sigma=sigma, **extra)
    return path


def load_reference_images(path: str | os.PathLike, key: str = "arr_0") -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` from an image-batch ``.npz`` stored as ``[N, H, W, C]`` (OpenAI's layout)."""
    path = Path(path)
    [arr] = _read_npz(path, [key])
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ReferenceFileError(f"{path}: key {key!r} has dtype {arr.dtype} and shape {arr.shape}, expected uint8 "
                                 f"(N, H, W, C) with C in (1, 3)")
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


class DatasetImages(torch.utils.data.Dataset):
    """EDM's ``ImageFolderDataset``: images in a folder (recursively) or zip, sorted by relative name, as uint8
    ``[C, H, W]``; ``labels()``: the labels of ``dataset.json`` (``{"labels": [[name, label], ...]}``) or None."""

    def __init__(self, path):
        import PIL.Image
        PIL.Image.init()
        self.path = Path(path)
        if self.path.is_dir():
            names = [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]
        elif zipfile.is_zipfile(self.path):
            names = zipfile.ZipFile(self.path).namelist()
        else:
            raise ReferenceFileError(f"dataset {path} is not a folder or a zip file")
        self.names = sorted(n for n in names if os.path.splitext(n)[1].lower() in PIL.Image.EXTENSION)
        self.all_names, self._zip = set(names), None
        if not self.names:
            raise ReferenceFileError(f"dataset {path} holds no images")

    def _open(self, name):
        if self.path.is_dir():
            return open(self.path / name, "rb")
        self._zip = self._zip or zipfile.ZipFile(self.path)
        return io.BytesIO(self._zip.read(name))

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        import PIL.Image
        with self._open(self.names[i]) as f:
            a = np.array(PIL.Image.open(f))
        return torch.from_numpy(np.ascontiguousarray((a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)))

    def labels(self) -> np.ndarray | None:
        if "dataset.json" not in self.all_names:
            return None
        with self._open("dataset.json") as f:
            raw = json.load(f).get("labels")
        if raw is None:
            return None
        table = dict(raw)
        missing = [n for n in self.names if n not in table]
        if missing:
            raise ReferenceFileError(f"{self.path}/dataset.json has no label for {missing[0]} (and {len(missing) - 1} more)")
        return np.array([table[n] for n in self.names], dtype=np.int64)


@torch.no_grad()
def dataset_statistics(data, *, feature_extractor: str | None = None, batch_size: int = 64, device=None,
                       max_images: int | None = None, extractor_kwargs=None) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mu, sigma, n)`` of the features (default: Inception-v3) of a dataset folder or zip, accumulated in float64
    as EDM's ``fid.py ref`` (sums all-reduced over ``torchrun`` ranks; rank r takes images r, r+W, ...)."""
    from .. import distributed as dist_utils
    from .fidelity import INCEPTION, FeatureExtractor

    ds = DatasetImages(data)
    n = min(len(ds), max_images or len(ds))
    if n < 2:
        raise ReferenceFileError(f"dataset {data}: {n} image(s), need at least 2")
    device = torch.device(device or "cpu")
    fe = FeatureExtractor(feature_extractor or INCEPTION, ["fid"], cuda=device.type == "cuda", **(extractor_kwargs or {}))
    mine = list(range(n))[dist_utils.rank()::dist_utils.world_size()]
    acc = None
    for i in range(0, len(mine), batch_size):
        f = fe(torch.stack([ds[j] for j in mine[i:i + batch_size]]))["fid"].to(device, torch.float64)
        acc = [f.sum(0), f.T @ f] if acc is None else [acc[0] + f.sum(0), acc[1] + f.T @ f]
    if acc is None:  # a rank without images still joins the all-reduce, with zeros of the feature width
        dim = int(fe(torch.zeros([1, *ds[0].shape], dtype=torch.uint8))["fid"].shape[1])
        acc = [torch.zeros(shape, dtype=torch.float64, device=device) for shape in ([dim], [dim, dim])]
    mu, outer = dist_utils.all_reduce_sum(acc[0]) / n, dist_utils.all_reduce_sum(acc[1])
    sigma = (outer - torch.outer(mu, mu) * n) / (n - 1)
    return mu.cpu().numpy(), sigma.cpu().numpy(), n


def label_frequencies(source, num_classes: int | None = None) -> list[float]:
    """Normalised class frequencies from a list, a string ``"0.1,0.2,..."``, a YAML/JSON file (a list, or a
    ``dataset.json`` whose labels are counted) or a dataset folder/zip; ``num_classes``: checked length (pads counts)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir() or (path.is_file() and zipfile.is_zipfile(path)):
            labels = DatasetImages(path).labels()
            if labels is None:
                raise ReferenceFileError(f"dataset {path} has no labels (dataset.json)")
            source = np.bincount(labels, minlength=num_classes or 0).tolist()
        elif path.is_file():
            source = yaml.safe_load(path.read_text(encoding="utf-8"))
            if isinstance(source, dict) and "labels" in source:
                source = np.bincount([int(v) for _, v in source["labels"]], minlength=num_classes or 0).tolist()
        elif "," in str(source):
            source = [float(v) for v in str(source).split(",")]
        else:
            raise ReferenceFileError(f"class frequencies {source!r}: not a file, a dataset or a comma-separated list")
    p = np.asarray(source, dtype=np.float64)
    if p.ndim != 1 or not len(p) or (p < 0).any() or not np.isfinite(p).all() or p.sum() <= 0:
        raise ReferenceFileError(f"class frequencies must be non-negative numbers with a positive sum, got {source!r}")
    if num_classes is not None and len(p) != num_classes:
        raise ReferenceFileError(f"{len(p)} class frequencies for {num_classes} classes")
    return (p / p.sum()).tolist()
