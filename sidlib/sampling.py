"""Samplers as plain functions: EDM's Heun sampler for teachers (:func:`edm_sigmas`, :func:`heun_sampler`; EDM's
``generate.py``), SiD generators (:func:`generate_onestep`, :func:`generate_fewstep`; SiD's ``generate_onestep.py``),
both as ``generator_fn(z, labels[, generators])`` of :mod:`sidlib.metrics.protocol` (:func:`onestep_generator`,
:func:`heun_generator`), and :func:`to_uint8`. Seeded evaluation noise lives in :mod:`sidlib.rng`.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .rng import GeneratorArg, randn

__all__ = ['edm_sigmas', 'heun_sampler', 'generate_onestep', 'generate_fewstep', 'augment_dim', 'augment_zeros',
           'sid_call', 'to_uint8', 'onestep_generator', 'heun_generator']


def edm_sigmas(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
               device=None) -> torch.Tensor:
    """EDM's noise levels ``[num_steps + 1]`` float64: ``t_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) -
    sigma_max^(1/rho)))^rho`` for i = 0..N-1, then ``t_N = 0``."""
    if num_steps < 1:
        raise ValueError(f'num_steps must be >= 1, got {num_steps}')
    frac = torch.arange(num_steps, dtype=torch.float64, device=device) / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def _call(denoiser, x, sigma, class_labels):
    """Denoiser on a per-sample sigma vector ``[N]``; returns float64 like ``x``."""
    s = torch.full([x.shape[0]], float(sigma), dtype=x.dtype, device=x.device)
    return denoiser(x, s, class_labels).to(x.dtype)


@torch.no_grad()
def heun_sampler(denoiser, x: torch.Tensor, sigmas: torch.Tensor, *, class_labels=None,
                 S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float('inf'),
                 S_noise: float = 1.0, generator: GeneratorArg = None, noise_every_step: bool = False):
    """EDM's 2nd-order Heun sampler (EDM, Algorithm 2; the last step is Euler). Returns ``(x0, nfe)``.

    denoiser: ``D(x, sigma [N], class_labels)``. x: ``[N, C, H, W]`` noise already scaled by ``sigmas[0]``,
    integrated in x's dtype (float64 matches EDM). sigmas: ``[N_steps + 1]`` decreasing, ending in 0.
    S_churn, S_min, S_max, S_noise: EDM's stochasticity (S_churn=0: deterministic); generator: the churn noise.
    noise_every_step: with S_churn > 0, draw the churn noise at every step and discard it where gamma = 0, as EDM's
    ``edm_sampler`` does, which with EDM's per-seed generators reproduces EDM's stochastic images.
    """
    sigmas = [float(s) for s in sigmas]
    num_steps = len(sigmas) - 1
    for i in range(num_steps):
        t_cur, t_next = sigmas[i], sigmas[i + 1]
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        draw = gamma > 0 or (noise_every_step and S_churn > 0)
        eps = randn(x.shape[0], x.shape[1:], generator, device=x.device, dtype=x.dtype) if draw else None
        x_hat = x + math.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * eps if gamma > 0 else x
        d = (x_hat - _call(denoiser, x_hat, t_hat, class_labels)) / t_hat
        x = x_hat + (t_next - t_hat) * d
        if t_next > 0:
            d2 = (x - _call(denoiser, x, t_next, class_labels)) / t_next
            x = x_hat + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
    return x, num_steps + sum(t > 0 for t in sigmas[1:])  # one evaluation per step, two where t_next > 0


def augment_dim(net) -> int:
    """Length of the augmentation conditioning a network was built with (0 = none); wrappers (DDP,
    ``torch.compile``) are looked through."""
    while isinstance(getattr(net, 'module', None) or getattr(net, '_orig_mod', None), torch.nn.Module):
        net = getattr(net, 'module', None) or net._orig_mod
    kwargs = getattr(net, 'init_kwargs', None)
    return int(kwargs.get('augment_dim', 0) or 0) if isinstance(kwargs, dict) else 0


def augment_zeros(net, n: int, device) -> torch.Tensor | None:
    """Zero augment labels ``[n, augment_dim]`` (what SiD feeds without augmentation; the augment mapping has no
    bias) for a network built with ``augment_dim > 0``, else None."""
    dim = augment_dim(net)
    return torch.zeros([n, dim], device=device) if dim > 0 else None


def sid_call(net, x, sigma, class_labels=None, augment_labels=None) -> torch.Tensor:
    """``net(x, sigma, class_labels)`` in float32 as SiD calls its networks: with ``augment_labels``, by default
    :func:`augment_zeros` (none for networks without augmentation conditioning)."""
    if augment_labels is None:
        augment_labels = augment_zeros(net, x.shape[0], x.device)
    kw = {} if augment_labels is None else {'augment_labels': augment_labels}
    return net(x, sigma, class_labels, **kw).to(torch.float32)


def generate_onestep(G, z: torch.Tensor, init_sigma: float, class_labels=None, augment_labels=None) -> torch.Tensor:
    """One-step SiD generation ``x_g = G(init_sigma * z, init_sigma, labels)`` from standard normal latents
    ``z [N, C, H, W]``: float32 images in [-1, 1] (not clipped); gradients flow if enabled."""
    sigma = torch.full([z.shape[0], 1, 1, 1], float(init_sigma), dtype=torch.float32, device=z.device)
    return sid_call(G, z.to(torch.float32) * float(init_sigma), sigma, class_labels, augment_labels)


def generate_fewstep(G, z: torch.Tensor, sigmas: Sequence[float], class_labels=None,
                     generator: GeneratorArg = None) -> torch.Tensor:
    """Multi-step sampling by re-noising: x = G(sigmas[0] z, sigmas[0]), then x = G(x + s_k n_k, s_k) for each later
    level, n_k ~ N(0, I) from ``generator``; ``[init_sigma]`` is :func:`generate_onestep`. NFE = len(sigmas)."""
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(s <= 0 for s in sigmas):
        raise ValueError(f'sigmas must be a non-empty list of positive levels, got {sigmas}')
    x = generate_onestep(G, z, sigmas[0], class_labels)
    for s in sigmas[1:]:
        n = randn(x.shape[0], x.shape[1:], generator, device=x.device)
        x = generate_onestep(G, x / s + n, s, class_labels)
    return x


def onestep_generator(G: torch.nn.Module, init_sigma: float = 2.5) -> Callable:
    """SiD's one-step sampling ``G(init_sigma * z, init_sigma, labels)`` (``generate_onestep.py``) as a
    ``generator_fn(z, labels)``; ``fn.nfe`` and ``fn.description`` say what it is."""
    def fn(z, labels):
        return generate_onestep(G, z.to(torch.float32), init_sigma, labels)
    fn.nfe = 1
    fn.description = {"kind": "onestep", "init_sigma": float(init_sigma), "nfe": 1}
    return fn


def heun_generator(net: torch.nn.Module, num_steps: int = 18, *, sigma_min: float = 0.002, sigma_max: float = 80.0,
                   rho: float = 7.0, S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"),
                   S_noise: float = 1.0) -> Callable:
    """EDM's ``edm_sampler`` (``generate.py``; ``num_steps`` Heun steps, NFE = 2*num_steps - 1) as a
    ``generator_fn(z, labels, generators)``: float64 from ``z * sigma_max``, the sigma range clamped to the
    network's, the churn noise drawn at every step from the seeds' generators (:func:`sidlib.rng.inputs_for_seeds`)."""
    sigma_min = max(sigma_min, float(getattr(net, "sigma_min", 0.0)))
    sigma_max = min(sigma_max, float(getattr(net, "sigma_max", math.inf)))
    sigmas = edm_sigmas(num_steps, sigma_min, sigma_max, rho)

    def fn(z, labels, generators=None):
        if S_churn > 0 and generators is None:
            raise ValueError("the stochastic Heun sampler needs the seeds' generators")
        return heun_sampler(net, z.to(torch.float64) * sigmas[0], sigmas.to(z.device), class_labels=labels,
                            S_churn=S_churn, S_min=S_min, S_max=S_max, S_noise=S_noise, generator=generators,
                            noise_every_step=True)[0]
    fn.nfe = 2 * num_steps - 1
    fn.description = {"kind": "heun", "steps": int(num_steps), "nfe": 2 * num_steps - 1, "S_churn": S_churn,
                      "S_min": S_min, "S_max": S_max if math.isfinite(S_max) else None, "S_noise": S_noise}
    return fn


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 via ``clip(x * 127.5 + 128, 0, 255)``, same layout, computed in float64 as EDM's
    ``generate.py`` and SiD's ``generate_onestep.py`` do (exact for float32 input, so the bytes equal theirs)."""
    return (x.to(torch.float64) * 127.5 + 128).clip(0, 255).to(torch.uint8)
