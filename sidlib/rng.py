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
evaluation seed ``s``                  ``s % 2**32`` on the generating device (EDM's ``generate.py``): the latent
                                       (float32 ``randn``), the label (``randint`` or one float64 uniform), then
                                       one float64 ``randn`` per step of the stochastic Heun sampler
=====================================  =======================================================================

``derive_seed`` mixes its keys with SplitMix64: streams meet only when their whole key tuples are equal (the one
meeting, kept for reproducibility: ``per_batch`` streams of iteration ``G_INIT_STREAM`` (1761) equal ``g_init`` parts
0 and 1). "Generator" arguments (:data:`GeneratorArg`): ``None`` (torch's global RNG), one ``torch.Generator``, a
:class:`BatchStream` view, or one generator per row (drawn on its device, then moved to the requested device).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

__all__ = [
    'GeneratorArg', 'PHASE_FAKE', 'PHASE_G', 'RANK_STREAM', 'DROPOUT_STREAM', 'STUDENT_INIT_STREAM',
    'G_INIT_STREAM', 'BatchStream', 'derive_seed', 'sample_generators', 'randn', 'rand', 'random_labels',
    'SeedInputs', 'inputs_for_seeds', 'latents_for_seeds', 'reseed_global',
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
    return [torch.Generator(device=device).manual_seed(derive_seed(*keys, int(i))) for i in indices]


class BatchStream:
    """The random draws of one global batch (one per iteration and phase; :meth:`view` per micro-batch): the k-th
    draw of every view is rows ``[start, start + count)`` of one cached global tensor drawn from ``derive_seed(*keys)``,
    so a sample's rows do not depend on the split over processes and micro-batches, at one call per tensor."""

    def __init__(self, keys: Sequence[int], total: int, device='cpu'):
        self.gen = torch.Generator(device=device).manual_seed(derive_seed(*keys))
        self.total, self.cache = int(total), []

    def view(self, start: int, count: int) -> 'BatchStream':
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
    if generator is None:
        return fn([n] + shape, device=device, **kw)
    if isinstance(generator, BatchStream):
        out = generator.draw(fn, n, shape, **kw)
    elif isinstance(generator, torch.Generator):
        out = fn([n] + shape, generator=generator, device=generator.device, **kw)
    elif len(generator) != n:
        raise ValueError(f'expected {n} per-sample generators, got {len(generator)}')
    else:
        rows = [fn(shape, generator=g, device=g.device, **kw) for g in generator]
        out = torch.stack(rows) if rows else fn([0] + shape, **kw)
    return out.to(device) if device is not None else out


def _inverse_cdf(u: torch.Tensor, p: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class indices of the float64 uniforms ``u`` under the (unnormalised) float64 frequencies ``p``."""
    return torch.searchsorted(torch.cumsum(p / p.sum(), 0), u, right=True).clamp_(max=num_classes - 1)


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
    """One-hot class labels ``[n, num_classes]`` float32 (None when ``num_classes == 0``), uniform or by the
    unnormalised ``probs``: one float64 uniform per sample, CDF inverted."""
    if num_classes <= 0:
        return None
    u = rand(n, [], generator, device='cpu', dtype=torch.float64)
    if probs is None:
        idx = (u * num_classes).floor().long().clamp_(max=num_classes - 1)
    else:
        idx = _inverse_cdf(u, torch.as_tensor(probs, dtype=torch.float64), num_classes)
    return torch.nn.functional.one_hot(idx, num_classes).to(torch.float32).to(device)


class SeedInputs(NamedTuple):
    """What an evaluation seed gives: latents ``[N, *shape]`` float32, one-hot labels ``[N, label_dim]`` float32
    (None when unconditional) and the per-seed generators, positioned for the sampler's own noise."""
    latents: torch.Tensor
    labels: Optional[torch.Tensor]
    generators: list


def inputs_for_seeds(seeds: Sequence[int], shape: Sequence[int], label_dim: int = 0, device=None, *,
                     probs: Optional[Sequence[float]] = None, class_idx: Optional[int] = None) -> SeedInputs:
    """Latents and labels of evaluation seeds as EDM's ``generate.py`` and SiD's ``generate_onestep.py`` draw them:
    per seed, ``randn(shape)`` (float32) then ``randint(label_dim)`` from a generator on ``device`` (default CPU)
    seeded with ``seed % 2**32`` (EDM's ``StackedRandomGenerator``; CPU and CUDA give different numbers); any split
    of the seeds gives the same rows. probs: unnormalised class frequencies (not in EDM): the label is then one float64
    uniform, CDF inverted. class_idx: every label set to it after the draw (EDM's ``--class``)."""
    shape, gen_device = [int(s) for s in shape], torch.device('cpu' if device is None else device)
    gens = [torch.Generator(device=gen_device).manual_seed(int(s) % (1 << 32)) for s in seeds]
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
        idx = _inverse_cdf(u, p, label_dim)
    if class_idx is not None:
        if not 0 <= int(class_idx) < label_dim:
            raise ValueError(f'class {class_idx} outside 0..{label_dim - 1}')
        idx = torch.full_like(idx, int(class_idx))
    return SeedInputs(z, torch.eye(label_dim, device=idx.device)[idx].to(z.device), gens)


def latents_for_seeds(seeds: Sequence[int], shape: Sequence[int], device=None, dtype=torch.float64) -> torch.Tensor:
    """The latents of :func:`inputs_for_seeds` (EDM's float32 draw on ``device``), returned in ``dtype`` (an exact
    cast for float64, the dtype EDM's Heun sampler integrates in)."""
    return inputs_for_seeds(seeds, shape, 0, device).latents.to(dtype)


def reseed_global(seed: int, device) -> None:
    """Seed torch's global RNG of ``device`` (dropout draws from it), CPU always: the same stream as
    ``torch.manual_seed`` without its costly (about 1 ms) lazy seeding of uninitialised CUDA/MTIA/XPU devices."""
    torch.default_generator.manual_seed(seed)
    if torch.device(device).type == 'cuda':
        torch.cuda.manual_seed(seed)
