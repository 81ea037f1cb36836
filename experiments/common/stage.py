"""What the stage notebooks call, and the hand-over of parameters from DVC to papermill.

A DVC stage runs (see ``dvc.yaml``)::

    papermill notebooks/02_distill.ipynb reports/notebooks/02_distill-digits.ipynb -p benchmark digits \\
        -y "$(python -m experiments.common.stage distill digits)"

``python -m experiments.common.stage <stage> <bench>`` prints (as one line of YAML) exactly the params the stage
declares to DVC: the blocks :data:`STAGE_BLOCKS` of ``<bench>``'s section and the ``run`` block, merged with the
smoke overlay in smoke mode. The notebook receives them as papermill parameters, so DVC tracks everything a stage
reads, and a stage re-runs only when a block it reads changes.
"""
from __future__ import annotations

import json
import sys

import yaml

from .benchmark import Context, StageResult, get_benchmark
from .params import get_paths, load_params, validate_params
from .reports import write_table

__all__ = ["STAGE_BLOCKS", "stage_params", "stage_context", "show_params", "targets_table", "main"]

#: The blocks of a benchmark's section each stage reads (dvc.yaml declares exactly these, and ``run``).
STAGE_BLOCKS = {
    "teacher": ("data", "teacher", "runs"),
    "distill": ("data", "teacher", "runs", "distill", "eval"),
    "evaluate": ("data", "teacher", "runs", "distill", "eval"),
    "figures": ("data", "teacher", "runs", "distill", "eval"),
}


def stage_params(stage: str, benchmark: str, params: dict | None = None) -> dict:
    """``{'params': <the stage's blocks of the benchmark's section>, 'run': <run block>}``."""
    if stage not in STAGE_BLOCKS:
        raise ValueError(f"unknown stage {stage!r}; stages: {sorted(STAGE_BLOCKS)}")
    params = load_params() if params is None else params
    get_benchmark(benchmark)
    return {"params": {k: params[benchmark][k] for k in STAGE_BLOCKS[stage]}, "run": params["run"]}


def stage_context(stage: str, benchmark: str, section: dict | None = None, run: dict | None = None):
    """``(Context, Benchmark)`` for a stage notebook; ``section``/``run`` None: read ``params.yaml``.

    Given ones are validated exactly as ``params.yaml`` would be.
    """
    bench = get_benchmark(benchmark)
    if section is None or run is None:
        full = stage_params(stage, benchmark)
        section = full["params"] if section is None else section
        run = full["run"] if run is None else run
    validate_params({"run": {**run, "benchmarks": [benchmark]}, benchmark: section}, blocks=STAGE_BLOCKS[stage])
    return Context(benchmark, section, run, get_paths()), bench


def show_params(ctx: Context) -> None:
    print(yaml.safe_dump({ctx.name: ctx.section}, sort_keys=False, default_flow_style=None, width=110))


def targets_table(benchmarks=None) -> StageResult:
    """Every benchmark's targets (from ``reports/eval/<bench>.json``) into ``reports/tables/targets.{md,csv}``."""
    params = load_params()
    paths = get_paths()
    rows, skipped = [], []
    for b in benchmarks or params["run"]["benchmarks"]:
        f = paths.eval / f"{b}.json"
        if not f.is_file() and paths.smoke:
            skipped.append(b)  # a smoke run (nbval) evaluates only the notebooks' default benchmark
            continue
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: run the evaluate@{b} stage first")
        rows += [{"benchmark": b, **t} for t in json.loads(f.read_text()).get("targets", [])]
    md = write_table(paths.tables / "targets", rows, ["benchmark", "target", "measured", "met"], title="Targets")
    met = sum(r["met"] == "yes" for r in rows)
    note = f" (smoke run: {', '.join(skipped)} not evaluated)" if skipped else ""
    return StageResult(text=f"{met} of {len(rows)} targets met{note}.", tables={"targets": md} if rows else {})


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m experiments.common.stage STAGE BENCHMARK", file=sys.stderr)
        return 2
    # YAML, not JSON: papermill reads -y with PyYAML, which takes JSON's 5e-05 for a string.
    print(yaml.safe_dump(stage_params(*argv), default_flow_style=True, width=float("inf")).strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
