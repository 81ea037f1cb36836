"""Reference statistics for the paper's FID protocol and the ImageNet-64 precision/recall reference batch.

* EDM's FID references (``.npz`` with ``mu`` ``[2048]`` and ``sigma`` ``[2048, 2048]``: Inception pool features of
  the training set, built by EDM's ``fid.py ref``), one per dataset, from ``nvlabs-fi-cdn.nvidia.com/edm/fid-refs``.
  SiD compares against exactly these (``--data_stat``).
* OpenAI's ``VIRTUAL_imagenet64_labeled.npz`` (key ``arr_0``: uint8 images ``[N, 64, 64, 3]``), used by SiD for
  ImageNet-64 precision/recall only; FID on ImageNet uses EDM's ``imagenet-64x64.npz``. Mixing them makes numbers
  incomparable with the paper's.

Files are fetched into the download cache with :func:`sidlib.download.download` (``file://`` URLs work offline).
CLI (used by the DVC stages)::

    python -m sidlib.references fetch cifar10-32x32 --out data/paper/refs/cifar10-32x32.npz
    python -m sidlib.references fetch-benchmark imagenet64-cond --out-dir data/paper/refs/imagenet64-cond
    python -m sidlib.references check data/paper/refs/cifar10-32x32.npz
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import torch

from sidlib.atomic import atomic_copy
from sidlib.download import download

__all__ = [
    "FEATURE_DIM", "FID_REFERENCES", "PR_REFERENCES", "BENCHMARK_FID_REFERENCE", "BENCHMARK_PR_REFERENCE",
    "ReferenceFileError", "reference_url", "fetch_reference", "load_reference_stats", "save_reference_stats",
    "load_reference_images",
]

#: Dimension of the Inception-v3 pool features the EDM references hold.
FEATURE_DIM = 2048

_EDM_REFS = "https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/"

#: EDM FID reference statistics, name -> URL (spec §3.3; NVlabs/edm README).
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

#: Paper benchmark -> FID reference name (SiD's ``--data_stat`` per run, spec §2.2).
BENCHMARK_FID_REFERENCE: dict[str, str] = {
    "cifar10-uncond": "cifar10-32x32",
    "cifar10-cond": "cifar10-32x32",
    "imagenet64-cond": "imagenet-64x64",
    "ffhq64": "ffhq-64x64",
    "afhqv2-64": "afhqv2-64x64",
}

#: Paper benchmark -> precision/recall reference (ImageNet only).
BENCHMARK_PR_REFERENCE: dict[str, str] = {"imagenet64-cond": "imagenet64-openai"}


class ReferenceFileError(ValueError):
    """A reference file is missing, unknown, or does not have the expected keys/shapes."""


def _all_names() -> dict[str, str]:
    names = dict(FID_REFERENCES)
    names.update(PR_REFERENCES)
    return names


def reference_url(name: str, kind: str = "fid") -> str:
    """URL of a reference given its name or a benchmark name (``kind`` 'fid' or 'pr' for benchmarks)."""
    if kind not in ("fid", "pr"):
        raise ValueError(f"kind must be 'fid' or 'pr', got {kind!r}")
    bench = BENCHMARK_FID_REFERENCE if kind == "fid" else BENCHMARK_PR_REFERENCE
    names = _all_names()
    if name in bench:
        return names[bench[name]]
    if name in names:
        return names[name]
    raise ReferenceFileError(f"unknown reference {name!r}; known references: {sorted(names)}; "
                          f"benchmarks with a {kind} reference: {sorted(bench)}")


def _is_url(s: str) -> bool:
    return "://" in s and urllib.parse.urlparse(s).scheme.lower() in ("file", "http", "https")


def fetch_reference(source: str | os.PathLike, *, kind: str = "fid", cache_dir=None, sha256: str | None = None,
                    progress: bool = True) -> Path:
    """Local path of a reference: an existing file, a URL (downloaded once), or a reference/benchmark name.

    Raises :class:`ReferenceFileError` for a path that does not exist and is neither a URL nor a known name.
    """
    text = os.fspath(source)
    if Path(text).expanduser().is_file():
        return Path(text).expanduser()
    if _is_url(text):
        return download(text, sha256=sha256, cache_dir=cache_dir, progress=progress)
    try:
        url = reference_url(text, kind)
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
    from sidlib.atomic import atomic_open

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


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m sidlib.references", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a reference (name, benchmark or URL) and copy it to --out")
    f.add_argument("name")
    f.add_argument("--kind", choices=("fid", "pr"), default="fid")
    f.add_argument("--out", required=True)
    f.add_argument("--sha256", default=None)
    b = sub.add_parser("fetch-benchmark", help="a benchmark's references into DIR: fid.npz (+ pr.npz for ImageNet)")
    b.add_argument("benchmark")
    b.add_argument("--out-dir", required=True)
    c = sub.add_parser("check", help="validate an FID reference npz (mu [2048], sigma [2048, 2048])")
    c.add_argument("path")
    c.add_argument("--dim", type=int, default=FEATURE_DIM)
    sub.add_parser("list", help="print the known references")
    args = p.parse_args(argv)
    if args.cmd == "list":
        for name, url in sorted(_all_names().items()):
            print(f"{name}\t{url}")
        return 0
    if args.cmd == "check":
        mu, sigma = load_reference_stats(args.path, dim=args.dim)
        print(f"{args.path}: mu {mu.shape}, sigma {sigma.shape}, trace(sigma) {np.trace(sigma):.6g}")
        return 0
    if args.cmd == "fetch-benchmark":
        if args.benchmark not in BENCHMARK_FID_REFERENCE:
            raise ReferenceFileError(f"unknown benchmark {args.benchmark!r}; valid: {sorted(BENCHMARK_FID_REFERENCE)}")
        jobs = [("fid", Path(args.out_dir) / "fid.npz")]
        if args.benchmark in BENCHMARK_PR_REFERENCE:
            jobs.append(("pr", Path(args.out_dir) / "pr.npz"))
        for kind, out in jobs:
            _copy_reference(args.benchmark, kind, out, None)
        return 0
    _copy_reference(args.name, args.kind, Path(args.out), args.sha256)
    return 0


def _copy_reference(name: str, kind: str, out: Path, sha256: str | None) -> None:
    src = fetch_reference(name, kind=kind, sha256=sha256)
    if kind == "fid":
        load_reference_stats(src)
    atomic_copy(src, out)
    print(f"{name} ({kind}) -> {out}")


if __name__ == "__main__":
    sys.exit(_main())
