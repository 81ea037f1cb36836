"""The one-dimensional Gaussian case, where every quantity of SiD has a closed form (the method tour notebook).

Data ``N(mean, std^2)``; a generator ``x_g = m + v z`` with two parameters; the teacher and an *ideal* fake score
are exact denoisers, so SiD's identities and the role of alpha can be checked without training a network.
"""
from __future__ import annotations

import math

import torch

from sidlib.losses import sample_sid_sigma, sid_generator_loss

__all__ = ["gaussian_denoiser", "gaussian_log_density", "gaussian_sid_trajectory"]


def gaussian_denoiser(x: torch.Tensor, sigma, mean: float, std: float) -> torch.Tensor:
    """``E[x0 | x0 + sigma n = x]`` for ``x0 ~ N(mean, std^2)``: ``mean + std^2/(std^2+sigma^2) (x - mean)``."""
    return mean + std ** 2 / (std ** 2 + sigma ** 2) * (x - mean)


def gaussian_log_density(x: torch.Tensor, sigma, mean: float, std: float) -> torch.Tensor:
    """Log density of ``N(mean, std^2 + sigma^2)`` at ``x`` (nats)."""
    var = std ** 2 + sigma ** 2
    return -0.5 * (x - mean) ** 2 / var - 0.5 * torch.log(2 * math.pi * torch.as_tensor(var, dtype=x.dtype))


def gaussian_sid_trajectory(alpha: float, *, data_mean: float = 1.0, data_std: float = 0.5, init_mean: float = -1.0,
                            init_std: float = 1.5, steps: int = 600, batch: int = 1024, lr: float = 0.05,
                            tmax: float = 800.0, seed: int = 0) -> dict:
    """SiD on a 1-D Gaussian with a two-parameter generator ``x_g = m + v z`` (``v = exp(log_v)``), plain SGD.

    The teacher is the exact denoiser of ``N(data_mean, data_std^2)``; the fake score is the exact denoiser of the
    current generator ``N(m, v^2)`` (an ideal fake-score network), evaluated with the parameters detached, as SiD
    treats its fake score. The loss is :func:`sidlib.losses.sid_generator_loss` (mean over the batch) with noise
    levels from :func:`sidlib.losses.sample_sid_sigma`.
    Returns {"mean": [...], "std": [...], "diverged_at": step or None}; the lists stop at a divergence.
    """
    gen = torch.Generator().manual_seed(seed)
    m = torch.tensor(float(init_mean), dtype=torch.float64, requires_grad=True)
    log_v = torch.tensor(math.log(init_std), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.SGD([m, log_v], lr=lr)
    means, stds, diverged = [m.item()], [log_v.exp().item()], None
    for step in range(steps):
        z = torch.randn(batch, 1, 1, 1, generator=gen, dtype=torch.float64)
        x_g = m + log_v.exp() * z
        sigma = sample_sid_sigma(batch, tmax, generator=gen).double()
        x_t = x_g + sigma * torch.randn(batch, 1, 1, 1, generator=gen, dtype=torch.float64)
        y_real = gaussian_denoiser(x_t, sigma, data_mean, data_std)
        y_fake = gaussian_denoiser(x_t, sigma, m.detach(), log_v.detach().exp())
        loss = sid_generator_loss(x_g, y_real, y_fake, alpha).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if not (math.isfinite(m.item()) and math.isfinite(log_v.item())) or log_v.item() > 10:
            diverged = step + 1
            break
        means.append(m.item())
        stds.append(log_v.exp().item())
    return {"mean": means, "std": stds, "diverged_at": diverged}
