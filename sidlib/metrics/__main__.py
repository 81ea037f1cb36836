"""``python -m sidlib.metrics``: the paper's FID protocol (EDM's ``fid.py``, SiD's ``sid_metrics.py``).

::

    python -m sidlib.metrics calc --network sid-cifar10-uncond-alpha1.2 --ref cifar10-32x32 --isc --out m.json
    torchrun --nproc_per_node gpu -m sidlib.metrics calc --network runs/x --snapshot best --ref ref.npz --out m.json
    python -m sidlib.metrics ref --data datasets/cifar10-32x32.zip --dest refs/cifar10.npz
    python -m sidlib.metrics fetch cifar10-32x32 --out refs/fid.npz
    python -m sidlib.metrics list

Errors print one ``error: ...`` line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch

from .. import distributed as dist_utils
from ..cli import run_main, split_debug
from ..generate import add_network_args, sampler_kwargs
from ..io.atomic import atomic_copy
from ..io.checkpoints import read_network_meta
from ..io.jsonio import write_json
from .fidelity import INCEPTION
from .protocol import PAPER_NUM_IMAGES, PAPER_TRIALS, ProtocolError, evaluate_network, metric_names, select_snapshot
from .references import (FID_REFERENCES, PR_REFERENCES, dataset_statistics, fetch_reference, label_frequencies,
                         load_reference_stats, save_reference_stats)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidlib.metrics", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (anywhere on the line)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calc", help="FID/IS/PR of a network under the paper's protocol")
    add_network_args(c)
    c.add_argument("--ref", help="FID reference: .npz path, URL, or reference name (see 'list')")
    c.add_argument("--pr-ref", default=None, help="precision/recall reference batch (.npz arr_0) or name")
    # "--num" alone is ambiguous to torchrun's own parser (--numa-binding); use --num-images under torchrun.
    c.add_argument("--num-images", "--num", dest="num", type=int, default=PAPER_NUM_IMAGES,
                   help="images per trial (default 50000; anything else is labelled a proxy)")
    c.add_argument("--trials", type=int, default=PAPER_TRIALS)
    c.add_argument("--seed-start", type=int, default=0)
    c.add_argument("--isc", action="store_true", help="also the Inception Score")
    c.add_argument("--proxy", action="store_true", help="label the result a proxy even at 50k images")
    c.add_argument("--out", default=None, help="metrics JSON (written atomically by rank 0)")
    c.add_argument("--progress", action="store_true")
    c.add_argument("--feature-dim", type=int, default=None)
    r = sub.add_parser("ref", help="reference statistics of a dataset folder or zip (EDM's fid.py ref)")
    r.add_argument("--data", required=True, help="images in a folder or zip (EDM's dataset_tool.py layout)")
    r.add_argument("--dest", required=True, help="output .npz (mu, sigma)")
    r.add_argument("--max-images", type=int, default=None)
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--device", default="auto", help="auto | cpu | cuda")
    for q in (c, r):
        q.add_argument("--feature-extractor", default=INCEPTION)
        q.add_argument("--weights", default=None, help="path of torch-fidelity's Inception weights file")
        q.add_argument("--import", dest="imports", action="append", default=[],
                       help="installed module to import first (e.g. one that registers a feature extractor)")
    f = sub.add_parser("fetch", help="download a known reference (or a URL) and copy it to --out")
    f.add_argument("name")
    f.add_argument("--out", required=True)
    f.add_argument("--sha256", default=None)
    sub.add_parser("list", help="print the known references")
    return p


def _run(args) -> None:
    if args.cmd == "list":
        print("\n".join(f"{k}\t{v}" for k, v in sorted({**FID_REFERENCES, **PR_REFERENCES}.items())))
        return
    if args.cmd == "fetch":
        src = fetch_reference(args.name, sha256=args.sha256)
        if args.name in FID_REFERENCES:
            load_reference_stats(src)
        print(f"{args.name} -> {atomic_copy(src, Path(args.out))}")
        return
    for module in args.imports:
        importlib.import_module(module)
    device = dist_utils.default_device() if args.device == "auto" else torch.device(args.device)
    ekw = {"feature_extractor_weights_path": args.weights} if args.weights else None
    if args.cmd == "calc":
        if args.ref is None and not args.isc:
            raise ProtocolError("--ref is required (or --isc for the Inception Score alone)")
        metric_names(args.num, True if args.proxy else None)
        read_network_meta(select_snapshot(args.network, args.snapshot)[0])  # a bad source fails before any compute
        probs = label_frequencies(args.label_probs) if args.label_probs else None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    created = dist_utils.init(device)
    try:
        if args.cmd == "ref":
            mu, sigma, n = dataset_statistics(args.data, feature_extractor=args.feature_extractor, batch_size=args.batch,
                                              device=device, max_images=args.max_images, extractor_kwargs=ekw)
            if dist_utils.rank() == 0:
                print(f"{n} images -> {save_reference_stats(args.dest, mu, sigma)}")
            return
        result = evaluate_network(
            args.network, snapshot=args.snapshot, sampler=args.sampler, init_sigma=args.init_sigma, steps=args.steps,
            sampler_kwargs=sampler_kwargs(args), num_images=args.num, trials=args.trials, seed_start=args.seed_start,
            reference_stats=args.ref, pr_reference=args.pr_ref, isc=args.isc, label_probs=probs,
            feature_extractor=args.feature_extractor, proxy=True if args.proxy else None, batch_size=args.batch,
            progress=args.progress, feature_dim=args.feature_dim, device=device, extractor_kwargs=ekw)
    finally:
        if created:
            dist_utils.shutdown()
    if dist_utils.env_rank() == 0:
        if args.out:
            write_json(args.out, result)
        print(json.dumps(result["summary"], indent=2))


def main(argv=None) -> int:
    argv, debug = split_debug(argv)
    args = _parser().parse_args(argv)
    return run_main(lambda: _run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
