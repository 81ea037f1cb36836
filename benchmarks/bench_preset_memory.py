"""Memory of one SiD iteration for each paper preset's architecture, measured at small per-process batches and
extrapolated linearly to the preset's ``batch_gpu``.

For every preset of ``paper/params.yaml`` (:mod:`experiments.paper.presets`) and every batch b in ``--batches``, a
fresh subprocess builds the preset's teacher architecture (its entry of :data:`sidlib.networks.PAPER_NETWORKS`) with
random weights, runs one SiD iteration through the real loop (:func:`sidlib.distill.distill`, the preset's config
with ``batch = batch_gpu = b``) and reports its peak memory above the process's baseline after imports.
A least-squares line ``mem(b) = fixed + b * per_image`` through those points predicts ``mem(batch_gpu)``.

* ``fixed``: four networks (teacher, fake score, G, G_ema), two gradients and two Adam states, about
  10 x parameters x 4 bytes; ``per_image``: the activations kept for the backward passes.
* On the CPU, memory is peak RSS (KiB from ``getrusage``), which includes allocator caching, and every preset runs
  in fp32, an upper bound for the fp16 presets. On CUDA it is ``torch.cuda.max_memory_allocated``, with the
  preset's own precision. Either way the extrapolation is an estimate; the CUDA context (about 0.3-0.6 GB) is
  not included.

Usage::

    python benchmarks/bench_preset_memory.py                          # all five presets, b = 1, 2, 4 on the CPU
    python benchmarks/bench_preset_memory.py --presets cifar10-uncond --batches 1 2 4 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _presets():
    """The paper presets module (``experiments`` lives in the repository, it is not installed)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from experiments.paper import presets
    return presets


def _current_mem_gb(device) -> float:
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is in KiB on Linux


def measure(preset_name: str, batch: int, device_name: str) -> dict:
    """Peak memory (GB) of one SiD iteration of ``preset_name``'s architecture at per-process batch ``batch``."""
    import torch

    from sidlib.distill import distill
    from sidlib.io.checkpoints import save_network
    from sidlib.networks import EDMPrecond, paper_network

    presets = _presets()
    device = torch.device(device_name)
    base = _current_mem_gb(device)
    p = presets.get_preset(preset_name)
    # CPU bf16/fp16 autocast is too slow to be practical here, so the CPU measures fp32: for the fp16 presets that
    # is an upper bound (autocast keeps most activations in 2 bytes).
    precision = p['distill'].get('precision', 'fp32') if device.type == 'cuda' else 'fp32'
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        net = EDMPrecond(**paper_network(p['network']))
        n_params = sum(t.numel() for t in net.parameters())
        teacher = save_network(Path(tmp) / 'teacher', net)
        del net
        cfg = presets.distill_config(preset_name, dict(
            teacher=str(teacher), batch=batch, batch_gpu=batch, iterations=1, precision=precision,
            device=device_name, tick_kimg=1e9, snap_ticks=0, state_ticks=0, numbered_state_ticks=0, grid_size=0,
            progress=False, run_dir=str(Path(tmp) / 'run')))
        distill(cfg)
    return {'preset': preset_name, 'batch': batch, 'precision': precision, 'params': n_params,
            'peak_gb': _current_mem_gb(device) - base}


def fit_line(xs, ys) -> tuple[float, float]:
    """Least-squares (intercept, slope) of ys against xs; needs two distinct xs."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError('--batches needs at least two different batch sizes to separate fixed and per-image memory')
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def _spawn(preset_name, batch, device) -> dict:
    env = dict(os.environ)
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    out = subprocess.run([sys.executable, __file__, '--_child', preset_name, str(batch), device], env=env,
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--presets', nargs='*', default=None, help='preset names (default: all in paper/params.yaml)')
    ap.add_argument('--batches', nargs='+', type=int, default=[1, 2, 4],
                    help='per-process batches to measure (batch 1 and 2 alone understate the per-image part)')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--json', default=None, help='also write the results to this JSON file')
    ap.add_argument('--_child', nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        name, batch, device = args._child
        print(json.dumps(measure(name, int(batch), device)))
        return 0

    presets = _presets()
    if len(set(args.batches)) < 2 or min(args.batches) < 1:
        ap.error('--batches needs at least two different positive batch sizes')
    try:  # every name is resolved before the first measurement, so a typo costs no minutes
        names = args.presets or list(presets.load_paper_params()['presets'])
        chosen = {name: presets.get_preset(name) for name in names}
    except ValueError as e:  # the presets' ParamsError
        ap.error(str(e))
    results = []
    print('| preset | params | precision measured | batches | fixed GB | GB per image | batch_gpu | '
          'estimated GB at batch_gpu |')
    print('|---|---|---|---|---|---|---|---|')
    for name, p in chosen.items():
        points = [_spawn(name, b, args.device) for b in args.batches]
        fixed, per_image = fit_line([r['batch'] for r in points], [r['peak_gb'] for r in points])
        batch_gpu = int(p['distill']['batch_gpu'])
        estimate = fixed + per_image * batch_gpu
        row = {'preset': name, 'params': points[0]['params'], 'precision': points[0]['precision'],
               'device': args.device, 'points': points, 'fixed_gb': round(fixed, 3),
               'gb_per_image': round(per_image, 4), 'batch_gpu': batch_gpu,
               'estimated_gb_at_batch_gpu': round(estimate, 2)}
        results.append(row)
        measured = ', '.join('%d: %.2f GB' % (r['batch'], r['peak_gb']) for r in points)
        print(f"| {name} | {row['params']:,} | {row['precision']} | {measured} | {fixed:.2f} | "
              f"{per_image:.3f} | {row['batch_gpu']} | {estimate:.1f} |", flush=True)
    if args.json:
        from sidlib.io.jsonio import write_json
        write_json(args.json, results)
    return 0


if __name__ == '__main__':
    sys.exit(main())
