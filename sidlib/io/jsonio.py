"""The one JSON convention of sidlib: plain data in (:func:`to_jsonable`), atomic files out (:func:`write_json`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text

__all__ = ['to_jsonable', 'dumps', 'write_json']


def to_jsonable(x: Any) -> Any:
    """``x`` as JSON data: numpy/torch scalars -> numbers, arrays and tuples -> lists, paths and dict keys ->
    strings, NaN/+-Inf -> ``None``; anything else raises ``TypeError`` naming its type."""
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if hasattr(x, 'tolist') and callable(x.tolist):  # numpy scalars/arrays, torch tensors
        return to_jsonable(x.tolist())
    raise TypeError(f'{type(x).__name__} is not JSON data: {str(x)[:80]}')


def dumps(obj: Any, **kw) -> str:
    """``json.dumps`` of :func:`to_jsonable` ``(obj)``; never writes NaN or Infinity."""
    return json.dumps(to_jsonable(obj), allow_nan=False, **kw)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (parent folders are created); returns the path."""
    return atomic_write_text(Path(path), dumps(obj, indent=2) + '\n')
