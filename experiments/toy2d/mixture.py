"""toy2d: a 2-D Gaussian mixture with an exact, closed-form denoiser as the SiD teacher.

The data are points in the plane stored as ``[N, 2, 1, 1]`` "images" so that the same EDM-preconditioned
networks, losses and samplers used for real images run unchanged. The mixture has ``K`` isotropic components
``N(mu_k, s^2 I)`` with equal weights. Adding Gaussian noise of standard deviation ``sigma`` keeps it a mixture,
``N(mu_k, (s^2 + sigma^2) I)``, so the optimal denoiser ``E[x0 | x_t = x]`` is available in closed form:

    E[x0 | x] = sum_k r_k(x) * (mu_k + s^2 / (s^2 + sigma^2) * (x - mu_k)),

with ``r_k(x)`` the posterior responsibility of component ``k`` under the noisy mixture. That module is the
teacher ``f_phi``: there is nothing to train, so every deviation of the student is the distillation's doing.

The metrics against this exact distribution are in :mod:`experiments.toy2d.metrics`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["MixtureSpec", "MixtureDenoiser", "ring_means", "sample_mixture", "mixture_log_density",
           "points_to_images", "images_to_points", "grid_log_density"]


@dataclass(frozen=True)
class MixtureSpec:
    """An equal-weight mixture of ``num_modes`` isotropic Gaussians with means on a circle.

    radius: distance of every mean from the origin (data units).
    std: per-coordinate standard deviation ``s`` of each component (data units).
    """

    num_modes: int = 8
    radius: float = 1.0
    std: float = 0.05

    def __post_init__(self):
        if int(self.num_modes) < 1:
            raise ValueError(f"toy2d.num_modes must be >= 1, got {self.num_modes!r}")
        if not float(self.radius) > 0 or not float(self.std) > 0:
            raise ValueError(f"toy2d.radius and toy2d.std must be > 0, got {self.radius!r}, {self.std!r}")

    @property
    def means(self) -> torch.Tensor:
        return ring_means(self.num_modes, self.radius)

    @property
    def data_std(self) -> float:
        """Per-coordinate standard deviation of the whole mixture (used as EDM's sigma_data)."""
        means = self.means.double()
        var = (means.pow(2).mean(0) - means.mean(0).pow(2)).mean().item() + self.std ** 2
        return math.sqrt(var)

    def to_dict(self) -> dict:
        return asdict(self)


def ring_means(num_modes: int, radius: float) -> torch.Tensor:
    """Means of the mixture: ``[K, 2]`` float64 points evenly spaced on a circle of ``radius``."""
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    return torch.stack([radius * torch.cos(angles), radius * torch.sin(angles)], dim=1)


def sample_mixture(spec: MixtureSpec, n: int, *, seed: int = 0) -> torch.Tensor:
    """``n`` exact samples of the mixture as ``[n, 2]`` float32 (deterministic for a given seed)."""
    gen = torch.Generator().manual_seed(int(seed))
    comp = torch.randint(spec.num_modes, (n,), generator=gen)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return (spec.means[comp] + spec.std * noise).float()


def _noisy_log_resp(x: torch.Tensor, means: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Log posterior responsibilities ``[N, K]`` of the components for noisy points ``x`` ``[N, 2]``.

    var: ``[N, 1]`` total per-coordinate variance ``s^2 + sigma^2``. Equal weights cancel in the softmax.
    """
    d2 = (x[:, None, :] - means[None, :, :]).pow(2).sum(-1)  # [N, K]
    return torch.log_softmax(-0.5 * d2 / var, dim=1)


def mixture_log_density(points: torch.Tensor, spec: MixtureSpec, sigma: float = 0.0) -> torch.Tensor:
    """Log density ``[N]`` (nats) of ``points`` ``[N, 2]`` under the mixture convolved with ``N(0, sigma^2 I)``."""
    x = points.reshape(-1, 2).double()
    var = spec.std ** 2 + float(sigma) ** 2
    d2 = (x[:, None, :] - spec.means[None]).pow(2).sum(-1)
    log_comp = -0.5 * d2 / var - math.log(2 * math.pi * var)  # 2-D isotropic Gaussian
    return torch.logsumexp(log_comp, dim=1) - math.log(spec.num_modes)


class MixtureDenoiser(nn.Module):
    """The exact denoiser ``E[x0 | x0 + sigma*n = x]`` of a :class:`MixtureSpec`, with EDMPrecond's call signature.

    ``forward(x, sigma, class_labels=None, force_fp32=False, augment_labels=None)``:
    x: ``[N, 2, 1, 1]`` noisy points; sigma: scalar, ``[N]`` or ``[N, 1, 1, 1]`` noise std (data units).
    Returns float32 ``[N, 2, 1, 1]``. Differentiable in ``x`` (SiD back-propagates through the teacher's input).
    Computed in float64 so that tiny sigmas do not underflow the responsibilities.
    """

    def __init__(self, num_modes: int = 8, radius: float = 1.0, std: float = 0.05):
        super().__init__()
        self.spec = MixtureSpec(int(num_modes), float(radius), float(std))
        self.register_buffer("means", self.spec.means, persistent=False)
        self.init_kwargs = dict(num_modes=int(num_modes), radius=float(radius), std=float(std))
        # Attributes samplers and the distillation loop read from EDMPrecond-like networks.
        self.img_resolution = 1
        self.img_channels = 2
        self.label_dim = 0
        self.use_fp16 = False
        self.sigma_min = 0.0
        self.sigma_max = float("inf")
        self.sigma_data = self.spec.data_std

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **unused):
        shape = x.shape
        pts = x.reshape(shape[0], 2).to(torch.float64)
        sig = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1)
        if sig.shape[0] == 1:
            sig = sig.expand(shape[0], 1)
        s2 = self.spec.std ** 2
        var = s2 + sig.pow(2)  # [N, 1]
        resp = _noisy_log_resp(pts, self.means, var).exp()  # [N, K]
        shrink = s2 / var  # weight of the observation inside each component's posterior mean
        post = self.means[None] + shrink[:, :, None] * (pts[:, None, :] - self.means[None])  # [N, K, 2]
        out = (resp[:, :, None] * post).sum(1)
        return out.to(torch.float32).reshape(shape)


def points_to_images(points: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` -> ``[N, 2, 1, 1]``."""
    return points.reshape(-1, 2, 1, 1)


def images_to_points(images: torch.Tensor) -> torch.Tensor:
    """``[N, 2, 1, 1]`` (or anything with 2 values per sample) -> ``[N, 2]``."""
    return images.reshape(images.shape[0], 2)


def grid_log_density(spec: MixtureSpec, extent: float, steps: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log density on a ``steps x steps`` grid over ``[-extent, extent]^2`` (for contour plots)."""
    lin = torch.linspace(-extent, extent, steps, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    ld = mixture_log_density(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), spec).reshape(steps, steps)
    return gx.numpy(), gy.numpy(), ld.numpy()


