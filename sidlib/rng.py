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
evaluation seed ``s``                  ``s % 2**32`` on the generating device (EDM's ``StackedRandomGenerator``
                                       in ``generate.py``; SiD's ``generate_onestep.py``), drawn in this order:
                                       the latent (float32 ``randn``), the class label (``randint(label_dim)``,
                                       or one float64 uniform when class frequencies are given), then one
                                       float64 ``randn`` per step of the stochastic Heun sampler
=====================================  =======================================================================

``derive_seed`` mixes its keys with SplitMix64, so neighbouring keys give unrelated streams (unlike ``seed + i``);
two streams meet only when their whole key tuples are equal. The training constants keep their values (runs stay
reproducible), which leaves one meeting: the ``per_batch`` streams of iteration ``G_INIT_STREAM`` (1761) equal
the ``g_init`` parts 0 and 1. Evaluation seeds are below ``2**32`` and the derived seeds are 63-bit hashes, so the
two families do not meet in practice.

"Generator" arguments (:data:`GeneratorArg`) accept ``None`` (torch's global RNG), one ``torch.Generator``, or
a sequence of per-sample generators (one per row of the batch); per-sample draws are made on each generator's
device and then moved to the requested device.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

__all__ = [
    'GeneratorArg', 'PHASE_FAKE', 'PHASE_G', 'RANK_STREAM', 'DROPOUT_STREAM', 'STUDENT_INIT_STREAM',
    'G_INIT_STREAM', 'BatchStream', 'derive_seed', 'sample_generators', 'randn', 'rand', 'random_labels',
    'SeedInputs', 'seed_generators', 'inputs_for_seeds', 'latents_for_seeds', 'reseed_global',
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


class SeedInputs(NamedTuple):
    """What an evaluation seed gives: latents ``[N, *shape]`` float32, one-hot labels ``[N, label_dim]`` float32
    (None when unconditional) and the per-seed generators, positioned for the sampler's own noise."""
    latents: torch.Tensor
    labels: Optional[torch.Tensor]
    generators: list


def seed_generators(seeds: Sequence[int], device=None) -> list:
    """One generator per seed on ``device`` (default CPU), seeded with ``seed % 2**32`` (EDM's
    ``StackedRandomGenerator``). CPU and CUDA generators give different numbers for the same seed."""
    device = torch.device('cpu') if device is None else torch.device(device)
    return [torch.Generator(device=device).manual_seed(int(s) % (1 << 32)) for s in seeds]


def _one_hot(idx: torch.Tensor, num_classes: int, device) -> torch.Tensor:
    return torch.eye(num_classes, device=idx.device)[idx].to(device)


def inputs_for_seeds(seeds: Sequence[int], shape: Sequence[int], label_dim: int = 0, device=None, *,
                     probs: Optional[Sequence[float]] = None, class_idx: Optional[int] = None) -> SeedInputs:
    """Latents and labels of evaluation seeds, drawn as EDM's ``generate.py`` and SiD's ``generate_onestep.py`` draw
    them: per seed, ``randn(shape)`` (float32) then ``randint(label_dim)`` from the seed's generator on ``device``.

    probs: class frequencies (length ``label_dim``, need not be normalised): the label is then one float64 uniform
        from the same generator, inverted through the CDF (an option EDM does not have). class_idx: every label set
        to this class after the draw (EDM's ``--class``), so the sampler's later noise is unchanged.
    Any split of the seeds over batches or processes gives the same rows.
    """
    shape, gens = [int(s) for s in shape], seed_generators(seeds, device)
    if not gens:
        z = torch.zeros([0] + shape, device=device)
        return SeedInputs(z, torch.zeros([0, label_dim], device=device) if label_dim > 0 else None, gens)
    z = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in gens])
    if label_dim <= 0:
        if class_idx is not None:
            raise ValueError(f'class {class_idx} given for an unconditional network')
        return SeedInputs(z, None, gens)
    if probs is None:
        idx = torch.stack([torch.randint(label_dim, size=[], generator=g, device=g.device) for g in gens])
    else:
        p = torch.as_tensor(probs, dtype=torch.float64)
        if p.shape != (label_dim,) or not bool((p >= 0).all()) or float(p.sum()) <= 0:
            raise ValueError(f'class frequencies must be {label_dim} non-negative numbers with a positive sum, '
                             f'got {list(p.shape)} values')
        u = torch.stack([torch.rand([], generator=g, device=g.device, dtype=torch.float64) for g in gens]).cpu()
        idx = torch.searchsorted(torch.cumsum(p / p.sum(), 0), u, right=True).clamp_(max=label_dim - 1)
    if class_idx is not None:
        if not 0 <= int(class_idx) < label_dim:
            raise ValueError(f'class {class_idx} outside 0..{label_dim - 1}')
        idx = torch.full_like(idx, int(class_idx))
    return SeedInputs(z, _one_hot(idx, label_dim, z.device), gens)


def latents_for_seeds(seeds: Sequence[int], shape: Sequence[int], device=None,
                      dtype=torch.float64) -> torch.Tensor:
    """The latents of :func:`inputs_for_seeds` (EDM's float32 draw on ``device``), returned in ``dtype`` (an exact
    cast for float64, the dtype EDM's Heun sampler integrates in)."""
    return inputs_for_seeds(seeds, shape, 0, device).latents.to(dtype)


def reseed_global(seed: int, device) -> None:
    """Seed torch's global RNG of ``device`` (dropout draws from it), CPU always. Unlike ``torch.manual_seed`` this
    queues no seed for CUDA, MTIA or XPU when they are not initialised, which captures a stack trace per call
    (about 1 ms, a tenth of a tiny network's iteration); on the CPU the resulting stream is the same."""
    torch.default_generator.manual_seed(seed)
    if torch.device(device).type == 'cuda':
        torch.cuda.manual_seed(seed)
