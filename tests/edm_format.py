"""Test-only writer of pickles in EDM's persistence format (what EDM and SiD snapshots contain).

EDM's ``torch_utils.persistence`` pickles each object of a "persistent" class as a call
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with
``meta = {'type': 'class', 'version': 6, 'module_src': <source text>, 'class_name': ..., 'state': <__dict__>}``.
``torch.nn.ModuleDict`` children are pickled natively, and tensors the way torch's own reducers
write them inside a plain ``pickle.dump`` (``_rebuild_parameter`` / ``_rebuild_tensor_v2`` around
a legacy ``torch.save`` blob passed to ``torch.storage._load_from_bytes``).

To make ``pickle`` emit the right global, a stand-in ``torch_utils.persistence`` module is put in
``sys.modules`` only for the duration of :func:`write_edm_pickle` and removed afterwards.
"""

from __future__ import annotations

import collections
import copy
import contextlib
import io
import pickle
import sys
import types
from pathlib import Path

import numpy as np
import torch

DEFAULT_MODULE_SRC = '"""Stand-in for the networks module source EDM embeds; loaders must never run it."""\n'

_PLAIN = (type(None), bool, int, float, str, np.generic)


def _plain(v) -> bool:
    if isinstance(v, _PLAIN):
        return True
    if isinstance(v, (list, tuple)):
        return all(_plain(x) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    return False


class PersistentObject:
    """Pickles as ``_reconstruct_persistent_obj(meta)``, like an instance of an EDM persistent class."""

    def __init__(self, class_name: str, state: dict, module_src: str = DEFAULT_MODULE_SRC):
        self.class_name = class_name
        self.state = state
        self.module_src = module_src

    def __reduce__(self):
        reconstruct = sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj
        meta = dict(type="class", version=6, module_src=self.module_src,
                    class_name=self.class_name, state=self.state)
        return reconstruct, (meta,)


def persistent_plain(class_name: str, attrs: dict, init_kwargs: dict | None = None,
                     module_src: str = DEFAULT_MODULE_SRC) -> PersistentObject:
    """A persistent non-module object (EDM's ``EDMLoss``, ``AugmentPipe``): attributes + ctor kwargs."""
    state = dict(attrs)
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(init_kwargs if init_kwargs is not None else attrs)
    return PersistentObject(class_name, state, module_src)


def _module_state(module: torch.nn.Module, module_src: str) -> dict:
    """The instance ``__dict__`` as EDM pickles it: torch bookkeeping + plain attributes."""
    state = {}
    for k, v in vars(module).items():
        if k == "_modules":
            state[k] = collections.OrderedDict(
                (n, None if c is None else as_persistent(c, module_src)) for n, c in v.items())
        elif k in ("_parameters", "_buffers"):
            state[k] = collections.OrderedDict(v)
        elif k == "init_kwargs":
            continue  # our own attribute; EDM records the constructor arguments as _init_kwargs
        elif k.startswith("_"):
            # Hook dicts, _non_persistent_buffers_set, _is_full_backward_hook.
            if isinstance(v, (dict, set)) and len(v) and k != "_non_persistent_buffers_set":
                raise ValueError(f"{type(module).__name__}.{k} is not empty; EDM snapshots carry no hooks")
            if isinstance(v, (dict, set, bool, type(None))):
                state[k] = v
        elif _plain(v):
            state[k] = v
    if "skip_scale" in state and isinstance(state["skip_scale"], float):
        state["skip_scale"] = np.float64(state["skip_scale"])  # EDM stores np.sqrt(0.5)
    state["_init_args"] = ()
    state["_init_kwargs"] = dict(getattr(module, "init_kwargs", {}))
    return state


def as_persistent(module: torch.nn.Module, module_src: str = DEFAULT_MODULE_SRC):
    """Mirror a module tree: ModuleDicts stay torch ModuleDicts, every other module persistent."""
    if isinstance(module, torch.nn.ModuleDict):
        out = torch.nn.ModuleDict.__new__(torch.nn.ModuleDict)
        state = dict(vars(module))
        state["_modules"] = collections.OrderedDict(
            (n, as_persistent(c, module_src)) for n, c in module._modules.items())
        out.__dict__.update(state)
        return out
    return PersistentObject(type(module).__name__, _module_state(module, module_src), module_src)


@contextlib.contextmanager
def stand_in_torch_utils():
    """Temporarily register ``torch_utils`` / ``torch_utils.persistence`` in ``sys.modules``."""
    saved = {name: sys.modules.get(name) for name in ("torch_utils", "torch_utils.persistence")}
    pkg = types.ModuleType("torch_utils")
    pkg.__path__ = []
    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise RuntimeError("stand-in used for writing only")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = persistence
    sys.modules["torch_utils"] = pkg
    sys.modules["torch_utils.persistence"] = persistence
    try:
        yield persistence
    finally:
        for name, mod in saved.items():
            if mod is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = mod


def _snapshot_value(value, module_src):
    if isinstance(value, torch.nn.Module):
        # As EDM's training loop does: a CPU copy in eval mode without gradients.
        value = copy.deepcopy(value).eval().requires_grad_(False).cpu()
        return as_persistent(value, module_src)
    return value


def write_edm_pickle(target, data: dict, *, module_src: str = DEFAULT_MODULE_SRC, protocol: int = 4) -> bytes:
    """Pickle ``data`` (modules become persistent objects) the way EDM snapshots are written.

    Args:
        target: a path to write, or None to only return the bytes.
        data: e.g. ``{'ema': net, 'loss_fn': persistent_plain('EDMLoss', ...), 'augment_pipe': None,
            'dataset_kwargs': {...}}`` or SiD's ``{'ema': net}``.
        module_src: source text embedded in every persistent object.
        protocol: pickle protocol (EDM used Python's default, 4).

    Returns the pickle bytes.
    """
    payload = {k: _snapshot_value(v, module_src) for k, v in data.items()}
    buf = io.BytesIO()
    with stand_in_torch_utils():
        pickle.dump(payload, buf, protocol=protocol)
    raw = buf.getvalue()
    if target is not None:
        Path(target).write_bytes(raw)
    return raw


def edm_snapshot(net: torch.nn.Module, **overrides) -> dict:
    """An EDM network-snapshot dict: ``ema``, ``loss_fn``, ``augment_pipe``, ``dataset_kwargs``."""
    data = {
        "ema": net,
        "loss_fn": persistent_plain("EDMLoss", {"P_mean": -1.2, "P_std": 1.2, "sigma_data": 0.5}),
        "augment_pipe": persistent_plain("AugmentPipe", {"p": 0.12, "xflip": 1e8, "yflip": 1, "scale": 1,
                                                         "rotate_frac": 1, "aniso": 1, "translate_frac": 1}),
        "dataset_kwargs": {"class_name": "training.dataset.ImageFolderDataset", "path": "datasets/tiny.zip",
                           "use_labels": False, "xflip": False, "cache": True, "resolution": 8,
                           "max_size": 50000},
    }
    data.update(overrides)
    return data


def pickle_globals(raw: bytes) -> set[str]:
    """Every global (``'module.name'``) a pickle references, found with :mod:`pickletools`.

    STACK_GLOBAL takes module and name from the two values pushed before it, which may come from
    the memo, so memoised strings are tracked.
    """
    import pickletools

    memo, pushed, found = {}, [], set()
    for op, arg, _ in pickletools.genops(raw):
        name = op.name
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
                    "BINSTRING", "SHORT_BINSTRING"):
            pushed.append(arg)
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif name == "STACK_GLOBAL":
            found.add(f"{pushed[-2]}.{pushed[-1]}")
            pushed.append(None)
        elif name in ("GLOBAL", "INST"):
            found.add(arg.replace(" ", "."))
            pushed.append(None)
        else:
            pushed.append(None)
    return found


def bytes_args(raw: bytes) -> list[bytes]:
    """The bytes literals of a pickle (the storage blobs, for a network pickle)."""
    import pickletools

    return [arg for op, arg, _ in pickletools.genops(raw)
            if op.name in ("BINBYTES", "SHORT_BINBYTES", "BINBYTES8")]
