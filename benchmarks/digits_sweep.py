"""Try a digits SiD setting on several distillation seeds and print its paired ratio to the teacher.

Each ``--set key=value`` (YAML value) overrides ``digits.distill`` for every run, e.g. ``--set glr=2.0e-4
--set 'g_init={pairs: 4000, steps: 1000}'`` or ``--set g_init=null``; the grid is ``--variant`` × ``--seeds``. The
runs go to ``<checkpoints>/sid`` (resumable, named as the pipeline names them), the teachers and the classifier are
the pipeline's (``checkpoints/digits/teacher``, from ``dvc repro``). For every snapshot at a multiple of ``--every``
kimg and the last one, the script prints the mean ± std over seeds of student FID / teacher FID at ``--nfe``, both on
the pipeline's evaluation seeds (the same latents and labels); ``--other-sets K ...`` also scores the last snapshots
on the seed sets of ``benchmarks/fid_noise_digits.py`` (``seed_set``: 5,000,000 + 100,000 K onwards).

Usage (after ``dvc repro``; two worker processes, minutes per setting)::

    python benchmarks/digits_sweep.py --variant uncond --set ema_halflife_kimg=8.0 --other-sets 0 1
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fid_noise_digits import sample_fid, seed_set  # noqa: E402


def fid_job(section: dict, ckpt: str, kind: str, path: str, variant: str, seeds: list, nfe: int) -> float:
    """FID of the images of ``seeds`` of a teacher (Heun, ``nfe``) or a student snapshot."""
    from experiments.digits import bench as D
    from sidlib.io.checkpoints import load_checkpoint, load_network

    metrics, label_dim = D.image_metrics(section, Path(ckpt)), D.VARIANT_LABEL_DIM[variant]
    if kind == "teacher":
        return sample_fid(metrics, load_network(path), seeds, label_dim, nfe=nfe)
    G, meta = load_checkpoint(path)
    return sample_fid(metrics, G, seeds, label_dim, init_sigma=float(meta["init_sigma"]))


def parse_sets(items) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {item!r}: expected key=value")
        out[key] = yaml.safe_load(value)
    return out


def main(argv=None) -> int:
    from experiments.common.params import get_paths, load_params
    from experiments.common.parallel import run_parallel
    from experiments.digits import bench as D

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="uncond", choices=sorted(D.VARIANT_LABEL_DIM))
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--every", type=float, default=8.0, help="kimg between scored snapshots")
    p.add_argument("--other-sets", type=int, nargs="*", default=[])
    p.add_argument("--nfe", type=int, default=35)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--checkpoints", default=None, help="default: checkpoints/digits-sweep")
    args = p.parse_args(argv)

    section = copy.deepcopy(load_params(smoke=False)["digits"])
    pipeline = get_paths(smoke=False).checkpoints / "digits"
    base = next(g for g in section["runs"] if args.variant in g["variant"])  # the pipeline's grid for this variant
    grid = {k: v for k, v in base.items() if k not in ("variant", "seed")}
    several = sorted(k for k, v in grid.items() if len(v) != 1)
    if several:
        raise SystemExit(f"error: the {args.variant} grid of params.yaml lists several values of {', '.join(several)}; "
                         "choose one with --set")
    section["distill"] = {**section["distill"], **{k: v[0] for k, v in grid.items()}, **parse_sets(args.sets)}
    section["runs"] = [{"variant": [args.variant], "seed": list(args.seeds)}]
    D.BENCHMARK.validate(section)  # a bad key or value fails here, before anything runs
    teacher = D.require(D.teacher_path(pipeline, section, args.variant), f"digits {args.variant} teacher", "teacher@digits")
    D.require(D.classifier_path(pipeline), "digit classifier", "teacher@digits")
    ckpt = Path(args.checkpoints) if args.checkpoints else pipeline.parent / "digits-sweep"
    (ckpt / "sid").mkdir(parents=True, exist_ok=True)
    if not (ckpt / "teacher").exists():
        (ckpt / "teacher").symlink_to(pipeline.resolve() / "teacher", target_is_directory=True)
    runs = D.runs(section, ckpt)
    print(f"digits {args.variant}, distill block {section['distill']}", flush=True)
    run_parallel(D.run_one, [dict(section=section, run=r, ckpt=str(ckpt)) for r in runs], workers=args.workers)

    snaps = {}  # kimg -> one snapshot per run
    for r in runs:
        files = sorted(r.dir(ckpt / "sid").glob("network-snapshot-*.safetensors"))
        for i, f in enumerate(files):
            kimg = int(f.stem.rsplit("-", 1)[1])
            if (kimg > 0 and kimg % args.every == 0) or i == len(files) - 1:
                snaps.setdefault(kimg, []).append(str(f))
    last = max(snaps)
    n = int(section["eval"]["num_samples"])
    sets = {D.EVAL_SEEDS: list(range(D.EVAL_SEEDS, D.EVAL_SEEDS + n))}  # first seed -> seeds
    sets.update((seeds[0], seeds) for seeds in (seed_set(k, n) for k in args.other_sets))
    firsts = list(sets)
    common = dict(section=section, ckpt=str(ckpt), variant=args.variant, nfe=args.nfe)
    jobs = [dict(common, kind="teacher", path=str(teacher), seeds=sets[s]) for s in firsts]
    jobs += [dict(common, kind="student", path=f, seeds=sets[D.EVAL_SEEDS]) for k in sorted(snaps) for f in snaps[k]]
    jobs += [dict(common, kind="student", path=f, seeds=sets[s]) for s in firsts[1:] for f in snaps[last]]
    fids = run_parallel(fid_job, jobs, workers=args.workers)
    by_job = {(j["kind"], j["path"], j["seeds"][0]): v for j, v in zip(jobs, fids)}
    t = {s: by_job[("teacher", str(teacher), s)] for s in firsts}
    print(f"teacher at {args.nfe} NFE: FID {t[D.EVAL_SEEDS]:.3f} on the pipeline's seeds")
    print("| kimg | ratio (mean ± std over seeds) | per seed |\n|---:|---:|---|")
    for k in sorted(snaps):
        r = np.array([by_job[("student", f, D.EVAL_SEEDS)] / t[D.EVAL_SEEDS] for f in snaps[k]])
        sd = f"{r.std(ddof=1):.3f}" if len(r) > 1 else "-"
        print(f"| {k} | {r.mean():.3f} ± {sd} | {', '.join(f'{v:.3f}' for v in r)} |")
    if args.other_sets:
        per_student = np.array([np.mean([by_job[("student", f, s)] / t[s] for s in firsts[1:]]) for f in snaps[last]])
        sd = f"{per_student.std(ddof=1):.3f}" if len(per_student) > 1 else "-"
        print(f"last snapshots on seed sets {args.other_sets}: ratio {per_student.mean():.3f} ± {sd} (each "
              f"student's mean over the sets; per student {', '.join(f'{v:.3f}' for v in per_student)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
