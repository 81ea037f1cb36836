"""Atomic save / safe load of the distillation's full training state.

The state is a plain nested dict of tensors, numbers, strings, lists and dicts, so it round-trips
through ``torch.load(..., weights_only=True)`` (no arbitrary unpickling when resuming).
It is written with ``torch.save`` to a temporary file in the same directory and renamed over the
target, so a process killed at any moment leaves either the previous state or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .atomic import atomic_path

__all__ = ['STATE_FORMAT', 'save_training_state', 'load_training_state', 'capture_rng', 'restore_rng']

STATE_FORMAT = 'sidlib-training-state/1'


def save_training_state(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (plus a format tag) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({'format': STATE_FORMAT, **state}, tmp)
    return path


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a state written by :func:`save_training_state` with ``weights_only=True`` (on the CPU)."""
    state = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(state, dict) or state.get('format') != STATE_FORMAT:
        raise ValueError(f'{path} is not a sidlib training state (format {STATE_FORMAT!r})')
    return state


def capture_rng() -> dict:
    """torch's global CPU (and CUDA, if initialised) RNG states as tensors."""
    out = {'torch': torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out['cuda'] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(rng: dict) -> None:
    if 'torch' in rng:
        torch.set_rng_state(rng['torch'])
    if 'cuda' in rng and torch.cuda.is_available() and len(rng['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng['cuda'])
