"""``python -m experiments.paper``: the paper presets from the command line (``paper/dvc.yaml`` uses it).

::

    python -m experiments.paper list
    python -m experiments.paper show cifar10-uncond
    python -m experiments.paper disk [NAME ...] [--set snap_ticks=250]  # disk use of the run directories
    python -m experiments.paper distill-config cifar10-uncond --out cfg.yaml [--set batch_gpu=8 ...] \\
        [--label-probs datasets/cifar10-32x32.zip]                    # export a python -m sidlib.distill config
    python -m experiments.paper fetch-all cifar10-uncond [--released]  # teacher, references, Inception -> cache
    python -m experiments.paper fetch-teacher cifar10-uncond --out data/paper/teachers/cifar10-uncond.pkl
    python -m experiments.paper fetch-refs cifar10-uncond --out-dir data/paper/refs/cifar10-uncond
    python -m experiments.paper calc cifar10-uncond --network runs/paper/cifar10-uncond --snapshot best --out m.json
    python -m experiments.paper calc cifar10-uncond --released alpha1.2 --out m.json   # a released generator
    python -m experiments.paper calc cifar10-uncond --teacher --out m.json            # the teacher, EDM's sampler
    python -m experiments.paper tables --metrics reports/paper/metrics --out reports/paper/tables

``calc`` runs under ``torchrun`` too. Errors print one ``error: ...`` line and exit with status 2; ``--debug``
(anywhere on the line) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import yaml

from sidlib import distributed as dist_utils
from sidlib.cli import run_main, split_debug
from sidlib.io.atomic import atomic_copy, atomic_write_text
from sidlib.io.jsonio import write_json
from sidlib.io.registry import resolve_source
from sidlib.metrics.fidelity import ensure_inception_weights
from sidlib.metrics.protocol import evaluate_network
from sidlib.metrics.references import fetch_reference, load_reference_stats

from .presets import check_teacher, disk_estimate, distill_config, get_preset, load_paper_params, preset_label_probs
from .tables import load_measurements, write_tables


def _parser():
    p = argparse.ArgumentParser(prog="python -m experiments.paper", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    sub.add_parser("show").add_argument("name")
    k = sub.add_parser("disk", help="estimated disk use of each preset's run directory")
    k.add_argument("names", nargs="*")
    d = sub.add_parser("distill-config", help="write the sidlib.distill config of a preset")
    d.add_argument("name")
    d.add_argument("--out", required=True)
    for q in (k, d):
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="DistillConfig override")
    a = sub.add_parser("fetch-all", help="download a preset's teacher, references and the Inception weights")
    a.add_argument("name")
    a.add_argument("--released", action="store_true", help="the released generators too")
    t = sub.add_parser("fetch-teacher", help="download a preset's teacher, check its architecture, copy it to --out")
    t.add_argument("name")
    t.add_argument("--out", required=True)
    r = sub.add_parser("fetch-refs", help="a preset's references into DIR: fid.npz (and pr.npz)")
    r.add_argument("name")
    r.add_argument("--out-dir", required=True)
    c = sub.add_parser("calc", help="the paper's FID protocol on a run, a released generator or the teacher")
    c.add_argument("name")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--network", help="a run directory or any load_network source")
    which.add_argument("--released", choices=("alpha1.0", "alpha1.2"), help="a released SiD generator")
    which.add_argument("--teacher", action="store_true", help="the preset's teacher with EDM's sampler")
    c.add_argument("--snapshot", default=None, help="of a run directory: latest | best | KIMG (default: params)")
    c.add_argument("--refs", default=None, help="directory with fid.npz (and pr.npz); default: download")
    c.add_argument("--num-images", type=int, default=None)
    c.add_argument("--trials", type=int, default=None)
    c.add_argument("--batch", type=int, default=None)
    c.add_argument("--out", required=True)
    c.add_argument("--feature-extractor", default=None, help="not the paper's Inception: for tests and custom work")
    c.add_argument("--import", dest="imports", action="append", default=[], help="module to import first")
    for q in (d, c):
        q.add_argument("--label-probs", default=None, help="class frequencies: list, file or labelled dataset "
                                                           "(default: the preset's label_probs, else uniform)")
    tb = sub.add_parser("tables", help="Tables 1-4: reported numbers beside the measured ones")
    tb.add_argument("--metrics", nargs="*", default=[], help="metrics JSON files or directories")
    tb.add_argument("--out", required=True)
    return p


def _calc(args) -> dict:
    for module in args.imports:
        importlib.import_module(module)
    preset, ev = get_preset(args.name), load_paper_params()["eval"]
    refs = Path(args.refs) if args.refs else None
    fid_ref = str(refs / "fid.npz") if refs else preset["fid_ref"]
    pr_ref = (str(refs / "pr.npz") if refs else preset["pr_ref"]) if preset["pr_ref"] else None
    kw = dict(num_images=args.num_images or ev["num_images"], trials=args.trials or ev["trials"],
              batch_size=args.batch or ev["batch"], reference_stats=fid_ref, pr_reference=pr_ref, isc=preset["isc"],
              label_probs=preset_label_probs(preset, args.label_probs),
              **({"feature_extractor": args.feature_extractor} if args.feature_extractor else {}))
    if args.teacher:
        ts = preset["teacher_sampler"]
        source, kw["sampler"], kw["steps"] = preset["teacher"], "heun", ts["steps"]
        kw["sampler_kwargs"] = {k: v for k, v in ts.items() if k != "steps"}
    elif args.network:
        run_dir = any(Path(args.network).glob("network-snapshot-*"))  # params' choice applies to run directories
        source, kw["snapshot"] = args.network, args.snapshot or (ev.get("snapshot", "latest") if run_dir else "latest")
    else:
        source = preset["released"][args.released]
    device = dist_utils.default_device()
    created = dist_utils.init(device)
    try:
        return evaluate_network(source, device=device, info={"benchmark": args.name}, **kw)
    finally:
        if created:
            dist_utils.shutdown()


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e9 else f"{n / 1e6:,.0f} MB"


def _overrides(items) -> dict:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        out[k.strip()] = yaml.safe_load(v)
    return out


def _run(args) -> None:
    if args.cmd == "list":
        print("\n".join(load_paper_params()["presets"]))
    elif args.cmd == "show":
        print(yaml.safe_dump(get_preset(args.name), sort_keys=False))
    elif args.cmd == "disk":
        print("| preset | parameters | snapshot | snapshots written / kept | kept snapshots | training state | "
              "states kept | total |")
        print("|---|---|---|---|---|---|---|---|")
        for name in args.names or load_paper_params()["presets"]:
            e = disk_estimate(name, _overrides(args.set))
            print(f"| {name} | {e['parameters'] / 1e6:.1f} M | {_gb(e['snapshot_bytes'])} | {e['snapshots']} / "
                  f"{e['snapshots_kept']} | {_gb(e['snapshots_bytes'])} | {_gb(e['state_bytes'])} | "
                  f"{1 + e['numbered_states']} | {_gb(e['total_bytes'])} |")
    elif args.cmd == "distill-config":
        cfg = distill_config(args.name, _overrides(args.set), label_probs=args.label_probs)
        print(atomic_write_text(args.out, yaml.safe_dump(cfg, sort_keys=False)))
    elif args.cmd == "fetch-all":
        preset = get_preset(args.name)
        src, _ = resolve_source(preset["teacher"])
        check_teacher(preset, str(src))
        print(f"teacher {preset['teacher']}: {src}")
        for ref in (preset["fid_ref"], preset["pr_ref"]):
            if ref:
                print(f"reference {ref}: {fetch_reference(ref)}")
        if args.released:
            for name in preset["released"].values():
                print(f"released {name}: {resolve_source(name)[0]}")
        print(f"Inception weights: {ensure_inception_weights(progress=True)}")
    elif args.cmd == "fetch-teacher":
        preset = get_preset(args.name)
        src, _ = resolve_source(preset["teacher"])
        check_teacher(preset, str(src))
        print(f"{preset['teacher']} -> {atomic_copy(src, args.out)}")
    elif args.cmd == "fetch-refs":
        preset = get_preset(args.name)
        fid = fetch_reference(preset["fid_ref"])
        load_reference_stats(fid)
        atomic_copy(fid, Path(args.out_dir) / "fid.npz")
        if preset["pr_ref"]:
            atomic_copy(fetch_reference(preset["pr_ref"]), Path(args.out_dir) / "pr.npz")
        print(args.out_dir)
    elif args.cmd == "calc":
        result = _calc(args)
        if dist_utils.env_rank() == 0:
            write_json(args.out, result)
            print(json.dumps(result["summary"], indent=2))
    else:
        print("\n".join(str(p) for p in write_tables(args.out, load_measurements(args.metrics))))


def main(argv=None) -> int:
    argv, debug = split_debug(argv)
    args = _parser().parse_args(argv)
    return run_main(lambda: _run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
