"""CPU throughput and memory of the paper teacher architectures.

For each architecture (CIFAR-10 DDPM++ 32x32 and ImageNet-64 ADM by default) this builds the
EDMPrecond network with the paper's constructor kwargs (``sidlib.networks.PAPER_NETWORKS``) (random weights: speed does not depend on
their values) and measures, at the given batch size:

* forward time per image (eval mode, ``torch.no_grad``), wall-clock and process CPU time,
* forward+backward time per image (train mode, dropout on, gradients w.r.t. all parameters and the
  input, as in a training step without the optimizer),
* peak resident memory (RSS) of the process during each phase.

Memory: on Linux the RSS high-water mark ``VmHWM`` from ``/proc/self/status`` is reset before each
phase (by writing ``5`` to ``/proc/self/clear_refs``), so each phase gets its own peak, which
includes the weights and the Python/torch runtime. Where that is not possible the lifetime peak
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is reported instead; the output says which. With
``--arch all`` each architecture runs in its own subprocess so peaks do not mix.

Usage::

    python benchmarks/bench_networks.py                      # both, batch 8, 3 repeats
    python benchmarks/bench_networks.py --arch adm --batch 4 --repeats 2 --attention sdpa
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

from sidlib.networks import EDMPrecond, paper_network, set_attention_backend, set_precision

# The paper's teacher architectures, from sidlib's table (sidlib.networks.PAPER_NETWORKS).
ARCHS = {
    'cifar10-ddpmpp': paper_network('cifar10-uncond'),
    'imagenet64-adm': paper_network('imagenet64-cond'),
}
ALIASES = {'ddpmpp': 'cifar10-ddpmpp', 'cifar10': 'cifar10-ddpmpp', 'adm': 'imagenet64-adm', 'imagenet': 'imagenet64-adm'}


def _reset_peak_rss():
    """Reset the kernel's RSS high-water mark; True when the per-phase measurement is available."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def _peak_rss_mib(per_phase):
    if per_phase:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) / 1024          # kB -> MiB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if platform.system() != 'Darwin' else rss / 2 ** 20   # Linux: KiB, macOS: bytes


def _inputs(net, batch, generator):
    x = torch.randn(batch, net.img_channels, net.img_resolution, net.img_resolution, generator=generator)
    sigma = torch.exp(torch.randn(batch, generator=generator) * 1.2 - 1.2)
    labels = None
    if net.label_dim:
        labels = torch.nn.functional.one_hot(torch.randint(net.label_dim, (batch,), generator=generator),
                                             net.label_dim).float()
    return x, sigma, labels


def _timed(fn, repeats):
    """(best wall s, mean wall s, mean process CPU s) per call, after one warm-up call."""
    fn()                                   # warm-up: allocator, kernel selection
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return min(times), sum(times) / len(times), sum(cpu) / len(cpu)


def bench_one(arch, batch, repeats, attention='math', channels_last=False, amp=None):
    """Measure one architecture; returns a dict of results (seconds per image, MiB)."""
    torch.manual_seed(0)
    net = EDMPrecond(**ARCHS[arch])
    set_attention_backend(net, attention)
    set_precision(net, amp or 'fp32')
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    g = torch.Generator().manual_seed(1)
    x, sigma, labels = _inputs(net, batch, g)
    x = x.contiguous(memory_format=fmt)
    n_params = sum(p.numel() for p in net.parameters())

    def forward():
        with torch.no_grad():
            net(x, sigma, labels)

    def forward_backward():
        xi = x.clone().requires_grad_()
        net(xi, sigma, labels).square().mean().backward()
        net.zero_grad(set_to_none=True)

    net.eval()
    per_phase = _reset_peak_rss()
    fwd_best, fwd_mean, fwd_cpu = _timed(forward, repeats)
    fwd_peak = _peak_rss_mib(per_phase)

    net.train()
    per_phase = _reset_peak_rss()
    bwd_best, bwd_mean, bwd_cpu = _timed(forward_backward, repeats)
    bwd_peak = _peak_rss_mib(per_phase)

    return dict(arch=arch, batch=batch, repeats=repeats, params=n_params, threads=torch.get_num_threads(),
                attention=attention, channels_last=channels_last, amp=amp,
                fwd_s_per_img=fwd_best / batch, fwd_mean_s_per_img=fwd_mean / batch,
                fwdbwd_s_per_img=bwd_best / batch, fwdbwd_mean_s_per_img=bwd_mean / batch,
                fwd_cpu_s_per_img=fwd_cpu / batch, fwdbwd_cpu_s_per_img=bwd_cpu / batch,
                fwd_peak_rss_mib=fwd_peak, fwdbwd_peak_rss_mib=bwd_peak,
                memory_method='VmHWM per phase (/proc/self/clear_refs)' if per_phase
                else 'ru_maxrss (process lifetime peak)')


def _print_table(rows):
    print(f'torch {torch.__version__}, {platform.processor() or platform.machine()}, '
          f'{rows[0]["threads"]} threads; times are best of {rows[0]["repeats"]} (mean in brackets)')
    header = (f'{"arch":<16} {"params":>12} {"batch":>5} {"fwd s/img":>18} {"fwd+bwd s/img":>18} '
              f'{"CPU-s/img fwd":>13} {"CPU-s/img f+b":>13} {"peak RSS fwd":>13} {"peak RSS f+b":>13}')
    print(header)
    print('-' * len(header))
    for r in rows:
        print(f'{r["arch"]:<16} {r["params"]:>12,} {r["batch"]:>5} '
              f'{r["fwd_s_per_img"]:>8.4f} ({r["fwd_mean_s_per_img"]:.4f}) '
              f'{r["fwdbwd_s_per_img"]:>8.4f} ({r["fwdbwd_mean_s_per_img"]:.4f}) '
              f'{r["fwd_cpu_s_per_img"]:>13.3f} {r["fwdbwd_cpu_s_per_img"]:>13.3f} '
              f'{r["fwd_peak_rss_mib"]:>9.0f} MiB {r["fwdbwd_peak_rss_mib"]:>9.0f} MiB')
    print('s/img = wall-clock seconds per image; CPU-s/img = process CPU seconds per image (all threads; '
          'less sensitive to other load on the machine)')
    print(f'memory: {rows[0]["memory_method"]}; attention={rows[0]["attention"]}, '
          f'channels_last={rows[0]["channels_last"]}, amp={rows[0]["amp"]}')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='all', help=f'all, {", ".join(ARCHS)} (or ddpmpp / adm)')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--attention', choices=['math', 'sdpa'], default='math')
    parser.add_argument('--channels-last', action='store_true')
    parser.add_argument('--amp', choices=['bf16', 'fp16'], default=None,
                        help='precision of the network (sidlib.networks.set_precision; default: fp32)')
    parser.add_argument('--json', default=None, help='also write the results to this JSON file')
    parser.add_argument('--_child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    arch = ALIASES.get(args.arch, args.arch)
    if arch != 'all' and arch not in ARCHS:
        parser.error(f'unknown --arch {args.arch!r}')
    options = dict(batch=args.batch, repeats=args.repeats, attention=args.attention,
                   channels_last=args.channels_last, amp=args.amp)

    if args._child:
        print(json.dumps(bench_one(arch, **options)))
        return 0

    rows = []
    for name in (ARCHS if arch == 'all' else [arch]):
        # A fresh process per architecture keeps the memory peaks separate.
        cmd = [sys.executable, os.path.abspath(__file__), '--_child', '--arch', name, '--batch', str(args.batch),
               '--repeats', str(args.repeats), '--attention', args.attention]
        if args.channels_last:
            cmd.append('--channels-last')
        if args.amp:
            cmd += ['--amp', args.amp]
        out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    _print_table(rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
