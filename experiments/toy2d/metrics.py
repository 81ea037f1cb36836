"""toy2d metrics: generated points against the exact mixture.

* ``within_2sigma``: the fraction of points within ``2 s`` of some mode's mean (``s`` the component std). Exact
  samples score ``1 - exp(-2) = 0.865`` (a 2-D Gaussian's mass within two standard deviations); a ring through
  the modes scores about half that. The midpoint between two neighbouring modes of the default mixture lies
  ``0.38`` from each, so a 4 s radius would count a ring as on-mode; 2 s does not.
* ``mode_share_min`` / ``mode_share_max``: the least and most popular mode's share of those points (exact: 1/K).
* ``modes_covered``: modes holding at least a quarter of the exact share 1/K of all points within 2 s.
* ``mean_log_density``: the mean log-density of the points under the true mixture (nats; exact samples: about
  -0.31 for the default mixture, a ring far less).
* ``energy_distance`` and ``sliced_wasserstein``: distances to true samples (data units).
"""
from __future__ import annotations

import math

import torch

from .mixture import MixtureSpec, images_to_points, mixture_log_density, sample_mixture

__all__ = ["mean_pairwise_distance", "energy_distance", "sliced_wasserstein", "mode_metrics", "evaluate_points", "reference_points",
           "REFERENCE_SEED"]

#: Seed of the true samples every metric compares against (disjoint from every other seed in the benchmark).
REFERENCE_SEED = 12345


def mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
    """Mean Euclidean distance over all pairs of rows of ``a`` ``[n, 2]`` and ``b`` ``[m, 2]`` (float64 sums)."""
    total = 0.0
    for i in range(0, a.shape[0], chunk):
        total += torch.cdist(a[i:i + chunk], b).sum().item()
    return total / (a.shape[0] * b.shape[0])


def energy_distance(x: torch.Tensor, y: torch.Tensor, *, yy: float | None = None) -> float:
    """Energy distance ``2E|X-Y| - E|X-X'| - E|Y-Y'|`` between sample sets ``[n, 2]`` and ``[m, 2]`` (data units).

    V-statistic form: zero when the two sets are identical, positive for different empirical distributions.
    yy: a precomputed ``E|Y-Y'|`` of the reference set (it does not change between evaluations).
    """
    x, y = x.reshape(-1, 2).double(), y.reshape(-1, 2).double()
    if yy is None:
        yy = mean_pairwise_distance(y, y)
    return 2 * mean_pairwise_distance(x, y) - mean_pairwise_distance(x, x) - yy


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance (data units) between ``[n, 2]`` and ``[m, 2]`` point sets.

    Projects on ``num_projections`` fixed random directions and compares 1-D quantile functions on a common grid,
    so ``n`` and ``m`` may differ.
    """
    x, y = x.reshape(-1, 2).double(), y.reshape(-1, 2).double()
    gen = torch.Generator().manual_seed(int(seed))
    theta = torch.randn(2, num_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = (x @ theta).sort(0)
    py, _ = (y @ theta).sort(0)
    q = (torch.arange(max(len(x), len(y)), dtype=torch.float64) + 0.5) / max(len(x), len(y))

    def quantiles(p: torch.Tensor) -> torch.Tensor:
        idx = (q * p.shape[0]).floor().long().clamp_(max=p.shape[0] - 1)
        return p[idx]

    return (quantiles(px) - quantiles(py)).abs().mean().item()


def mode_metrics(points: torch.Tensor, spec: MixtureSpec, *, radius_in_std: float = 2.0,
                 min_share: float = 0.25) -> dict:
    """``within_2sigma``, ``mode_share_min``/``max`` (of the points within the radius) and ``modes_covered``."""
    x = points.reshape(-1, 2).double()
    dist, nearest = torch.cdist(x, spec.means).min(1)
    on = dist <= radius_in_std * spec.std
    counts = torch.bincount(nearest[on], minlength=spec.num_modes).double()
    share = counts / max(int(on.sum()), 1)
    return {"within_2sigma": float(on.double().mean()) if len(x) else 0.0,
            "mode_share_min": float(share.min()), "mode_share_max": float(share.max()),
            "modes_covered": int((counts / max(len(x), 1) >= min_share / spec.num_modes).sum())}


def reference_points(spec: MixtureSpec, n: int = 10_000) -> torch.Tensor:
    """The true samples the distances are measured against (seed :data:`REFERENCE_SEED`)."""
    return sample_mixture(spec, n, seed=REFERENCE_SEED)


def evaluate_points(points: torch.Tensor, spec: MixtureSpec, reference: torch.Tensor | None = None, *,
                    reference_self_distance: float | None = None) -> dict:
    """Every toy2d metric of generated points ``[N, 2]`` (or ``[N, 2, 1, 1]``); non-finite points count as off-mode
    and are left out of the distances."""
    pts = images_to_points(points).detach().cpu().double()
    reference = reference_points(spec) if reference is None else reference
    finite = torch.isfinite(pts).all(1)
    ok = pts[finite]
    if not len(ok):  # a diverged generator: nothing to measure a distance from
        return {"energy_distance": math.inf, "sliced_wasserstein": math.inf, "mean_log_density": -math.inf,
                **mode_metrics(torch.full_like(pts, math.inf), spec)}
    return {"energy_distance": energy_distance(ok, reference, yy=reference_self_distance),
            "sliced_wasserstein": sliced_wasserstein(ok, reference),
            "mean_log_density": float(mixture_log_density(ok, spec).mean()) if len(ok) else -math.inf,
            **mode_metrics(torch.where(finite[:, None], pts, torch.full_like(pts, math.inf)), spec)}
