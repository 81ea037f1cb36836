"""``python -m sidlib.generate``: images of a network for a list of seeds (EDM's ``generate.py``, SiD's
``generate_onestep.py``), also under ``torchrun``.

::

    python -m sidlib.generate --network sid-cifar10-uncond-alpha1.2 --seeds 0-49999 --outdir out
    python -m sidlib.generate --network runs/paper/cifar10-cond --snapshot best --seeds 0-9999 --npz s.npz --class 3
    torchrun --standalone --nproc_per_node gpu -m sidlib.generate --network edm-cifar10-32x32-cond-vp \\
        --sampler heun --steps 18 --seeds 0-63 --grid grid.png

Network: a registered name, file, URL or run directory (:func:`select_snapshot`). Outputs: PNGs in EDM's
``--subdirs`` layout (``000000/000000.png``; ``--no-subdirs``: one folder), an ``.npz`` (``arr_0`` uint8
``[N, H, W, C]`` as OpenAI's batches, ``seeds``, ``labels`` class indices if conditional) and/or a grid PNG.

Seed ``s`` draws its latent, label and sampler noise as EDM does (:func:`sidlib.rng.inputs_for_seeds`); the one-step
image is SiD's ``G(init_sigma * z, init_sigma, labels)`` (``init_sigma``: checkpoint meta, else 2.5), the teacher's
EDM's ``edm_sampler``, both quantised as EDM/SiD save them. On the CPU this is bit-exact against the official code
(``tests/test_official.py``); on CUDA up to kernel differences (a pixel may move by one level). CPU and CUDA images
differ; SiD's ``sid_metrics.py`` draws unseeded noise, so it has no seeds to match; ``--label-probs`` is ours.
"""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist_utils
from .cli import run_main, split_debug
from .io.atomic import atomic_open, atomic_path
from .io.checkpoints import load_checkpoint
from .io.logs import training_curve
from .rng import inputs_for_seeds
from .sampling import heun_generator, onestep_generator, to_uint8

__all__ = ["parse_seeds", "select_snapshot", "make_generator", "generate_images", "gather_rows", "save_pngs",
           "save_npz", "save_grid", "add_network_args", "sampler_kwargs", "load_for_sampling", "main"]


def parse_seeds(text) -> list[int]:
    """EDM's seed syntax: ``"0-63,100"`` -> ``[0, ..., 63, 100]`` (non-negative, ranges inclusive)."""
    if isinstance(text, (list, tuple, range)):
        return [int(s) for s in text]
    seeds = []
    for part in str(text).split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if m is None or (m.group(2) is not None and int(m.group(2)) < int(m.group(1))):
            raise ValueError(f"seeds: {part!r} in {text!r} is not N or N-M with M >= N (e.g. 0-63,100)")
        seeds += range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1)
    return seeds


_SNAPSHOT = re.compile(r"^network-snapshot-(?:\d+\.\d+-)?(\d+)\.(json|pkl)$")


def select_snapshot(source, which="latest") -> tuple[str, dict | None]:
    """``(checkpoint, selection)``: a run directory's ``network-snapshot-[<alpha>-]<kimg>.json|pkl`` at ``'latest'``,
    ``'best'`` (lowest FID logged in ``log.jsonl``) or a kimg; other sources with ``'latest'``: ``(source, None)``."""
    run = Path(str(source))
    snaps = {int(m.group(1)): run / f.name for f in (run.iterdir() if run.is_dir() else [])
             if (m := _SNAPSHOT.match(f.name))}
    if not snaps:
        if str(which) == "latest":
            return str(source), None
        raise ValueError(f"snapshot {which!r} needs a run directory with network-snapshot-* files; got {source}")
    sel: dict = {"snapshot": str(which), "run_dir": str(run)}
    if str(which) == "latest":
        kimg = max(snaps)
    elif str(which) == "best":
        curve = training_curve(run)
        metric = next((k for r in curve for k in r if k.startswith("fid")), None)
        pts = [(float(r[metric]), int(r["images_seen"]) // 1000) for r in curve
               if metric and r.get(metric) is not None and int(r["images_seen"]) // 1000 in snaps]
        if not pts:
            raise ValueError(f"{run}: no logged FID of a snapshot in log.jsonl, so no 'best' snapshot; use "
                             f"'latest' or a kimg ({', '.join(map(str, sorted(snaps)))})")
        value, kimg = min(pts)
        sel.update(criterion=f"lowest {metric} of {len(pts)} logged evaluations", criterion_value=value)
    elif str(which).isdigit():
        kimg = int(which)
        if kimg not in snaps:
            raise ValueError(f"{run} has no snapshot at {kimg} kimg; snapshots: {', '.join(map(str, sorted(snaps)))}")
    else:
        raise ValueError(f"snapshot must be 'latest', 'best' or a kimg, got {which!r}")
    sel.update(kimg=kimg, file=str(snaps[kimg]), of=len(snaps))
    return str(snaps[kimg]), sel


def make_generator(net, meta, sampler: str = "onestep", init_sigma: float | None = None, steps: int = 18,
                   sampler_kwargs=None):
    """``generator_fn`` of ``net``: SiD's ``'onestep'`` (``init_sigma``: else ``meta``'s, else 2.5) or EDM's
    ``'heun'`` (``steps``, ``sampler_kwargs`` S_churn/S_min/S_max/S_noise)."""
    if sampler not in ("onestep", "heun"):
        raise ValueError(f"sampler must be 'onestep' or 'heun', got {sampler!r}")
    if sampler == "heun":
        return heun_generator(net, steps, **dict(sampler_kwargs or {}))
    return onestep_generator(net, float(init_sigma if init_sigma is not None else meta.get("init_sigma", 2.5)))


@torch.no_grad()
def generate_images(generator_fn, seeds, img_shape, label_dim: int = 0, *, class_idx=None, label_probs=None,
                    batch: int = 64, device=None):
    """Yield ``(seeds, uint8 [n, C, H, W], class indices [n] or None)`` batch by batch: ``generator_fn(z,
    labels)`` (images in [-1, 1]) of each seed's inputs (:func:`inputs_for_seeds`); a ``generator_fn`` with a
    ``generators`` parameter also receives the seeds' generators for its own noise."""
    try:
        pass_gens = "generators" in inspect.signature(generator_fn).parameters
    except (TypeError, ValueError):
        pass_gens = False
    seeds = list(seeds)
    for i in range(0, len(seeds), batch):
        s = seeds[i:i + batch]
        z, labels, gens = inputs_for_seeds(s, img_shape, label_dim, device, probs=label_probs, class_idx=class_idx)
        x = generator_fn(z, labels, generators=gens) if pass_gens else generator_fn(z, labels)
        yield s, to_uint8(x), None if labels is None else labels.argmax(1)  # on the generating device


def gather_rows(batches: list, total: int) -> torch.Tensor:
    """The rows of every rank's ``batches`` (tensors ``[n, ...]``), ``[total, ...]`` in position order, where rank
    ``r`` of ``W`` holds positions ``r, r+W, ...`` (the ``[rank::world]`` split of the seeds)."""
    world = dist_utils.world_size()
    if world == 1:
        return torch.cat(batches)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, [b.cpu() for b in batches])
    rows = [[row for b in p for row in b] for p in parts]
    if [len(r) for r in rows] != [len(range(r, total, world)) for r in range(world)]:
        raise RuntimeError("gathering lost rows: ranks disagree on the seed split")
    return torch.stack([rows[i % world][i // world] for i in range(total)])


def _write_png(path, hwc: np.ndarray) -> None:
    import PIL.Image

    with atomic_path(path) as tmp:
        PIL.Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc).save(tmp, format="png")


def save_pngs(outdir, seeds, images: torch.Tensor, subdirs: bool = True) -> None:
    """``outdir/<seed - seed % 1000>/<seed>.png`` (or ``outdir/<seed>.png``), 6-digit names as EDM's."""
    for s, img in zip(seeds, images.permute(0, 2, 3, 1).numpy()):
        d = Path(outdir) / f"{s - s % 1000:06d}" if subdirs else Path(outdir)
        d.mkdir(parents=True, exist_ok=True)
        _write_png(d / f"{s:06d}.png", img)


def save_npz(path, seeds, images: torch.Tensor, labels=None) -> Path:
    """``arr_0`` uint8 ``[N, H, W, C]``, ``seeds`` and (conditional) ``labels``, written atomically."""
    extra = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
    with atomic_open(path, "wb") as f:
        np.savez(f, arr_0=images.permute(0, 2, 3, 1).numpy(), seeds=np.asarray(seeds, dtype=np.int64), **extra)
    return Path(path)


def save_grid(path, images: torch.Tensor) -> Path:
    """A grid PNG of uint8 ``[N, C, H, W]`` images, row by row in ``ceil(sqrt(N))`` columns."""
    n, c, h, w = images.shape
    gw = math.ceil(math.sqrt(n))
    gh = math.ceil(n / gw)
    full = torch.zeros([gh * gw, c, h, w], dtype=torch.uint8)
    full[:n] = images
    _write_png(path, full.reshape(gh, gw, c, h, w).permute(0, 3, 1, 4, 2).reshape(gh * h, gw * w, c).numpy())
    return Path(path)


def add_network_args(p: argparse.ArgumentParser) -> None:
    """The options ``sidlib.generate`` and ``sidlib.metrics calc`` share: network, snapshot, sampler, batch, device."""
    p.add_argument("--network", required=True, help="registered name, file, run directory or URL")
    p.add_argument("--snapshot", default="latest", help="of a run directory: latest | best (logged FID) | KIMG")
    p.add_argument("--label-probs", default=None, help="class frequencies: list, file or labelled dataset")
    p.add_argument("--sampler", choices=("onestep", "heun"), default="onestep", help="heun: EDM's teacher sampler")
    p.add_argument("--init-sigma", type=float, default=None, help="one-step sigma (default: checkpoint meta or 2.5)")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (NFE = 2 steps - 1)")
    for k in ("S-churn", "S-min", "S-max", "S-noise"):
        p.add_argument(f"--{k}", type=float, default=None, help="EDM's stochastic sampler setting")
    p.add_argument("--batch", type=int, default=64, help="images per batch per process")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def sampler_kwargs(args) -> dict:
    """EDM's stochastic sampler settings given on the command line (:func:`add_network_args`)."""
    return {k: getattr(args, k) for k in ("S_churn", "S_min", "S_max", "S_noise") if getattr(args, k) is not None}


def load_for_sampling(source, snapshot="latest", device=None) -> tuple:
    """``(net, meta, selection, device)``: ``source`` at ``snapshot`` (:func:`select_snapshot`) loaded in eval mode
    without gradients on ``device`` (``'auto'``: this process's GPU if any; None: the CPU)."""
    path, selection = select_snapshot(source, snapshot)
    device = dist_utils.default_device() if device == "auto" else torch.device("cpu" if device is None else device)
    net, meta = load_checkpoint(path)
    return net.to(device).eval().requires_grad_(False), dict(meta or {}), selection, device


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidlib.generate", description=__doc__.split("\n")[0])
    add_network_args(p)
    p.add_argument("--seeds", default="0-63", help="EDM's syntax, e.g. 0-63,100")
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="one class for every image")
    p.add_argument("--outdir", help="PNG folder")
    p.add_argument("--subdirs", action=argparse.BooleanOptionalAction, default=True, help="1,000 PNGs per folder")
    p.add_argument("--npz", help="npz file (arr_0 NHWC uint8, seeds, labels)")
    p.add_argument("--grid", help="grid PNG file")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _run(args) -> None:
    if not (args.outdir or args.npz or args.grid):
        raise ValueError("nothing to write: give --outdir, --npz and/or --grid")
    seeds = parse_seeds(args.seeds)
    net, meta, selection, device = load_for_sampling(args.network, args.snapshot, args.device)
    from .metrics.references import label_frequencies
    probs = label_frequencies(args.label_probs, int(net.label_dim)) if args.label_probs else None
    fn = make_generator(net, meta, args.sampler, args.init_sigma, args.steps, sampler_kwargs(args))
    shape = [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)]
    created = dist_utils.init(device)
    try:
        images, labels = [], []
        mine = seeds[dist_utils.rank()::dist_utils.world_size()]  # as the protocol splits them
        for s, x, lab in generate_images(fn, mine, shape, int(net.label_dim), class_idx=args.class_idx,
                                         label_probs=probs, batch=args.batch, device=device):
            x, lab = x.cpu(), None if lab is None else lab.cpu()
            if args.outdir:
                save_pngs(args.outdir, s, x, subdirs=args.subdirs)
            if args.npz or args.grid:
                images.append(x)
                labels.append(lab)
        if args.npz or args.grid:
            images = gather_rows(images, len(seeds))
            labels = gather_rows(labels, len(seeds)) if net.label_dim else None
            if dist_utils.rank() == 0 and args.npz:
                save_npz(args.npz, seeds, images, labels)
            if dist_utils.rank() == 0 and args.grid:
                save_grid(args.grid, images)
        dist_utils.barrier()
    finally:
        if created:
            dist_utils.shutdown()
    if dist_utils.env_rank() == 0:
        what = args.network + (f" (snapshot {selection['snapshot']}: {selection['kimg']} kimg)" if selection else "")
        outs = ", ".join(str(o) for o in (args.outdir, args.npz, args.grid) if o)
        print(f"{len(seeds)} images of {what}, {args.sampler} sampler -> {outs}")


def main(argv=None) -> int:
    argv, debug = split_debug(argv)
    args = _parser().parse_args(argv)
    return run_main(lambda: _run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
