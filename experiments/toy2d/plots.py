"""toy2d figures: the exact denoiser, generated points against the modes, the α ablation, metrics against NFE."""
from __future__ import annotations

import torch

from ..common.figures import plt
from .mixture import MixtureSpec, grid_log_density, points_to_images, sample_mixture

LABELS = {"within_2sigma": ("fraction of points within 2σ of a mode", False),
          "mean_log_density": ("mean log-density under the mixture (nats)", False),
          "energy_distance": ("energy distance to the mixture (data units)", True),
          "mode_share_min": ("least popular mode's share", False)}
XY = ("x₁ (data units)", "x₂ (data units)")


def _modes(ax, spec: MixtureSpec, extent: float):
    """Mode means with circles of radius 2σ (where 86.5 % of each component's mass lies)."""
    for m in spec.means.numpy():
        ax.add_patch(plt.Circle(m, 2 * spec.std, fill=False, color="0.45", lw=0.7))
    ax.set_xlim(-extent, extent)
    ax.set_ylim(-extent, extent)
    ax.set_aspect("equal")


def denoiser(spec: MixtureSpec, den) -> "plt.Figure":
    """The target with its log-density, and the exact E[x0 | x_t] at three noise levels."""
    true_pts = sample_mixture(spec, 4000, seed=1)
    ext = 1.6 * spec.radius
    gx, gy, ld = grid_log_density(spec, extent=ext, steps=200)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.6), sharex=True, sharey=True)
    axes[0].contourf(gx, gy, ld.clip(min=ld.max() - 12), levels=20, cmap="Greys")
    axes[0].scatter(true_pts[:800, 0], true_pts[:800, 1], s=1, c="C0")
    axes[0].set_title("target: log-density and samples")
    g = torch.Generator().manual_seed(0)
    for ax, sigma in zip(axes[1:], (0.05, 0.3, 1.0)):
        noisy = true_pts[:400] + sigma * torch.randn(400, 2, generator=g)
        clean = den(points_to_images(noisy), sigma).reshape(-1, 2)
        for a, b in zip(noisy, clean):
            ax.plot([a[0], b[0]], [a[1], b[1]], color="C1", lw=0.3)
        ax.scatter(clean[:, 0], clean[:, 1], s=2, c="C3")
        ax.set_title(f"E[x0 | x_t] at σ = {sigma}")
    for ax in axes:
        _modes(ax, spec, ext)
        ax.set_xlabel(XY[0])
    axes[0].set_ylabel(XY[1])
    fig.tight_layout()
    return fig


def points_over_training(spec: MixtureSpec, groups: dict, runs, root, n_cols: int = 5):
    """Rows: run groups (their first seed); columns: G_ema's points at evenly spaced evaluations."""
    fig, axes = plt.subplots(len(groups), n_cols, figsize=(2.5 * n_cols, 2.5 * len(groups)), squeeze=False)
    for i, (key, members) in enumerate(groups.items()):
        run_dir = members[0].dir(root)
        files = sorted(run_dir.glob("points-*.pt"))
        picks = [files[round(j * (len(files) - 1) / (n_cols - 1))] for j in range(n_cols)] if files else []
        for j, f in enumerate(picks):
            pts = torch.load(f, weights_only=True)
            ax = axes[i, j]
            ax.scatter(pts[:1500, 0], pts[:1500, 1], s=0.5, c="C0")
            _modes(ax, spec, 1.7 * spec.radius)
            label = ", ".join(f"{k}={v}" for k, v in key)
            ax.set_title(f"{label}\n{int(f.stem.split('-')[1]) / 1000:g}k images", fontsize=7)
            ax.tick_params(labelsize=6)
    for ax in axes[-1]:
        ax.set_xlabel(XY[0], fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(XY[1], fontsize=7)
    fig.tight_layout()
    return fig


def alpha_ablation(ev: dict):
    """Mode metrics of the students (mean ± std over seeds) against α, the teacher and exact samples as lines."""
    rows = ev["rows"]
    students = sorted((r for r in rows if r.get("start") == "teacher-sampler"), key=lambda r: r["alpha"])
    alphas = [r["alpha"] for r in students]
    teacher = max((r for r in rows if r["model"].startswith("exact teacher")), key=lambda r: r["nfe"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for ax, m in zip(axes, ("within_2sigma", "mode_share_min", "mean_log_density")):
        ax.errorbar(alphas, [r[m] for r in students], yerr=[r[m + "_std"] or 0 for r in students], fmt="o-",
                    capsize=3, label="SiD students (mean ± std over seeds)")
        ax.axhline(teacher[m], color="C1", ls="--", lw=1, label=f"teacher, Heun {teacher['nfe']} NFE")
        ax.axhline(ev["exact"][m], color="k", ls=":", lw=1, label="exact samples")
        for r in rows:
            if r.get("start") == "random":
                ax.errorbar([r["alpha"]], [r[m]], yerr=[r[m + "_std"] or 0], fmt="x", color="C3", capsize=3,
                            label="random start (contrast)")
        ax.set(xlabel="α", ylabel=LABELS[m][0])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def points(spec: MixtureSpec, pts: dict, teacher_nfe: int):
    """The teacher's and every student's points (seed 0) against the modes' 2σ circles."""
    names = ["teacher"] + sorted(k for k in pts if k != "teacher")
    fig, axes = plt.subplots(1, len(names), figsize=(2.7 * len(names), 3), sharex=True, sharey=True, squeeze=False)
    for ax, k in zip(axes[0], names):
        p = pts[k]
        ax.scatter(p[:, 0], p[:, 1], s=0.5, c="C3" if k.startswith("random") else "C0")
        _modes(ax, spec, 1.7 * spec.radius)
        title = f"teacher, Heun {teacher_nfe} NFE" if k == "teacher" else \
            ("random start, " if k.startswith("random") else "student ") + "α=" + k.rsplit("_", 1)[1] + ", 1 NFE"
        ax.set_title(title, fontsize=8)
        ax.set_xlabel(XY[0], fontsize=8)
    axes[0, 0].set_ylabel(XY[1], fontsize=8)
    fig.tight_layout()
    return fig


def vs_nfe(ev: dict):
    """Within-2σ mass and energy distance of the teacher against NFE, the students at NFE 1."""
    rows = ev["rows"]
    teacher = sorted((r for r in rows if r["model"].startswith("exact teacher")), key=lambda r: r["nfe"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, m in zip(axes, ("within_2sigma", "energy_distance")):
        ax.plot([r["nfe"] for r in teacher], [r[m] for r in teacher], "o-", label="exact teacher, Heun")
        for k, r in enumerate(r for r in rows if r["model"].startswith("SiD")):
            ax.plot([1], [r[m]], "*", ms=10, color=f"C{k + 1}", label=r["model"])
        ax.set(xscale="log", yscale="log" if LABELS[m][1] else "linear",
               xlabel="network evaluations per sample (NFE, log scale)", ylabel=LABELS[m][0])
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    return fig


__all__ = ["LABELS", "denoiser", "points_over_training", "alpha_ablation", "points", "vs_nfe"]
