"""Read EDM / SiD network pickles without running anything stored in them.

EDM's ``torch_utils/persistence.py`` pickles each network as ``_reconstruct_persistent_obj(meta)`` with its module's
source in ``meta['module_src']``; NVIDIA's loader runs that source, this reader never does. :func:`scan_pickle` first
walks the opcodes and refuses globals outside :data:`ALLOWED_GLOBALS`, lengths past the data, unwritten memo indices,
more than :data:`MAX_NODES` objects (a shared one counted per path), nesting deeper than :data:`MAX_DEPTH`, cycles,
non-string dict keys and set members, and BUILD on anything but a ModuleDict or numpy dtype. A restricted unpickler
then makes each persistent object an inert :class:`PersistentRecord`; tensor storages (legacy ``torch.save`` blobs)
are parsed and size-checked, read once each, and tensors may not claim more elements than the storages hold. Every
failure is a :class:`CheckpointError` naming the file."""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import math
import mmap
import os
import pickle
import pickletools
import reprlib
import struct
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np
import torch

__all__ = ["CheckpointError", "UnsafePickleError", "PersistentRecord", "ModuleDictRecord", "TensorInfo",
           "ALLOWED_GLOBALS", "MAX_NODES", "MAX_DEPTH", "read_edm_pickle", "scan_pickle", "load_storage_blob",
           "short_repr"]

#: Most objects a pickle may describe, a shared one counted once per path to it (EDM's pickles: under 1e5).
MAX_NODES = 2_000_000
#: Deepest nesting of containers and calls (EDM's pickles: 35).
MAX_DEPTH = 200


class CheckpointError(Exception):
    """A checkpoint could not be read or does not match what was asked for."""


class UnsafePickleError(CheckpointError, pickle.UnpicklingError):
    """The pickle references a global outside the allow-list (``global_name``); nothing was executed."""

    def __init__(self, message: str, global_name: str | None = None):
        super().__init__(message)
        self.global_name = global_name


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, 60, 60, 40
#: A repr of bounded size and cost, for error messages about values read from a file.
short_repr = _REPR.repr


@dataclass(eq=False)
class PersistentRecord:
    """One persistent EDM object, never instantiated: ``class_name`` (e.g. ``'EDMPrecond'``), ``state`` (the
    instance ``__dict__``), the sha256 of the embedded source (provenance; the text is dropped), ``version``."""

    class_name: str
    state: dict = field(repr=False)
    module_src_sha256: str | None = None
    version: Any = None


class ModuleDictRecord:
    """Stand-in for ``torch.nn.ModuleDict``, which EDM pickles natively (NEWOBJ + BUILD)."""

    class_name, state = "ModuleDict", types.MappingProxyType({})

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointError(f"ModuleDict state must be a dict, got {type(state).__name__}")
        self.state = state  # not copied: one state BUILT onto many ModuleDicts must not cost a copy each


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a tensor whose data was skipped (``read_edm_pickle(load_tensors=False)``)."""

    shape: tuple
    dtype: torch.dtype

    def numel(self) -> int:
        return math.prod(self.shape)


# Pass 1. A stack item is a str (a string STACK_GLOBAL may need), _STR (a string), _LEAF (another scalar), _EMPTY
# (an empty tuple) or an int, the index of a node [kind, compound kids, other kids, all other kids strings?,
# expanded size, depth, used?]; kind is 'list', 'dict', 'set', 'tuple', 'g:<global>' or 'c:<global>' (a call's
# result). A node used as a child or call argument may not change any more, so there are no cycles and its size
# and depth, checked as they grow, are final.

_STR, _LEAF, _EMPTY = object(), object(), object()
_STRINGS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_INTS = {"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"}
_SCALARS = _STRINGS | _INTS | {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8", "NONE", "NEWTRUE", "NEWFALSE",
                               "FLOAT", "BINFLOAT"}
_DICTS = {"dict", "c:collections.OrderedDict"}
_TARGETS = {"APPEND": {"list"}, "APPENDS": {"list"}, "SETITEM": _DICTS, "SETITEMS": _DICTS,
            "ADDITEMS": {"set", "c:builtins.set"}, "BUILD": {"c:torch.nn.modules.container.ModuleDict", "c:numpy.dtype"}}
_POPS = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3, "APPEND": 1, "SETITEM": 2, "BUILD": 1, "REDUCE": 2, "NEWOBJ": 2,
         "POP": 1, "STACK_GLOBAL": 2, "APPENDS": None, "SETITEMS": None, "ADDITEMS": None, "TUPLE": None,
         "LIST": None, "DICT": None, "POP_MARK": None}  # None: everything above the top MARK, and the MARK
_IGNORED = {"PROTO", "FRAME", "POP", "POP_MARK"}  # opcodes not handled here nor ignored are refused


def scan_pickle(data) -> None:
    """Check a pickle (bytes or mmap, nothing after its STOP) against the limits above without building it."""
    stack, marks, memo, nodes, count = [], [], {}, [], [0]
    f = data if isinstance(data, mmap.mmap) else io.BytesIO(data)
    f.seek(0)
    name = pos = None

    def fail(msg):
        raise CheckpointError(f"corrupt or refused pickle: {msg} (opcode {name} at byte {pos})")

    def charge(n):
        count[0] += n
        if count[0] > MAX_NODES:
            raise CheckpointError(f"the pickle describes more than {MAX_NODES} objects")

    def extend(v, items):
        node = nodes[v]
        if node[6]:
            fail("an object changed after it was used (a cycle, or a forged reference)")
        charge(1 + len(items))
        for i in items:
            if type(i) is not int:
                node[2:6] = node[2] + 1, node[3] and (i is _STR or isinstance(i, str)), node[4] + 1, max(node[5], 2)
            elif i == v:
                fail("an object containing itself")
            else:
                nodes[i][6] = True
                node[1].append(i)
                node[3:6] = False, node[4] + nodes[i][4], max(node[5], nodes[i][5] + 1)
        if node[4] > MAX_NODES:
            raise CheckpointError(f"the pickle's objects expand to more than {MAX_NODES} objects (a shared one "
                                  "counted once per path to it)")
        if node[5] > MAX_DEPTH:
            raise CheckpointError(f"the pickle's objects are nested more than {MAX_DEPTH} deep")

    def new(kind, items=()):
        nodes.append([kind, [], 0, True, 1, 1, False])
        extend(len(nodes) - 1, items)
        return len(nodes) - 1

    def pop(n):
        start = (marks.pop() if marks else fail("no MARK")) if n is None else len(stack) - n
        if start < 0:
            fail("stack underflow")
        items = stack[start:]
        del stack[start:]
        return items

    for op, arg, pos in pickletools.genops(f):
        name = op.name
        if name == "POP" and marks and marks[-1] == len(stack):
            marks.pop()  # POP of a MARK
            continue
        items = pop(_POPS[name]) if name in _POPS else None
        keys = items[::2] if name in ("DICT", "SETITEM", "SETITEMS") else items if name == "ADDITEMS" else ()
        if (name in ("DICT", "SETITEMS") and len(items) % 2) or not all(k is _STR or isinstance(k, str) for k in keys):
            fail("a dict key or set member that is not a string")
        if name in _SCALARS:
            if isinstance(arg, int) and arg.bit_length() > 512:
                fail("an integer of more than 512 bits")
            charge(1)
            stack.append(arg if isinstance(arg, str) and len(arg) <= 256 else _STR if name in _STRINGS else _LEAF)
        elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET", "EMPTY_TUPLE"):
            stack.append(_EMPTY if name == "EMPTY_TUPLE" else new(name[6:].lower()))
        elif name in ("TUPLE", "TUPLE1", "TUPLE2", "TUPLE3", "LIST", "DICT"):
            stack.append(new({"LIST": "list", "DICT": "dict"}.get(name, "tuple"), items))
        elif name in _TARGETS:
            target = stack[-1] if stack else None
            kind = nodes[target][0] if type(target) is int else "plain value"
            if kind not in _TARGETS[name]:
                fail(f"{name} on a {kind.replace('c:', 'result of ')}")
            if kind == "c:numpy.dtype" and not (type(items[0]) is int and nodes[items[0]][0] == "tuple"
                                                and not nodes[items[0]][1]):
                fail("a numpy dtype state other than a flat tuple")
            extend(target, items)
        elif name in ("REDUCE", "NEWOBJ"):
            c, args = items
            fn = nodes[c][0][2:] if type(c) is int and nodes[c][0].startswith("g:") else fail(
                "a call of something other than an allowed global")
            if fn in ("builtins.set", "collections.OrderedDict") and args is not _EMPTY:
                # set(list of strings) costs the list's length, charged here; OrderedDict() is filled by SETITEMS.
                t = nodes[args] if fn == "builtins.set" and type(args) is int else [0, [], 1]
                lst = nodes[t[1][0]] if len(t[1]) == 1 and not t[2] else None
                if lst is None or lst[1] or not lst[3]:
                    fail(f"{fn}() with arguments other than a list of strings")
                charge(lst[2])
            stack.append(new("c:" + fn, [args]))
        elif name in ("GLOBAL", "STACK_GLOBAL"):
            module, attr = arg.split(" ", 1) if name == "GLOBAL" else items
            if not (isinstance(module, str) and isinstance(attr, str)):
                fail("STACK_GLOBAL of values other than short literal strings")
            if (module, attr) not in _ALLOWED_NAMES:
                raise UnsafePickleError(f"the pickle references the global '{short_repr(module)[1:-1]}."
                                        f"{short_repr(attr)[1:-1]}', which is not on the allow-list for EDM/SiD "
                                        f"network pickles (nothing from the file was executed). Allowed: "
                                        f"{', '.join(ALLOWED_GLOBALS)}", f"{module}.{attr}")
            stack.append(new(f"g:{module}.{attr}"))
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            charge(1)
            stack.append(memo[arg] if arg in memo else fail(f"memo index {arg} read before it was written"))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            key = len(memo) if name == "MEMOIZE" else arg
            if not stack or not 0 <= key <= len(memo):
                fail(f"memo index {key} skips past the {len(memo)} entries written so far")
            memo[key] = stack[-1]
        elif name == "FRAME" and arg > len(data) - f.tell():
            fail("a frame longer than the data left")
        elif name == "STOP":
            if len(stack) != 1 or marks:
                fail("the pickle does not end with exactly one object")
            if pos + 1 != len(data):
                raise CheckpointError(f"corrupt: unexpected data after the end of the pickle (byte {pos + 1} of "
                                      f"{len(data)})")
            return
        elif name not in _IGNORED:  # persistent ids, extension codes, buffers, DUP, INST/OBJ, ...
            fail("an opcode network pickles never use")
    fail("no STOP opcode")


# Tensor storages: each is a legacy (non-zip) ``torch.save`` blob of one storage, as torch's pickle reducers write
# it: five small pickles (magic number, protocol version, system info, the storage's persistent id
# ('storage', type, key, location, numel, view), the key list), then an 8-byte element count and the data.

_HEADER_OPS = _INTS | {"PROTO", "STOP", "MARK", "EMPTY_DICT", "EMPTY_LIST", "BINPUT", "BINUNICODE", "SHORT_BINUNICODE",
                       "NEWTRUE", "NONE", "SETITEM", "SETITEMS", "APPEND", "TUPLE", "BINPERSID", "GLOBAL"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def load_storage_blob(blob: bytes, *, load_data: bool = True):
    """One ``torch.storage._load_from_bytes`` blob -> a flat 1-D CPU tensor (a :class:`TensorInfo` without data).
    Before ``torch.load(weights_only=True)`` reads it, its header must be torch's (little-endian, one storage of a
    torch type) and its data exactly the declared size, checked without unpickling; zip blobs are refused."""
    if not isinstance(blob, (bytes, bytearray)) or blob[:4] == b"PK\x03\x04":
        raise CheckpointError("storage blob is not bytes, or is a zip archive (EDM/SiD pickles hold legacy "
                              "torch.save blobs only)")
    f, parts = io.BytesIO(blob), []
    try:
        for _ in range(5):
            parts.append([(op.name, arg) for _, (op, arg, _) in zip(range(100), pickletools.genops(f))])
    except ValueError as e:
        raise CheckpointError(f"corrupt storage blob header: {str(e)[:200]}") from None
    globals_ = [a.replace(" ", ".") for p in parts for n, a in p if n == "GLOBAL"]
    ints = [[a for n, a in p if n in _INTS] for p in parts]
    strs, keys = ([a for n, a in p if n in _STRINGS] for p in parts[3:])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage classes warn on .dtype
        dtype = getattr(getattr(torch, globals_[0][6:], None), "dtype", None) if len(globals_) == 1 else None
    # torch writes the key as a string: a second int could be what torch reads as numel while we read the first.
    if ({n for p in parts for n, _ in p} - _HEADER_OPS or any(len(p) == 100 for p in parts) or ints[:2] != [
            [_LEGACY_MAGIC], [1001]] or not isinstance(dtype, torch.dtype) or not globals_[0].startswith("torch.")
            or len(ints[3]) != 1 or len(strs) < 2 or keys != strs[1:2]):
        raise CheckpointError(f"storage blob header is not torch's header of one little-endian storage (globals: "
                              f"{short_repr(globals_)})")
    numel, header = ints[3][0], f.tell()
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if len(blob) != header + 8 + nbytes or struct.unpack_from("<q", blob, header)[0] != numel:
        raise CheckpointError(f"storage blob declares {numel} {dtype} elements ({nbytes} bytes) but holds "
                              f"{len(blob) - header - 8} data bytes")
    if not load_data:
        return TensorInfo((numel,), dtype)
    # The header was checked and the data is exactly the declared size: torch reads the blob itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated, yet torch.load returns it
        try:
            st = torch.load(io.BytesIO(bytes(blob)), weights_only=True, map_location="cpu")
        except Exception as e:  # torch raises assorted types for bad blobs
            raise CheckpointError(f"unreadable storage blob: {type(e).__name__}: {str(e)[:200]}") from None
        return torch.empty(0, dtype=st.dtype).set_(st.untyped(), 0, (st.size(),), (1,))


def _allowed_globals(load_tensors: bool) -> dict:
    """Pass 2: the globals the restricted unpickler finds, replacements for the few functions EDM pickles call."""
    done: dict[int, tuple] = {}  # id(blob or source text) -> (it, its storage or digest): each is read once
    totals, storages = {"stored": 0, "claimed": 0}, set()  # elements stored and viewed by tensors; storage ids

    def once(obj, fn):
        if id(obj) not in done:  # done keeps obj alive, so no other object takes its id
            done[id(obj)] = (obj, fn(obj))
        return done[id(obj)][1]

    def reconstruct_persistent_obj(meta):  # EDM's persistence._reconstruct_persistent_obj: wrap, don't run
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise CheckpointError("unsupported persistent object (only EDM's type='class' metadata dicts are)")
        class_name, state, src, version = (meta.get(k) for k in ("class_name", "state", "module_src", "version"))
        state = {} if state is None else state
        if not isinstance(class_name, str) or not isinstance(state, dict):
            raise CheckpointError(f"persistent object without a class_name or with a {type(state).__name__} state")
        digest = once(src, lambda s: hashlib.sha256(s.encode("utf-8", "surrogatepass") if isinstance(s, str)
                                                    else s).hexdigest()) if isinstance(src, (str, bytes)) else None
        return PersistentRecord(class_name, state, digest, version if isinstance(version, int) else None)

    def load(blob):
        st = load_storage_blob(blob, load_data=load_tensors)
        totals["stored"] += st.numel()
        storages.add(id(st))
        return st

    def rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        # Hooks and metadata (conj/neg bits of complex tensors) carry no weights; they are ignored.
        if not all(isinstance(x, (tuple, list)) and len(x) <= 32 and all(type(v) is int and v >= 0 for v in x)
                   for x in (size, stride)) or len(size) != len(stride) or type(offset) is not int or offset < 0:
            raise CheckpointError(f"bad tensor geometry: size {short_repr(size)}, stride {short_repr(stride)}, "
                                  f"offset {short_repr(offset)}")
        if id(storage) not in storages:
            raise CheckpointError(f"tensor built from a {type(storage).__name__}, expected a storage")
        available, n = storage.numel(), math.prod(size)
        if n > 0 and offset + sum((s - 1) * st for s, st in zip(size, stride)) >= available:
            raise CheckpointError(f"tensor of size {tuple(size)}, stride {tuple(stride)}, offset {offset} reaches "
                                  f"past its storage of {available} elements")
        totals["claimed"] += n
        if totals["claimed"] > totals["stored"]:
            raise CheckpointError(f"the tensors claim more elements than the file's storages hold "
                                  f"({totals['claimed']} > {totals['stored']}); overlapping views are refused")
        if isinstance(storage, TensorInfo):
            return TensorInfo(tuple(size), storage.dtype)
        return torch.as_strided(storage, size, stride, offset)

    def rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
        if not isinstance(data, (torch.Tensor, TensorInfo)):  # ``state``, Python attributes, is dropped
            raise CheckpointError(f"parameter data is a {type(data).__name__}, expected a tensor")
        return data

    def dtype(spec, align=False, copy=True):  # always a copy: BUILD must not reach numpy's shared singletons
        if not isinstance(spec, str) or len(spec) > 8 or np.dtype(spec).kind not in "biufc":
            raise CheckpointError(f"numpy dtype {short_repr(spec)} is not a plain numeric type")
        return np.dtype(spec, bool(align), True)

    def scalar(dt, data=None):
        if not (isinstance(dt, np.dtype) and dt.kind in "biufc" and isinstance(data, bytes)
                and len(data) == dt.itemsize):
            raise CheckpointError("malformed numpy scalar")
        return np.frombuffer(data, dtype=dt)[0].copy()

    return {
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): reconstruct_persistent_obj,
        ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,  # enc/dec, pickled natively by torch
        ("collections", "OrderedDict"): collections.OrderedDict,  # _parameters/_buffers/hook dicts
        ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): lambda blob: once(blob, load),
        # Numpy scalars (EDM's skip_scale = np.sqrt(0.5)); numpy >= 2 writes the _core path.
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("numpy", "dtype"): dtype,
        ("builtins", "set"): set,  # protocols <= 3 write _non_persistent_buffers_set as set([...])
    }


_ALLOWED_NAMES = frozenset(_allowed_globals(False))
#: The globals a network pickle may reference, as ``'module.name'`` strings.
ALLOWED_GLOBALS = tuple(sorted(f"{m}.{n}" for m, n in _ALLOWED_NAMES))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):  # scan_pickle refused any other global; a KeyError is a second line
        return self.allowed[(module, name)]


def read_edm_pickle(source: str | os.PathLike | bytes | BinaryIO, *, load_tensors: bool = True) -> dict:
    """Safely unpickle an EDM/SiD network pickle (a path, its bytes or a binary file) into its top-level dict, e.g.
    ``{'ema': PersistentRecord('EDMPrecond'), 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': {...}}`` (EDM)
    or ``{'ema': ...}`` (SiD); with ``load_tensors=False`` tensors are :class:`TensorInfo`. Raises
    :class:`UnsafePickleError` for a global outside :data:`ALLOWED_GLOBALS`, else :class:`CheckpointError`."""
    name = getattr(source, "name", None) if not isinstance(source, (str, os.PathLike)) else os.fspath(source)
    name = f"'{name}'" if isinstance(name, str) else "<bytes>"
    if not isinstance(source, (str, os.PathLike, bytes, bytearray, memoryview)) and not hasattr(source, "read"):
        raise TypeError(f"read_edm_pickle needs a path, bytes or a binary file, got {type(source).__name__}")
    try:
        with contextlib.ExitStack() as stack:
            if isinstance(source, (str, os.PathLike)):
                f = stack.enter_context(open(source, "rb"))
                data = stack.enter_context(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)) if os.fstat(
                    f.fileno()).st_size else b""
            else:
                data = source.read() if hasattr(source, "read") else bytes(source)
            if not isinstance(data, (bytes, mmap.mmap)) or not len(data):
                raise CheckpointError("the file is empty or not read as bytes")
            scan_pickle(data)
            f = data if isinstance(data, mmap.mmap) else io.BytesIO(data)
            f.seek(0)
            unpickler = _RestrictedUnpickler(f)
            unpickler.allowed = _allowed_globals(load_tensors)
            obj = unpickler.load()
    except CheckpointError as e:
        e.args = (f"{name}: {e}",) if name not in str(e) else e.args
        raise
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint file {name}: {e.strerror or e}") from None
    except Exception as e:  # corrupt data (pickletools, pickle and torch raise assorted types), or a MemoryError
        raise CheckpointError(f"{name} is corrupt or truncated, not a readable network pickle "
                              f"({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, expected a dict such as {{'ema': network}}")
    return obj
