"""Atomic save / safe load of the distillation's training state (EDM's ``training-state-*.pt`` role): a plain nested
dict written atomically with ``torch.save``, read with ``torch.load(weights_only=True)`` once the archive's entries
are checked to be uncompressed and to fit in the file; a bad file raises :class:`TrainingStateError` naming it."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch

from .atomic import atomic_path
from .edm_pickle import CheckpointError

__all__ = ['STATE_FORMAT', 'TrainingStateError', 'save_training_state', 'load_training_state', 'capture_rng',
           'restore_rng']

STATE_FORMAT = 'sidlib-training-state/1'


class TrainingStateError(CheckpointError, ValueError):
    """A training-state file is corrupt, truncated or not one of ours."""


def save_training_state(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` (plus a format tag) to ``path`` atomically; returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save({'format': STATE_FORMAT, **state}, tmp)
    return path


def load_training_state(path: str | os.PathLike) -> dict:
    """Read a state written by :func:`save_training_state` (on the CPU, ``weights_only=True``)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
        # torch.save writes a zip of stored (uncompressed) entries; refuse anything that would be inflated.
        if any(e.compress_type != zipfile.ZIP_STORED for e in entries) or sum(
                e.file_size for e in entries) > path.stat().st_size:
            raise ValueError('the archive holds compressed entries or entries larger than the file')
        state = torch.load(path, map_location='cpu', weights_only=True)
        if isinstance(state, dict) and state.get('format') == STATE_FORMAT:
            return state
        reason = f'it holds no {STATE_FORMAT!r} tag, so it was not written by sidlib'
    except OSError as e:
        reason = f'{type(e).__name__}: {e.strerror or e}'
    except Exception as e:  # zipfile, torch and the unpickler raise assorted types, MemoryError included
        # Why torch.load failed, in a line, without torch's advice to retry with weights_only=False.
        keep = [p.strip() for p in str(e).split('\n\n') if p.strip() and 'eights_only' not in p]
        reason = f"{type(e).__name__}: {' '.join(keep)[:300] or 'objects other than tensors and plain data'}"
    numbered = sorted(path.parent.glob('training-state-*.pt'))
    hint = (f'the latest numbered state is {numbered[-1].name}' if numbered else
            'no numbered training-state-<kimg>.pt is beside it')
    raise TrainingStateError(f'{path} is not a readable sidlib training state ({reason}). Delete it to start the '
                             f'run over, or copy a numbered state of the same run over it to resume from there '
                             f'({hint}).')


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
