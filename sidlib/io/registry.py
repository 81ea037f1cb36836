"""Registered names of public EDM (NVlabs/edm README) and SiD (Hugging Face ``UT-Austin-PML/SiD``) networks, and
:func:`resolve_source`: a name, URL or path -> a local file (names and URLs downloaded once into the cache)."""

from __future__ import annotations

import difflib
import os
import urllib.parse
from pathlib import Path
from typing import Any

from .atomic import atomic_copy
from .download import DownloadError, cache_lock, download, file_sha256
from .edm_pickle import CheckpointError

__all__ = ["TEACHERS", "TEACHER_ALIASES", "OTHER_EDM_PICKLES", "SID_GENERATORS", "SID_GENERATOR_INFO",
           "KNOWN_SHA256", "registered_names", "resolve_source", "local_checkpoint", "is_url"]

_EDM_BASE = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
_SID_BASE = "https://huggingface.co/UT-Austin-PML/SiD/resolve/main/"

#: The five EDM teachers SiD distils (EDM preconditioning; DDPM++ "vp" and ADM architectures).
TEACHERS: dict[str, str] = {name: f"{_EDM_BASE}{name}.pkl" for name in (
    "edm-cifar10-32x32-uncond-vp", "edm-cifar10-32x32-cond-vp", "edm-ffhq-64x64-uncond-vp",
    "edm-afhqv2-64x64-uncond-vp", "edm-imagenet-64x64-cond-adm")}

#: SiD's own short keys for the teachers (its ``--data``-style dataset names).
TEACHER_ALIASES: dict[str, str] = {
    "cifar10-uncond": "edm-cifar10-32x32-uncond-vp", "cifar10-cond": "edm-cifar10-32x32-cond-vp",
    "ffhq64": "edm-ffhq-64x64-uncond-vp", "afhq64-v2": "edm-afhqv2-64x64-uncond-vp",
    "imagenet64-cond": "edm-imagenet-64x64-cond-adm"}

#: Public EDM-preconditioned NCSN++ ("ve") pickles that SiD does not use.
OTHER_EDM_PICKLES: dict[str, str] = {name: f"{_EDM_BASE}{name}.pkl" for name in (
    "edm-cifar10-32x32-uncond-ve", "edm-cifar10-32x32-cond-ve", "edm-ffhq-64x64-uncond-ve",
    "edm-afhqv2-64x64-uncond-ve")}

# (name, HF path, alpha, kimg, teacher)
_SID_RELEASES = (
    ("sid-cifar10-uncond-alpha1.2", "cifar10-uncond/alpha1.2/network-snapshot-1.200000-403968.pkl", 1.2, 403968, "edm-cifar10-32x32-uncond-vp"),
    ("sid-cifar10-uncond-alpha1.0", "cifar10-uncond/alpha1/network-snapshot-1.000000-416768.pkl", 1.0, 416768, "edm-cifar10-32x32-uncond-vp"),
    ("sid-cifar10-cond-alpha1.2", "cifar10-cond/alpha1.2/network-snapshot-1.200000-713312.pkl", 1.2, 713312, "edm-cifar10-32x32-cond-vp"),
    ("sid-cifar10-cond-alpha1.0", "cifar10-cond/alpha1/network-snapshot-1.000000-415744.pkl", 1.0, 415744, "edm-cifar10-32x32-cond-vp"),
    ("sid-imagenet64-cond-alpha1.2", "imagenet64/alpha1.2/network-snapshot-1.200000-939176.pkl", 1.2, 939176, "edm-imagenet-64x64-cond-adm"),
    ("sid-imagenet64-cond-alpha1.0", "imagenet64/alpha1/network-snapshot-1.000000-492836.pkl", 1.0, 492836, "edm-imagenet-64x64-cond-adm"),
    ("sid-ffhq64-uncond-alpha1.2", "ffhq64/alpha1.2/network-snapshot-1.200000-498176.pkl", 1.2, 498176, "edm-ffhq-64x64-uncond-vp"),
    ("sid-ffhq64-uncond-alpha1.0", "ffhq64/alpha1/network-snapshot-1.000000-453120.pkl", 1.0, 453120, "edm-ffhq-64x64-uncond-vp"),
    ("sid-afhq64-uncond-alpha1.0", "afhq64/alpha1/network-snapshot-1.000000-371712.pkl", 1.0, 371712, "edm-afhqv2-64x64-uncond-vp"),
    ("sid-afhq64-uncond-alpha1.2", "afhq64/alpha1.2/network-snapshot-1.200000-305664.pkl", 1.2, 305664, "edm-afhqv2-64x64-uncond-vp"),
)

#: Per released SiD generator: url, alpha, kimg (from the file name), teacher, init_sigma.
#: init_sigma is 2.5 for all releases: they are sampled as G(2.5 * z, sigma=2.5).
SID_GENERATOR_INFO: dict[str, dict] = {
    name: dict(url=_SID_BASE + path, alpha=alpha, kimg=kimg, images_seen=kimg * 1000, teacher=teacher, init_sigma=2.5)
    for name, path, alpha, kimg, teacher in _SID_RELEASES}

#: The ten released SiD one-step generators, name -> URL.
SID_GENERATORS: dict[str, str] = {name: info["url"] for name, info in SID_GENERATOR_INFO.items()}

#: Optional sha256 pins, URL -> hex digest, checked by the download cache. No digests are
#: published for these files, so none are pinned; the cache records what it first downloaded.
KNOWN_SHA256: dict[str, str] = {}


def registered_names() -> dict[str, str]:
    """Every registered checkpoint name (teachers, their aliases, other EDM pickles, SiD releases) -> URL."""
    return {**TEACHERS, **{alias: TEACHERS[name] for alias, name in TEACHER_ALIASES.items()}, **OTHER_EDM_PICKLES,
            **SID_GENERATORS}


def is_url(s: str) -> bool:
    """True for ``file://``, ``http://`` and ``https://`` URLs."""
    return urllib.parse.urlparse(s).scheme.lower() in ("file", "http", "https") and "://" in s


def resolve_source(source, *, cache_dir=None) -> tuple[Path, dict]:
    """``(local path, provenance)`` of a source (name, URL or path); provenance has ``source`` and, for names and
    URLs, ``name`` / ``url``. Registered names and URLs are downloaded into the cache."""
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"checkpoint source must be a str or path, got {type(source).__name__}")
    text = os.fspath(source)
    prov: dict[str, Any] = {"source": text}
    reg = registered_names()
    if isinstance(source, str) and (text in reg or is_url(text)):
        url = reg.get(text, text)
        prov.update({"name": text} if text in reg else {}, url=url)
        return _download_checkpoint(url, cache_dir), prov
    path = local_checkpoint(text)
    if path is not None:
        return path, prov
    hint = difflib.get_close_matches(text, list(reg), n=3)
    raise CheckpointError(
        f"checkpoint {text!r} is not an existing file or directory, a file:// or http(s):// URL, "
        f"or a registered name" + (f" (did you mean {', '.join(hint)}?)" if hint else "")
        + f". Registered names: {', '.join(sorted(reg))}")


def local_checkpoint(text: str) -> Path | None:
    """The existing file or folder ``text`` names (``~`` expanded), else the first existing file ``text`` +
    ``.safetensors`` / ``.json`` / ``.pkl``; None when there is none."""
    path = Path(text).expanduser()
    if path.exists():
        return path
    candidates = (path.with_name(path.name + suffix) for suffix in (".safetensors", ".json", ".pkl"))
    return next((c for c in candidates if c.is_file()), None)


def _download_checkpoint(url: str, cache_dir) -> Path:
    """Download a checkpoint URL. A URL to either file of our format (``.safetensors`` weights, ``.json`` sidecar)
    fetches both and keeps a copy of the sidecar beside the weights; the weights' path is returned."""
    parsed = urllib.parse.urlparse(url)
    stem, suffix = os.path.splitext(parsed.path)
    if suffix not in (".safetensors", ".json"):
        return download(url, sha256=KNOWN_SHA256.get(url), cache_dir=cache_dir)
    urls = [urllib.parse.urlunparse(parsed._replace(path=stem + ext)) for ext in (".safetensors", ".json")]
    weights, sidecar = (download(u, sha256=KNOWN_SHA256.get(u), cache_dir=cache_dir) for u in urls)
    beside = weights.with_suffix(".json")
    with cache_lock(weights):
        try:
            if not beside.is_file() or file_sha256(beside) != file_sha256(sidecar):
                atomic_copy(sidecar, beside)
        except OSError as e:
            raise DownloadError(f"cannot place the sidecar {beside} in the cache: {e}") from e
    return weights
