"""toy2d: a 2-D Gaussian mixture with an exact, closed-form denoiser as the SiD teacher.

The data are points in the plane stored as ``[N, 2, 1, 1]`` "images" so that the same EDM-preconditioned
networks, losses and samplers used for real images run unchanged. The mixture has ``K`` isotropic components
``N(mu_k, s^2 I)`` with equal weights. Adding Gaussian noise of standard deviation ``sigma`` keeps it a mixture,
``N(mu_k, (s^2 + sigma^2) I)``, so the optimal denoiser ``E[x0 | x_t = x]`` is available in closed form:

    E[x0 | x] = sum_k r_k(x) * (mu_k + s^2 / (s^2 + sigma^2) * (x - mu_k)),

with ``r_k(x)`` the posterior responsibility of component ``k`` under the noisy mixture. That module is the
teacher ``f_phi``: there is nothing to train, so every deviation of the student is the distillation's doing.

Metrics compare generated points with the exact distribution: energy distance and sliced Wasserstein distance to
10k true samples, mode coverage, and mean log-density under the true mixture.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

__all__ = [
    "MixtureSpec",
    "MixtureDenoiser",
    "ring_means",
    "sample_mixture",
    "mixture_log_density",
    "energy_distance",
    "sliced_wasserstein",
    "mode_coverage",
    "evaluate_points",
    "points_to_images",
    "images_to_points",
]


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


def _mean_pairwise_distance(a: torch.Tensor, b: torch.Tensor, chunk: int = 2048) -> float:
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
        yy = _mean_pairwise_distance(y, y)
    return 2 * _mean_pairwise_distance(x, y) - _mean_pairwise_distance(x, x) - yy


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


def mode_coverage(points: torch.Tensor, spec: MixtureSpec, *, radius_in_std: float = 4.0,
                  min_share: float = 0.25) -> dict:
    """Which modes the points cover.

    A point belongs to its nearest mean if it lies within ``radius_in_std * std`` of it, else it is off-mode.
    A mode counts as covered when it holds at least ``min_share`` of the share it has under the true
    mixture (``1/K``) among all points.
    Returns ``{"modes_covered": int, "num_modes": K, "on_mode_fraction": float, "mode_fractions": [K floats]}``.
    """
    x = points.reshape(-1, 2).double()
    d = torch.cdist(x, spec.means)  # [N, K]
    dist, nearest = d.min(1)
    on = dist <= radius_in_std * spec.std
    counts = torch.bincount(nearest[on], minlength=spec.num_modes).double()
    frac = counts / max(len(x), 1)
    covered = int((frac >= min_share / spec.num_modes).sum().item())
    return {
        "modes_covered": covered,
        "num_modes": spec.num_modes,
        "on_mode_fraction": float(on.double().mean().item()) if len(x) else 0.0,
        "mode_fractions": [round(float(f), 6) for f in frac],
    }


def evaluate_points(points: torch.Tensor, spec: MixtureSpec, reference: torch.Tensor | None = None, *,
                    num_reference: int = 10_000, reference_self_distance: float | None = None) -> dict:
    """All toy2d metrics of generated points ``[N, 2]`` against the exact mixture.

    reference: true samples ``[M, 2]``; by default 10k samples with seed 12345 (disjoint from training seeds).
    Returns energy_distance, sliced_wasserstein, mean_log_density (nats), modes_covered, on_mode_fraction.
    """
    pts = images_to_points(points).detach().cpu().float()
    if reference is None:
        reference = sample_mixture(spec, num_reference, seed=12345)
    cov = mode_coverage(pts, spec)
    finite = torch.isfinite(pts).all(1)
    return {
        "energy_distance": energy_distance(pts[finite], reference, yy=reference_self_distance),
        "sliced_wasserstein": sliced_wasserstein(pts[finite], reference),
        "mean_log_density": float(mixture_log_density(pts[finite], spec).mean().item()),
        "modes_covered": cov["modes_covered"],
        "num_modes": cov["num_modes"],
        "on_mode_fraction": cov["on_mode_fraction"],
    }


def reference_metrics(spec: MixtureSpec, n: int, *, seed: int = 777) -> dict:
    """The metrics of ``n`` fresh exact samples: the floor any generator is compared against."""
    return evaluate_points(sample_mixture(spec, n, seed=seed), spec)


def grid_log_density(spec: MixtureSpec, extent: float, steps: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log density on a ``steps x steps`` grid over ``[-extent, extent]^2`` (for contour plots)."""
    lin = torch.linspace(-extent, extent, steps, dtype=torch.float64)
    gx, gy = torch.meshgrid(lin, lin, indexing="xy")
    ld = mixture_log_density(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), spec).reshape(steps, steps)
    return gx.numpy(), gy.numpy(), ld.numpy()


# --------------------------------------------------------------------------------------------------------------
# Distillation runs on toy2d (one per alpha), used by the pipeline and the toy2d notebook.

TEACHER_NAME = "toy2d-analytic"


def register_teacher(spec: MixtureSpec) -> str:
    """Register the exact denoiser of ``spec`` with :func:`sidlib.distill.register_teacher`; returns its name."""
    from .distill import register_teacher as _register

    kwargs = spec.to_dict()
    _register(TEACHER_NAME, lambda: MixtureDenoiser(**kwargs))
    return TEACHER_NAME


def student_kwargs(network: dict) -> dict:
    """EDMPrecond kwargs of the toy2d generator and fake score (an MLPNet on ``[N, 2, 1, 1]`` points)."""
    return dict(img_resolution=1, img_channels=2, label_dim=0, model_type="MLPNet",
                model_channels=int(network.get("model_channels", 128)), num_layers=int(network.get("num_layers", 3)))


class PointsEval:
    """SiD eval callback for toy2d: generates ``num_samples`` points from fixed latent seeds, computes
    :func:`evaluate_points`, and stores the first ``keep`` points as ``points-<kimg>.pt`` for the pictures."""

    def __init__(self, spec: MixtureSpec, run_dir, init_sigma: float, num_samples: int = 5000,
                 num_reference: int = 10_000, keep: int = 2000, seed_offset: int = 0):
        from .sampling import latents_for_seeds

        self.spec, self.run_dir, self.init_sigma, self.keep = spec, run_dir, float(init_sigma), keep
        self.z = latents_for_seeds(range(seed_offset, seed_offset + num_samples), [2, 1, 1]).float()
        self.reference = sample_mixture(spec, num_reference, seed=12345)
        self.yy = _mean_pairwise_distance(self.reference.double(), self.reference.double())

    @torch.no_grad()
    def __call__(self, G, kimg: float) -> dict:
        from pathlib import Path

        from .sampling import generate_onestep

        pts = images_to_points(generate_onestep(G, self.z, self.init_sigma))
        torch.save(pts[: self.keep].clone(), Path(self.run_dir) / f"points-{int(round(kimg * 1000)):09d}.pt")
        return evaluate_points(pts, self.spec, self.reference, reference_self_distance=self.yy)


def mixture_spec(cfg: dict) -> MixtureSpec:
    """The :class:`MixtureSpec` of a ``toy2d`` params section (its ``data`` block)."""
    d = cfg["data"]
    return MixtureSpec(int(d["num_modes"]), float(d["radius"]), float(d["std"]))


def alpha_dir(ckpt_dir, alpha: float):
    """Run directory of the SiD run at ``alpha`` under the benchmark's checkpoint folder."""
    from pathlib import Path

    return Path(ckpt_dir) / "sid" / f"alpha-{float(alpha):g}"


def distill_config(cfg: dict, alpha: float, run_dir) -> dict:
    """A :class:`sidlib.distill.DistillConfig` mapping for one toy2d run from the ``toy2d`` params section."""
    d = cfg["distill"]
    batch = int(d.get("batch", 256))
    return dict(
        teacher=TEACHER_NAME, teacher_kwargs=mixture_spec(cfg).to_dict(),
        student=student_kwargs(d["network"]), alpha=float(alpha), tmax=float(d.get("tmax", 800)),
        init_sigma=float(d.get("init_sigma", 2.5)), batch=batch, lr=float(d["lr"]), glr=float(d["glr"]),
        g_beta1=float(d.get("g_beta1", 0.0)), lsg=float(d.get("lsg", 100.0)), ls=float(d.get("ls", 1.0)),
        ema_halflife_kimg=float(d.get("ema_halflife_kimg", 2.0)), ema_rampup=float(d.get("ema_rampup", 0.05)),
        duration_kimg=float(d["kimg"]), tick_kimg=float(d.get("eval_every_kimg", 5.0)), snap_ticks=1,
        state_ticks=max(1, int(round(float(d.get("checkpoint_every_kimg", d.get("eval_every_kimg", 5.0)))
                                     / float(d.get("eval_every_kimg", 5.0))))),
        seed=int(d.get("seed", 0)), device="cpu", grid_size=0, progress=False, run_dir=str(run_dir))


def run_alpha(cfg: dict, alpha: float, ckpt_dir) -> dict:
    """Distil the toy2d teacher into a one-step MLP generator with SiD at ``alpha`` (resumable); returns run_dir.

    The run lands in ``<ckpt_dir>/sid/alpha-<alpha>``. Evaluates and stores points every
    ``distill.eval_every_kimg`` thousand images (metrics logged in ``log.jsonl``). Returns {alpha, run_dir, seconds}.
    """
    import time

    from .distill import distill

    run_dir = alpha_dir(ckpt_dir, alpha)
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = mixture_spec(cfg)
    register_teacher(spec)
    callback = PointsEval(spec, run_dir, cfg["distill"].get("init_sigma", 2.5),
                          num_samples=int(cfg["distill"].get("eval_samples", 5000)),
                          num_reference=int(cfg["data"].get("num_reference", 10_000)))
    t0 = time.perf_counter()
    distill(distill_config(cfg, alpha, run_dir), eval_fn=callback)
    return {"alpha": float(alpha), "run_dir": str(run_dir), "seconds": time.perf_counter() - t0}


def training_curve(run_dir) -> list[dict]:
    """The eval records of a toy2d SiD run: [{kimg, images_seen, energy_distance, modes_covered, ...}]."""
    from pathlib import Path

    from .logging_utils import read_jsonl

    return [{"kimg": r["kimg"], "images_seen": r["images_seen"], **r["metrics"]}
            for r in read_jsonl(Path(run_dir) / "log.jsonl") if r.get("metrics")]


def point_snapshots(run_dir) -> list[tuple[float, torch.Tensor]]:
    """[(kimg, points [n, 2])] stored by :class:`PointsEval` during a run, in order."""
    from pathlib import Path

    out = []
    for f in sorted(Path(run_dir).glob("points-*.pt")):
        out.append((int(f.stem.split("-")[1]) / 1000, torch.load(f, weights_only=True)))
    return out


def evaluate_alpha(cfg: dict, alpha: float, ckpt_dir) -> dict:
    """Final metrics of the SiD run at ``alpha`` (last G_ema snapshot, ``eval.num_samples`` fixed seeds) and the
    summary of its last ``eval.last_evals`` in-training evaluations."""
    import time

    from .checkpoints import load_checkpoint
    from .pipeline import summarise_metric
    from .sampling import generate_onestep, latents_for_seeds

    run_dir = alpha_dir(ckpt_dir, alpha)
    snaps = sorted(run_dir.glob("network-snapshot-*.safetensors"))
    if not snaps:
        raise FileNotFoundError(f"no SiD generator snapshot in {run_dir} (produced by the 'distill@toy2d' stage)")
    G, meta = load_checkpoint(snaps[-1])
    spec = mixture_spec(cfg)
    n = int(cfg["eval"]["num_samples"])
    z = latents_for_seeds(range(2_000_000, 2_000_000 + n), [2, 1, 1]).float()
    t0 = time.perf_counter()
    with torch.no_grad():
        pts = images_to_points(generate_onestep(G, z, float(meta["init_sigma"])))
    secs = time.perf_counter() - t0
    curve = training_curve(run_dir)
    last = curve[-int(cfg["eval"].get("last_evals", 3)):]
    return {"alpha": float(alpha), "kimg": meta.get("kimg"), "sec_per_1k": secs / n * 1000,
            **evaluate_points(pts, spec, num_reference=int(cfg["data"].get("num_reference", 10_000))),
            "last_evals_energy": summarise_metric([r.get("energy_distance") for r in last]),
            "last_evals_modes_min": min((r.get("modes_covered", 0) for r in last), default=None),
            "points": pts[:2000]}


def evaluate_teacher(cfg: dict) -> list[dict]:
    """The exact denoiser sampled with EDM's Heun sampler at every ``eval.nfe`` (deterministic, float64).

    Returns one row per NFE with the metrics of :func:`evaluate_points`, ``sec_per_1k`` and the first 2,000 points.
    """
    import time

    from .sampling import edm_sigmas, heun_sampler, latents_for_seeds

    spec = mixture_spec(cfg)
    den = MixtureDenoiser(**spec.to_dict())
    n = int(cfg["eval"]["num_samples"])
    z = latents_for_seeds(range(1_000_000, 1_000_000 + n), [2, 1, 1])
    rows = []
    for nfe in sorted(int(k) for k in cfg["eval"]["nfe"]):
        sig = edm_sigmas((nfe + 1) // 2)
        t0 = time.perf_counter()
        x, used = heun_sampler(den, z * sig[0], sig)
        secs = time.perf_counter() - t0
        pts = images_to_points(x).float()
        rows.append({"model": "exact teacher (Heun)", "nfe": used, "sec_per_1k": secs / n * 1000,
                     **evaluate_points(pts, spec, num_reference=int(cfg["data"].get("num_reference", 10_000))),
                     "points": pts[:2000]})
    return rows


# --------------------------------------------------------------------------------------------------------------
# The one-dimensional Gaussian case, where every quantity of SiD is known in closed form (method tour).

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
    from .losses import sample_sid_sigma, sid_generator_loss

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
