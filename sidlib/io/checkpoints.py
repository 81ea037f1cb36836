"""Load EDM teachers, released SiD generators and our own checkpoints into sidlib networks.

Sources: a registered name or URL (:mod:`sidlib.io.registry`, downloaded once); an EDM/SiD network pickle, read by
:mod:`sidlib.io.edm_pickle` without running its code; our ``<name>.safetensors`` + ``<name>.json`` (either file, or
``<name>``); or a directory holding one (``network.safetensors`` preferred). The stored kwargs are first checked
against the stored tensors on the meta device (a build registering far more tensors than stored is abandoned), then
the network is built and loaded strictly.

Our format (``FORMAT``): safetensors weights (metadata ``{'format': FORMAT}`` only, so identical weights give
identical bytes) and a JSON sidecar ``{"format", "class_name", "init_kwargs", "meta", "weights", "weights_sha256",
"num_tensors"}``, written atomically, the sidecar last."""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import re
import threading
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.modules import module as _torch_module

from .. import networks
from .atomic import atomic_path
from .download import _read_record, file_sha256
from .edm_pickle import CheckpointError, PersistentRecord, TensorInfo, UnsafePickleError, read_edm_pickle, short_repr
from .edm_records import network_from_record, plain_value
from .jsonio import to_jsonable, write_json
from .registry import (OTHER_EDM_PICKLES, SID_GENERATOR_INFO, SID_GENERATORS, TEACHER_ALIASES, TEACHERS,
                       resolve_source)

__all__ = ["load_network", "load_checkpoint", "save_network", "read_network_meta", "resolve_source",
           "effective_kwargs", "TEACHERS", "TEACHER_ALIASES", "OTHER_EDM_PICKLES", "SID_GENERATORS",
           "SID_GENERATOR_INFO", "FORMAT", "CheckpointError", "UnsafePickleError"]

FORMAT = "sidlib-network/1"
#: Largest sidecar read (ours are a few kB).
MAX_SIDECAR_BYTES = 1 << 24
#: Networks with this many stored elements take the loaded tensors on a meta-device build; smaller ones are built
#: on the CPU (cheaper).
META_BUILD_MIN_ELEMENTS = 5_000_000


def _pick_latest(files: list[Path], what: str, directory: Path) -> Path:
    numbered = sorted((int(m.group(1)), f) for f in files
                      if f.stem.startswith("network-snapshot") and (m := re.search(r"(\d+)$", f.stem)))
    if len(files) == 1 or (len(numbered) == len(files) and len({n for n, _ in numbered}) == len(files)):
        return numbered[-1][1] if len(files) > 1 else files[0]
    raise CheckpointError(f"{directory} holds several {what} checkpoints and none is named "
                          f"network.*: {', '.join(f.name for f in files)}; pass the file itself")


def _locate(path: Path) -> tuple[str, Path]:
    """``('sidlib', weights_path)`` or ``('pickle', pkl_path)`` for a local file or directory."""
    if path.is_dir():
        if (path / "network.safetensors").is_file():
            return "sidlib", path / "network.safetensors"
        ours = sorted(p for p in path.glob("*.safetensors") if p.with_suffix(".json").is_file())
        pickles = sorted(path.glob("*.pkl"))
        if ours or pickles:
            return ("sidlib", _pick_latest(ours, "safetensors", path)) if ours else (
                "pickle", _pick_latest(pickles, "pickle", path))
        raise CheckpointError(f"directory {path} holds no network checkpoint (*.safetensors with a .json sidecar, "
                              "or *.pkl)")
    if path.suffix in (".json", ".safetensors"):
        return "sidlib", path.with_suffix(".safetensors")
    with open(path, "rb") as f:
        if f.read(4) == b"PK\x03\x04":
            raise CheckpointError(f"{path} is a torch.save archive (e.g. a SiD training state), not a network "
                                  "snapshot; load network-snapshot-*.pkl files instead")
    return "pickle", path  # the restricted reader refuses whatever is not a network pickle


def _read_sidecar(json_path: Path) -> dict:
    try:
        if json_path.stat().st_size > MAX_SIDECAR_BYTES:
            raise CheckpointError(f"sidecar {json_path} is larger than {MAX_SIDECAR_BYTES} bytes")
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing sidecar {json_path} (it holds the architecture of "
                              f"{json_path.with_suffix('.safetensors').name})") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"sidecar {json_path} is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = short_repr(doc.get("format") if isinstance(doc, dict) else type(doc).__name__)
        raise CheckpointError(f"{json_path} is not a {FORMAT} sidecar (format: {found})")
    if not isinstance(doc.get("class_name"), str) or not isinstance(doc.get("init_kwargs"), dict) or not isinstance(
            doc.get("meta", {}), dict):
        raise CheckpointError(f"{json_path} lacks class_name/init_kwargs, or its meta is not an object")
    return doc


def _read_sidlib(weights: Path, load_tensors: bool) -> tuple[str, dict, dict, dict, str | None]:
    doc = _read_sidecar(weights.with_suffix(".json"))
    if not weights.is_file():
        raise CheckpointError(f"missing weights file {weights} for sidecar {weights.with_suffix('.json')}")
    recorded = doc.get("weights_sha256")
    if load_tensors and recorded is not None and file_sha256(weights) != recorded:
        raise CheckpointError(f"{weights} does not match the sha256 recorded in its sidecar "
                              f"{weights.with_suffix('.json').name}; the pair is inconsistent")
    try:
        if load_tensors:
            sd = load_file(str(weights), device="cpu")
        else:
            with safe_open(str(weights), framework="pt") as f:
                sd = {k: TensorInfo(tuple(f.get_slice(k).get_shape()), None) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {str(e)[:200]}") from None
    return doc["class_name"], doc["init_kwargs"], sd, doc.get("meta", {}), recorded


_SID_SNAPSHOT_NAME = re.compile(r"network-snapshot-(\d+\.\d+)-(\d+)\.pkl$")


def _read_pickle(path: Path, load_tensors: bool, prov: dict) -> tuple[str, dict, dict, dict, str]:
    data = read_edm_pickle(path, load_tensors=load_tensors)
    if "ema" not in data:
        raise CheckpointError(f"{path} has no 'ema' network (top-level keys: {short_repr(sorted(data))})")
    try:
        class_name, init_kwargs, sd = network_from_record(data["ema"])
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    meta: dict[str, Any] = {}
    if info := SID_GENERATOR_INFO.get(prov.get("name")):
        meta.update({k: info[k] for k in ("alpha", "kimg", "images_seen", "init_sigma", "teacher")})
    elif m := _SID_SNAPSHOT_NAME.search(path.name) or _SID_SNAPSHOT_NAME.search(prov.get("url", "")):
        meta.update(alpha=float(m.group(1)), kimg=int(m.group(2)), images_seen=int(m.group(2)) * 1000)
    sha = _read_record(path) or file_sha256(path)
    kind = "edm-network-snapshot" if {"loss_fn", "augment_pipe", "dataset_kwargs"} & set(data) else "sid-snapshot"
    prov = {**prov, "path": str(path), "format": "edm-pickle", "sha256": sha, "kind": kind}
    for key in ("loss_fn", "augment_pipe"):
        rec = data.get(key)
        if isinstance(rec, PersistentRecord):
            # Informational only: an exotic value here must not block loading the network.
            with contextlib.suppress(CheckpointError, AttributeError):
                prov[key] = {"class_name": rec.class_name,
                             "init_kwargs": plain_value(rec.state.get("_init_kwargs") or {}, key)}
    if isinstance(data.get("dataset_kwargs"), Mapping):
        with contextlib.suppress(CheckpointError):
            prov["dataset_kwargs"] = plain_value(data["dataset_kwargs"], "dataset_kwargs")
    meta["provenance"] = {**prov, "module_src_sha256": data["ema"].module_src_sha256}
    return class_name, init_kwargs, sd, meta, sha


def _read(source, cache_dir, load_tensors: bool):
    """``(class_name, init_kwargs, state_dict, meta, weights sha256 as recorded or None, file, kind)``."""
    path, prov = resolve_source(source, cache_dir=cache_dir)
    try:
        kind, file = _locate(path)
        read = _read_sidlib(file, load_tensors) if kind == "sidlib" else _read_pickle(file, load_tensors, prov)
        return *read, file, kind
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


def _defaults(fn, skip=()) -> dict:
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.name not in skip and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.default is not p.empty}


def effective_kwargs(class_name: str, init_kwargs: Mapping) -> dict:
    """Constructor kwargs with the wrapper's and inner model's defaults filled in (e.g. ``sigma_data`` 0.5 for an
    EDM pickle that does not store it); what an ``expected_kwargs`` check compares against."""
    eff = _defaults(networks.PRECOND_TYPES[class_name])
    model_cls = networks.MODEL_TYPES.get(init_kwargs.get("model_type", eff.get("model_type")))
    if model_cls is not None:  # the wrapper supplies these to the inner network itself
        eff = {**_defaults(model_cls, {"self", "img_resolution", "in_channels", "out_channels", "label_dim"}), **eff}
    eff.update(init_kwargs)
    return plain_value(eff, "init_kwargs")


def _check_expected(class_name: str, init_kwargs: Mapping, expected: Mapping, where: str) -> None:
    eff = effective_kwargs(class_name, init_kwargs)
    diffs = []
    for key, want in plain_value(dict(expected), "expected_kwargs").items():
        if key not in eff:
            diffs.append((key, f"expected {short_repr(want)}, the checkpoint's {class_name} has no such argument"))
        elif not (eff[key] == want or isinstance(want, float) and isinstance(eff[key], float)
                  and math.isnan(want) and math.isnan(eff[key])):
            diffs.append((key, f"expected {short_repr(want)}, checkpoint has {short_repr(eff[key])}"))
    if diffs:
        raise CheckpointError(f"architecture of {where} differs from the expected kwargs in "
                              f"{', '.join(k for k, _ in diffs)} ({'; '.join(f'{k}: {m}' for k, m in diffs)})")


def _listing(keys, limit: int = 20) -> str:
    keys = list(keys)
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


class _ScalarsOnCPU(torch.overrides.TorchFunctionMode):
    """Inside ``torch.device('meta')``: 0-d tensors made from Python numbers are made on the CPU, so a constructor
    can read them back (VPPrecond computes its sigma range with ``float``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if (isinstance(out, torch.Tensor) and out.is_meta and out.dim() == 0 and kwargs.get("device") is None
                and not any(isinstance(a, torch.Tensor) for a in args)):
            out = func(*args, **{**kwargs, "device": "cpu"})
        return out


_REFERENCES: dict[str, dict] = {}


def _reference(class_name: str, init_kwargs: dict, stored: int, where: str) -> dict:
    """``{key: (shape, dtype)}`` of ``class_name(**init_kwargs)``'s state_dict, built on the meta device (nothing
    allocated) and abandoned once it registers more modules and tensors than ``stored`` tensors could fill."""
    key = json.dumps([class_name, init_kwargs], sort_keys=True)
    if key in _REFERENCES:
        return _REFERENCES[key]
    count, limit, me = [0], 3 * stored + 64, threading.get_ident()

    def hook(*args):
        count[0] += threading.get_ident() == me
        if count[0] > limit:
            raise CheckpointError(f"the kwargs stored in {where} describe a {class_name} with far more modules and "
                                  f"tensors than the {stored} tensors stored; refused before allocating it")

    handles = [reg(hook) for reg in (_torch_module.register_module_module_registration_hook,
                                     _torch_module.register_module_parameter_registration_hook,
                                     _torch_module.register_module_buffer_registration_hook)]
    try:
        with torch.device("meta"), _ScalarsOnCPU():
            net = networks.build_network(class_name, init_kwargs)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"cannot build {class_name} from the kwargs stored in {where}: "
                              f"{type(e).__name__}: {str(e)[:300]}") from None
    finally:
        for h in handles:
            h.remove()
    if len(_REFERENCES) >= 16:
        _REFERENCES.pop(next(iter(_REFERENCES)))
    _REFERENCES[key] = {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}
    return _REFERENCES[key]


def _build(class_name: str, init_kwargs: dict, sd: Mapping, where: str) -> torch.nn.Module:
    if class_name not in networks.PRECOND_TYPES:
        raise CheckpointError(f"{where} holds a {short_repr(class_name)}; supported network classes: "
                              f"{', '.join(sorted(networks.PRECOND_TYPES))}")
    with torch.random.fork_rng(devices=[]):  # building initialises weights randomly; keep the caller's RNG
        ref = _reference(class_name, init_kwargs, len(sd), where)
        missing, unexpected = [k for k in ref if k not in sd], [k for k in sd if k not in ref]
        shapes = [f"{k} (checkpoint {list(sd[k].shape)}, network {list(ref[k][0])})"
                  for k in ref if k in sd and tuple(sd[k].shape) != ref[k][0]]
        if missing or unexpected or shapes:
            parts = [f"{what}: {_listing(keys)}" for what, keys in (("missing from the checkpoint", missing),
                     ("not in the network", unexpected), ("shape mismatches", shapes)) if keys]
            raise CheckpointError(f"weights in {where} do not match {class_name}(**init_kwargs) built from its "
                                  f"stored constructor kwargs; " + "; ".join(parts))
        cast = {k: v.to(ref[k][1]) if v.is_floating_point() else v for k, v in sd.items()}
        net = None
        if sum(v.numel() for v in sd.values()) >= META_BUILD_MIN_ELEMENTS:
            with torch.device("meta"), _ScalarsOnCPU():
                net = networks.build_network(class_name, init_kwargs)
            net.load_state_dict(cast, strict=True, assign=True)
            # A tensor outside the state_dict (a non-persistent buffer, a plain attribute) is left on meta: rebuild.
            tensors = [*net.parameters(), *net.buffers(), *(v for m in net.modules() for v in vars(m).values())]
            net = None if any(isinstance(t, torch.Tensor) and t.is_meta for t in tensors) else net
        if net is None:  # the shapes match the stored tensors now, so this allocates what the file holds
            try:
                net = networks.build_network(class_name, init_kwargs)
            except Exception as e:
                raise CheckpointError(f"cannot build {class_name} from {where}: {str(e)[:300]}") from None
            net.load_state_dict(cast, strict=True)
    return net.eval()


def load_network(source, *, cache_dir=None, expected_kwargs: Mapping | None = None) -> torch.nn.Module:
    """A network (any source above) in eval mode on the CPU, ``net(x [N,C,R,R], sigma, class_labels=None, ...)``;
    ``expected_kwargs``: constructor kwargs it must have. Raises :class:`CheckpointError` (or its subclasses)."""
    return load_checkpoint(source, cache_dir=cache_dir, expected_kwargs=expected_kwargs)[0]


def load_checkpoint(path, *, cache_dir=None, expected_kwargs: Mapping | None = None):
    """``(net, meta)``; ``meta`` is what :func:`save_network` stored (for pickles: alpha/kimg/init_sigma where
    known, and ``provenance``). Accepts every :func:`load_network` source."""
    class_name, init_kwargs, sd, meta, _, file, _ = _read(path, cache_dir, load_tensors=True)
    if expected_kwargs is not None and class_name in networks.PRECOND_TYPES:
        _check_expected(class_name, init_kwargs, expected_kwargs, str(file))
    return _build(class_name, init_kwargs, sd, str(file)), meta


def read_network_meta(source, *, cache_dir=None) -> dict:
    """``{'format', 'class_name', 'init_kwargs', 'meta', 'path', 'num_tensors', 'num_elements', 'sha256'}`` of a
    checkpoint, without building the network; ``format`` is ``'sidlib-network/1'`` or ``'edm-pickle'``; ``sha256``
    identifies the weights wherever the file lies (ours: the weights file's, from the sidecar; a pickle: the file's)."""
    class_name, init_kwargs, sd, meta, sha, file, kind = _read(source, cache_dir, load_tensors=False)
    return {"format": FORMAT if kind == "sidlib" else "edm-pickle", "class_name": class_name,
            "init_kwargs": init_kwargs, "meta": meta, "path": str(file), "num_tensors": len(sd),
            "num_elements": sum(math.prod(v.shape) for v in sd.values()),
            "sha256": sha or file_sha256(file)}


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    # DistributedDataParallel / DataParallel keep the network in .module; torch.compile in ._orig_mod.
    parallel = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(net, parallel) or isinstance(getattr(net, "_orig_mod", None), torch.nn.Module):
        net = net.module if isinstance(net, parallel) else net._orig_mod
    return net


def save_network(path, net: torch.nn.Module, meta: Mapping | None = None) -> Path:
    """Write ``<path>.safetensors`` and ``<path>.json`` of a sidlib network (DDP/compiled wrappers unwrapped) with
    JSON-able ``meta`` (``init_sigma``, ``alpha``, ``kimg``, ``images_seen``, ``provenance``); returns the weights."""
    net = _unwrap(net)
    class_name = type(net).__name__
    if class_name not in networks.PRECOND_TYPES or not isinstance(getattr(net, "init_kwargs", None), dict):
        raise CheckpointError(f"save_network needs a sidlib network with init_kwargs "
                              f"({', '.join(sorted(networks.PRECOND_TYPES))}), got {class_name}")
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    weights, sidecar = base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")
    try:
        doc_meta = to_jsonable(dict(meta or {}))
    except TypeError as e:
        raise CheckpointError(f"cannot store meta in JSON: {e}") from None
    tensors, seen = {}, set()
    for k, v in net.state_dict().items():
        v = v.detach().to("cpu").contiguous()
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        tensors[k] = v.clone() if v.numel() and key in seen else v  # safetensors refuses tensors sharing memory
        seen.add(key)
    with atomic_path(weights) as tmp:
        # One metadata key: safetensors writes metadata in hash order, which differs between processes.
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
        digest = file_sha256(tmp)
    write_json(sidecar, {"format": FORMAT, "class_name": class_name, "init_kwargs": net.init_kwargs, "meta": doc_meta,
                         "weights": weights.name, "weights_sha256": digest, "num_tensors": len(tensors)})
    return weights
