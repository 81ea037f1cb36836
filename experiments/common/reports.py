"""Report writing: Markdown/CSV tables, figures, summaries over seeds, and the one JSON writer (sidlib's)."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from sidlib.io.atomic import atomic_write_text
from sidlib.io.jsonio import write_json

__all__ = ["write_json", "markdown_table", "write_table", "save_figure", "mean_std", "summarise", "fmt"]


def fmt(v) -> str:
    """A table cell: numbers to 4 significant digits, None/NaN as empty."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}" if (abs(v) >= 1e-3 or v == 0) else f"{v:.2e}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (dicts)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_table(stem: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None,
                title: str | None = None, notes: str | None = None) -> str:
    """Write ``<stem>.csv`` and ``<stem>.md`` for the same rows; returns the Markdown table."""
    stem = Path(stem)
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows({c: r.get(c) for c in columns} for r in rows)
    atomic_write_text(stem.with_suffix(".csv"), buf.getvalue())
    md = markdown_table(rows, columns)
    atomic_write_text(stem.with_suffix(".md"), (f"# {title}\n\n" if title else "") + md + (f"\n{notes}\n" if notes else ""))
    return md


def save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG (parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof 1; None for a single value) of the finite values."""
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def summarise(values: Sequence[float]) -> dict:
    """count, min, median, mean, max of the finite values (None when there are none)."""
    v = sorted(float(x) for x in values if x is not None and math.isfinite(float(x)))
    if not v:
        return {"count": 0, "min": None, "median": None, "mean": None, "max": None}
    return {"count": len(v), "min": v[0], "median": float(np.median(v)), "mean": float(np.mean(v)), "max": v[-1]}
