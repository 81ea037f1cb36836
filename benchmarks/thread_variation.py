"""How much does an embedded result move when only the thread count changes?

Float sums are reduced in a different order with more threads, and the tiny SiD runs are chaotic, so a run repeated
with ``--threads`` torch threads (the pipeline uses one per worker) ends elsewhere. This script repeats one toy2d run
(alpha 1.2, seed 0, data-free start, the start itself included) and one digits run (``--variant``, seed 0) from
scratch in a temporary folder with ``--threads`` threads, scores them exactly as the pipeline does, and prints them
beside the committed per-seed results and their seed band (``reports/eval/<bench>.json``).

Usage (after ``make repro``; reads the digits teachers and classifier from ``checkpoints/digits``)::

    python benchmarks/thread_variation.py --threads 2 [--variant cond] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _band(values):
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} (seeds {', '.join(f'{v:.4f}' for v in values)})"


def toy2d(params: dict, threads: int, tmp: Path) -> dict:
    from experiments.toy2d import bench as T

    section = params["toy2d"]
    run = next(r for r in T.runs(section) if r.point.get("alpha") == 1.2 and r.point.get("seed") == 0
               and r.point.get("start", T.STARTS[0]) == T.STARTS[0])
    run.config["num_threads"] = threads
    T.run_one(section, run, str(tmp / "toy2d"))
    got = T.evaluate_run(section, run, str(tmp / "toy2d"))
    committed = [r for r in json.loads((ROOT / "reports/eval/toy2d.json").read_text())["runs"]
                 if r.get("alpha") == 1.2 and r.get("start", T.STARTS[0]) == T.STARTS[0]]
    out = {}
    for key in ("within_2sigma", "mode_share_min", "mode_share_max", "mean_log_density"):
        seeds = [r[key] for r in sorted(committed, key=lambda r: r["seed"])]
        out[key] = {"threads": got[key], "committed_seed0_1thread": seeds[0], "seed_band": seeds}
        print(f"toy2d alpha 1.2 {key}: {threads} threads {got[key]:.4f}; 1 thread {_band(seeds)}")
    return out


def digits(params: dict, threads: int, variant: str, tmp: Path) -> dict:
    import shutil

    from experiments.digits import bench as D

    section = params["digits"]
    ckpt = tmp / "digits"
    (ckpt / "sid").mkdir(parents=True)
    shutil.copytree(ROOT / "checkpoints/digits/teacher", ckpt / "teacher")  # teachers and classifier of the pipeline
    run = next(r for r in D.runs(section, ckpt) if r.point["variant"] == variant and r.point["seed"] == 0)
    run.config["num_threads"] = threads
    D.run_one(section, run, str(ckpt))
    got = D.evaluate_job(section, str(ckpt), "student", variant, run=run)
    rows = [r for r in json.loads((ROOT / "reports/eval/digits.json").read_text())["rows"]
            if r["variant"] == variant and r["model"].startswith("SiD")]
    seeds = [r["fid"] for r in sorted(rows, key=lambda r: r["seed"])]
    print(f"digits {variant} student FID: {threads} threads {got['fid']:.4f}; 1 thread {_band(seeds)}")
    return {"fid": {"threads": got["fid"], "committed_seed0_1thread": seeds[0], "seed_band": seeds}}


def main(argv=None) -> int:
    from experiments.common.params import load_params

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variant", default="cond", choices=["uncond", "cond"])
    ap.add_argument("--bench", nargs="+", default=["toy2d", "digits"], choices=["toy2d", "digits"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    params = load_params(ROOT / "params.yaml", smoke=False)
    torch.set_num_threads(args.threads)
    res = {"threads": args.threads}
    with tempfile.TemporaryDirectory() as tmp:
        if "toy2d" in args.bench:
            res["toy2d"] = toy2d(params, args.threads, Path(tmp))
        if "digits" in args.bench:
            res["digits"] = digits(params, args.threads, args.variant, Path(tmp))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
