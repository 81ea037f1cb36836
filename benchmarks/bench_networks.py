"""Speed of sidlib's networks against EDM's own code, side by side in one process, on the paper architectures.

For CIFAR-10 DDPM++ (32x32) and ImageNet-64 ADM, with random weights (speed does not depend on their values), this
builds sidlib's ``EDMPrecond`` (its default options: 'sdpa' attention) and, when an official EDM checkout is given
(``--edm-repo`` or the environment variable ``SIDLIB_EDM_REPO``), EDM's ``training/networks.py`` ``EDMPrecond`` with
the same kwargs and the same state_dict. It checks that both compute the same outputs (eval mode, max |difference|
relative to max |output|) and times, alternating the two networks repeat by repeat so that both see the same
machine load:

* forward+backward per image (train mode, dropout on, gradients w.r.t. all parameters and the input), wall-clock
  and process CPU time, best of ``--repeats`` after one warm-up call;
* forward per image (eval mode, no graph);
* the ratio sidlib / EDM of the forward+backward times (the ``ratio`` lines);
* peak resident memory of the process (``VmHWM``, reset before each architecture; Linux only).

Each architecture runs in its own subprocess (``--arch all``). Usage::

    SIDLIB_EDM_REPO=/path/to/edm python benchmarks/bench_networks.py        # both, batch 8, 3 repeats
    python benchmarks/bench_networks.py --arch adm --batch 4 --attention math --json out.json
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from sidlib.networks import (EDMPrecond, get_default_attention_backend, paper_network, set_attention_backend,
                             set_precision)

ARCHS = {
    'cifar10-ddpmpp': paper_network('cifar10-uncond'),
    'imagenet64-adm': paper_network('imagenet64-cond'),
}
ALIASES = {'ddpmpp': 'cifar10-ddpmpp', 'cifar10': 'cifar10-ddpmpp', 'adm': 'imagenet64-adm', 'imagenet': 'imagenet64-adm'}


def _reset_peak_rss():
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_mib():
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith('VmHWM:'))
    except (OSError, StopIteration):
        return None


def _edm_networks(repo):
    """EDM's ``training.networks`` module from a checkout (its own top-level packages first on sys.path)."""
    sys.path.insert(0, os.path.abspath(repo))
    from training import networks
    if os.path.abspath(repo) not in os.path.abspath(networks.__file__):
        raise ImportError(f'{repo}: training.networks resolved to {networks.__file__}')
    return networks


def _inputs(net, batch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=g)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2)
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.randint(net.label_dim, (batch,), generator=g), net.label_dim).float()
    return x, sigma, labels


def bench(arch, batch, repeats, attention=None, channels_last=False, amp=None, edm_repo=None):
    """Measure one architecture (sidlib, and EDM when ``edm_repo``); returns a dict (seconds per image, MiB)."""
    torch.manual_seed(0)
    ours = EDMPrecond(**ARCHS[arch])
    if attention is not None:
        set_attention_backend(ours, attention)
    set_precision(ours, amp or 'fp32')
    nets = {'sidlib': ours}
    if edm_repo:
        edm = _edm_networks(edm_repo).EDMPrecond(**ARCHS[arch])
        edm.load_state_dict(ours.state_dict())
        nets['edm'] = edm
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours.to(memory_format=fmt)
    x, sigma, labels = _inputs(ours, batch)
    out = {'arch': arch, 'batch': batch, 'repeats': repeats, 'threads': torch.get_num_threads(),
           'params': sum(p.numel() for p in ours.parameters()),
           'attention': attention or get_default_attention_backend(), 'channels_last': channels_last, 'amp': amp}

    def forward(net):
        with torch.no_grad():
            return net(x.contiguous(memory_format=fmt) if net is ours else x, sigma, labels)

    def forward_backward(net):
        xi = (x.contiguous(memory_format=fmt) if net is ours else x).clone().requires_grad_()
        net(xi, sigma, labels).square().mean().backward()
        net.zero_grad(set_to_none=True)

    if 'edm' in nets:
        for n in nets.values():
            n.eval()
        a, b = forward(nets['sidlib']), forward(nets['edm'])
        out['max_abs_diff'] = float((a - b).abs().max())
        out['max_rel_diff'] = out['max_abs_diff'] / float(b.abs().max())
    _reset_peak_rss()
    for phase, fn, train in (('fwd', forward, False), ('fwdbwd', forward_backward, True)):
        times = {k: [] for k in nets}
        for n in nets.values():
            n.train(train)
            fn(n)  # warm-up: allocator, kernel selection
        for _ in range(repeats):
            for k, n in nets.items():  # alternate, so both see the same load
                t0, c0 = time.perf_counter(), time.process_time()
                fn(n)
                times[k].append((time.perf_counter() - t0, time.process_time() - c0))
        for k, ts in times.items():
            out[f'{k}_{phase}_s_per_img'] = min(t for t, _ in ts) / batch
            out[f'{k}_{phase}_cpu_s_per_img'] = min(c for _, c in ts) / batch
    out['peak_rss_mib'] = _peak_rss_mib()
    if 'edm' in nets:
        out['ratio_fwdbwd'] = out['sidlib_fwdbwd_s_per_img'] / out['edm_fwdbwd_s_per_img']
        out['ratio_fwdbwd_cpu'] = out['sidlib_fwdbwd_cpu_s_per_img'] / out['edm_fwdbwd_cpu_s_per_img']
        out['ratio_fwd'] = out['sidlib_fwd_s_per_img'] / out['edm_fwd_s_per_img']
    return out


def _print(rows):
    r0 = rows[0]
    print(f'torch {torch.__version__}, {r0["threads"]} threads, batch {r0["batch"]}, best of {r0["repeats"]}; sidlib: '
          f'attention={r0["attention"]}, channels_last={r0["channels_last"]}, amp={r0["amp"]}')
    for r in rows:
        line = (f'{r["arch"]:<15} {r["params"]:>12,} params  sidlib fwd+bwd {r["sidlib_fwdbwd_s_per_img"]:.4f} s/img '
                f'({r["sidlib_fwdbwd_cpu_s_per_img"]:.3f} CPU-s), fwd {r["sidlib_fwd_s_per_img"]:.4f} s/img')
        if 'edm_fwdbwd_s_per_img' in r:
            line += (f'; EDM fwd+bwd {r["edm_fwdbwd_s_per_img"]:.4f} s/img ({r["edm_fwdbwd_cpu_s_per_img"]:.3f} CPU-s),'
                     f' fwd {r["edm_fwd_s_per_img"]:.4f}')
        print(line + (f'; peak RSS {r["peak_rss_mib"]:.0f} MiB' if r['peak_rss_mib'] else ''))
    for r in rows:
        if 'ratio_fwdbwd' in r:
            print(f'ratio {r["arch"]}: sidlib / EDM forward+backward = {r["ratio_fwdbwd"]:.3f} (wall), '
                  f'{r["ratio_fwdbwd_cpu"]:.3f} (CPU time); forward = {r["ratio_fwd"]:.3f}; outputs max |diff| = '
                  f'{r["max_abs_diff"]:.2g} ({r["max_rel_diff"]:.2g} of max |output|)')
    if not any('ratio_fwdbwd' in r for r in rows):
        print('(no EDM checkout given: set SIDLIB_EDM_REPO or --edm-repo for the side-by-side ratio)')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='all', help=f'all, {", ".join(ARCHS)} (or ddpmpp / adm)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--attention', choices=['math', 'sdpa'], default=None, help="default: the networks' default")
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--amp', choices=['bf16', 'fp16'], default=None, help='sidlib precision (default fp32)')
    parser.add_argument('--edm-repo', default=os.environ.get('SIDLIB_EDM_REPO'), help='official EDM checkout')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    parser.add_argument('--_child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    arch = ALIASES.get(args.arch, args.arch)
    if arch != 'all' and arch not in ARCHS:
        parser.error(f'unknown --arch {args.arch!r}')
    opts = dict(batch=args.batch, repeats=args.repeats, attention=args.attention, channels_last=args.channels_last,
                amp=args.amp, edm_repo=args.edm_repo)
    if args._child:
        print(json.dumps(bench(arch, **opts)))
        return 0
    rows = []
    for name in (ARCHS if arch == 'all' else [arch]):
        cmd = [sys.executable, os.path.abspath(__file__), '--_child', '--arch', name, '--batch', str(args.batch),
               '--repeats', str(args.repeats)] + (['--attention', args.attention] if args.attention else []) + \
            (['--channels-last'] if args.channels_last else []) + (['--amp', args.amp] if args.amp else []) + \
            (['--edm-repo', args.edm_repo] if args.edm_repo else [])
        rows.append(json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
                               .strip().splitlines()[-1]))
    _print(rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
