"""Figures shared by the benchmarks: curves over training with a band over seeds, and saving.

Every figure has labelled axes with units; seed bands show mean ± one standard deviation over distillation seeds.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .reports import save_figure, write_table

__all__ = ["plt", "save_all", "seed_curves", "write_curve_plots", "curves_with_bands", "targets_text"]

IMAGES_LABEL = "generator-synthesised images"


def save_all(figs: dict, root: Path) -> dict:
    """Save every ``{relative name: Figure}`` as PNG under ``root`` and close it; returns ``{name: path}``."""
    out = {}
    for name, fig in figs.items():
        out[name] = save_figure(fig, Path(root) / name)
        plt.close(fig)
    return out


def seed_curves(members, curves: dict, metric: str):
    """``(images_seen [T], values [seeds, T])`` of one group of runs that differ only in their seed."""
    series = [curves[m.name][1] for m in members if curves[m.name][1]]
    if not series:
        return np.zeros(0), np.zeros((0, 0))
    t = min(len(s) for s in series)
    x = np.array([r["images_seen"] for r in series[0][:t]], dtype=float)
    y = np.array([[r.get(metric, np.nan) if r.get(metric) is not None else np.nan for r in s[:t]] for s in series],
                 dtype=float)
    return x, y


def write_curve_plots(folder: Path, groups: dict, curves: dict, metrics, label) -> list:
    """One CSV per metric (``<folder>/<metric>.csv``): images_seen and the mean over seeds of every group, the data
    of ``dvc plots``. ``label(group_key) -> column name``. Returns the CSV paths."""
    out = []
    for metric in metrics:
        cols, table = {}, {}
        for key, members in groups.items():
            x, y = seed_curves(members, curves, metric)
            cols[label(key)] = dict(zip(x.tolist(), np.nanmean(y, 0).tolist())) if y.size else {}
        xs = sorted({x for c in cols.values() for x in c})
        for x in xs:
            table[x] = {"images_seen": int(x), **{name: c.get(x) for name, c in cols.items()}}
        path = Path(folder) / metric
        write_table(path, list(table.values()), ["images_seen", *cols])
        out.append(path.with_suffix(".csv"))
    return out


def curves_with_bands(groups: dict, curves: dict, metrics, labels: dict, group_label, hlines=None):
    """One panel per metric: for every group, the mean over seeds against images seen, with a ±1 std band.

    ``labels``: metric -> (axis label, log scale?); ``hlines``: metric -> {label: value} reference lines.
    """
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for k, (key, members) in enumerate(groups.items()):
            x, y = seed_curves(members, curves, metric)
            if not y.size:
                continue
            mean = np.nanmean(y, 0)
            ax.plot(x, mean, color=f"C{k}", lw=1.4, label=f"{group_label(key)} ({y.shape[0]} seeds)")
            if y.shape[0] > 1:
                sd = np.nanstd(y, 0, ddof=1)
                ax.fill_between(x, mean - sd, mean + sd, color=f"C{k}", alpha=0.2, lw=0)
        for j, (name, v) in enumerate(((hlines or {}).get(metric) or {}).items()):
            ax.axhline(v, color="0.3", ls=(":", "--", "-.")[j % 3], lw=1, label=name)
        ylabel, log = labels[metric]
        ax.set(xlabel=IMAGES_LABEL, ylabel=ylabel + (" (log scale)" if log else ""), yscale="log" if log else "linear")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def targets_text(targets: list) -> str:
    """Markdown summary of a benchmark's targets: what was measured and whether it was met."""
    if not targets:
        return ""
    met = sum(t["met"] == "yes" for t in targets)
    return f"Targets met: {met} of {len(targets)}" + "".join(
        f"\n* {t['target']}: {t['measured']} — **{t['met']}**" for t in targets)
