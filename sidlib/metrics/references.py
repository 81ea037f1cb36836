"""Reference statistics for the paper's FID protocol and the ImageNet-64 precision/recall reference batch.

* EDM's FID references (``.npz`` with ``mu`` ``[2048]`` and ``sigma`` ``[2048, 2048]``: Inception pool features of
  the training set, built by EDM's ``fid.py ref``), one per dataset, from ``nvlabs-fi-cdn.nvidia.com/edm/fid-refs``.
  SiD compares against exactly these (``--data_stat``).
* OpenAI's ``VIRTUAL_imagenet64_labeled.npz`` (key ``arr_0``: uint8 images ``[N, 64, 64, 3]``), used by SiD for
  ImageNet-64 precision/recall only; FID on ImageNet uses EDM's ``imagenet-64x64.npz``. Mixing them makes numbers
  incomparable with the paper's.

Files are fetched into the download cache with :func:`sidlib.io.download.download` (``file://`` URLs work
offline); ``python -m sidlib.metrics fetch NAME --out PATH`` does it from the command line.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..io.atomic import atomic_open
from ..io.download import download
from ..io.registry import is_url

__all__ = [
    "FEATURE_DIM", "FID_REFERENCES", "PR_REFERENCES",
    "ReferenceFileError", "reference_url", "fetch_reference", "load_reference_stats", "save_reference_stats",
    "load_reference_images",
]

#: Dimension of the Inception-v3 pool features the EDM references hold.
FEATURE_DIM = 2048

_EDM_REFS = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"

#: EDM FID reference statistics, name -> URL (NVlabs/edm README).
FID_REFERENCES: dict[str, str] = {
    "cifar10-32x32": _EDM_REFS + "cifar10-32x32.npz",
    "imagenet-64x64": _EDM_REFS + "imagenet-64x64.npz",
    "imagenet-64x64-baseline": _EDM_REFS + "imagenet-64x64-baseline.npz",  # ADM baseline data; not used by SiD
    "ffhq-64x64": _EDM_REFS + "ffhq-64x64.npz",
    "afhqv2-64x64": _EDM_REFS + "afhqv2-64x64.npz",
}

#: Precision/recall reference image batches, name -> URL (OpenAI guided-diffusion evaluation batch).
PR_REFERENCES: dict[str, str] = {
    "imagenet64-openai": "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/64/"
                         "VIRTUAL_imagenet64_labeled.npz",
}

class ReferenceFileError(ValueError):
    """A reference file is missing, unknown, or does not have the expected keys/shapes."""


def _all_names() -> dict[str, str]:
    names = dict(FID_REFERENCES)
    names.update(PR_REFERENCES)
    return names


def reference_url(name: str) -> str:
    """URL of a known reference (a key of :data:`FID_REFERENCES` or :data:`PR_REFERENCES`)."""
    names = _all_names()
    if name not in names:
        raise ReferenceFileError(f"unknown reference {name!r}; known references: {sorted(names)}")
    return names[name]


def fetch_reference(source: str | os.PathLike, *, cache_dir=None, sha256: str | None = None,
                    progress: bool = True) -> Path:
    """Local path of a reference: an existing file, a URL (downloaded once), or a known reference name.

    Raises :class:`ReferenceFileError` for a path that does not exist and is neither a URL nor a known name.
    """
    text = os.fspath(source)
    if Path(text).expanduser().is_file():
        return Path(text).expanduser()
    if is_url(text):
        return download(text, sha256=sha256, cache_dir=cache_dir, progress=progress)
    try:
        url = reference_url(text)
    except ReferenceFileError as e:
        raise ReferenceFileError(f"reference {text!r} is not an existing file, a URL, or a known name. {e}") from None
    return download(url, sha256=sha256, cache_dir=cache_dir, progress=progress)


def _open_npz(path: Path):
    if not path.is_file():
        raise ReferenceFileError(f"reference file not found: {path}")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ReferenceFileError(f"{path}: not a readable .npz file ({e})") from e


def load_reference_stats(path: str | os.PathLike, *, dim: int | None = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Read ``mu`` ``[dim]`` and ``sigma`` ``[dim, dim]`` (float64) from an EDM-style ``.npz``.

    dim: expected feature dimension (2048 for Inception); None accepts any D with consistent shapes (custom
    extractors such as the digits classifier). Wrong or missing keys/shapes raise :class:`ReferenceFileError` naming
    the file, the key, the expected shape and the shape found.
    """
    path = Path(path)
    with _open_npz(path) as data:
        for key in ("mu", "sigma"):
            if key not in data.files:
                raise ReferenceFileError(f"{path}: key {key!r} missing (found keys {data.files}); an FID reference "
                                      f"needs 'mu' [D] and 'sigma' [D, D]")
        mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
    d = dim if dim is not None else (mu.shape[0] if mu.ndim == 1 else None)
    if d is None or mu.shape != (d,):
        want = f"({dim},)" if dim is not None else "(D,)"
        raise ReferenceFileError(f"{path}: key 'mu' has shape {mu.shape}, expected {want}")
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


def load_reference_images(path: str | os.PathLike, key: str = "arr_0", limit: int | None = None) -> torch.Tensor:
    """uint8 images ``[N, C, H, W]`` from an image-batch ``.npz`` stored as ``[N, H, W, C]`` (OpenAI's layout)."""
    path = Path(path)
    with _open_npz(path) as data:
        if key not in data.files:
            raise ReferenceFileError(f"{path}: key {key!r} missing (found keys {data.files})")
        arr = data[key]
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ReferenceFileError(f"{path}: key {key!r} has dtype {arr.dtype} and shape {arr.shape}, expected uint8 "
                              f"(N, H, W, C) with C in (1, 3)")
    if limit is not None:
        arr = arr[:limit]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))
