"""Load EDM teachers, released SiD generators and our own checkpoints into sidlib networks.

Sources accepted by :func:`load_network`, :func:`load_checkpoint` and :func:`read_network_meta`:

* a registered name: the EDM teachers in :data:`TEACHERS` (also under SiD's short keys in
  :data:`TEACHER_ALIASES`), the other public EDM-preconditioned EDM pickles in
  :data:`OTHER_EDM_PICKLES`, and the released SiD generators in :data:`SID_GENERATORS` (all in
  :mod:`sidlib.io.registry`);
* a ``file://``, ``http://`` or ``https://`` URL (downloaded once into the cache, see :mod:`sidlib.io.download`);
* a local EDM/SiD network pickle (``.pkl``: a dict with ``'ema'``, plus ``'loss_fn'``,
  ``'augment_pipe'``, ``'dataset_kwargs'`` for EDM snapshots), read with the restricted
  unpickler of :mod:`sidlib.io.edm_pickle` -- code embedded in the pickle is never run;
* our own format: ``<name>.safetensors`` + ``<name>.json`` (give either file or ``<name>``);
* a directory holding one of the above (``network.safetensors`` preferred).

The network is rebuilt from its stored constructor kwargs with
:func:`sidlib.networks.build_network` and its weights are loaded strictly: every key and every
shape must match, otherwise :class:`CheckpointError` names the offending keys.

Our format (``FORMAT = 'sidlib-network/1'``): weights in safetensors, and a JSON sidecar::

    {"format": "sidlib-network/1", "class_name": "EDMPrecond", "init_kwargs": {...},
     "meta": {"init_sigma": 2.5, "alpha": 1.2, "kimg": ..., "provenance": {...}, ...},
     "weights": "<name>.safetensors", "weights_sha256": "...", "num_tensors": N}

Both files are written atomically (weights first; the sidecar, which records the weights' sha256,
last), and loading checks that the sidecar's digest matches the weights file.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from .. import networks
from .atomic import atomic_path, atomic_write_text
from .download import file_sha256
from .jsonio import to_jsonable
from .edm_pickle import (CheckpointError, PersistentRecord, TensorInfo, UnsafePickleError, network_from_record,
                         plain_value, read_edm_pickle)
from .registry import (OTHER_EDM_PICKLES, SID_GENERATOR_INFO, SID_GENERATORS, TEACHER_ALIASES, TEACHERS,
                       resolve_source)

__all__ = [
    "load_network", "load_checkpoint", "save_network", "read_network_meta", "resolve_source", "effective_kwargs",
    "TEACHERS", "TEACHER_ALIASES", "OTHER_EDM_PICKLES", "SID_GENERATORS", "SID_GENERATOR_INFO", "FORMAT",
    "CheckpointError", "UnsafePickleError",
]

FORMAT = "sidlib-network/1"

_SNAPSHOT_NUMBER = re.compile(r"(\d+)$")


def _pick_latest(files: list[Path], what: str, directory: Path) -> Path:
    if len(files) == 1:
        return files[0]
    numbered = []
    for f in files:
        m = _SNAPSHOT_NUMBER.search(f.stem)
        if m is None or not f.stem.startswith("network-snapshot"):
            break
        numbered.append((int(m.group(1)), f))
    else:
        numbered.sort()
        if len({n for n, _ in numbered}) == len(numbered):
            return numbered[-1][1]
    raise CheckpointError(f"{directory} holds several {what} checkpoints and none is named "
                          f"network.*: {', '.join(f.name for f in files)}; pass the file itself")


def _locate(path: Path) -> tuple[str, Path]:
    """``('sidlib', weights_path)`` or ``('pickle', pkl_path)`` for a local file or directory."""
    if path.is_dir():
        if (path / "network.safetensors").is_file():
            return "sidlib", path / "network.safetensors"
        ours = sorted(p for p in path.glob("*.safetensors") if p.with_suffix(".json").is_file())
        if ours:
            return "sidlib", _pick_latest(ours, "safetensors", path)
        pickles = sorted(path.glob("*.pkl"))
        if pickles:
            return "pickle", _pick_latest(pickles, "pickle", path)
        raise CheckpointError(f"directory {path} holds no network checkpoint "
                              "(*.safetensors with a .json sidecar, or *.pkl)")
    if path.suffix == ".json":
        return "sidlib", path.with_suffix(".safetensors")
    if path.suffix == ".safetensors":
        return "sidlib", path
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":
        raise CheckpointError(f"{path} is a torch.save archive (e.g. a SiD training state), not a "
                              "network snapshot; load network-snapshot-*.pkl files instead")
    # Anything else is read as a network pickle; the restricted reader refuses what is not one.
    return "pickle", path


# ---------------------------------------------------------------------------------------------
# Reading.


def _read_sidecar(json_path: Path) -> dict:
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing sidecar {json_path} (it holds the architecture of "
                              f"{json_path.with_suffix('.safetensors').name})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"sidecar {json_path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise CheckpointError(f"{json_path} is not a {FORMAT} sidecar (format: {found!r})")
    if not isinstance(doc.get("class_name"), str) or not isinstance(doc.get("init_kwargs"), dict):
        raise CheckpointError(f"{json_path} lacks class_name/init_kwargs")
    if not isinstance(doc.get("meta", {}), dict):
        raise CheckpointError(f"{json_path}: meta must be an object")
    return doc


def _safetensors_shapes(weights: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from e


def _read_sidlib(weights: Path, load_tensors: bool) -> tuple[str, dict, dict, dict]:
    doc = _read_sidecar(weights.with_suffix(".json"))
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights} for sidecar {weights.with_suffix('.json')}")
    recorded = doc.get("weights_sha256")
    if load_tensors:
        if recorded is not None and file_sha256(weights) != recorded:
            raise CheckpointError(f"{weights} does not match the sha256 recorded in its sidecar "
                                  f"{weights.with_suffix('.json').name}; the pair is inconsistent")
        from safetensors.torch import load_file

        try:
            sd = load_file(str(weights), device="cpu")
        except Exception as e:
            raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from e
    else:
        sd = {k: TensorInfo(shape, None) for k, shape in _safetensors_shapes(weights).items()}
    info = {"format": FORMAT, "weights_sha256": recorded}
    return doc["class_name"], doc["init_kwargs"], sd, {"meta": doc.get("meta", {}), "info": info}


_SID_SNAPSHOT_NAME = re.compile(r"network-snapshot-(\d+\.\d+)-(\d+)\.pkl$")


def _read_pickle(path: Path, load_tensors: bool, prov: dict) -> tuple[str, dict, dict, dict]:
    data = read_edm_pickle(path, load_tensors=load_tensors)
    if "ema" not in data:
        raise CheckpointError(f"{path} has no 'ema' network (top-level keys: {sorted(map(str, data))})")
    class_name, init_kwargs, sd = network_from_record(data["ema"])
    meta: dict[str, Any] = {}
    name = prov.get("name")
    if name in SID_GENERATOR_INFO:
        info = SID_GENERATOR_INFO[name]
        meta.update({k: info[k] for k in ("alpha", "kimg", "images_seen", "init_sigma", "teacher")})
    else:
        m = _SID_SNAPSHOT_NAME.search(path.name) or _SID_SNAPSHOT_NAME.search(prov.get("url", ""))
        if m:
            meta.update(alpha=float(m.group(1)), kimg=int(m.group(2)), images_seen=int(m.group(2)) * 1000)
    kind = "edm-network-snapshot" if {"loss_fn", "augment_pipe", "dataset_kwargs"} & set(data) else "sid-snapshot"
    extra: dict[str, Any] = {"kind": kind}
    for key in ("loss_fn", "augment_pipe"):
        rec = data.get(key)
        if isinstance(rec, PersistentRecord):
            # Informational only: an exotic value here must not block loading the network.
            with contextlib.suppress(CheckpointError, AttributeError):
                extra[key] = {"class_name": rec.class_name,
                              "init_kwargs": plain_value(rec.state.get("_init_kwargs") or {}, key)}
    if isinstance(data.get("dataset_kwargs"), Mapping):
        with contextlib.suppress(CheckpointError):
            extra["dataset_kwargs"] = plain_value(data["dataset_kwargs"], "dataset_kwargs")
    extra["module_src_sha256"] = data["ema"].module_src_sha256
    return class_name, init_kwargs, sd, {"meta": meta, "info": extra}


def _read(source, cache_dir, load_tensors: bool):
    path, prov = resolve_source(source, cache_dir=cache_dir)
    kind, file = _locate(path)
    if kind == "sidlib":
        class_name, init_kwargs, sd, parts = _read_sidlib(file, load_tensors)
        meta = parts["meta"]
    else:
        class_name, init_kwargs, sd, parts = _read_pickle(file, load_tensors, prov)
        meta = parts["meta"]
        digest = _cached_sha256(file) or file_sha256(file)
        meta["provenance"] = {**prov, "path": str(file), "format": "edm-pickle", "sha256": digest,
                              **parts["info"]}
    return class_name, init_kwargs, sd, meta, file, kind


def _cached_sha256(path: Path) -> str | None:
    record = path.with_name(path.name + ".sha256")
    with contextlib.suppress(OSError, IndexError):
        return record.read_text(encoding="utf-8").split()[0]
    return None


# ---------------------------------------------------------------------------------------------
# Building and strict loading.


def _defaults(fn, skip=()) -> dict:
    out = {}
    for p in inspect.signature(fn).parameters.values():
        if p.name in skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or p.default is p.empty:
            continue
        out[p.name] = p.default
    return out


def effective_kwargs(class_name: str, init_kwargs: Mapping) -> dict:
    """Constructor kwargs with the wrapper's and inner model's defaults filled in.

    E.g. an EDM pickle that does not store ``sigma_data`` has the default 0.5; this is what an
    ``expected_kwargs`` check compares against.
    """
    cls = networks.PRECOND_TYPES[class_name]
    eff = _defaults(cls)
    model_type = init_kwargs.get("model_type", eff.get("model_type"))
    model_cls = networks.MODEL_TYPES.get(model_type)
    if model_cls is not None:
        # The wrapper supplies these to the inner network itself.
        skip = {"self", "img_resolution", "in_channels", "out_channels", "label_dim"}
        eff = {**_defaults(model_cls, skip), **eff}
    eff.update(init_kwargs)
    return plain_value(eff, "init_kwargs")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def _check_expected(class_name: str, init_kwargs: Mapping, expected: Mapping, where: str) -> None:
    eff = effective_kwargs(class_name, init_kwargs)
    expected = plain_value(dict(expected), "expected_kwargs")
    diffs = []
    for key, want in expected.items():
        if key not in eff:
            diffs.append((key, f"expected {want!r}, the checkpoint's {class_name} has no such argument"))
        elif not _same(eff[key], want):
            diffs.append((key, f"expected {want!r}, checkpoint has {eff[key]!r}"))
    if diffs:
        detail = "; ".join(f"{k}: {msg}" for k, msg in diffs)
        raise CheckpointError(f"architecture of {where} differs from the expected kwargs in "
                              f"{', '.join(k for k, _ in diffs)} ({detail})")


def _listing(keys, limit: int = 20) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _check_strict(reference: Mapping, loaded: Mapping, class_name: str, where: str) -> None:
    missing = [k for k in reference if k not in loaded]
    unexpected = [k for k in loaded if k not in reference]
    shapes = [f"{k} (checkpoint {list(loaded[k].shape)}, network {list(reference[k].shape)})"
              for k in reference if k in loaded and tuple(loaded[k].shape) != tuple(reference[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing from the checkpoint: {_listing(missing)}")
        if unexpected:
            parts.append(f"not in the network: {_listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_listing(shapes)}")
        raise CheckpointError(f"weights in {where} do not match {class_name}(**init_kwargs) built from "
                              f"its stored constructor kwargs; " + "; ".join(parts))


def _meta_tensors_left(net: torch.nn.Module) -> bool:
    for t in list(net.parameters()) + list(net.buffers()):
        if t.is_meta:
            return True
    for m in net.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and v.is_meta:
                return True
    return False


def _check_class(class_name: str, where: str) -> None:
    if class_name not in networks.PRECOND_TYPES:
        raise CheckpointError(f"{where} holds a {class_name}; supported network classes: "
                              f"{', '.join(sorted(networks.PRECOND_TYPES))}")


def _construct(class_name: str, init_kwargs: dict, where: str) -> torch.nn.Module:
    try:
        return networks.build_network(class_name, init_kwargs)
    except Exception as e:
        raise CheckpointError(f"cannot build {class_name} from the kwargs stored in {where}: "
                              f"{type(e).__name__}: {e}") from e


#: Networks with at least this many stored elements are built on the meta device (no random
#: init, no second copy of the weights in memory) and then take the loaded tensors. Below it a
#: plain CPU build is cheaper than the one-time start-up cost of meta-device tracing.
META_BUILD_MIN_ELEMENTS = 5_000_000


def _build(class_name: str, init_kwargs: dict, sd: Mapping, where: str) -> torch.nn.Module:
    _check_class(class_name, where)
    net = None
    # Building initialises weights randomly; keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        if sum(v.numel() for v in sd.values()) >= META_BUILD_MIN_ELEMENTS:
            try:
                # Falls back to a CPU build below if a constructor needs real data, or leaves
                # tensors that the state_dict does not cover.
                with torch.device("meta"):
                    net = networks.build_network(class_name, init_kwargs)
            except Exception:
                net = None
        cpu_net = None if net is not None else _construct(class_name, init_kwargs, where)
        reference = (net if net is not None else cpu_net).state_dict()
        _check_strict(reference, sd, class_name, where)
        cast = {k: v.to(reference[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
        if net is not None:
            net.load_state_dict(cast, strict=True, assign=True)
            if _meta_tensors_left(net):
                net = None
        if net is None:
            net = cpu_net if cpu_net is not None else _construct(class_name, init_kwargs, where)
            net.load_state_dict(cast, strict=True)
    return net.eval()


def load_network(source, *, cache_dir=None, expected_kwargs: Mapping | None = None) -> torch.nn.Module:
    """Load a network (EDM teacher, SiD generator or sidlib checkpoint) in eval mode on the CPU.

    Args:
        source: registered name, ``file://``/``http(s)://`` URL, ``.pkl`` / ``.safetensors`` /
            ``.json`` file, ``<name>`` of a ``<name>.safetensors`` pair, or a directory.
        cache_dir: download cache root (default ``$SIDLIB_CACHE`` or ``~/.cache/sidlib``).
        expected_kwargs: constructor kwargs the checkpoint must have (e.g. a preset's
            architecture); compared after filling in constructor defaults.

    Returns:
        The ``EDMPrecond``-compatible module (fp32 weights, ``requires_grad`` left on), callable as
        ``net(x [N,C,R,R], sigma, class_labels=None, augment_labels=None) -> [N,C,R,R]``.

    Raises:
        UnsafePickleError: the pickle references a global outside the allow-list.
        CheckpointError: unreadable file, architecture mismatch, or weights not matching strictly.
    """
    return _load(source, cache_dir, expected_kwargs)[0]


def _load(source, cache_dir, expected_kwargs):
    class_name, init_kwargs, sd, meta, file, _ = _read(source, cache_dir, load_tensors=True)
    _check_class(class_name, str(file))
    if expected_kwargs is not None:
        _check_expected(class_name, init_kwargs, expected_kwargs, str(file))
    return _build(class_name, init_kwargs, sd, str(file)), meta


def load_checkpoint(path, *, cache_dir=None, expected_kwargs: Mapping | None = None):
    """Load ``(net, meta)``; ``meta`` is the dict saved by :func:`save_network` (for pickles:
    alpha/kimg/init_sigma where known, and ``provenance``). Accepts every :func:`load_network` source.
    """
    return _load(path, cache_dir, expected_kwargs)


def read_network_meta(source, *, cache_dir=None) -> dict:
    """Architecture and metadata of a checkpoint without building the network.

    Returns ``{'format', 'class_name', 'init_kwargs', 'meta', 'path', 'num_tensors',
    'num_elements'}``; ``format`` is ``'sidlib-network/1'`` or ``'edm-pickle'``.
    """
    class_name, init_kwargs, sd, meta, file, kind = _read(source, cache_dir, load_tensors=False)
    return {
        "format": FORMAT if kind == "sidlib" else "edm-pickle",
        "class_name": class_name,
        "init_kwargs": init_kwargs,
        "meta": meta,
        "path": str(file),
        "num_tensors": len(sd),
        "num_elements": int(sum(np.prod(v.shape, dtype=np.int64) for v in sd.values())),
    }


# ---------------------------------------------------------------------------------------------
# Writing.


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    # DistributedDataParallel / DataParallel keep the network in .module; torch.compile in ._orig_mod.
    while True:
        if isinstance(net, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            net = net.module
        elif hasattr(net, "_orig_mod") and isinstance(net._orig_mod, torch.nn.Module):
            net = net._orig_mod
        else:
            return net


def _stem(path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (".safetensors", ".json") else path


def save_network(path, net: torch.nn.Module, meta: Mapping | None = None) -> Path:
    """Write ``<path>.safetensors`` (weights) and ``<path>.json`` (architecture + meta), atomically.

    Args:
        path: target without suffix, or ending in ``.safetensors``.
        net: a sidlib preconditioned network (has ``init_kwargs``); DDP/compiled wrappers are unwrapped.
        meta: JSON-able metadata, conventionally ``init_sigma``, ``alpha``, ``kimg`` /
            ``images_seen`` and ``provenance``; tuples become lists, numpy scalars Python numbers.

    Returns the path of the ``.safetensors`` file.
    """
    from safetensors.torch import save_file

    net = _unwrap(net)
    class_name = type(net).__name__
    if class_name not in networks.PRECOND_TYPES or not isinstance(getattr(net, "init_kwargs", None), dict):
        raise CheckpointError(f"save_network needs a sidlib network with init_kwargs "
                              f"({', '.join(sorted(networks.PRECOND_TYPES))}), got {class_name}")
    base = _stem(path)
    weights = base.with_name(base.name + ".safetensors")
    sidecar = base.with_name(base.name + ".json")
    try:
        doc_meta = to_jsonable(dict(meta or {}))
    except TypeError as e:
        raise CheckpointError(f"cannot store meta in JSON: {e}") from None
    init_kwargs = to_jsonable(dict(net.init_kwargs))

    tensors, seen = {}, set()
    for k, v in net.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share memory; copy the rare aliased ones.
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if v.numel() and key in seen:
            v = v.clone()
        seen.add(key)
        tensors[k] = v
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "class_name": class_name})
        digest = file_sha256(tmp)
    doc = {
        "format": FORMAT,
        "class_name": class_name,
        "init_kwargs": init_kwargs,
        "meta": doc_meta,
        "weights": weights.name,
        "weights_sha256": digest,
        "num_tensors": len(tensors),
    }
    atomic_write_text(sidecar, json.dumps(doc, indent=2) + "\n")
    return weights
