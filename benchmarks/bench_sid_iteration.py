"""Cost of one SiD iteration relative to one forward+backward of the same network, plus throughput and memory.

One SiD iteration runs: G forward (no graph) + fake-score forward/backward, then G forward/backward
with teacher and fake-score forwards and input-backwards -- about 4-5 network forward+backward passes,
so the target ratio is <= 5.0.

Usage::

    python benchmarks/bench_sid_iteration.py                      # CIFAR-10 DDPM++ at batch 8 on the CPU
    python benchmarks/bench_sid_iteration.py --arch tiny --iters 5
    python benchmarks/bench_sid_iteration.py --device cuda --batch 64 --precision bf16

Each measurement runs in its own subprocess so that peak memory (peak RSS on the CPU, peak allocated
memory on CUDA) belongs to that measurement alone. The SiD iteration is timed through the real loop
(:func:`sidlib.distill.distill`), excluding its first (warm-up) iteration and any checkpoint writing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

def _archs() -> dict:
    from sidlib.networks import edm_kwargs, paper_network
    return {
        # EDM's CIFAR-10 DDPM++ teacher (sidlib.networks.PAPER_NETWORKS): 55.7 M parameters, augment_dim 9.
        'cifar10-ddpmpp': paper_network('cifar10-uncond'),
        # The same architecture scaled down.
        'tiny': edm_kwargs('ddpmpp', img_resolution=8, channel_mult=[1, 2], model_channels=16, num_blocks=1,
                           attn_resolutions=[4], augment_dim=9, dropout=0.13),
    }


ARCH_NAMES = ('cifar10-ddpmpp', 'tiny')


def _peak_mem_gb(device) -> float:
    import torch
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def _device(name):
    import torch
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    return torch.device(name)


def part_reference(args) -> dict:
    """Mean seconds of one forward+backward (train mode, dropout on) of the network at the batch size."""
    import torch
    from sidlib.networks import EDMPrecond, set_precision
    device = _device(args.device)
    torch.manual_seed(0)
    net = EDMPrecond(**_archs()[args.arch]).to(device).train()
    set_precision(net, args.precision)   # as the loop does for its four networks
    r = net.img_resolution
    x = torch.randn([args.batch, net.img_channels, r, r], device=device)
    sigma = torch.exp(torch.randn([args.batch, 1, 1, 1], device=device) * 1.2 - 1.2)
    aug = torch.zeros([args.batch, 9], device=device)

    def step():
        net.zero_grad(set_to_none=True)
        loss = (net(x + sigma * torch.randn_like(x), sigma, augment_labels=aug) - x).square().sum()
        loss.backward()
        if device.type == 'cuda':
            torch.cuda.synchronize()

    step()  # warm-up
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in net.parameters())
    return {'sec_fwd_bwd': sum(times) / len(times), 'peak_mem_gb': _peak_mem_gb(device), 'params': n_params}


def part_sid(args) -> dict:
    """Mean seconds per SiD iteration through the real loop (first iteration excluded)."""
    import torch
    from sidlib.distill import distill
    from sidlib.io.checkpoints import save_network
    from sidlib.io.logs import read_jsonl
    from sidlib.networks import EDMPrecond
    device = _device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        teacher = save_network(Path(tmp) / 'teacher', EDMPrecond(**_archs()[args.arch]))
        cfg = dict(teacher=str(teacher), batch=args.batch, batch_gpu=args.batch, iterations=args.iters + 1,
                   augment_p=0.12, dropout=0.13, precision=args.precision, device=str(device),
                   tick_kimg=1e9, snap_ticks=0, state_ticks=0, grid_size=0, progress=False,
                   channels_last=args.channels_last, attention=args.attention, fused_adam=args.fused_adam,
                   run_dir=str(Path(tmp) / 'run'))
        run = distill(cfg)
        log = read_jsonl(run / 'log.jsonl')
    # Tick 0 closes after the first iteration (warm-up); the last record covers the remaining ones.
    timed = log[-1]
    return {'sec_per_iter': timed['sec_per_iter'], 'images_per_sec': timed['images_per_sec'],
            'peak_mem_gb': _peak_mem_gb(device), 'iterations_timed': args.iters}


def _spawn(part, argv) -> dict:
    env = dict(os.environ)
    repo = str(Path(__file__).resolve().parents[1])
    env['PYTHONPATH'] = repo + os.pathsep + env.get('PYTHONPATH', '')
    out = subprocess.run([sys.executable, __file__, '--part', part] + argv, env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--arch', choices=sorted(ARCH_NAMES), default='cifar10-ddpmpp')
    p.add_argument('--batch', type=int, default=8)
    p.add_argument('--iters', type=int, default=3, help='timed iterations (after one warm-up)')
    p.add_argument('--device', default='auto')
    p.add_argument('--precision', choices=['fp32', 'bf16', 'fp16'], default='fp32')
    p.add_argument('--channels-last', action='store_true')
    p.add_argument('--attention', choices=['math', 'sdpa'], default=None)
    p.add_argument('--fused-adam', action='store_true')
    p.add_argument('--part', choices=['reference', 'sid'], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part == 'reference':
        print(json.dumps(part_reference(args)))
        return 0
    if args.part == 'sid':
        print(json.dumps(part_sid(args)))
        return 0
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    ref = _spawn('reference', passthrough)
    sid = _spawn('sid', passthrough)
    ratio = sid['sec_per_iter'] / ref['sec_fwd_bwd']
    import torch
    result = {
        'arch': args.arch, 'params': ref['params'], 'batch': args.batch, 'device': str(_device(args.device)),
        'precision': args.precision, 'threads': torch.get_num_threads(),
        'sec_fwd_bwd': round(ref['sec_fwd_bwd'], 4), 'sec_per_sid_iter': round(sid['sec_per_iter'], 4),
        'ratio_sid_iter_to_fwd_bwd': round(ratio, 3), 'target_ratio': 5.0,
        'sid_images_per_sec': round(sid['images_per_sec'], 3),
        'peak_mem_gb_fwd_bwd': round(ref['peak_mem_gb'], 3), 'peak_mem_gb_sid': round(sid['peak_mem_gb'], 3),
    }
    print(json.dumps(result, indent=2))
    print(f"SiD iteration / (forward+backward) = {ratio:.2f}  (target <= 5.0)  "
          f"{result['sid_images_per_sec']:.2f} img/s  peak {result['peak_mem_gb_sid']:.2f} GB")
    return 0


if __name__ == '__main__':
    sys.exit(main())
