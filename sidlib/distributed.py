"""Minimal torch.distributed helpers for torchrun (NCCL on CUDA, gloo on CPU); in a single process (no
``WORLD_SIZE`` or ``WORLD_SIZE=1``) no process group is created and every helper is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ['env_world_size', 'env_rank', 'env_local_rank', 'default_device', 'init', 'is_initialized', 'rank',
           'world_size', 'barrier', 'all_reduce_sum', 'shutdown']


def env_world_size() -> int:
    return int(os.environ.get('WORLD_SIZE', '1'))


def env_rank() -> int:
    return int(os.environ.get('RANK', '0'))


def env_local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', '0'))


def default_device() -> torch.device:
    return torch.device('cuda', env_local_rank()) if torch.cuda.is_available() else torch.device('cpu')


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: torch.device) -> bool:
    """Create the default process group when ``WORLD_SIZE > 1``; returns True if this call created it."""
    if env_world_size() <= 1 or is_initialized():
        return False
    cuda = device.type == 'cuda'
    dist.init_process_group(backend='nccl' if cuda else 'gloo', init_method='env://', timeout=timedelta(minutes=30),
                            **({'device_id': device} if cuda else {}))
    return True


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in a single process); returns ``t``."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def shutdown() -> None:
    if is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()
