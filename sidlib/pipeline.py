"""What the notebooks and DVC stages share: params.yaml loading and validation, where outputs go, report writing,
and running independent variants in parallel single-thread processes.

* :func:`load_params` reads ``params.yaml`` and validates the sections this project defines (``run``, ``toy2d``,
  ``digits``); other top-level sections (e.g. ``paper``) are passed through untouched. Every error names the
  dotted key (``digits.teacher.iterations``) or the file.
* :func:`benchmark_params` returns one benchmark's section or raises naming the unknown benchmark.
* Smoke mode (environment variable ``SIDLIB_SMOKE=1``, set by ``notebooks/conftest.py`` for nbval) shrinks every
  budget and sends all outputs to a temporary directory: a smoke run never writes into ``reports/`` or
  ``checkpoints/``.
"""
from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import pickle
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

__all__ = ["ParamsError", "load_params", "validate_params", "benchmark_params", "is_smoke", "Paths", "get_paths",
           "repo_root", "write_json", "write_table", "markdown_table", "run_parallel", "EMBEDDED_BENCHMARKS",
           "summarise_metric"]

EMBEDDED_BENCHMARKS = ("toy2d", "digits")
SMOKE_ENV = "SIDLIB_SMOKE"


class ParamsError(ValueError):
    """A params.yaml entry is missing, of the wrong type, out of range or unknown. The message names the key."""


# --------------------------------------------------------------------------------------------------------------
# Schema: for each section, key -> (type(s), check or None). Nested dicts are sub-schemas.

def _pos(v):
    return v > 0


def _nonneg(v):
    return v >= 0


_NUM = (int, float)
_DISTILL_SCHEMA = {
    "alpha": (_NUM, None), "tmax": (_NUM, lambda v: 0 < v <= 1000), "init_sigma": (_NUM, _pos),
    "lr": (_NUM, _pos), "glr": (_NUM, _pos), "batch": (int, _pos), "kimg": (_NUM, _pos),
    "ema_halflife_kimg": (_NUM, _nonneg), "ema_rampup": (_NUM, _nonneg), "lsg": (_NUM, _pos), "ls": (_NUM, _pos),
    "g_beta1": (_NUM, lambda v: 0 <= v < 1), "dropout": (_NUM, lambda v: 0 <= v < 1), "seed": (int, _nonneg),
    "eval_every_kimg": (_NUM, _pos), "eval_samples": (int, _pos), "snapshot_every_kimg": (_NUM, _pos),
    "checkpoint_every_kimg": (_NUM, _pos), "max_seconds": (_NUM, _pos),
}
_SCHEMA: dict[str, dict] = {
    "run": {
        "benchmarks": (list, None),
        "workers": (int, _pos),
        "threads_per_worker": (int, _pos),
        "checkpoints_dir": (str, None),
        "reports_dir": (str, None),
    },
    # Every benchmark has the same four blocks, so DVC stages can declare ${item}.data, ${item}.teacher, ...
    "toy2d": {
        "data": {"num_modes": (int, _pos), "radius": (_NUM, _pos), "std": (_NUM, _pos),
                 "num_reference": (int, _pos)},
        "teacher": {"kind": (str, lambda v: v == "exact-mixture-denoiser")},
        "distill": {**_DISTILL_SCHEMA, "alphas": (list, None),
                    "network": {"model_channels": (int, _pos), "num_layers": (int, _pos)}},
        "eval": {"num_samples": (int, _pos), "nfe": (list, None), "last_evals": (int, _pos)},
    },
    "digits": {
        "data": {"split_seed": (int, _nonneg), "num_train": (int, _pos)},
        "teacher": {"variants": (list, None),
                    "classifier": {"epochs": (int, _pos), "batch": (int, _pos), "lr": (_NUM, _pos),
                                   "seed": (int, _nonneg)},
                    "model_channels": (int, _pos), "channel_mult": (list, None), "num_blocks": (int, _pos),
                    "attn_resolutions": (list, None), "dropout": (_NUM, lambda v: 0 <= v < 1),
                    "iterations": (int, _pos), "batch": (int, _pos), "lr": (_NUM, _pos),
                    "warmup_iterations": (int, _nonneg), "ema_halflife_kimg": (_NUM, _nonneg),
                    "ema_rampup": (_NUM, _nonneg), "seed": (int, _nonneg), "checkpoint_every": (int, _pos),
                    "log_every": (int, _pos)},
        "distill": _DISTILL_SCHEMA,
        "eval": {"num_samples": (int, _pos), "teacher_samples": (int, _pos), "nfe": (list, None),
                 "last_evals": (int, _pos)},
    },
}
_REQUIRED = {
    "run": ["benchmarks"],
    "toy2d": ["data", "teacher", "distill", "eval"],
    "digits": ["data", "teacher", "distill", "eval"],
}
_REQUIRED_NESTED = {
    "toy2d.distill": ["alphas", "network", "lr", "glr", "kimg"],
    "digits.teacher": ["variants", "classifier"],
    "digits.distill": ["lr", "glr", "kimg"],
}
_DIGITS_VARIANTS = ("uncond", "cond")


def _check_section(value: Any, schema: dict, where: str) -> None:
    if not isinstance(value, dict):
        raise ParamsError(f"params.yaml: {where} must be a mapping, got {type(value).__name__}")
    for key, val in value.items():
        path = f"{where}.{key}"
        if key not in schema:
            raise ParamsError(f"params.yaml: unknown key {path}; expected one of {sorted(schema)}")
        rule = schema[key]
        if isinstance(rule, dict):
            _check_section(val, rule, path)
            continue
        types, check = rule
        types = types if isinstance(types, tuple) else (types,)
        if isinstance(val, bool) or not isinstance(val, types):
            raise ParamsError(f"params.yaml: {path} must be {'/'.join(t.__name__ for t in types)}, "
                              f"got {val!r} ({type(val).__name__})")
        if isinstance(val, float) and not math.isfinite(val):
            raise ParamsError(f"params.yaml: {path} must be finite, got {val!r}")
        if check is not None and not check(val):
            raise ParamsError(f"params.yaml: {path} is out of range: {val!r}")


def _check_number_list(val: Any, path: str, *, integer: bool = False, positive: bool = False) -> None:
    if not isinstance(val, list) or not val:
        raise ParamsError(f"params.yaml: {path} must be a non-empty list, got {val!r}")
    for i, v in enumerate(val):
        ok = isinstance(v, int) if integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok or (positive and v <= 0):
            raise ParamsError(f"params.yaml: {path}[{i}] must be a {'positive ' if positive else ''}"
                              f"{'integer' if integer else 'number'}, got {v!r}")


def validate_params(params: dict, *, source: str = "params.yaml") -> dict:
    """Check the sections this project defines; return ``params`` unchanged. Raises :class:`ParamsError`."""
    if not isinstance(params, dict):
        raise ParamsError(f"{source}: top level must be a mapping, got {type(params).__name__}")
    for section, schema in _SCHEMA.items():
        if section not in params:
            if section == "run":
                raise ParamsError(f"{source}: missing section 'run'")
            continue
        _check_section(params[section], schema, section)
        for req in _REQUIRED[section]:
            if req not in params[section]:
                raise ParamsError(f"{source}: missing key {section}.{req}")
    for dotted, keys in _REQUIRED_NESTED.items():
        sec, sub = dotted.split(".")
        if sec in params:
            for k in keys:
                if k not in params[sec][sub]:
                    raise ParamsError(f"{source}: missing key {dotted}.{k}")
    benches = params["run"]["benchmarks"]
    if not all(isinstance(b, str) for b in benches):
        raise ParamsError(f"{source}: run.benchmarks must be a list of names, got {benches!r}")
    for b in benches:
        if b not in params or not isinstance(params[b], dict):
            raise ParamsError(f"{source}: run.benchmarks names {b!r} but there is no top-level section {b!r}")
    for name in ("toy2d", "digits"):
        if name in params and "nfe" in params[name]["eval"]:
            _check_number_list(params[name]["eval"]["nfe"], f"{name}.eval.nfe", integer=True, positive=True)
            bad = [n for n in params[name]["eval"]["nfe"] if n % 2 == 0]
            if bad:
                raise ParamsError(f"{source}: {name}.eval.nfe must be odd (Heun uses 2*steps-1 evaluations), got {bad}")
    if "toy2d" in params:
        _check_number_list(params["toy2d"]["distill"]["alphas"], "toy2d.distill.alphas")
    if "digits" in params:
        t = params["digits"]["teacher"]
        if not isinstance(t["variants"], list) or not t["variants"]:
            raise ParamsError(f"{source}: digits.teacher.variants must be a non-empty list")
        for i, v in enumerate(t["variants"]):
            if v not in _DIGITS_VARIANTS:
                raise ParamsError(f"{source}: digits.teacher.variants[{i}] is {v!r}; "
                                  f"expected one of {list(_DIGITS_VARIANTS)}")
        for k in ("channel_mult", "attn_resolutions"):
            if k in t:
                _check_number_list(t[k], f"digits.teacher.{k}", integer=True, positive=True)
    return params


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: cwd) that holds ``params.yaml``."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / "params.yaml").is_file():
            return d
    raise FileNotFoundError(f"params.yaml not found in {here} or any parent directory")


def load_params(path: str | Path | None = None) -> dict:
    """Read and validate ``params.yaml`` (default: the repository's). Errors name the file or the key."""
    path = Path(path) if path is not None else repo_root() / "params.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    return validate_params(params, source=str(path))


def benchmark_params(params: dict, name: str) -> dict:
    """A deep copy of benchmark ``name``'s section, shrunk in smoke mode. Unknown names raise naming the key."""
    known = [k for k in params if k in EMBEDDED_BENCHMARKS or k == "paper"]
    if name not in params or name == "run":
        raise ParamsError(f"unknown benchmark {name!r}: params.yaml has no section {name!r} "
                          f"(known benchmarks: {', '.join(known)})")
    cfg = copy.deepcopy(params[name])
    return smoke_overrides(name, cfg) if is_smoke() else cfg


# --------------------------------------------------------------------------------------------------------------
# Smoke mode and output locations.

def is_smoke() -> bool:
    """True when ``SIDLIB_SMOKE`` is set to a non-empty value other than 0/false."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def smoke_overrides(name: str, cfg: dict) -> dict:
    """Tiny budgets that exercise every code path in seconds (shapes, counts and files, not quality)."""
    if name == "toy2d":
        cfg["data"].update(num_reference=1000)
        cfg["distill"].update(alphas=[0.0, 1.2], kimg=1.0, batch=64, eval_every_kimg=0.5, eval_samples=300,
                              checkpoint_every_kimg=0.5, network=dict(model_channels=16, num_layers=1))
        cfg["eval"].update(num_samples=300, nfe=[1, 3], last_evals=2)
    elif name == "digits":
        cfg["teacher"].update(iterations=4, batch=8, model_channels=16, num_blocks=1, checkpoint_every=2,
                              log_every=2, warmup_iterations=2)
        cfg["teacher"]["classifier"] = {**cfg["teacher"].get("classifier", {}), "epochs": 1}
        cfg["distill"].update(kimg=0.032, batch=8, eval_every_kimg=0.016, eval_samples=100,
                              checkpoint_every_kimg=0.016)
        cfg["eval"].update(num_samples=100, teacher_samples=50, nfe=[1, 3], last_evals=2)
    return cfg


@dataclass(frozen=True)
class Paths:
    """Where a run writes. ``reports`` and ``checkpoints`` point into a temporary directory in smoke mode."""

    root: Path
    reports: Path
    checkpoints: Path
    smoke: bool

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"

    @property
    def tables(self) -> Path:
        return self.reports / "tables"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    def benchmark_checkpoints(self, benchmark: str) -> Path:
        return self.checkpoints / benchmark


def get_paths(params: dict | None = None, *, root: str | Path | None = None) -> Paths:
    """Output folders (created). Normal runs: ``reports/`` and ``checkpoints/`` under the repository root (or
    ``run.reports_dir`` / ``run.checkpoints_dir``). Smoke runs: ``$SIDLIB_SMOKE_DIR`` or a fixed temp folder."""
    root = Path(root) if root is not None else repo_root()
    run = (params or {}).get("run", {})
    if is_smoke():
        base = Path(os.environ.get("SIDLIB_SMOKE_DIR") or Path(tempfile.gettempdir()) / "sidlib-smoke")
        paths = Paths(root, base / "reports", base / "checkpoints", True)
    else:
        paths = Paths(root, root / run.get("reports_dir", "reports"), root / run.get("checkpoints_dir", "checkpoints"),
                      False)
    for p in (paths.reports, paths.checkpoints, paths.metrics, paths.figures, paths.tables, paths.plots):
        p.mkdir(parents=True, exist_ok=True)
    return paths


# --------------------------------------------------------------------------------------------------------------
# Reports.

def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Path):
        return str(v)
    return v


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (non-finite floats become null), creating parent folders."""
    from .atomic import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")
    return path


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return ""
        a = abs(v)
        return f"{v:.4g}" if (a >= 1e-3 or a == 0) else f"{v:.2e}"
    return str(v)


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``rows`` (list of dicts); numbers to 4 significant digits."""
    columns = list(columns or (rows[0].keys() if rows else []))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_table(stem: str | Path, rows: Sequence[dict], columns: Sequence[str] | None = None,
                title: str | None = None, notes: str | None = None) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` for the same rows; returns both paths."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({c: r.get(c) for c in columns})
    csv_path, md_path = stem.with_suffix(".csv"), stem.with_suffix(".md")
    csv_path.write_text(buf.getvalue())
    md = (f"# {title}\n\n" if title else "") + markdown_table(rows, columns) + (f"\n{notes}\n" if notes else "")
    md_path.write_text(md)
    return csv_path, md_path


def summarise_metric(values: Sequence[float]) -> dict:
    """min / median / mean / max / count of finite values (None when there are none)."""
    vals = sorted(float(v) for v in values if v is not None and math.isfinite(float(v)))
    if not vals:
        return {"min": None, "median": None, "mean": None, "max": None, "count": 0}
    n = len(vals)
    med = vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2])
    return {"min": vals[0], "median": med, "mean": sum(vals) / n, "max": vals[-1], "count": n}


# --------------------------------------------------------------------------------------------------------------
# Parallel variants.

def _worker(args):
    fn, kwargs, threads = args
    import torch

    torch.set_num_threads(threads)
    # Plain pickle bytes: torch's multiprocessing reductions would pass tensors through shared-memory handles
    # that die with the worker (maxtasksperchild=1) and can hang the parent.
    return pickle.dumps(fn(**kwargs))


def run_parallel(fn: Callable, jobs: Sequence[dict], *, workers: int = 2, threads_per_worker: int = 1) -> list:
    """Run ``fn(**job)`` for every job, ``workers`` processes at a time, each limited to ``threads_per_worker``
    torch threads; results in job order. ``fn`` must be importable (a module-level function).

    Independent variants (uncond/cond, the alpha sweep) use both cores better as single-thread processes than as
    one two-thread process: the 8x8 convolutions are too small to split well across threads.
    With ``workers == 1`` or a single job everything runs in this process.
    """
    import multiprocessing as mp

    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        import torch

        prev = torch.get_num_threads()
        torch.set_num_threads(max(threads_per_worker, prev if workers > 1 else threads_per_worker))
        try:
            return [fn(**j) for j in jobs]
        finally:
            torch.set_num_threads(prev)
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(workers, len(jobs)), maxtasksperchild=1) as pool:
        return [pickle.loads(b) for b in pool.map(_worker, [(fn, j, threads_per_worker) for j in jobs], chunksize=1)]
