"""Every random stream of sidlib, named in one place, and the counter-based draws behind them.

A run's randomness is a pure function of integer keys, so it is reproducible, resumable and, where stated,
independent of how samples are split over processes and micro-batches:

=====================================  =======================================================================
stream                                 seed of the ``torch.Generator``
=====================================  =======================================================================
training sample ``i`` (``per_sample``)  ``derive_seed(seed, iteration, phase, i)``; phase = :data:`PHASE_FAKE`
                                       or :data:`PHASE_G`; draws labels, z, sigma, noise, augmentation
global batch (``per_batch``)           ``derive_seed(seed, iteration, phase)``; every process and micro-batch
                                       takes its rows of the global batch's draws (:class:`BatchStream`)
training micro-batch (``per_rank``)    ``derive_seed(seed, iteration, phase, RANK_STREAM + rank, micro_batch)``
dropout and label dropout              torch's global RNG, reseeded with
                                       ``derive_seed(seed, iteration, phase, DROPOUT_STREAM, rank, micro_batch)``
student init (in-process teachers)     ``derive_seed(seed, STUDENT_INIT_STREAM)`` (global RNG, forked)
data-free start of G (``g_init``)      ``derive_seed(seed, G_INIT_STREAM, part)``, part 0: latents and labels,
                                       1: regression batches and dropout, 2: fake-score pre-fit
evaluation latent of seed ``s``        ``s`` (as EDM's ``generate.py`` numbers its images)
evaluation label of seed ``s``         ``derive_seed(s, LABEL_STREAM)``
Heun churn noise of seed ``s``         ``derive_seed(CHURN_STREAM, s)``
=====================================  =======================================================================

``derive_seed`` mixes its keys with SplitMix64, so neighbouring keys give unrelated streams (unlike ``seed + i``).
The constants below only have to differ from each other and from small counters; their values are arbitrary.

"Generator" arguments (:data:`GeneratorArg`) accept ``None`` (torch's global RNG), one ``torch.Generator``, or
a sequence of per-sample generators (one per row of the batch); per-sample draws are made on each generator's
device and then moved to the requested device.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

__all__ = [
    'GeneratorArg', 'PHASE_FAKE', 'PHASE_G', 'RANK_STREAM', 'DROPOUT_STREAM', 'STUDENT_INIT_STREAM', 'LABEL_STREAM',
    'CHURN_STREAM', 'G_INIT_STREAM', 'BatchStream', 'derive_seed', 'sample_generators', 'randn', 'rand', 'random_labels', 'latents_for_seeds',
    'labels_for_seeds', 'churn_generators',
]

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator], 'BatchStream']

#: Phases of a SiD iteration (the third key of every training stream).
PHASE_FAKE, PHASE_G = 0, 1
#: Offset of the per-rank streams; large so they never meet a sample index of the per-sample scheme.
RANK_STREAM = 1_000_003
#: Key of the dropout stream (distinct from the phases and sample indices that precede it).
DROPOUT_STREAM = 7
#: Key of the random initialisation of students built from kwargs (teachers without weights to copy).
STUDENT_INIT_STREAM = 0xC0FFEE
#: Key of the class label drawn for an evaluation seed (the latent uses the seed itself).
LABEL_STREAM = 1
#: Key of the churn noise of EDM's stochastic Heun sampler for an evaluation seed.
CHURN_STREAM = 7
#: Key of the data-free initialisation of G from the teacher's sampler.
G_INIT_STREAM = 0x6E1

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One round of the SplitMix64 finaliser: a bijective, well-mixing map on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure, well-mixed function of the integer ``keys``."""
    h = 0x243F6A8885A308D3
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h >> 1


def sample_generators(indices: Sequence[int], *keys: int, device='cpu') -> list:
    """One freshly seeded ``torch.Generator`` per sample index: seed ``derive_seed(*keys, index)``."""
    out = []
    for i in indices:
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(*keys, int(i)))
        out.append(g)
    return out


class BatchStream:
    """The random draws of one global batch, of which a process's micro-batch takes rows ``[start, start + count)``.

    The k-th draw of every micro-batch is the same global tensor (drawn once from one generator seeded with
    ``derive_seed(*keys)``, then cached), so the rows a sample receives do not depend on how the global batch is
    split over processes and micro-batches, while drawing costs one call per tensor instead of one per sample.
    Create one per (iteration, phase) and call :meth:`view` for each micro-batch.
    """

    def __init__(self, keys: Sequence[int], total: int, device='cpu'):
        self.gen = torch.Generator(device=device).manual_seed(derive_seed(*keys))
        self.total, self.cache = int(total), []

    def view(self, start: int, count: int) -> 'BatchStream':
        """A micro-batch's view: its k-th draw is rows ``[start, start + count)`` of the k-th global draw."""
        v = object.__new__(BatchStream)
        v.gen, v.total, v.cache, v.start, v.count, v.k = self.gen, self.total, self.cache, int(start), int(count), 0
        return v

    def draw(self, fn, n: int, shape, **kw) -> torch.Tensor:
        if n != self.count:
            raise ValueError(f'a batch-stream view holds {self.count} rows, {n} were asked for')
        if self.k == len(self.cache):
            self.cache.append(fn([self.total] + list(shape), generator=self.gen, device=self.gen.device, **kw))
        full = self.cache[self.k]
        if tuple(full.shape[1:]) != tuple(shape) or full.dtype != kw.get('dtype', full.dtype):
            raise ValueError('micro-batches of one batch stream must draw the same sequence of tensors')
        self.k += 1
        return full[self.start:self.start + self.count]


def _draw(fn, n, shape, generator, device, **kw):
    shape = list(shape)
    if isinstance(generator, BatchStream):
        out = generator.draw(fn, n, shape, **kw)
        return out.to(device) if device is not None else out
    if generator is None:
        return fn([n] + shape, device=device, **kw)
    if isinstance(generator, torch.Generator):
        out = fn([n] + shape, generator=generator, device=generator.device, **kw)
        return out.to(device) if device is not None else out
    if len(generator) != n:
        raise ValueError(f'expected {n} per-sample generators, got {len(generator)}')
    rows = [fn(shape, generator=g, device=g.device, **kw) for g in generator]
    out = torch.stack(rows) if rows else fn([0] + shape, **kw)
    return out.to(device) if device is not None else out


def randn(n: int, shape: Sequence[int], generator: GeneratorArg = None, device=None,
          dtype=torch.float32) -> torch.Tensor:
    """Standard normal ``[n, *shape]``; row ``i`` comes from ``generator[i]`` when per-sample."""
    return _draw(torch.randn, n, shape, generator, device, dtype=dtype)


def rand(n: int, shape: Sequence[int], generator: GeneratorArg = None, device=None,
         dtype=torch.float32) -> torch.Tensor:
    """Uniform on [0, 1) ``[n, *shape]``; row ``i`` comes from ``generator[i]`` when per-sample."""
    return _draw(torch.rand, n, shape, generator, device, dtype=dtype)


def random_labels(n: int, num_classes: int, generator: GeneratorArg = None, device=None,
                  probs: Optional[Sequence[float]] = None) -> Optional[torch.Tensor]:
    """One-hot class labels ``[n, num_classes]`` float32 (``None`` when ``num_classes == 0``).

    Classes are uniform unless ``probs`` (length ``num_classes``, need not be normalised) is given; either way
    exactly one uniform float64 number is drawn per sample and the CDF is inverted.
    """
    if num_classes <= 0:
        return None
    u = rand(n, [], generator, device='cpu', dtype=torch.float64)
    if probs is None:
        idx = (u * num_classes).floor().long().clamp_(max=num_classes - 1)
    else:
        p = torch.as_tensor(probs, dtype=torch.float64)
        cdf = torch.cumsum(p / p.sum(), 0)
        idx = torch.searchsorted(cdf, u, right=True).clamp_(max=num_classes - 1)
    return torch.nn.functional.one_hot(idx, num_classes).to(torch.float32).to(device)


def latents_for_seeds(seeds: Sequence[int], shape: Sequence[int], device=None,
                      dtype=torch.float64) -> torch.Tensor:
    """Latents ``[len(seeds), *shape]``: row i = ``randn(shape)`` from a CPU generator seeded with ``seeds[i]``.

    Any split of the seeds over batches or processes gives the same rows. Drawn in float64 on the CPU, then moved.
    """
    rows = [torch.randn(list(shape), generator=torch.Generator().manual_seed(int(s)), dtype=dtype) for s in seeds]
    out = torch.stack(rows) if rows else torch.zeros([0] + list(shape), dtype=dtype)
    return out.to(device) if device is not None else out


def labels_for_seeds(seeds: Sequence[int], num_classes: int, device=None,
                     probs: Optional[Sequence[float]] = None) -> Optional[torch.Tensor]:
    """One-hot labels ``[len(seeds), num_classes]`` (None if num_classes == 0), one generator per seed
    (``derive_seed(seed, LABEL_STREAM)``), uniform unless ``probs`` is given."""
    if num_classes <= 0:
        return None
    gens = [torch.Generator().manual_seed(derive_seed(int(s), LABEL_STREAM)) for s in seeds]
    return random_labels(len(gens), num_classes, gens, device=device, probs=probs)


def churn_generators(seeds: Sequence[int]) -> list:
    """Per-seed generators of the stochastic Heun sampler's churn noise (``derive_seed(CHURN_STREAM, s)``)."""
    return sample_generators(list(seeds), CHURN_STREAM)
