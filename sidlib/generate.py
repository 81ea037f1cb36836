"""``python -m sidlib.generate``: images of a network for a list of seeds (EDM's ``generate.py``, SiD's
``generate_onestep.py``), also under ``torchrun``.

::

    python -m sidlib.generate --network sid-cifar10-uncond-alpha1.2 --seeds 0-49999 --outdir out
    python -m sidlib.generate --network runs/paper/cifar10-cond --snapshot best --seeds 0-9999 --npz s.npz --class 3
    torchrun --standalone --nproc_per_node gpu -m sidlib.generate --network edm-cifar10-32x32-cond-vp \\
        --sampler heun --steps 18 --seeds 0-63 --grid grid.png

The network is a registered name, a file, a URL or a run directory (:func:`sidlib.io.checkpoints.load_checkpoint`,
:func:`select_snapshot`). Outputs: PNGs laid out as EDM's ``--subdirs`` (``000000/000000.png``,
1,000 per folder; ``--no-subdirs`` for one folder), an ``.npz`` (``arr_0`` uint8 ``[N, H, W, C]`` as OpenAI's
batches, ``seeds``, and ``labels`` class indices for conditional networks), and/or a grid PNG.

Where the images equal the official ones: seed ``s`` draws its latent, label and sampler noise from a generator
seeded with ``s % 2**32`` on the generating device, in EDM's order (:func:`sidlib.rng.inputs_for_seeds`); the
one-step image is ``G(init_sigma * z, init_sigma, labels)`` (``init_sigma`` from the checkpoint's meta, else 2.5) as
in SiD's ``generate_onestep.py``, the teacher's is EDM's ``edm_sampler`` (deterministic, or stochastic with
``--S-churn``), and both are quantised as EDM/SiD save them. On the CPU this is bit-exact against the official code
(``tests/test_official.py``); on CUDA the same seeds give the same latents as EDM's on CUDA, and the images agree up
to floating-point differences between kernels and GPUs (which can move a pixel by one level).

Where they do not: CPU and CUDA give different images for the same seed (EDM's too); SiD's ``sid_metrics.py`` and its
training loop draw unseeded noise and dataset labels, so their images have no seed to match; EDM's ablation sampler
options are not offered; ``--label-probs`` (class frequencies) has no official counterpart.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch

from . import distributed as dist_utils
from .io.atomic import atomic_open, atomic_path
from .io.checkpoints import load_checkpoint
from .io.logs import training_curve
from .rng import inputs_for_seeds
from .sampling import heun_generator, onestep_generator, to_uint8

__all__ = ["parse_seeds", "select_snapshot", "generate_images", "save_pngs", "save_npz", "save_grid", "main"]


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
    """``(checkpoint, selection)`` for ``source``: a run directory's snapshot ``'latest'``, ``'best'`` (lowest
    logged in-training FID in ``log.jsonl``, a proxy unless the loop evaluated 50k images) or a kimg (int or digits);
    any other source with ``'latest'`` is returned unchanged with selection None. Snapshots are sidlib's
    ``network-snapshot-<kimg>.json`` and SiD's ``network-snapshot-<alpha>-<kimg>.pkl``."""
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


@torch.no_grad()
def generate_images(net, seeds, *, sampler: str = "onestep", init_sigma: float = 2.5, steps: int = 18,
                    sampler_kwargs=None, class_idx=None, label_probs=None, batch: int = 64, device=None):
    """Yield ``(seeds, uint8 [n, C, H, W] on CPU, class indices [n] or None)`` batch by batch."""
    if sampler not in ("onestep", "heun"):
        raise ValueError(f"sampler must be 'onestep' or 'heun', got {sampler!r}")
    fn = onestep_generator(net, init_sigma) if sampler == "onestep" else heun_generator(net, steps, **(sampler_kwargs or {}))
    shape = [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)]
    seeds = list(seeds)
    for i in range(0, len(seeds), batch):
        s = seeds[i:i + batch]
        z, labels, gens = inputs_for_seeds(s, shape, int(net.label_dim), device, probs=label_probs, class_idx=class_idx)
        x = fn(z, labels, generators=gens) if sampler == "heun" else fn(z, labels)
        yield s, to_uint8(x).cpu(), None if labels is None else labels.argmax(1).cpu()


def save_pngs(outdir, seeds, images: torch.Tensor, subdirs: bool = True) -> None:
    """``outdir/<seed - seed % 1000>/<seed>.png`` (or ``outdir/<seed>.png``), 6-digit names as EDM's."""
    import PIL.Image

    for s, img in zip(seeds, images.permute(0, 2, 3, 1).numpy()):
        d = Path(outdir) / f"{s - s % 1000:06d}" if subdirs else Path(outdir)
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / f"{s:06d}.png") as tmp:
            PIL.Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(tmp, format="png")


def save_npz(path, seeds, images: torch.Tensor, labels=None) -> Path:
    """``arr_0`` uint8 ``[N, H, W, C]``, ``seeds`` and (conditional) ``labels``, written atomically."""
    extra = {} if labels is None else {"labels": np.asarray(labels, dtype=np.int64)}
    with atomic_open(path, "wb") as f:
        np.savez(f, arr_0=images.permute(0, 2, 3, 1).numpy(), seeds=np.asarray(seeds, dtype=np.int64), **extra)
    return Path(path)


def save_grid(path, images: torch.Tensor, columns: int | None = None) -> Path:
    """A grid PNG of uint8 ``[N, C, H, W]`` images, row by row (``ceil(sqrt(N))`` columns by default)."""
    import PIL.Image

    n, c, h, w = images.shape
    gw = columns or math.ceil(math.sqrt(n))
    gh = math.ceil(n / gw)
    full = torch.zeros([gh * gw, c, h, w], dtype=torch.uint8)
    full[:n] = images
    grid = full.reshape(gh, gw, c, h, w).permute(0, 3, 1, 4, 2).reshape(gh * h, gw * w, c).numpy()
    with atomic_path(path) as tmp:
        PIL.Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(tmp, format="png")
    return Path(path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sidlib.generate", description=__doc__.split("\n")[0])
    p.add_argument("--network", required=True, help="registered name, file, run directory or URL")
    p.add_argument("--snapshot", default="latest", help="of a run directory: latest | best (logged FID) | KIMG")
    p.add_argument("--seeds", default="0-63", help="EDM's syntax, e.g. 0-63,100")
    p.add_argument("--class", dest="class_idx", type=int, default=None, help="one class for every image")
    p.add_argument("--label-probs", default=None, help="class frequencies: list, file or labelled dataset")
    p.add_argument("--sampler", choices=("onestep", "heun"), default="onestep", help="heun: EDM's teacher sampler")
    p.add_argument("--init-sigma", type=float, default=None, help="one-step sigma (default: checkpoint meta or 2.5)")
    p.add_argument("--steps", type=int, default=18, help="Heun steps (NFE = 2 steps - 1)")
    for k in ("S-churn", "S-min", "S-max", "S-noise"):
        p.add_argument(f"--{k}", type=float, default=None, help="EDM's stochastic sampler setting")
    p.add_argument("--batch", type=int, default=64, help="images per batch per process")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--outdir", help="PNG folder")
    p.add_argument("--subdirs", action=argparse.BooleanOptionalAction, default=True, help="1,000 PNGs per folder")
    p.add_argument("--npz", help="npz file (arr_0 NHWC uint8, seeds, labels)")
    p.add_argument("--grid", help="grid PNG file")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


def _run(args) -> str:
    if not (args.outdir or args.npz or args.grid):
        raise ValueError("nothing to write: give --outdir, --npz and/or --grid")
    seeds = parse_seeds(args.seeds)
    path, selection = select_snapshot(args.network, args.snapshot)
    device = dist_utils.default_device() if args.device == "auto" else torch.device(args.device)
    net, meta = load_checkpoint(path)
    net = net.to(device).eval().requires_grad_(False)
    from .metrics.references import label_frequencies
    probs = label_frequencies(args.label_probs, int(net.label_dim)) if args.label_probs else None
    kw = {k: getattr(args, k) for k in ("S_churn", "S_min", "S_max", "S_noise") if getattr(args, k) is not None}
    init_sigma = float(args.init_sigma if args.init_sigma is not None else (meta or {}).get("init_sigma", 2.5))
    created = dist_utils.init(device)
    try:
        mine = seeds[dist_utils.rank()::dist_utils.world_size()]  # as the protocol splits them
        parts = []
        for s, images, labels in generate_images(net, mine, sampler=args.sampler, init_sigma=init_sigma,
                                                 steps=args.steps, sampler_kwargs=kw, class_idx=args.class_idx,
                                                 label_probs=probs, batch=args.batch, device=device):
            if args.outdir:
                save_pngs(args.outdir, s, images, subdirs=args.subdirs)
            if args.npz or args.grid:
                parts.append((s, images, labels))
        if args.npz or args.grid:
            gathered = [parts]
            if dist_utils.world_size() > 1:
                gathered = [None] * dist_utils.world_size()
                torch.distributed.all_gather_object(gathered, parts)
            order = {s: i for i, s in enumerate(seeds)}
            rows = sorted(((s, img, None if lab is None else int(lab[j])) for p in gathered for ss, img_b, lab in p
                           for j, (s, img) in enumerate(zip(ss, img_b))), key=lambda r: order[r[0]])
            images = torch.stack([r[1] for r in rows])
            if dist_utils.rank() == 0 and args.npz:
                save_npz(args.npz, [r[0] for r in rows], images, None if rows[0][2] is None else [r[2] for r in rows])
            if dist_utils.rank() == 0 and args.grid:
                save_grid(args.grid, images)
        dist_utils.barrier()
    finally:
        if created:
            dist_utils.shutdown()
    what = f"{args.network}" + (f" (snapshot {selection['snapshot']}: {selection['kimg']} kimg)" if selection else "")
    outs = ", ".join(str(o) for o in (args.outdir, args.npz, args.grid) if o)
    return f"{len(seeds)} images of {what}, {args.sampler} sampler -> {outs}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args([a for a in argv if a != "--debug"])
    try:
        message = _run(args)
    except Exception as e:  # noqa: BLE001 -- the command line's one error line
        if "--debug" in argv:
            raise
        print(f"error: {' '.join(str(e).split()) or type(e).__name__}", file=sys.stderr)
        return 2
    if dist_utils.env_rank() == 0:
        print(message)
    return 0


if __name__ == "__main__":
    sys.exit(main())
