"""How noisy is a digits FID, and how many samples does a paired comparison need?

For a trained digits teacher and one SiD student of the same variant, scores both on ``--sets`` disjoint seed
sets of each size in ``--sizes`` (the same latents and labels for teacher and student within a set) and prints,
per size: the spread (std over seed sets) of the teacher's FID, of the student's FID, and of the paired ratio
student/teacher. The sample count of the pipeline's final evaluation is chosen from this table.

Usage (after the digits stages of ``dvc repro`` have run)::

    python benchmarks/fid_noise_digits.py --variant cond --sizes 1000 2000 4000 --sets 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

#: Seed set k is ``SEED_SETS + k * SEED_SET_STRIDE`` onwards: disjoint from the pipeline's evaluation seeds
#: (1,000,000 ...) and from each other up to 100,000 samples.
SEED_SETS, SEED_SET_STRIDE = 5_000_000, 100_000


def seed_set(k: int, n: int) -> list:
    """The first ``n`` seeds of seed set ``k``."""
    return list(range(SEED_SETS + k * SEED_SET_STRIDE, SEED_SETS + k * SEED_SET_STRIDE + n))


def sample_fid(metrics, net, seeds, label_dim: int, *, nfe: int | None = None, init_sigma: float | None = None):
    """FID of the images of ``seeds``: a teacher through Heun at ``nfe``, or a one-step student at ``init_sigma``."""
    from experiments.digits.metrics import student_samples, teacher_samples

    if init_sigma is None:
        x, labels, _ = teacher_samples(net, seeds, nfe, label_dim)
    else:
        x, labels = student_samples(net, seeds, init_sigma, label_dim)
    return metrics(x, labels, kid=False, prc=False)["fid"]


def main(argv=None) -> int:
    from experiments.common.params import get_paths, load_params
    from experiments.digits import bench as D
    from sidlib.io.checkpoints import load_checkpoint, load_network

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="cond", choices=sorted(D.VARIANT_LABEL_DIM))
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000])
    p.add_argument("--sets", type=int, default=3)
    p.add_argument("--nfe", type=int, default=35)
    p.add_argument("--checkpoints", default=None, help="default: checkpoints/digits")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    section = load_params(smoke=False)["digits"]
    ckpt = Path(args.checkpoints) if args.checkpoints else get_paths(smoke=False).checkpoints / "digits"
    run = next(r for r in D.runs(section, ckpt) if r.point["variant"] == args.variant)
    G, meta = load_checkpoint(sorted(run.dir(ckpt / "sid").glob("network-snapshot-*.safetensors"))[-1])
    teacher = load_network(D.teacher_path(ckpt, section, args.variant))
    metrics = D.image_metrics(section, ckpt)
    label_dim = D.VARIANT_LABEL_DIM[args.variant]
    print(f"digits {args.variant}: teacher Heun {args.nfe} NFE vs {run.name}; std over {args.sets} disjoint seed sets")
    print("| samples | teacher FID (mean ± std) | student FID (mean ± std) | paired ratio (mean ± std) |")
    print("|---|---|---|---|")
    for n in args.sizes:
        t, s = [], []
        for k in range(args.sets):
            seeds = seed_set(k, n)
            t.append(sample_fid(metrics, teacher, seeds, label_dim, nfe=args.nfe))
            s.append(sample_fid(metrics, G, seeds, label_dim, init_sigma=float(meta["init_sigma"])))
        t, s = np.array(t), np.array(s)
        r = s / t
        print(f"| {n} | {t.mean():.2f} ± {t.std(ddof=1):.2f} | {s.mean():.2f} ± {s.std(ddof=1):.2f} | "
              f"{r.mean():.3f} ± {r.std(ddof=1):.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
