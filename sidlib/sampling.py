"""Samplers and seeded randomness for EDM teachers and SiD generators (k-diffusion style plain functions).

* :func:`edm_sigmas` / :func:`heun_sampler`: EDM's deterministic/stochastic 2nd-order Heun sampler
  (spec §5.7) for teacher denoisers, with the number of function evaluations (NFE) counted.
* :func:`generate_onestep` / :func:`generate_fewstep`: sampling a SiD generator ``G``.
* :func:`latents_for_seeds` / :func:`labels_for_seeds`: one ``torch.Generator`` per seed, so sample
  ``i`` depends only on seed ``i`` and never on how seeds are split over processes.
* :func:`derive_seed` / :func:`sample_generators` and the ``randn``/``rand``/``randint`` helpers:
  the counter-based randomness the distillation loop uses to make every random draw a pure function
  of ``(seed, iteration, phase, global sample index)``.

"Generator" arguments accept ``None`` (torch's global RNG), one ``torch.Generator``, or a sequence of
per-sample generators (one per row of the batch). Draws from per-sample generators are made on each
generator's device and then moved to the requested device.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

__all__ = [
    'GeneratorArg', 'derive_seed', 'sample_generators', 'randn', 'rand', 'randint', 'random_labels',
    'edm_sigmas', 'heun_sampler', 'generate_onestep', 'generate_fewstep', 'latents_for_seeds',
    'labels_for_seeds', 'to_uint8',
]

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]

_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# Counter-based seeding.

def _splitmix64(x: int) -> int:
    """One round of the SplitMix64 finaliser: a bijective, well-mixing map on 64-bit integers."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure, well-mixed function of the integer ``keys``.

    Used as ``derive_seed(seed, iteration, phase, index)``: neighbouring keys give unrelated streams,
    unlike ``seed + index``, whose streams of nearby seeds would overlap in meaning.
    """
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


def _draw(fn, n, shape, generator, device, **kw):
    shape = list(shape)
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


def randint(n: int, high: int, generator: GeneratorArg = None, device=None) -> torch.Tensor:
    """Integers in [0, high) ``[n]`` (int64)."""
    if generator is None or isinstance(generator, torch.Generator):
        dev = generator.device if generator is not None else device
        out = torch.randint(high, [n], generator=generator, device=dev)
        return out.to(device) if device is not None else out
    return _draw(lambda shape, **kw: torch.randint(high, shape, **kw), n, [], generator, device)


def random_labels(n: int, num_classes: int, generator: GeneratorArg = None, device=None,
                  probs: Optional[Sequence[float]] = None) -> Optional[torch.Tensor]:
    """One-hot class labels ``[n, num_classes]`` float32 (``None`` when ``num_classes == 0``).

    Classes are uniform unless ``probs`` (length ``num_classes``, need not be normalised) is given;
    either way exactly one uniform number is drawn per sample, by inverting the CDF.
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


# ----------------------------------------------------------------------------------------------
# EDM Heun sampler.

def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device=None) -> torch.Tensor:
    """EDM's noise levels ``[num_steps + 1]`` float64, decreasing from sigma_max to sigma_min, then 0.

    t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, i = 0..N-1; t_N = 0.
    """
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    i = torch.arange(num_steps, dtype=torch.float64, device=device)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def _call(denoiser, x, sigma, class_labels):
    """Denoiser on a per-sample sigma vector ``[N]``; returns float64 like ``x``."""
    s = torch.full([x.shape[0]], float(sigma), dtype=x.dtype, device=x.device)
    return denoiser(x, s, class_labels).to(x.dtype)


@torch.no_grad()
def heun_sampler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, class_labels=None,
                 S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float('inf'),
                 S_noise: float = 1.0, generator: GeneratorArg = None):
    """EDM's 2nd-order Heun sampler (spec §5.7). Returns ``(x0, nfe)``.

    Args:
        denoiser: ``D(x, sigma [N], class_labels) -> x0-estimate`` (an EDMPrecond or any callable).
        x: initial noise ``[N, C, H, W]`` already scaled by ``sigmas[0]`` (e.g. ``z * sigmas[0]``);
            the integration runs in x's dtype (use float64 to match EDM).
        sigmas: ``[N_steps + 1]`` decreasing noise levels ending in 0 (see :func:`edm_sigmas`).
        S_churn, S_min, S_max, S_noise: EDM's stochasticity parameters (S_churn=0: deterministic).
        generator: randomness for the churn noise (only used when S_churn > 0).

    The deterministic sampler uses ``2 N - 1`` network evaluations: the last step is an Euler step.
    """
    sigmas = [float(s) for s in sigmas]
    num_steps = len(sigmas) - 1
    nfe = 0
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            eps = randn(x.shape[0], x.shape[1:], generator, device=x.device, dtype=x.dtype)
            x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * eps
        else:
            x_hat = x
        d = (x_hat - _call(denoiser, x_hat, t_hat, class_labels)) / t_hat
        nfe += 1
        x = x_hat + (t_next - t_hat) * d
        if t_next > 0:
            d2 = (x - _call(denoiser, x, t_next, class_labels)) / t_next
            nfe += 1
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    return x, nfe


# ----------------------------------------------------------------------------------------------
# SiD generator sampling.

def _augment_zeros(net, n, device):
    """Zero augment labels when the network conditions on augmentations (contributes nothing, spec §1.2)."""
    dim = int(getattr(net, 'init_kwargs', {}).get('augment_dim', 0) or 0) if hasattr(net, 'init_kwargs') else 0
    return torch.zeros([n, dim], device=device) if dim > 0 else None


def generate_onestep(G, z: torch.Tensor, sigma_init: float, class_labels=None, augment_labels=None) -> torch.Tensor:
    """One-step SiD generation ``x_g = G(sigma_init * z, sigma_init, labels)``.

    z: ``[N, C, H, W]`` standard normal latents; class_labels ``[N, label_dim]`` or None.
    Returns float32 ``[N, C, H, W]`` images in [-1, 1] (not clipped). Gradients flow if enabled.
    """
    n = z.shape[0]
    sigma = torch.full([n, 1, 1, 1], float(sigma_init), dtype=torch.float32, device=z.device)
    kw = {}
    aug = augment_labels if augment_labels is not None else _augment_zeros(G, n, z.device)
    if aug is not None:
        kw['augment_labels'] = aug
    x = (z.to(torch.float32) * float(sigma_init))
    return G(x, sigma, class_labels, **kw).to(torch.float32)


def generate_fewstep(G, z: torch.Tensor, sigmas: Sequence[float], class_labels=None,
                     generator: GeneratorArg = None) -> torch.Tensor:
    """Multi-step sampling of a one-step generator by re-noising its output.

    x = G(sigmas[0] z, sigmas[0]); then for every later level s_k: x = G(x + s_k n_k, s_k), n_k ~ N(0, I)
    drawn from ``generator``. ``sigmas = [sigma_init]`` reproduces :func:`generate_onestep`.
    Returns float32 ``[N, C, H, W]``; NFE = len(sigmas).
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(s <= 0 for s in sigmas):
        raise ValueError(f'sigmas must be a non-empty list of positive levels, got {sigmas}')
    x = generate_onestep(G, z, sigmas[0], class_labels)
    for s in sigmas[1:]:
        n = randn(x.shape[0], x.shape[1:], generator, device=x.device)
        x = generate_onestep(G, x / s + n, s, class_labels)
    return x


def latents_for_seeds(seeds: Sequence[int], shape: Sequence[int], device=None,
                      dtype=torch.float64) -> torch.Tensor:
    """Latents ``[len(seeds), *shape]``: row i = ``randn(shape)`` from a generator seeded with ``seeds[i]``.

    Independent of batch composition and world size: any split of the seeds gives the same rows.
    Drawn in float64 (as EDM/SiD's scripts do) on the CPU, then moved to ``device``.
    """
    rows = []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        rows.append(torch.randn(list(shape), generator=g, dtype=dtype))
    out = torch.stack(rows) if rows else torch.zeros([0] + list(shape), dtype=dtype)
    return out.to(device) if device is not None else out


def labels_for_seeds(seeds: Sequence[int], num_classes: int, device=None) -> Optional[torch.Tensor]:
    """Uniform one-hot labels ``[len(seeds), num_classes]`` (None if num_classes == 0), one generator per seed.

    The generator for seed s is seeded with ``derive_seed(s, 1)``, so labels are independent of the
    latents' shape and of how the seeds are split.
    """
    if num_classes <= 0:
        return None
    gens = [torch.Generator().manual_seed(derive_seed(int(s), 1)) for s in seeds]
    return random_labels(len(gens), num_classes, gens, device=device)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 via ``clip(x * 127.5 + 128, 0, 255)`` (EDM/SiD's rounding), same layout."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)
