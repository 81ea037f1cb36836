"""``python -m sidlib.metrics``: the paper's FID protocol from the command line (EDM's ``fid.py``).

::

    python -m sidlib.metrics calc --network sid-cifar10-uncond-alpha1.2 --ref cifar10-32x32 --isc \\
        --num-images 50000 --trials 10 --out metrics.json
    torchrun --nproc_per_node 8 -m sidlib.metrics calc --network run/ --ref ref.npz --out metrics.json
    python -m sidlib.metrics fetch cifar10-32x32 --out refs/fid.npz
    python -m sidlib.metrics list
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from .. import distributed as dist_utils
from ..io.atomic import atomic_copy
from ..io.checkpoints import read_network_meta
from ..io.jsonio import write_json
from .fidelity import INCEPTION
from .protocol import PAPER_NUM_IMAGES, ProtocolError, evaluate_network, metric_names
from .references import FID_REFERENCES, PR_REFERENCES, fetch_reference, load_reference_stats


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidlib.metrics", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calc", help="FID/IS/PR of a network under the paper's protocol")
    c.add_argument("--network", required=True, help="load_network source: registered name, file, directory or URL")
    c.add_argument("--ref", help="FID reference: .npz path, URL, or reference name (python -m sidlib.metrics list)")
    c.add_argument("--pr-ref", default=None, help="precision/recall reference batch (.npz arr_0) or name")
    # "--num" alone is ambiguous to torchrun's own parser (--numa-binding); use --num-images under torchrun.
    c.add_argument("--num-images", "--num", dest="num", type=int, default=PAPER_NUM_IMAGES,
                   help="images per trial (default 50000; anything else is labelled a proxy)")
    c.add_argument("--trials", type=int, default=1)
    c.add_argument("--seed-start", type=int, default=0)
    c.add_argument("--batch", type=int, default=64, help="images per batch per process")
    c.add_argument("--sampler", choices=("onestep", "heun"), default="onestep")
    c.add_argument("--init-sigma", type=float, default=None, help="one-step sigma (default: checkpoint meta or 2.5)")
    c.add_argument("--steps", type=int, default=18, help="Heun steps (NFE = 2 steps - 1)")
    for k in ("S-churn", "S-min", "S-max", "S-noise"):
        c.add_argument(f"--{k}", type=float, default=None, help="EDM's stochastic sampler setting")
    c.add_argument("--isc", action="store_true", help="also the Inception Score")
    c.add_argument("--proxy", action="store_true", help="label the result a proxy even at 50k images")
    c.add_argument("--feature-extractor", default=INCEPTION)
    c.add_argument("--feature-dim", type=int, default=None)
    c.add_argument("--weights", default=None, help="path of torch-fidelity's Inception weights file")
    c.add_argument("--import", dest="imports", action="append", default=[],
                   help="installed module to import first (e.g. one that registers a feature extractor)")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda")
    c.add_argument("--progress", action="store_true")
    c.add_argument("--out", default=None, help="metrics JSON (written atomically by rank 0)")
    f = sub.add_parser("fetch", help="download a known reference (or a URL) and copy it to --out")
    f.add_argument("name")
    f.add_argument("--out", required=True)
    f.add_argument("--sha256", default=None)
    sub.add_parser("list", help="print the known references")
    return p


def _calc(args) -> dict:
    for module in args.imports:
        importlib.import_module(module)
    if args.ref is None and not args.isc:
        raise ProtocolError("--ref is required (or --isc for the Inception Score alone)")
    metric_names(args.num, True if args.proxy else None)
    read_network_meta(args.network)  # a bad source fails before the network or the extractor is loaded
    device = dist_utils.default_device() if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sampler_kwargs = {k: getattr(args, k) for k in ("S_churn", "S_min", "S_max", "S_noise")
                      if getattr(args, k) is not None}
    created = dist_utils.init(device)
    try:
        return evaluate_network(
            args.network, sampler=args.sampler, init_sigma=args.init_sigma, steps=args.steps,
            sampler_kwargs=sampler_kwargs, num_images=args.num, trials=args.trials, seed_start=args.seed_start,
            reference_stats=args.ref, pr_reference=args.pr_ref, isc=args.isc, feature_extractor=args.feature_extractor,
            proxy=True if args.proxy else None, batch_size=args.batch, progress=args.progress,
            feature_dim=args.feature_dim, device=device,
            extractor_kwargs={"feature_extractor_weights_path": args.weights} if args.weights else None)
    finally:
        if created:
            dist_utils.shutdown()


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.cmd == "list":
        for name, url in sorted({**FID_REFERENCES, **PR_REFERENCES}.items()):
            print(f"{name}\t{url}")
    elif args.cmd == "fetch":
        src = fetch_reference(args.name, sha256=args.sha256)
        if args.name in FID_REFERENCES:
            load_reference_stats(src)
        print(f"{args.name} -> {atomic_copy(src, Path(args.out))}")
    else:
        result = _calc(args)
        if dist_utils.env_rank() == 0:
            if args.out:
                write_json(args.out, result)
            print(json.dumps(result["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
