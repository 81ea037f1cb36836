"""The inert records of an EDM / SiD pickle (:mod:`sidlib.io.edm_pickle`) -> a network's class name, constructor
kwargs and state_dict, as EDM's ``torch_utils/persistence.py`` would rebuild it, without running its stored source."""

from __future__ import annotations

import collections
from typing import Any, Mapping

import numpy as np
import torch

from .edm_pickle import MAX_DEPTH, CheckpointError, ModuleDictRecord, PersistentRecord, TensorInfo, short_repr

__all__ = ["network_from_record", "state_dict_from_record", "plain_value"]

#: Most characters in a network's state_dict keys; most values plus characters in plain (kwargs) data.
MAX_KEY_CHARS, MAX_PLAIN = 1 << 24, 1 << 20


def state_dict_from_record(record, prefix: str = "") -> "collections.OrderedDict[str, Any]":
    """Flatten a module record tree as ``torch.nn.Module.state_dict`` does (parameters, persistent buffers, then
    children under ``'<child>.'``); a module or tensor may appear only once (EDM's never share them)."""
    out, seen, chars = collections.OrderedDict(), set(), [0]

    def walk(node, prefix, depth):
        owner = f"{short_repr(node.class_name)} at '{short_repr(prefix)[1:-1] or '<root>'}'"
        if id(node) in seen or depth > MAX_DEPTH:
            raise CheckpointError(f"{owner}: the module appears twice in the tree, or the tree is too deep")
        seen.add(id(node))
        state = {k: node.state.get(k) or {} for k in ("_parameters", "_buffers", "_modules")}
        nonpersistent = node.state.get("_non_persistent_buffers_set") or ()
        if not all(isinstance(s, Mapping) and all(isinstance(n, str) for n in s) for s in state.values()) or (
                not isinstance(nonpersistent, (set, frozenset, list, tuple))):
            raise CheckpointError(f"{owner}: _parameters, _buffers or _modules is not a mapping with string keys")
        for kind in ("_parameters", "_buffers"):
            for name, t in state[kind].items():
                if t is None or (kind == "_buffers" and name in nonpersistent):
                    continue
                if not isinstance(t, (torch.Tensor, TensorInfo)) or id(t) in seen:
                    raise CheckpointError(f"{owner}: {kind[1:-1]} {short_repr(name)} is a {type(t).__name__} or "
                                          "appears twice")
                seen.add(id(t))
                chars[0] += len(prefix) + len(name)
                if chars[0] > MAX_KEY_CHARS:
                    raise CheckpointError(f"{owner}: the state_dict keys exceed {MAX_KEY_CHARS} characters")
                out[prefix + name] = t
        for name, child in state["_modules"].items():
            if not isinstance(child, (PersistentRecord, ModuleDictRecord, type(None))):
                raise CheckpointError(f"{owner}: child module {short_repr(name)} is a {type(child).__name__}")
            if child is not None:
                walk(child, f"{prefix}{name}.", depth + 1)

    walk(record, prefix, 0)
    return out


def plain_value(x, where: str = "value", _budget: list | None = None):
    """Convert numpy scalars and tuples to plain Python (lists); reject anything exotic, keys that are not strings,
    and values expanding to more than :data:`MAX_PLAIN` objects and characters."""
    budget, x = [MAX_PLAIN] if _budget is None else _budget, x.tolist() if isinstance(x, np.ndarray) else x
    budget[0] -= 1 + (len(x) if isinstance(x, str) else 0)
    if budget[0] < 0:
        raise CheckpointError(f"{where} expands to more than {MAX_PLAIN} values and characters")
    if x is None or isinstance(x, (bool, int, float, str, np.generic)):
        return x.item() if isinstance(x, np.generic) else x
    if isinstance(x, (list, tuple)):
        return [plain_value(v, where, budget) for v in x]
    if isinstance(x, Mapping) and all(isinstance(k, str) for k in x):
        return {k: plain_value(v, f"{where}.{k[:40]}", budget) for k, v in x.items()}
    raise CheckpointError(f"{where} holds a {type(x).__name__}; expected plain data with string keys")


def network_from_record(record: PersistentRecord) -> tuple[str, dict, "collections.OrderedDict"]:
    """``(class_name, init_kwargs, state_dict)`` of a network record: the ``_init_kwargs`` EDM's persistence
    decorator records, as plain values, and EDM key names -> CPU tensors (or :class:`TensorInfo`)."""
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"expected a persistent network record, got {type(record).__name__}")
    kwargs, args = record.state.get("_init_kwargs") or {}, record.state.get("_init_args", ())
    name = short_repr(record.class_name)
    if not isinstance(kwargs, Mapping) or not isinstance(args, (tuple, list)) or args:
        # EDM builds networks from keyword arguments only (dnnlib.util.construct_class_by_name).
        raise CheckpointError(f"{name} was pickled with positional constructor arguments or malformed _init_kwargs")
    return record.class_name, plain_value(dict(kwargs), f"{name} init_kwargs"), state_dict_from_record(record)
