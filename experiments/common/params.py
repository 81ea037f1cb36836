"""The one params loader: ``params.yaml`` (plus the ``params-smoke.yaml`` overlay in smoke mode), validated.

Layout of ``params.yaml``::

    run:        benchmarks (the embedded ones ``dvc repro`` runs), workers, threads_per_worker
    <bench>:    data, teacher, runs, distill, eval   (one section per embedded benchmark)

* ``<bench>.distill`` holds :class:`sidlib.distill.DistillConfig` keys; :meth:`DistillConfig.from_dict` is the only
  translation and its ``validate`` the only range check, with errors naming the full key (``digits.distill.glr``).
* ``<bench>.runs`` maps keys to lists: one SiD run per combination (``alpha``, ``seed``, ``variant``, ...).
* The other blocks are checked by the benchmark itself (:meth:`Benchmark.validate`).

Smoke mode (``SIDLIB_SMOKE=1``, set by ``notebooks/conftest.py``) deep-merges ``params-smoke.yaml`` over the params
and sends every output to a temporary folder: a smoke run never writes into ``reports/`` or ``checkpoints/``.
The paper presets have their own file, ``paper/params.yaml`` (:mod:`experiments.paper.presets`).
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ParamsError", "SMOKE_ENV", "repo_root", "is_smoke", "load_params", "validate_params", "deep_merge",
           "check_keys", "check_number", "check_list", "check_eval", "Paths", "get_paths"]

SMOKE_ENV = "SIDLIB_SMOKE"
_SECTION_BLOCKS = ("data", "teacher", "runs", "distill", "eval")


class ParamsError(ValueError):
    """A params entry is missing, of the wrong type, out of range or unknown. The message names the full key."""


def repo_root(start: str | Path | None = None) -> Path:
    """The nearest directory at or above ``start`` (default: this package's checkout, then cwd) with params.yaml."""
    for base in ([Path(start)] if start else [Path(__file__).resolve().parents[2], Path.cwd()]):
        here = base.resolve()
        for d in (here, *here.parents):
            if (d / "params.yaml").is_file():
                return d
    raise FileNotFoundError(f"params.yaml not found above {start or Path.cwd()}")


def is_smoke() -> bool:
    """True when ``SIDLIB_SMOKE`` is set to a non-empty value other than 0/false/no."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into a copy of ``base``: mappings recursively, everything else replaced."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) else copy.deepcopy(v)
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def load_params(path: str | Path | None = None, *, smoke: bool | None = None) -> dict:
    """Read and validate the params (default: the repository's ``params.yaml``); in smoke mode the overlay
    ``params-smoke.yaml`` beside it is merged in first. Errors name the file or the full key."""
    path = Path(path) if path is not None else repo_root() / "params.yaml"
    params = _read_yaml(path)
    if is_smoke() if smoke is None else smoke:
        params = deep_merge(params, _read_yaml(path.with_name("params-smoke.yaml")))
    return validate_params(params, source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# Checks shared by the benchmarks' validators.

def check_keys(block: Any, where: str, allowed, required=()) -> dict:
    """``block`` must be a mapping with only ``allowed`` keys and every ``required`` one."""
    if not isinstance(block, dict):
        raise ParamsError(f"{where} must be a mapping, got {block!r}")
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise ParamsError(f"unknown key {where}.{unknown[0]}; expected some of {sorted(allowed)}")
    missing = [k for k in required if k not in block]
    if missing:
        raise ParamsError(f"missing key {where}.{missing[0]}")
    return block


def check_number(value: Any, where: str, *, integer: bool = False, low=None, high=None, low_open: bool = False):
    """A finite number (an int if ``integer``) in ``[low, high]`` (``(low, high]`` if ``low_open``)."""
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value):
        raise ParamsError(f"{where} must be {'an integer' if integer else 'a finite number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ParamsError(f"{where} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ParamsError(f"{where} must be <= {high}, got {value!r}")
    return value


def check_list(value: Any, where: str, *, unique: bool = True, min_len: int = 1) -> list:
    """A list of at least ``min_len`` items, without duplicates when ``unique``."""
    if not isinstance(value, list) or len(value) < min_len:
        raise ParamsError(f"{where} must be a list of at least {min_len} item(s), got {value!r}")
    if unique:
        seen = []
        for v in value:
            if v in seen:
                raise ParamsError(f"{where} lists {v!r} twice")
            seen.append(v)
    return value


EVAL_KEYS = ("train_samples", "num_samples", "nfe", "last_evals")


def check_eval(block: Any, where: str) -> dict:
    """The ``eval`` block every embedded benchmark shares: sample counts and the teacher's Heun NFEs (odd)."""
    check_keys(block, where, EVAL_KEYS, EVAL_KEYS)
    for k in ("train_samples", "num_samples", "last_evals"):
        check_number(block[k], f"{where}.{k}", integer=True, low=2 if k != "last_evals" else 1, high=10_000_000)
    for i, v in enumerate(check_list(block["nfe"], f"{where}.nfe")):
        check_number(v, f"{where}.nfe[{i}]", integer=True, low=1, high=1001)
        if v % 2 == 0:
            raise ParamsError(f"{where}.nfe[{i}] must be odd (Heun uses 2 steps - 1 evaluations), got {v}")
    return block


def validate_params(params: dict, *, source: str = "params.yaml", blocks=_SECTION_BLOCKS) -> dict:
    """Check ``run`` and every embedded benchmark section (which must hold exactly ``blocks``); returns ``params``."""
    from .benchmark import BENCHMARKS, get_benchmark

    check_keys(params, source, ("run", *BENCHMARKS), ("run",))
    run = check_keys(params.get("run"), "run", ("benchmarks", "workers", "threads_per_worker"), ("benchmarks",))
    for b in check_list(run["benchmarks"], "run.benchmarks"):
        if b not in BENCHMARKS:
            raise ParamsError(f"run.benchmarks names {b!r}; embedded benchmarks: {sorted(BENCHMARKS)}")
        if b not in params:
            raise ParamsError(f"{source}: run.benchmarks names {b!r} but there is no section {b!r}")
    for k in ("workers", "threads_per_worker"):
        if k in run:
            check_number(run[k], f"run.{k}", integer=True, low=1)
    for name in BENCHMARKS:
        if name in params:
            check_keys(params[name], name, _SECTION_BLOCKS, blocks)
            get_benchmark(name).validate(params[name])
    return params


# ----------------------------------------------------------------------------------------------------------------
# Where outputs go.

@dataclass(frozen=True)
class Paths:
    """Where a stage writes: ``reports/`` and ``checkpoints/`` (a temporary folder in smoke mode)."""

    root: Path
    reports: Path
    checkpoints: Path
    smoke: bool

    @property
    def metrics(self) -> Path:
        return self.reports / "metrics"

    @property
    def eval(self) -> Path:
        return self.reports / "eval"

    @property
    def tables(self) -> Path:
        return self.reports / "tables"

    @property
    def plots(self) -> Path:
        return self.reports / "plots"

    @property
    def figures(self) -> Path:
        return self.reports / "figures"


def get_paths(*, root: str | Path | None = None, smoke: bool | None = None) -> Paths:
    """Output folders. Smoke runs: ``$SIDLIB_SMOKE_DIR`` or ``<tmp>/sidlib-smoke``."""
    root = Path(root) if root is not None else repo_root()
    if is_smoke() if smoke is None else smoke:
        base = Path(os.environ.get("SIDLIB_SMOKE_DIR") or Path(tempfile.gettempdir()) / "sidlib-smoke")
        return Paths(root, base / "reports", base / "checkpoints", True)
    return Paths(root, root / "reports", root / "checkpoints", False)
