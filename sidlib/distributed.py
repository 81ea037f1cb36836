"""Minimal torch.distributed helpers: initialise from torchrun's environment, rank queries, reductions.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) never initialises a process group, so all
helpers degrade to no-ops. Under ``torchrun`` the backend is NCCL on CUDA and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ['env_world_size', 'env_rank', 'env_local_rank', 'default_device', 'init', 'is_initialized', 'rank', 'world_size',
           'is_main', 'barrier', 'all_reduce_sum', 'broadcast_object', 'shutdown']


def env_world_size() -> int:
    """World size announced by the launcher (1 when not launched by torchrun)."""
    return int(os.environ.get('WORLD_SIZE', '1'))


def env_rank() -> int:
    return int(os.environ.get('RANK', '0'))


def env_local_rank() -> int:
    return int(os.environ.get('LOCAL_RANK', '0'))


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under torchrun) when CUDA is available, else the CPU."""
    return torch.device('cuda', env_local_rank()) if torch.cuda.is_available() else torch.device('cpu')


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device: torch.device) -> bool:
    """Create the default process group when ``WORLD_SIZE > 1``; returns True if this call created it."""
    if env_world_size() <= 1 or is_initialized():
        return False
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    kwargs = {}
    if device.type == 'cuda':
        kwargs['device_id'] = device
    dist.init_process_group(backend=backend, init_method='env://', timeout=timedelta(minutes=30), **kwargs)
    return True


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (identity in a single process); returns ``t``."""
    if is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects only)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shutdown() -> None:
    if is_initialized():
        with contextlib.suppress(Exception):
            dist.barrier()
        dist.destroy_process_group()
