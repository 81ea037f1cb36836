"""Loss formulas of EDM (``training/loss.py``: teachers and SiD's fake score) and SiD (``training/sid_loss.py``:
the generator loss and its noise schedule), per element with no reduction (the training loop sums and scales).
"""

from __future__ import annotations

from typing import Optional

import torch

from .rng import GeneratorArg, rand, randn

__all__ = ['EDMLoss', 'sid_sigma', 'sample_sid_sigma', 'sid_generator_loss', 'finite_sample_mask']


class EDMLoss:
    """EDM's denoising loss per element (Karras et al. 2022, Eq. 2), ``lambda(sigma) (D(y + sigma n; sigma, labels,
    aug) - y)^2`` with ``ln sigma ~ N(P_mean, P_std^2)``, ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``.
    Draws sigma, the augmentation, the noise, in this order, from ``generator``; ``sigma [N, 1, 1, 1]`` and ``noise``
    may be given instead. ``augment_labels`` go to the net when no ``augment_pipe`` is used."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean, self.P_std, self.sigma_data = float(P_mean), float(P_std), float(sigma_data)

    def sample_sigma(self, n: int, generator: GeneratorArg = None, device=None) -> torch.Tensor:
        return (randn(n, [1, 1, 1], generator, device=device) * self.P_std + self.P_mean).exp()

    def __call__(self, net, images, labels=None, augment_pipe=None, generator: GeneratorArg = None, *,
                 sigma: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                 augment_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        n = images.shape[0]
        if sigma is None:
            sigma = self.sample_sigma(n, generator, device=images.device)
        sigma = sigma.reshape(-1, 1, 1, 1).to(torch.float32)
        y = images
        if augment_pipe is not None:
            y, augment_labels = augment_pipe(images, generator=generator)
        if noise is None:
            noise = randn(n, y.shape[1:], generator, device=y.device)
        kw = {} if augment_labels is None else {'augment_labels': augment_labels}
        D = net(y + noise * sigma, sigma, labels, **kw)
        weight = (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2
        return weight * (D.to(torch.float32) - y.to(torch.float32)) ** 2


def sid_sigma(u, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
    """``(sigma_min^(1/rho) + u (sigma_max^(1/rho) - sigma_min^(1/rho)))^rho``, u in [0, 1] (floats or tensors)."""
    a, b = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (a + u * (b - a)) ** rho


def sample_sid_sigma(n: int, tmax: float, *, generator: GeneratorArg = None, device=None,
                     sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> torch.Tensor:
    """SiD's generator-loss noise levels ``[n, 1, 1, 1]``: sid_sigma(u), u ~ U(0, tmax/1000) (800: <= 24.41)."""
    u = rand(n, [1, 1, 1], generator, device=device) * (float(tmax) / 1000.0)
    return sid_sigma(u, sigma_min, sigma_max, rho)


def sid_generator_loss(x_g: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """SiD's generator loss per element (float32, shape of the inputs), before loss scale and reduction:
    ``(y_real - y_fake) ((y_real - x_g) - alpha (y_real - y_fake)) / w`` with the detached per-sample normaliser
    ``w = max(1e-5, mean_{C,H,W} |x_g - y_real|)``. Gradients flow into all three inputs but not into w.
    """
    x_g, y_real, y_fake = x_g.to(torch.float32), y_real.to(torch.float32), y_fake.to(torch.float32)
    with torch.no_grad():
        dims = tuple(range(1, x_g.ndim))
        w = (x_g - y_real).abs().mean(dim=dims, keepdim=True).clamp(min=1e-5)
    diff = y_real - y_fake
    return diff * ((y_real - x_g) - alpha * diff) / w


def finite_sample_mask(*tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """Bool ``[N]``: True for samples whose rows are finite in every given tensor (None entries are ignored)."""
    masks = [torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(dim=1) for t in tensors if t is not None]
    if not masks:
        raise ValueError('finite_sample_mask needs at least one tensor')
    return torch.stack(masks).all(dim=0)
