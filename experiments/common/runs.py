"""SiD runs of a benchmark: the grid of ``<bench>.runs``, one DistillConfig per point, one folder per config.

A run folder is named after its grid point and a digest of everything that defines its trajectory: the
DistillConfig minus the keys a resumed run may change, the teacher's weights (not its path), and the source code
that computes it (:func:`code_digest`). A changed configuration, a retrained teacher or changed code starts a fresh
run in a new folder instead of resuming or reloading an old one, so the reports always come from the code that is
checked in, and ``dvc exp run -S digits.distill.alpha=1.0`` never touches the old runs. A checkout moved to another
folder finds its runs again.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from sidlib.distill import ConfigError, DistillConfig
from sidlib.distill.config import RESUMABLE_CHANGES
from sidlib.io.checkpoints import CheckpointError, read_network_meta
from sidlib.io.registry import is_url

from .params import ParamsError, check_keys, check_list

__all__ = ["Run", "expand_runs", "config_digest", "code_digest", "short_digest", "teacher_identity",
           "validate_distill", "with_shared_start"]

_ROOT = Path(__file__).resolve().parents[2]
#: The code a run's trajectory depends on: the library and the benchmarks (not their figures, not the paper).
_CODE = ("sidlib", "experiments/common", "experiments/toy2d", "experiments/digits")


@dataclass(frozen=True)
class Run:
    """One point of the run grid: ``point`` (grid values), ``name`` (folder stem) and the DistillConfig dict."""

    point: dict
    name: str
    config: dict

    def dir(self, root: Path) -> Path:
        return Path(root) / f"{self.name}-{config_digest(self.config)}"


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """sha256 over the Python sources of :data:`_CODE` (file names and contents, sorted), figures excluded."""
    h = hashlib.sha256()
    for folder in _CODE:
        for f in sorted((_ROOT / folder).rglob("*.py")):
            if f.name not in ("plots.py", "figures.py", "reports.py", "stage.py"):
                h.update(str(f.relative_to(_ROOT)).encode())
                h.update(f.read_bytes())
    return h.hexdigest()


def short_digest(obj, n: int = 8) -> str:
    """The first ``n`` hex digits of the sha256 of ``obj`` as key-sorted JSON: how folder names record settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def _trajectory(config: dict) -> dict:
    full = DistillConfig.from_dict(config).to_dict()
    return {k: v for k, v in sorted(full.items()) if k not in RESUMABLE_CHANGES}


def config_digest(config: dict) -> str:
    """8 hex digits of sha256 over the trajectory-defining keys of a DistillConfig mapping (the teacher as
    :func:`teacher_identity`) and :func:`code_digest`."""
    key = {**_trajectory(config), "teacher": teacher_identity(config.get("teacher"))}
    return short_digest([key, code_digest()])


def teacher_identity(teacher):
    """A teacher as run folders see it: a checkpoint file by its weights' sha256, so that the folder does not depend
    on where the checkout lies and a retrained teacher gets new runs; a name (registered or in-process) or URL as
    written. A local path that cannot be read raises FileNotFoundError naming it."""
    if not isinstance(teacher, str) or is_url(teacher) or ("/" not in teacher and not Path(teacher).exists()):
        return teacher
    try:
        stat = Path(teacher).stat()
        return {"sha256": _weights_sha256(str(Path(teacher).resolve()), stat.st_mtime_ns, stat.st_size)}
    except (OSError, CheckpointError) as e:
        raise FileNotFoundError(f"teacher {teacher}: run folders are named after the teacher's weights, which "
                                f"cannot be read ({e}); train the teacher first") from None


@functools.lru_cache(maxsize=64)
def _weights_sha256(path: str, mtime_ns: int, size: int) -> str:  # keyed on the file's state: a rewrite is read again
    return read_network_meta(path)["sha256"]


def with_shared_start(config: dict, root) -> dict:
    """``config`` with its data-free start (``g_init``, if any) cached under ``root/g_init-<code digest>`` unless
    it names a ``cache_dir``: runs that differ only in what the start does not depend on (alpha, glr, the budget,
    ...) fit it once."""
    if config.get("g_init") is None or config["g_init"].get("cache_dir"):
        return config
    return {**config, "g_init": {**config["g_init"], "cache_dir": str(Path(root) / f"g_init-{code_digest()[:8]}")}}


def _fmt(v) -> str:
    if isinstance(v, (dict, list)):  # e.g. a g_init mapping: a folder name holds 6 hex digits of its JSON, not the text
        return short_digest(v, 6)
    return f"{v:g}" if isinstance(v, float) else str(v)


def expand_runs(section: dict, name: str, extra_keys=(), fill=None) -> list:
    """The runs of a benchmark section: for each grid of ``section['runs']`` (a mapping key -> list of values, or a
    list of such grids), the product of its values over ``section['distill']``.

    ``extra_keys``: grid keys that are not DistillConfig keys (e.g. ``variant``); ``fill(point, config) -> config``
    adds what the benchmark sets itself (teacher, student geometry, device, ...). Order: grid by grid, keys sorted,
    so names and order do not depend on how a mapping was written or passed on (the stages get key-sorted YAML).
    """
    out = []
    for grid in _grids(section):
        keys = sorted(grid)
        for values in itertools.product(*(grid[k] for k in keys)):
            point = dict(zip(keys, values))
            config = {**section["distill"], **{k: v for k, v in point.items() if k not in extra_keys}}
            config = fill(point, config) if fill else config
            out.append(Run(point, "-".join(f"{k}{_fmt(v)}" if k not in extra_keys else str(v)
                                           for k, v in point.items()), config))
    return out


def _grids(section: dict) -> list:
    runs = section["runs"]
    return runs if isinstance(runs, list) else [runs]


def validate_distill(section: dict, name: str, extra_keys=(), fill=None) -> None:
    """Every run's DistillConfig builds and validates; errors name ``<name>.distill.<key>`` or ``<name>.runs.<key>``."""
    grids = _grids(section)
    for i, grid in enumerate(check_list(grids, f"{name}.runs")):
        where = f"{name}.runs" + (f"[{i}]" if isinstance(section["runs"], list) else "")
        check_keys(grid, where, set(DistillConfig.__dataclass_fields__) | set(extra_keys))
        for k, v in grid.items():
            check_list(v, f"{where}.{k}")
    if not isinstance(section["distill"], dict):
        raise ParamsError(f"{name}.distill must be a mapping of DistillConfig keys")
    all_runs = expand_runs(section, name, extra_keys, fill)
    names = [r.name for r in all_runs]
    if len(set(names)) != len(names):
        raise ParamsError(f"{name}.runs: the grids produce the same run twice "
                          f"({next(n for n in names if names.count(n) > 1)})")
    for run in all_runs:
        where = {k: f"{name}.runs.{k}" for k in run.point}
        try:
            cfg = DistillConfig.from_dict(run.config, where=f"{name}.distill.")
            cfg.validate(where=f"{name}.distill.")
        except ConfigError as e:
            msg = str(e)
            for k, w in where.items():  # a grid value is reported where it was written
                msg = msg.replace(f"{name}.distill.{k}:", f"{w}:")
            raise ParamsError(msg) from None
    shadowed = {k: v for k, v in section["distill"].items() if all(k in r.point for r in all_runs)}
    if shadowed and all_runs:  # a default every grid overrides is still checked, in the first run's context
        try:
            DistillConfig.from_dict({**all_runs[0].config, **shadowed}, where=f"{name}.distill.").validate(
                where=f"{name}.distill.")
        except ConfigError as e:
            raise ParamsError(str(e)) from None
    digests = [json.dumps(_trajectory(r.config), sort_keys=True) for r in all_runs]  # the teacher need not exist yet
    for i, d in enumerate(digests):
        if digests.index(d) != i:
            raise ParamsError(f"{name}.runs: {all_runs[digests.index(d)].name} and {all_runs[i].name} are the same "
                              "run (identical configuration)")
