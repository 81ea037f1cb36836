"""Read EDM / SiD network pickles without importing or running anything stored in them.

EDM's ``torch_utils.persistence`` pickles every network object as a call
``_reconstruct_persistent_obj(meta)`` whose ``meta['module_src']`` is the full Python source of
the defining module; NVIDIA's loader executes that source. This module never does. A restricted
:class:`pickle.Unpickler` resolves only the handful of globals such pickles contain (the list
below); each persistent object becomes an inert :class:`PersistentRecord` holding the class name
and the instance ``__dict__`` (``state``); tensor storages, legacy ``torch.save`` blobs, are read by
``torch.load(weights_only=True)`` after a size check. Any other global (``os.system``, ``builtins.eval``,
``subprocess.Popen``, ...) raises :class:`UnsafePickleError` naming it, at the moment the
unpickler resolves the name, i.e. before the object could be called.

Public API:

* :func:`read_edm_pickle` -- file / bytes -> the top-level dict (``{'ema': PersistentRecord, ...}``).
* :func:`network_from_record` -- record -> ``(class_name, init_kwargs, state_dict)``.
* :func:`state_dict_from_record` -- record -> flat ``OrderedDict`` of tensors (EDM key names).
* :data:`ALLOWED_GLOBALS` -- the allow-list, ``'module.name'`` strings.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pickle
import pickletools
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "UnsafePickleError",
    "PersistentRecord",
    "ModuleDictRecord",
    "TensorInfo",
    "ALLOWED_GLOBALS",
    "read_edm_pickle",
    "network_from_record",
    "state_dict_from_record",
    "load_storage_blob",
]


class CheckpointError(Exception):
    """A checkpoint could not be read or does not match what was asked for."""


class UnsafePickleError(CheckpointError, pickle.UnpicklingError):
    """The pickle references a global outside the allow-list; nothing was executed.

    ``global_name`` holds the offending ``'module.name'``.
    """

    def __init__(self, message: str, global_name: str | None = None):
        super().__init__(message)
        self.global_name = global_name


# ----------------------------------------------------------------------------------------------
# Inert stand-ins for the objects a network pickle describes.


@dataclass(eq=False)
class PersistentRecord:
    """One persistent EDM object, never instantiated.

    Attributes:
        class_name: e.g. ``'EDMPrecond'``, ``'SongUNet'``, ``'UNetBlock'``, ``'EDMLoss'``.
        state: the instance ``__dict__`` as pickled (``_parameters``, ``_buffers``,
            ``_modules``, ``_init_kwargs``, plain attributes, ...).
        module_src_sha256: sha256 hex digest of the embedded source text (provenance only; the
            text itself is dropped), or ``None`` if there was none.
        version: the persistence format version stored in the pickle (EDM writes 6).
    """

    class_name: str
    state: dict = field(repr=False)
    module_src_sha256: str | None = None
    version: Any = None


class ModuleDictRecord:
    """Stand-in for ``torch.nn.ModuleDict``, which EDM pickles natively (NEWOBJ + BUILD)."""

    class_name = "ModuleDict"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise CheckpointError("a ModuleDict in the pickle is constructed with arguments; "
                                  "network pickles never do that")
        obj = super().__new__(cls)
        obj.state = {}
        return obj

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise CheckpointError(f"ModuleDict state must be a dict, got {type(state).__name__}")
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"ModuleDictRecord({list(self.state.get('_modules', {}))})"


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a tensor whose data was skipped (``read_edm_pickle(load_tensors=False)``)."""

    shape: tuple
    dtype: torch.dtype

    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class _StorageInfo:
    dtype: torch.dtype
    numel: int


def _reconstruct_persistent_obj(meta):
    """Replacement for ``torch_utils.persistence._reconstruct_persistent_obj``: wrap, don't run."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"persistent object metadata must be a dict, got {type(meta).__name__}")
    if meta.get("type") != "class":
        raise CheckpointError(f"unsupported persistent object type {meta.get('type')!r} "
                              "(only EDM's type='class' objects are supported)")
    class_name = meta.get("class_name")
    if not isinstance(class_name, str):
        raise CheckpointError("persistent object without a class_name")
    state = meta.get("state")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise CheckpointError(f"state of persistent {class_name} must be a dict, got {type(state).__name__}")
    src = meta.get("module_src")
    digest = None
    if isinstance(src, str):
        digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
    elif isinstance(src, bytes):
        digest = hashlib.sha256(src).hexdigest()
    return PersistentRecord(class_name=class_name, state=state, module_src_sha256=digest,
                            version=meta.get("version"))


# ----------------------------------------------------------------------------------------------
# Tensor storages: each is a legacy (non-zip) ``torch.save`` blob of one storage, as torch's pickle reducers
# write them. ``torch.load(weights_only=True)`` reads them; we only check, before it allocates anything, that
# the storage the blob declares fits in the blob.

_ZIP_MAGIC = b"PK\x03\x04"
_HEADER_PICKLES = 5  # magic number, format version, sys info, the storage's persistent id, the key list
_INT_OPS = ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4")


def _declared_storage(blob: bytes) -> tuple[torch.dtype, int, int]:
    """``(dtype, numel, header length)`` of a legacy storage blob, read from its opcodes without running them."""
    f = io.BytesIO(blob)
    dtype, ints = None, []
    for index in range(_HEADER_PICKLES):
        for op, arg, _ in pickletools.genops(f):
            if index != 3:
                continue
            if op.name in ("GLOBAL", "STACK_GLOBAL") and isinstance(arg, str):
                module, _, name = arg.partition(" ")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # TypedStorage classes warn on .dtype
                    dtype = getattr(getattr(torch, name, None), "dtype", None) if module == "torch" else None
            elif op.name in _INT_OPS:
                ints.append(arg)
    # The persistent id ('storage', type, key, location, numel, view) holds one int, numel (torch writes the key as
    # a string); a second int could be what torch reads as numel while this check reads the first.
    numel = ints[0] if len(ints) == 1 else None
    if not isinstance(dtype, torch.dtype) or type(numel) is not int or numel < 0:
        raise CheckpointError("storage blob does not declare a torch storage type and size")
    return dtype, numel, f.tell()


def load_storage_blob(blob: bytes, *, load_data: bool = True):
    """One ``torch.storage._load_from_bytes`` blob -> a flat 1-D CPU tensor (or ``_StorageInfo`` without data).

    The declared element count times the element size must fit in the blob's data section, so a blob cannot
    make the reader allocate more memory than it occupies. Zip-format blobs, which torch's reducers never
    write, are refused rather than inflated.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise CheckpointError(f"storage blob must be bytes, got {type(blob).__name__}")
    if blob[:4] == _ZIP_MAGIC:
        raise CheckpointError("storage blob is a zip archive; EDM/SiD pickles hold legacy torch.save blobs only")
    try:
        dtype, numel, header = _declared_storage(bytes(blob))
    except CheckpointError:
        raise
    except Exception as e:  # pickletools raises ValueError and assorted others on garbage
        raise CheckpointError(f"corrupt storage blob header: {type(e).__name__}: {e}") from None
    need = 8 + numel * torch.empty(0, dtype=dtype).element_size()
    if header + need > len(blob):
        raise CheckpointError(f"storage blob declares {numel} {dtype} elements ({need} bytes) but holds only "
                              f"{len(blob) - header} data bytes")
    if not load_data:
        return _StorageInfo(dtype, numel)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated, yet torch.load returns it
            st = torch.load(io.BytesIO(bytes(blob)), weights_only=True, map_location="cpu")
            if not isinstance(st, torch.TypedStorage):
                raise CheckpointError(f"storage blob holds a {type(st).__name__}, expected a storage")
            return torch.empty(0, dtype=st.dtype).set_(st.untyped(), 0, (st.size(),), (1,))
    except CheckpointError:
        raise
    except Exception as e:  # torch raises assorted types for bad blobs
        raise CheckpointError(f"unreadable storage blob: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Tensor reconstruction (replacements for torch._utils functions).


def _check_int_seq(x, what) -> tuple:
    if not isinstance(x, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in x):
        raise CheckpointError(f"tensor {what} must be a sequence of non-negative ints, got {x!r:.100}")
    return tuple(x)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    # Hooks and metadata (conj/neg bits of complex tensors) carry no weights; they are ignored.
    size = _check_int_seq(size, "size")
    stride = _check_int_seq(stride, "stride")
    if len(size) != len(stride):
        raise CheckpointError(f"tensor size {size} and stride {stride} differ in length")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise CheckpointError(f"bad storage offset {storage_offset!r}")
    if isinstance(storage, _StorageInfo):
        available, dtype = storage.numel, storage.dtype
    elif isinstance(storage, torch.Tensor) and storage.dim() == 1:
        available, dtype = storage.numel(), storage.dtype
    else:
        raise CheckpointError(f"tensor built from a {type(storage).__name__}, expected a storage")
    n = 1
    for s in size:
        n *= s
    if n > 0:
        last = storage_offset + sum((s - 1) * st for s, st in zip(size, stride))
        if last >= available:
            raise CheckpointError(f"tensor of size {size}, stride {stride}, offset {storage_offset} "
                                  f"reaches past its storage of {available} elements")
    if isinstance(storage, _StorageInfo):
        return TensorInfo(size, dtype)
    return torch.as_strided(storage, size, stride, storage_offset)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    if not isinstance(data, (torch.Tensor, TensorInfo)):
        raise CheckpointError(f"parameter data is a {type(data).__name__}, expected a tensor")
    return data


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    # ``state`` is the Parameter's Python attribute dict; it holds no weights, so it is dropped.
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _numpy_scalar():
    core = getattr(np, "_core", None)
    if core is not None and hasattr(core, "multiarray"):
        return core.multiarray.scalar
    return np.core.multiarray.scalar  # numpy < 2


def _allowed_globals(load_tensors: bool) -> dict:
    loaded: dict[int, tuple] = {}

    def load_from_bytes(blob):
        # A blob the pickle references several times (through its memo) is materialised once.
        hit = loaded.get(id(blob))
        if hit is None or hit[0] is not blob:
            hit = loaded[id(blob)] = (blob, load_storage_blob(blob, load_data=load_tensors))
        return hit[1]

    scalar = _numpy_scalar()
    return {
        # EDM persistent objects: wrapped into inert records, module_src never imported.
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
        # enc/dec containers, pickled natively by torch.
        ("torch.nn.modules.container", "ModuleDict"): ModuleDictRecord,
        # _parameters/_buffers/hook dicts.
        ("collections", "OrderedDict"): collections.OrderedDict,
        # Tensors and their storages, as Tensor/Parameter.__reduce_ex__ writes them.
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
        ("torch.storage", "_load_from_bytes"): load_from_bytes,
        # Numpy scalars (e.g. skip_scale = np.sqrt(0.5)); numpy >= 2 writes the _core path.
        ("numpy.core.multiarray", "scalar"): scalar,
        ("numpy._core.multiarray", "scalar"): scalar,
        ("numpy", "dtype"): np.dtype,
        # Pickle protocols <= 3 (Python <= 3.7 default) write the module's
        # _non_persistent_buffers_set as a call to set(); protocol >= 4 uses an opcode.
        ("builtins", "set"): set,
    }


#: The globals a network pickle may reference, as ``'module.name'`` strings.
ALLOWED_GLOBALS = tuple(sorted(f"{m}.{n}" for m, n in _allowed_globals(False)))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source_name: str, load_tensors: bool):
        super().__init__(file)
        self._allowed = _allowed_globals(load_tensors)
        self._source_name = source_name

    def find_class(self, module, name):
        obj = self._allowed.get((module, name))
        if obj is None:
            raise UnsafePickleError(
                f"refusing to load {self._source_name}: the pickle references the global "
                f"'{module}.{name}', which is not on the allow-list for EDM/SiD network pickles "
                f"(nothing from the file was executed). Allowed: {', '.join(ALLOWED_GLOBALS)}",
                f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise CheckpointError(f"{self._source_name}: unexpected persistent id in a network pickle "
                              f"(is this a torch.save file rather than a network pickle?)")


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"'{os.fspath(source)}'"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>"
    name = getattr(source, "name", None)
    return f"'{name}'" if isinstance(name, str) else "<file object>"


def read_edm_pickle(source: str | os.PathLike | bytes | BinaryIO, *, load_tensors: bool = True) -> dict:
    """Safely unpickle an EDM/SiD network pickle.

    Args:
        source: a path, the file's bytes, or a binary file object.
        load_tensors: if False, tensors become :class:`TensorInfo` (shape, dtype) without data.

    Returns:
        The top-level dict, e.g. ``{'ema': PersistentRecord('EDMPrecond'), 'loss_fn': ...,
        'augment_pipe': ..., 'dataset_kwargs': {...}}`` for EDM, ``{'ema': ...}`` for SiD.

    Raises:
        UnsafePickleError: a global outside :data:`ALLOWED_GLOBALS` is referenced.
        CheckpointError: the file is empty, truncated, corrupt, or not a dict of records.
    """
    name = _describe(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CheckpointError(f"no such checkpoint file: {name}")
        with open(path, "rb") as f:
            return _read(f, name, load_tensors)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _read(io.BytesIO(bytes(source)), name, load_tensors)
    if hasattr(source, "read"):
        return _read(source, name, load_tensors)
    raise TypeError(f"read_edm_pickle needs a path, bytes or a binary file, got {type(source).__name__}")


def _read(f, name: str, load_tensors: bool) -> dict:
    try:
        obj = _RestrictedUnpickler(f, name, load_tensors).load()
    except CheckpointError:
        raise
    except EOFError as e:
        raise CheckpointError(f"{name} is empty or truncated; not a complete pickle ({e})") from e
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            struct.error, UnicodeDecodeError, OverflowError, RuntimeError, RecursionError) as e:
        raise CheckpointError(f"{name} is corrupt or truncated: not a readable network pickle "
                              f"({type(e).__name__}: {e})") from e
    if f.read(1):
        raise CheckpointError(f"{name} is corrupt: unexpected data after the end of the pickle")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{name} holds a {type(obj).__name__}, expected a dict such as "
                              "{'ema': network, ...}")
    return obj


# ----------------------------------------------------------------------------------------------
# Record tree -> state_dict / constructor kwargs.

_Node = (PersistentRecord, ModuleDictRecord)


def state_dict_from_record(record, prefix: str = "") -> "collections.OrderedDict[str, Any]":
    """Flatten a module record tree into state_dict order and naming.

    For every module: its non-None parameters, then its non-None buffers that are not in
    ``_non_persistent_buffers_set``, then its children (``_modules``) with ``'<child>.'``
    appended to the prefix -- the order and names ``torch.nn.Module.state_dict`` produces.
    """
    out: collections.OrderedDict = collections.OrderedDict()
    _walk(record, prefix, out, set())
    return out


def _mapping(state: dict, key: str, owner: str) -> Mapping:
    value = state.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise CheckpointError(f"{owner}: {key} must be a mapping, got {type(value).__name__}")
    return value


def _walk(node, prefix: str, out: dict, active: set) -> None:
    owner = f"{node.class_name} at '{prefix or '<root>'}'"
    if id(node) in active:
        raise CheckpointError(f"{owner}: the module tree contains a cycle")
    active.add(id(node))
    state = node.state
    nonpersistent = state.get("_non_persistent_buffers_set") or set()
    if not isinstance(nonpersistent, (set, frozenset, list, tuple)):
        raise CheckpointError(f"{owner}: _non_persistent_buffers_set is a {type(nonpersistent).__name__}")
    for kind in ("_parameters", "_buffers"):
        for name, t in _mapping(state, kind, owner).items():
            if t is None or (kind == "_buffers" and name in nonpersistent):
                continue
            if not isinstance(t, (torch.Tensor, TensorInfo)):
                raise CheckpointError(f"{owner}: {kind[1:-1]} {name!r} is a {type(t).__name__}, not a tensor")
            out[prefix + str(name)] = t
    for name, child in _mapping(state, "_modules", owner).items():
        if child is None:
            continue
        if not isinstance(child, _Node):
            raise CheckpointError(f"{owner}: child module {name!r} is a {type(child).__name__}")
        _walk(child, f"{prefix}{name}.", out, active)
    active.discard(id(node))


def plain_value(x, where: str = "value"):
    """Convert numpy scalars/arrays and tuples to plain Python (lists); reject anything exotic."""
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (list, tuple)):
        return [plain_value(v, where) for v in x]
    if isinstance(x, Mapping):
        return {str(k): plain_value(v, f"{where}.{k}") for k, v in x.items()}
    raise CheckpointError(f"{where} holds a {type(x).__name__}; expected plain data")


def network_from_record(record: PersistentRecord) -> tuple[str, dict, "collections.OrderedDict"]:
    """Return ``(class_name, init_kwargs, state_dict)`` of a top-level network record.

    ``init_kwargs`` are the constructor arguments recorded by EDM's persistence decorator
    (``_init_kwargs``; EDM passes none positionally), converted to plain Python values. ``state_dict`` maps EDM key names
    (e.g. ``'model.enc.32x32_conv.weight'``) to CPU tensors (or :class:`TensorInfo`).
    """
    if not isinstance(record, PersistentRecord):
        raise CheckpointError(f"expected a persistent network record, got {type(record).__name__}"
                              + (" (a None entry?)" if record is None else ""))
    state = record.state
    kwargs = state.get("_init_kwargs", {})
    args = state.get("_init_args", ())
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not isinstance(args, (tuple, list)):
        raise CheckpointError(f"{record.class_name}: malformed _init_args/_init_kwargs")
    if args:
        # EDM builds networks from keyword arguments only (dnnlib.util.construct_class_by_name).
        raise CheckpointError(f"{record.class_name} was pickled with positional constructor arguments")
    kwargs = plain_value(dict(kwargs), f"{record.class_name} init_kwargs")
    return record.class_name, kwargs, state_dict_from_record(record)
