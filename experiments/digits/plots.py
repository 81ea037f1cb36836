"""digits figures: training images, teacher loss, FID against generated images (seed band, teacher NFE lines),
sample grids (tiles separated by gaps; conditional rows are classes 0-9) and FID against NFE."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..common.figures import IMAGES_LABEL, plt, seed_curves

FID_LABEL = "FID in digit-classifier features"


def grid_order(x: torch.Tensor, labels: torch.Tensor | None, per_row: int = 10) -> torch.Tensor:
    """The first ``per_row`` samples of each class, class by class (row c = class c); unconditional: as they come."""
    if labels is None:
        return x[: per_row * per_row]
    cls = labels.argmax(1)
    rows = [x[cls == c][:per_row] for c in range(labels.shape[1])]
    if any(len(r) < per_row for r in rows):
        return x[: per_row * per_row]
    return torch.cat(rows)


def tile(u8: np.ndarray, cols: int = 10, gap: int = 2, gap_value: int = 64) -> np.ndarray:
    """``[N, 1, H, W]`` or ``[N, H, W]`` uint8 -> one mosaic with ``gap`` pixels of ``gap_value`` between tiles (a
    light grey under the ``gray_r`` colour map, so tiles stay apart from the digits' white background)."""
    a = np.asarray(u8).reshape(len(u8), u8.shape[-2], u8.shape[-1])
    rows = int(np.ceil(len(a) / cols))
    h, w = a.shape[1:]
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), gap_value, dtype=np.uint8)
    for i, img in enumerate(a):
        r, c = divmod(i, cols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = img
    return out


def _show(ax, mosaic, title):
    ax.imshow(mosaic, cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def training_images(sp):
    """Ten training images of each class (row c = class c)."""
    x = torch.cat([sp.train_images[sp.train_labels == c][:10] for c in range(10)])
    fig, ax = plt.subplots(figsize=(4.2, 4.4))
    _show(ax, tile(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()),
          "training images (rows: classes 0-9)")
    return fig


def teacher_loss(logs: dict):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for v, log in logs.items():
        ax.plot([r["kimg"] * 1000 for r in log], [r["loss"] for r in log], label=v)
    ax.set(xlabel="training images seen", ylabel="EDM loss per image (sum over pixels, log scale)", yscale="log",
           title="digits teacher training")
    ax.legend()
    fig.tight_layout()
    return fig


def samples_over_training(groups: dict, root: Path, picks: int = 4):
    """The loop's sample grids (G_ema, fixed seeds) of the first seed of each group at evenly spaced snapshots."""
    import matplotlib.image as mpimg

    fig, axes = plt.subplots(len(groups), picks, figsize=(2.6 * picks, 2.9 * len(groups)), squeeze=False)
    for i, (key, members) in enumerate(groups.items()):
        files = sorted(members[0].dir(root).glob("samples-*.png"))
        chosen = [files[round(j * (len(files) - 1) / (picks - 1))] for j in range(picks)] if files else []
        for j, f in enumerate(chosen):
            axes[i, j].imshow(mpimg.imread(f), cmap="gray", interpolation="nearest")
            axes[i, j].set_title(f"{dict(key)['variant']}: {int(f.stem.split('-')[1])}k images", fontsize=8)
        for ax in axes[i]:
            ax.axis("off")
    fig.tight_layout()
    return fig


def fid_vs_images(groups: dict, curves: dict, ev: dict):
    """FID (log) against generated images: seed mean ± std of each variant, the teacher's FID at each NFE as lines."""
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4.2), squeeze=False)
    teacher = [r for r in ev["rows"] if r["model"].startswith("teacher")]
    for ax, (key, members) in zip(axes[0], groups.items()):
        v = dict(key)["variant"]
        x, y = seed_curves(members, curves, "fid")
        if y.size:
            mean = np.nanmean(y, 0)
            ax.plot(x, mean, "o-", ms=2.5, color="C0", label=f"SiD one-step generator ({y.shape[0]} seeds)")
            if y.shape[0] > 1:
                sd = np.nanstd(y, 0, ddof=1)
                ax.fill_between(x, mean - sd, mean + sd, color="C0", alpha=0.2, lw=0)
        for k, r in enumerate(sorted((r for r in teacher if r["variant"] == v), key=lambda r: -r["nfe"])):
            if y.size and r["fid"] < 20 * np.nanmax(y):
                ax.axhline(r["fid"], color=f"C{k + 1}", ls="--", lw=1, label=f"teacher, Heun NFE {r['nfe']}")
        ax.set(yscale="log", xlabel=IMAGES_LABEL, ylabel=FID_LABEL + " (log scale)", title=f"digits, {v}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def grids(grids: dict, teacher_nfe: int):
    names = sorted({k.rsplit("_", 1)[0] for k in grids}, key=lambda v: v != "uncond")
    fig, axes = plt.subplots(len(names), 2, figsize=(8.4, 4.4 * len(names)), squeeze=False)
    for i, v in enumerate(names):
        for j, who in enumerate(("teacher", "student")):
            title = f"teacher, Heun {teacher_nfe} NFE" if who == "teacher" else "SiD student, 1 NFE"
            _show(axes[i, j], tile(grids[f"{v}_{who}"]), f"digits {v}: {title}" + (" (rows: classes 0-9)"
                                                                                  if v == "cond" else ""))
    fig.tight_layout()
    return fig


def fid_vs_nfe(ev: dict):
    rows = ev["rows"]
    vs = sorted({r["variant"] for r in rows}, key=lambda v: v != "uncond")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for k, v in enumerate(vs):
        t = sorted((r for r in rows if r["variant"] == v and r["model"].startswith("teacher")), key=lambda r: r["nfe"])
        ax.plot([r["nfe"] for r in t], [r["fid"] for r in t], "o-", color=f"C{k}", label=f"teacher, Heun ({v})")
        s = ev["summary"][v]
        ax.errorbar([1], [s["student_fid"]], yerr=[s["student_fid_std"] or 0], fmt="*", ms=12, color=f"C{k}",
                    capsize=3, label=f"SiD student ({v}, mean ± std over seeds)")
    ax.set(xscale="log", yscale="log", xlabel="network evaluations per sample (NFE, log scale)",
           ylabel=FID_LABEL + " (log scale)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
