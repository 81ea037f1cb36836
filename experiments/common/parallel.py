"""Independent runs as parallel single-thread processes (the 8x8 and 2-D networks are too small to split over
threads, so two processes use two cores better than one two-thread process)."""
from __future__ import annotations

import multiprocessing as mp
import pickle
import sys
import time
from typing import Callable, Sequence

import torch
from tqdm import tqdm

__all__ = ["run_parallel", "progress"]


def progress(message: str) -> None:
    """One line of progress on the process's file-level stderr: inside a notebook run by papermill (and DVC) the
    kernel echoes it to the terminal as it happens (and keeps a copy in the executed notebook); the stages run
    papermill without ``--log-output``, which would print that copy a second time."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.__stderr__, flush=True)


def _worker(args):
    fn, kwargs, threads = args
    torch.set_num_threads(threads)
    # Plain pickle bytes: torch's multiprocessing reductions would pass tensors through shared-memory handles that
    # die with the worker (maxtasksperchild=1) and can hang the parent.
    return pickle.dumps(fn(**kwargs))


def run_parallel(fn: Callable, jobs: Sequence[dict], *, workers: int = 2, threads_per_worker: int = 1) -> list:
    """``[fn(**job) for job in jobs]``, ``workers`` spawned processes at a time with ``threads_per_worker`` torch
    threads each; results in job order. ``fn`` must be a module-level function. One worker or one job: in-process."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        prev = torch.get_num_threads()
        torch.set_num_threads(threads_per_worker)
        try:
            return [fn(**j) for j in jobs]
        finally:
            torch.set_num_threads(prev)
    args = [(fn, j, threads_per_worker) for j in jobs]
    with mp.get_context("spawn").Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool, \
            tqdm(total=len(jobs), desc=getattr(fn, "__name__", "jobs"), unit="job", file=sys.__stderr__) as bar:
        results = [None] * len(jobs)
        for i, b in pool.imap_unordered(_indexed, list(enumerate(args)), chunksize=1):
            results[i] = pickle.loads(b)
            bar.update(1)
        return results


def _indexed(item):
    i, args = item
    return i, _worker(args)
