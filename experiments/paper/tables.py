"""Tables 1–4 and the FID-vs-images figures of the paper, built from whatever runs exist.

* Reported numbers come only from ``experiments/paper/data/reported_results.csv`` (sources cited per row, see
  ``experiments/paper/data/README.md``); measured numbers only from metrics JSON files written by
  :mod:`sidlib.metrics.protocol` and from distillation logs. The two are kept in separate fields from loading to
  rendering; a reported row with no measurement says "not run here".
* Table 1: CIFAR-10 unconditional (FID, IS); 2: CIFAR-10 conditional (FID); 3: ImageNet 64x64 (FID, precision,
  recall); 4: FFHQ and AFHQv2 64x64 (FID). Each caption states the protocol of every measured row (trials, images,
  proxy or not, snapshot selection, labels).

Command line: ``python -m experiments.paper tables ...`` (:mod:`experiments.paper.__main__`).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from sidlib.io.atomic import atomic_path, atomic_write_text
from sidlib.io.logs import training_curve
from sidlib.io.registry import SID_GENERATORS, TEACHER_ALIASES, TEACHERS

__all__ = [
    "REPORTED_CSV", "TABLES", "NOT_RUN", "load_reported", "load_measurements", "measurement_from_result",
    "build_table", "table_markdown", "table_csv", "write_tables", "load_training_curve", "plot_fid_vs_images",
    "plot_alpha_comparison", "teacher_reference_lines", "BENCHMARK_TITLES",
]

REPORTED_CSV = Path(__file__).with_name("data") / "reported_results.csv"
NOT_RUN = "not run here"

#: Table number -> (title, benchmarks, extra measured metrics shown).
TABLES: dict[int, dict] = {
    1: {"title": "Table 1: CIFAR-10 32x32, unconditional", "benchmarks": ["cifar10-uncond"], "extra": ["is"]},
    2: {"title": "Table 2: CIFAR-10 32x32, class-conditional", "benchmarks": ["cifar10-cond"], "extra": []},
    3: {"title": "Table 3: ImageNet 64x64, class-conditional", "benchmarks": ["imagenet64-cond"],
        "extra": ["precision", "recall"]},
    4: {"title": "Table 4: FFHQ 64x64 and AFHQv2 64x64, unconditional", "benchmarks": ["ffhq64", "afhqv2-64"],
        "extra": []},
}

BENCHMARK_TITLES = {"cifar10-uncond": "CIFAR-10 uncond.", "cifar10-cond": "CIFAR-10 cond.",
                     "imagenet64-cond": "ImageNet 64x64", "ffhq64": "FFHQ 64x64", "afhqv2-64": "AFHQv2 64x64"}

# Columns of the CSV output; "reported_*" come from the reported CSV only, "measured_*" from metrics JSON only.
CSV_COLUMNS = [
    "table", "benchmark", "method", "alpha", "nfe", "uses_real_data", "reported_fid", "reported_source",
    "reported_confidence", "status", "measured_what", "measured_protocol", "measured_proxy", "measured_trials",
    "measured_fid_mean", "measured_fid_std", "measured_fid_best", "measured_fid_min_of_3", "measured_is_mean",
    "measured_is_std", "measured_precision", "measured_recall", "measured_selection", "measured_file",
]


# ---------------------------------------------------------------------------------------------------------------------
# Inputs.

def _family(method: str) -> str:
    """Method name without its parenthesised detail: "EDM teacher (Heun 18 steps)" -> "EDM teacher"."""
    return re.sub(r"\s*\(.*\)\s*$", "", method).strip()


def _alpha_key(alpha) -> str:
    if alpha in (None, ""):
        return ""
    text = f"{float(alpha):.2f}".rstrip("0")
    return text + "0" if text.endswith(".") else text  # 1.2 -> "1.2", 1 -> "1.0", 0.75 -> "0.75"


def _nfe_key(nfe) -> str:
    return "" if nfe in (None, "") else str(int(float(nfe)))


def load_reported(path: str | os.PathLike | None = None) -> list[dict]:
    """Rows of the reported-results CSV with ``fid`` as float and ``alpha``/``nfe`` as strings."""
    path = Path(path) if path is not None else REPORTED_CSV
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    required = {"benchmark", "method", "alpha", "nfe", "fid", "uses_real_data", "source", "confidence"}
    for i, r in enumerate(rows, start=2):
        if set(r) != required or None in r:
            raise ValueError(f"{path}:{i}: expected columns {sorted(required)}, got {r}")
        r["fid"] = float(r["fid"])
    return rows


def _provenance(result: Mapping) -> str:
    if result.get("provenance"):
        return str(result["provenance"])
    network = str(result.get("network", ""))
    released = set(SID_GENERATORS) | set(SID_GENERATORS.values())
    teachers = set(TEACHERS) | set(TEACHERS.values()) | set(TEACHER_ALIASES)
    if network in released or "UT-Austin-PML/SiD" in network:
        return f"released checkpoint {network.rsplit('/', 1)[-1]}"
    if network in teachers or "edm/pretrained" in network:
        return f"EDM checkpoint {network.rsplit('/', 1)[-1]}"
    return f"distilled here ({network})" if result.get("method") == "SiD" else f"checkpoint {network}"


def measurement_from_result(result: Mapping, file: str = "") -> dict:
    """One measurement record from a :mod:`sidlib.metrics.protocol` result dict."""
    protocol = result.get("protocol", {})
    summary = result.get("summary", {})
    name = protocol.get("name", "fid50k")
    m = re.match(r"fid(\w+?)(_proxy)?$", name)
    count = m.group(1) if m else ""
    suffix = "_proxy" if protocol.get("proxy") else ""
    is_name, pr_name = f"is{count}{suffix}", (f"pr{count}3" if count.endswith("k") else f"pr{count}_k3") + suffix

    def get(key):
        v = summary.get(key)
        return None if v is None else float(v)

    sel = result.get("snapshot") or None
    if sel:
        how = f"by {sel['criterion']}" if sel.get("criterion") else f"'{sel['snapshot']}'"
        sel = f"snapshot {sel['kimg']} kimg of {sel.get('of', '?')}, selected {how}"

    return {
        "benchmark": result.get("benchmark"), "method": result.get("method", "SiD"),
        "alpha": _alpha_key(result.get("alpha")), "nfe": _nfe_key(result.get("nfe")),
        "what": _provenance(result), "protocol": name, "proxy": bool(protocol.get("proxy", False)),
        "num_images": protocol.get("num_images"), "trials": summary.get("trials"),
        "fid_mean": get(f"{name}_mean"), "fid_std": get(f"{name}_std"), "fid_best": get(f"{name}_best"),
        "fid_min_of_3": get(f"{name}_min_of_3"), "is_mean": get(f"{is_name}_mean"), "is_std": get(f"{is_name}_std"),
        "precision": get(f"{pr_name}_precision_mean"), "recall": get(f"{pr_name}_recall_mean"), "file": str(file),
        "selection": sel, "labels": protocol.get("labels"),
    }


def load_measurements(sources: Iterable[str | os.PathLike]) -> list[dict]:
    """Measurement records from metrics JSON files (paths, directories searched recursively, or glob patterns).

    Files that are not :mod:`sidlib.metrics.protocol` results, or that lack a ``benchmark``, are skipped with a
    warning.
    """
    files: list[Path] = []
    for s in sources:
        s = str(s)
        if any(ch in s for ch in "*?["):
            files += [Path(p) for p in sorted(glob.glob(s, recursive=True))]
        elif Path(s).is_dir():
            files += sorted(Path(s).rglob("*.json"))
        elif Path(s).is_file():
            files.append(Path(s))
    out = []
    for f in dict.fromkeys(files):
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            warnings.warn(f"skipping {f}: {e}")
            continue
        if not isinstance(data, dict) or data.get("format") != "sidlib-fid-protocol/1":
            continue
        if not data.get("benchmark"):
            warnings.warn(f"skipping {f}: no 'benchmark' field (evaluate with python -m experiments.paper calc)")
            continue
        out.append(measurement_from_result(data, str(f)))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tables.

@dataclass
class Row:
    benchmark: str
    method: str
    alpha: str
    nfe: str
    uses_real_data: str = ""
    reported: dict | None = None      # a row of the reported CSV, untouched
    measured: dict | None = None      # a measurement record, untouched
    extra: list = field(default_factory=list)


def _key(benchmark, method, alpha, nfe):
    return benchmark, _family(method), _alpha_key(alpha), _nfe_key(nfe)


def build_table(number: int, reported: Sequence[Mapping], measurements: Sequence[Mapping]) -> list[Row]:
    """Rows of table ``number``: every reported row of its benchmarks, each paired with the matching measurements
    (same benchmark, method family, alpha and NFE; one output row per measurement), then measurements that match no
    reported row."""
    spec = TABLES[number]
    rows: list[Row] = []
    used = set()
    for bench in spec["benchmarks"]:
        meas = [m for m in measurements if m.get("benchmark") == bench]
        for r in (r for r in reported if r["benchmark"] == bench):
            k = _key(bench, r["method"], r["alpha"], r["nfe"])
            hits = [i for i, m in enumerate(meas) if _key(bench, m["method"], m["alpha"], m["nfe"]) == k]
            for i in hits or [None]:
                rows.append(Row(bench, r["method"], _alpha_key(r["alpha"]), _nfe_key(r["nfe"]), r["uses_real_data"],
                                reported=dict(r), measured=None if i is None else dict(meas[i]),
                                extra=spec["extra"]))
                if i is not None:
                    used.add(id(meas[i]))
        for m in meas:
            if id(m) not in used:
                rows.append(Row(bench, m["method"], m["alpha"], m["nfe"], "", reported=None, measured=dict(m),
                                extra=spec["extra"]))
    return rows


def _fmt(x, digits=3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _row_csv(number: int, row: Row) -> dict:
    r, m = row.reported or {}, row.measured
    out = {
        "table": number, "benchmark": row.benchmark, "method": row.method, "alpha": row.alpha, "nfe": row.nfe,
        "uses_real_data": row.uses_real_data, "reported_fid": r.get("fid", ""), "reported_source": r.get("source", ""),
        "reported_confidence": r.get("confidence", ""),
        "status": NOT_RUN if m is None else ("measured (proxy)" if m["proxy"] else "measured"),
    }
    for col in (c for c in CSV_COLUMNS if c.startswith("measured_")):  # measured_<key> <- the record's <key>
        v = None if m is None else m.get(col[len("measured_"):])
        out[col] = "" if v is None else v
    return out


def table_csv(number: int, rows: Sequence[Row]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow(_row_csv(number, row))
    return buf.getvalue()


def _measured_fid_cell(m: Mapping | None) -> str:
    if m is None:
        return NOT_RUN
    if m.get("fid_mean") is None:
        return "n/a"
    n = m.get("trials") or 1
    count = m.get("num_images")
    count_txt = f"{count // 1000}k" if isinstance(count, int) and count % 1000 == 0 else str(count)
    text = _fmt(m["fid_mean"])
    if m.get("fid_std") is not None:
        text += f" ± {_fmt(m['fid_std'])}"
    parts = [f"{n}×{count_txt}"]
    if n > 1:
        parts.append(f"best {_fmt(m['fid_best'])}")
    if m.get("fid_min_of_3") is not None:
        parts.append(f"min-of-3 {_fmt(m['fid_min_of_3'])}")
    if m.get("proxy"):
        parts.insert(0, "PROXY")
    return f"{text} ({', '.join(parts)})"


def table_markdown(number: int, rows: Sequence[Row]) -> str:
    """Markdown of table ``number``: reported FID with its source beside this project's measurement."""
    spec = TABLES[number]
    extra = spec["extra"]
    titles = {"is": "IS measured here", "precision": "Precision measured here", "recall": "Recall measured here"}
    head = ["Benchmark", "Method", "α", "NFE", "Real data", "FID reported", "FID measured here"]
    head += [titles[e] for e in extra] + ["Measured what"]
    lines = [f"### {spec['title']}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r, m = row.reported, row.measured
        reported = "—" if r is None else f"{r['fid']:g} [{r['source']}]"
        cells = [BENCHMARK_TITLES.get(row.benchmark, row.benchmark), row.method, row.alpha or "—", row.nfe or "—",
                 row.uses_real_data or "—", reported, _measured_fid_cell(m)]
        for e in extra:
            key = {"is": "is_mean", "precision": "precision", "recall": "recall"}[e]
            cells.append(NOT_RUN if m is None else (_fmt(m.get(key)) or "n/a"))
        cells.append("—" if m is None else m["what"])
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    lines += ["", "Reported: numbers published by each method's authors (source in brackets; "
                  "`experiments/paper/data/reported_results.csv`). Measured: this project's evaluations with "
                  "torch-fidelity's Inception-v3 against EDM's reference statistics, each seed's image drawn as "
                  "EDM's generate.py draws it; mean ± std over trials of N images, best, and EDM's min-of-3. The "
                  "paper protocol is 10 trials of 50,000 images; PROXY marks fewer images (not comparable with the "
                  "paper).", ""]
    measured = [row for row in rows if row.measured is not None]
    if measured:
        lines.append("Protocol of each measured row:")
    for row in measured:
        m = row.measured
        n, count = m.get("trials") or 1, m.get("num_images")
        what = [f"{n} trial{'s' * (n != 1)} × {count:,} images" if isinstance(count, int) else f"{n} trial(s)",
                "PROXY" if m.get("proxy") else "paper protocol", m.get("selection") or "no snapshot selection"]
        if m.get("labels"):
            what.append(f"{m['labels']} labels")
        lines.append(f"* {BENCHMARK_TITLES.get(row.benchmark, row.benchmark)}, {row.method}"
                     f"{f' α={row.alpha}' if row.alpha else ''}: {'; '.join(what)} (`{m['file']}`)")
    return "\n".join(lines + ([""] if measured else []))


def write_tables(out_dir: str | os.PathLike, measurements: Sequence[Mapping] = (), reported=None) -> list[Path]:
    """Write ``table{1..4}.md`` / ``.csv`` and ``tables.md`` (all four) into ``out_dir``; returns the paths."""
    reported = load_reported() if reported is None else reported
    out = Path(out_dir)
    written, md_all = [], ["# SiD paper tables: reported vs measured here", ""]
    for n in TABLES:
        rows = build_table(n, reported, measurements)
        md = table_markdown(n, rows)
        written.append(atomic_write_text(out / f"table{n}.md", md))
        written.append(atomic_write_text(out / f"table{n}.csv", table_csv(n, rows)))
        md_all.append(md)
    written.append(atomic_write_text(out / "tables.md", "\n".join(md_all)))
    return written


# ---------------------------------------------------------------------------------------------------------------------
# Figures.

def load_training_curve(run_dir: str | os.PathLike, metric: str | None = None) -> dict:
    """FID-vs-images points of a distillation run: ``{'images', 'fid', 'metric', 'alpha', 'run_dir'}``; ``metric``
    defaults to the first key starting with ``fid`` in the run's evaluation records."""
    run = Path(run_dir)
    if not (run / "log.jsonl").is_file():
        raise FileNotFoundError(f"no distillation log at {run / 'log.jsonl'}")
    curve = training_curve(run)
    if metric is None:
        metric = next((k for r in curve for k in r if k.startswith("fid")), None)
    pts = [(float(r["images_seen"]), float(r[metric])) for r in curve if metric and r.get(metric) is not None]
    cfg = run / "config.json"
    alpha = json.loads(cfg.read_text(encoding="utf-8")).get("alpha") if cfg.is_file() else None
    return {"images": [p[0] for p in pts], "fid": [p[1] for p in pts], "metric": metric, "alpha": alpha,
            "run_dir": str(run)}


def _save_log_y_figure(fig, ax, xlabel: str, metric_label: str, title: str, legend: bool, out) -> Path:
    """Label a metric-vs-x axis (log y), write the PNG (150 dpi) atomically, close the figure; returns the path."""
    import matplotlib.pyplot as plt

    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric_label} (log scale, lower is better)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=150, format="png")
    plt.close(fig)
    return out


def plot_fid_vs_images(curves: Mapping[str, tuple], teacher_lines: Mapping[str, float], *, title: str,
                       out: str | os.PathLike, metric_label: str = "FID", log_x: bool = False) -> Path:
    """FID (log scale) against generator-synthesised images (millions), with horizontal teacher reference lines.

    curves: label -> (images seen [count], FID values); teacher_lines: label -> FID (e.g. "EDM teacher, 35 NFE
    (reported)"). Writes a PNG (150 dpi) atomically and returns its path.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (images, fid) in curves.items():
        x = [i / 1e6 for i in images]
        ax.plot(x, fid, marker="o", markersize=3, label=label)
    styles = ["--", ":", "-.", (0, (5, 1))]
    for i, (label, value) in enumerate(teacher_lines.items()):
        ax.axhline(value, color="black", linestyle=styles[i % len(styles)], linewidth=1, label=label)
    if log_x:
        ax.set_xscale("log")
    return _save_log_y_figure(fig, ax, "generator-synthesised images seen in distillation (millions)", metric_label,
                              title, bool(curves or teacher_lines), out)


def teacher_reference_lines(benchmark: str, reported=None, measurements: Sequence[Mapping] = ()) -> dict:
    """Teacher FIDs for a benchmark: reported (EDM README) and measured here, labelled with their NFE and origin."""
    reported = load_reported() if reported is None else reported
    lines = {}
    for r in reported:
        if r["benchmark"] == benchmark and _family(r["method"]) == "EDM teacher":
            lines[f"EDM teacher, {r['nfe']} NFE (reported)"] = r["fid"]
    for m in measurements:
        if m.get("benchmark") == benchmark and _family(m["method"]) == "EDM teacher" and m.get("fid_mean"):
            tag = "measured here, proxy" if m["proxy"] else "measured here"
            lines[f"EDM teacher, {m['nfe']} NFE ({tag}, {m['protocol']})"] = m["fid_mean"]
    return lines


def plot_alpha_comparison(points: Mapping[str, Mapping[float, float]], *, out: str | os.PathLike,
                          title: str = "Final FID against α", metric_label: str = "FID") -> Path:
    """Final FID (log scale) against α, one line per benchmark. points: benchmark -> {alpha: FID}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for label, pts in points.items():
        xs = sorted(pts)
        ax.plot(xs, [pts[a] for a in xs], marker="o", label=label)
    return _save_log_y_figure(fig, ax, "α (SiD loss weighting, dimensionless)", metric_label, title, bool(points), out)
