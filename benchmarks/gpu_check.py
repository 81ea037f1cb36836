"""One-shot GPU check of sidlib, sized for a short device lease (a hard internal time budget, ~5 minutes by default).

Parts, in order of importance (each is skipped, with the reason recorded, once the budget cannot fit it):

1. ``sid_job``: short SiD runs through the real loop (:func:`sidlib.distill.distill`) on the CIFAR-10 DDPM++
   architecture (``paper_network('cifar10-uncond')``, random weights saved as the teacher), the preset's batch
   (256, whole batch per step), augmentation 0.12, dropout 0.13: iterations/s (median over the timed ticks, after
   warm-up) and peak GPU memory, for precision fp32, fp16 (EDM's use_fp16, static loss scales) and bf16.
2. ``official_agreement`` (with ``--sid-repo`` or ``SIDLIB_SID_REPO``): two iterations of sidlib's loop against
   SiD's ``training/sid_training_loop.py`` replicated on SiD's own networks and loss (``tests/test_official.py``),
   on CUDA, same draws, in fp32 and in fp16 (SiD's use_fp16): weight differences in units of the learning rate.
3. ``options``: forward+backward time and peak memory of CIFAR-10 DDPM++ and ImageNet-64 ADM for the fast options
   ('math' vs 'sdpa' attention, channels_last, fp16, bf16, torch.compile last); with ``--edm-repo`` (or
   ``SIDLIB_EDM_REPO``) EDM's own networks in fp32 and use_fp16 as the reference.
4. Everything goes to ``--out`` as JSON (rewritten after each part, so an interrupted run keeps what it measured)
   and a summary is printed.

``--tiny`` runs tiny networks and batches (a CPU smoke test: ``--device cpu --tiny`` takes seconds).

On the device machine (official code carried in an ignored folder, e.g. ``.official/``)::

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json \\
        --sid-repo .official/sid --edm-repo .official/edm --budget 300
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'tests')]

from sidlib.distill import distill  # noqa: E402
from sidlib.io.checkpoints import save_network  # noqa: E402
from sidlib.io.logs import read_jsonl  # noqa: E402
from sidlib.io.training_state import load_training_state  # noqa: E402
from sidlib.networks import EDMPrecond, edm_kwargs, paper_network, set_attention_backend, set_precision  # noqa: E402


def archs(tiny):
    if tiny:
        return {'cifar10-ddpmpp': edm_kwargs('ddpmpp', img_resolution=8, channel_mult=[1, 2], model_channels=16,
                                             num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.13),
                'imagenet64-adm': edm_kwargs('adm', img_resolution=8, channel_mult=[1, 2], model_channels=64,
                                             num_blocks=1, attn_resolutions=[4], label_dim=10, dropout=0.1)}
    return {'cifar10-ddpmpp': paper_network('cifar10-uncond'), 'imagenet64-adm': paper_network('imagenet64-cond')}


class Budget:
    def __init__(self, seconds):
        self.t0, self.total = time.time(), float(seconds)

    def left(self):
        return self.total - (time.time() - self.t0)

    def fits(self, need, results, key):
        if self.left() >= need:
            return True
        results.setdefault('skipped', []).append(f'{key}: {self.left():.0f} s left, needs ~{need:.0f} s')
        return False


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _reset_mem(device):
    if device.type == 'cuda':
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device):
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == 'cuda' else None


def part_sid_job(args, device, budget, results, tmp):
    kw = archs(args.tiny)['cifar10-ddpmpp']
    torch.manual_seed(0)
    teacher = str(save_network(Path(tmp) / 'teacher', EDMPrecond(**kw)))
    batch, warm, timed = (4, 1, 2) if args.tiny else (256, 2, args.iters)
    out = results.setdefault('sid_job', {'arch': 'cifar10-ddpmpp', 'batch': batch, 'timed_iterations': timed})
    for precision in ('fp32', 'fp16', 'bf16'):
        if not budget.fits(20 if args.tiny else 45, results, f'sid_job.{precision}'):
            continue
        _reset_mem(device)
        cfg = dict(teacher=teacher, batch=batch, iterations=warm + timed, tick_kimg=batch / 1000, snap_ticks=0,
                   state_ticks=0, grid_size=0, progress=False, device=str(device), precision=precision,
                   augment_p=0.12, dropout=0.13, lr=1e-5, glr=1e-5, max_bad_iterations=0, resume=False)
        t0 = time.time()
        run = distill(cfg, Path(tmp) / f'run-{precision}')
        log = [r for r in read_jsonl(run / 'log.jsonl') if 'sec_per_iter' in r]
        sec = statistics.median(r['sec_per_iter'] for r in log[warm:]) if len(log) > warm else float('nan')
        out[precision] = {'iterations_per_s': 1 / sec, 'images_per_s': batch / sec, 'sec_per_iter': sec,
                          'peak_mem_gb': max((r.get('peak_mem_gb') or 0) for r in log) if log else None,
                          'loss_G_last': log[-1]['loss_G'], 'loss_fake_last': log[-1]['loss_fake'],
                          'nonfinite_grads': log[-1]['totals']['nonfinite_grads_G'] + log[-1]['totals'][
                              'nonfinite_grads_fake'], 'wall_s': time.time() - t0}


def _weight_error(ours, official, start, lr):
    err = torch.cat([(ours[k].float() - official[k].float()).abs().flatten() for k in official]) / lr
    moved = torch.cat([(official[k].float() - start[k].float()).abs().flatten() for k in official]) / lr
    return {'max_err_lr': float(err.max()), 'frac_err_gt_0.01lr': float((err > 0.01).double().mean()),
            'median_err_lr': float(err.median()), 'max_moved_lr': float(moved.max())}


def part_official(args, device, budget, results, tmp):
    if not args.sid_repo:
        results.setdefault('skipped', []).append('official_agreement: no --sid-repo / SIDLIB_SID_REPO')
        return
    from official_ref import OfficialRepo
    import test_official as T
    sid = OfficialRepo(args.sid_repo, 'SiD')
    kw = dict(archs(args.tiny)['cifar10-ddpmpp'], dropout=0.0, label_dim=3)
    torch.manual_seed(41)
    teacher = EDMPrecond(**kw)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(save_network(Path(tmp) / 'agree-teacher', teacher))
    out = results.setdefault('official_agreement', {'arch': 'cifar10-ddpmpp (label_dim 3, dropout 0)'})
    for precision in args.agree_precisions.split(','):
        if not budget.fits(30, results, f'official_agreement.{precision}'):
            continue
        cfg = dict(T.ITER_CFG, teacher=path, batch=4 if args.tiny else 8, iterations=2, device=str(device),
                   precision=precision, adam_eps=1e-6 if precision == 'fp16' else 1e-8, max_bad_iterations=0,
                   attention=args.agree_attention)
        run = distill(cfg, Path(tmp) / f'agree-{precision}')
        state = load_training_state(run / 'training-state.pt')
        off = T._official_sid_run(sid, dict(kw, use_fp16=precision == 'fp16'), teacher.state_dict(),
                                  teacher.state_dict(), cfg, device=device)
        out[precision + ('' if args.agree_attention is None else f'-{args.agree_attention}')] = {
            net: _weight_error(state[net], off[net], teacher.state_dict(), cfg['lr']) for net in ('G', 'fake', 'G_ema')}


def _time_fwdbwd(net, kw, batch, device, reps, channels_last=False):
    g = torch.Generator().manual_seed(1)
    r = kw['img_resolution']
    x = torch.randn(batch, kw['img_channels'], r, r, generator=g).to(device)
    sigma = torch.exp(torch.randn(batch, generator=g) * 1.2 - 1.2).to(device)
    labels = (torch.nn.functional.one_hot(torch.randint(kw['label_dim'], (batch,), generator=g), kw['label_dim'])
              .float().to(device) if kw.get('label_dim') else None)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        xi = x.clone().requires_grad_()
        net(xi, sigma, labels).float().square().mean().backward()
        net.zero_grad(set_to_none=True)
    _reset_mem(device)
    for _ in range(2):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {'s_per_img': min(times) / batch, 'median_s_per_img': statistics.median(times) / batch,
            'peak_mem_gb': _peak_gb(device)}


def part_options(args, device, budget, results):
    out = results.setdefault('options', {})
    edm = None
    if args.edm_repo:
        from official_ref import OfficialRepo
        edm = OfficialRepo(args.edm_repo, 'EDM')
    variants = [('sdpa', {}), ('math', {'attention': 'math'}), ('sdpa+channels_last', {'channels_last': True}),
                ('fp16', {'precision': 'fp16'}), ('bf16', {'precision': 'bf16'}),
                ('fp16+channels_last', {'precision': 'fp16', 'channels_last': True})]
    if edm is not None:
        variants += [('edm-fp32', {'edm': False}), ('edm-use_fp16', {'edm': True})]
    if not args.tiny or args.compile:
        variants += [('compile', {'compile': True}), ('compile+fp16', {'compile': True, 'precision': 'fp16'})]
    if args.variants:
        variants = [v for v in variants if v[0] in args.variants.split(',')]
    batches = {'cifar10-ddpmpp': 2 if args.tiny else 128, 'imagenet64-adm': 2 if args.tiny else 64}
    reps = 1 if args.tiny else 5
    for name, opt in variants:  # variant-major: every variant gets both architectures before the next one
        for arch, kw in archs(args.tiny).items():
            key = f'options.{arch}.{name}'
            if not budget.fits((150 if 'compile' in opt else 25) * (0.1 if args.tiny else 1), results, key):
                continue
            try:
                torch.manual_seed(0)
                if 'edm' in opt:
                    en = edm.load('training.networks')
                    with edm.active():
                        net = en.EDMPrecond(**dict(kw, use_fp16=opt['edm']))
                else:
                    net = EDMPrecond(**kw)
                    set_attention_backend(net, opt.get('attention', 'sdpa'))
                    set_precision(net, opt.get('precision', 'fp32'))
                net = net.to(device).train()
                if opt.get('channels_last'):
                    net = net.to(memory_format=torch.channels_last)
                run = torch.compile(net) if opt.get('compile') else net
                t0 = time.time()
                res = _time_fwdbwd(run, kw, batches[arch], device, reps, opt.get('channels_last', False))
                out.setdefault(arch, {})[name] = dict(res, batch=batches[arch], wall_s=time.time() - t0)
            except Exception as e:  # one failing option must not cost the others
                out.setdefault(arch, {})[name] = {'error': f'{type(e).__name__}: {e}'[:500]}
            finally:
                net = run = None
                _reset_mem(device)


def summary(results):
    lines = [f"device {results['device']} ({results.get('gpu', 'cpu')}), torch {results['torch']}, "
             f"{results['elapsed_s']:.0f} s of {results['budget_s']:.0f} s"]
    for p, r in results.get('sid_job', {}).items():
        if isinstance(r, dict):
            lines.append(f"sid_job {p}: {r['iterations_per_s']:.3f} it/s ({r['images_per_s']:.1f} img/s), peak "
                         f"{r['peak_mem_gb'] or 0:.2f} GB, non-finite grads {r['nonfinite_grads']}")
    for p, r in results.get('official_agreement', {}).items():
        if isinstance(r, dict):
            lines.append(f"official {p}: " + ', '.join(f"{n} max {v['max_err_lr']:.3g} lr ({100 * v['frac_err_gt_0.01lr']:.3g}% > "
                                                        f"0.01 lr; moved {v['max_moved_lr']:.3g} lr)" for n, v in r.items()))
    for arch, vs in results.get('options', {}).items():
        base = vs.get('edm-fp32', vs.get('sdpa', {})).get('s_per_img')
        for name, v in vs.items():
            if 'error' in v:
                lines.append(f'options {arch} {name}: {v["error"]}')
            else:
                rel = f' ({v["s_per_img"] / base:.2f}x {"EDM fp32" if "edm-fp32" in vs else "sdpa"})' if base else ''
                lines.append(f'options {arch} {name}: {v["s_per_img"] * 1e3:.3f} ms/img fwd+bwd{rel}, peak '
                             f'{v["peak_mem_gb"] or 0:.2f} GB')
    lines += [f'skipped {s}' for s in results.get('skipped', [])] + [f'error {e}' for e in results.get('errors', [])]
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--device', default='cuda')
    p.add_argument('--out', default='gpu_check.json', help='JSON results (rewritten after each part)')
    p.add_argument('--sid-repo', default=os.environ.get('SIDLIB_SID_REPO'), help="SiD checkout ('' = none)")
    p.add_argument('--edm-repo', default=os.environ.get('SIDLIB_EDM_REPO'), help="EDM checkout ('' = none)")
    p.add_argument('--budget', type=float, default=300.0, help='hard time budget in seconds')
    p.add_argument('--iters', type=int, default=10, help='timed SiD iterations per precision')
    p.add_argument('--tiny', action='store_true', help='tiny networks and batches (CPU smoke test)')
    p.add_argument('--compile', action='store_true', help='time torch.compile in --tiny mode too')
    p.add_argument('--parts', default='sid_job,official,options')
    p.add_argument('--variants', default=None, help='only these options (comma-separated names)')
    p.add_argument('--agree-precisions', default='fp32,fp16')
    p.add_argument('--agree-attention', default=None, choices=['math', 'sdpa'], help="sidlib's, for the agreement")
    p.add_argument('--threads', type=int, default=None, help='CPU threads (default: 1 for --tiny on the CPU)')
    args = p.parse_args(argv)
    device = torch.device(args.device)
    threads = args.threads or (1 if args.tiny and device.type == 'cpu' else None)
    if threads:
        torch.set_num_threads(threads)
    if device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # as SiD's loop
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    budget = Budget(args.budget)
    results = {'device': str(device), 'torch': torch.__version__, 'tiny': args.tiny, 'budget_s': args.budget,
               'gpu': torch.cuda.get_device_name(device) if device.type == 'cuda' else None}

    def write():
        results['elapsed_s'] = time.time() - budget.t0
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1, default=str, allow_nan=True))

    def on_alarm(signum, frame):
        raise TimeoutError(f'hard budget of {args.budget:.0f} s (+30 s grace) exceeded')
    if hasattr(signal, 'SIGALRM'):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(int(args.budget) + 30)
    parts = {'sid_job': part_sid_job, 'official': part_official, 'options': part_options}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.parts.split(','):
            try:
                fn = parts[name]
                fn(args, device, budget, results, tmp) if name != 'options' else fn(args, device, budget, results)
            except Exception as e:
                results.setdefault('errors', []).append(f'{name}: {type(e).__name__}: {e}'[:2000])
                traceback.print_exc()
            write()
            if budget.left() <= 0:
                break
    if hasattr(signal, 'SIGALRM'):
        signal.alarm(0)
    write()
    print(summary(results))
    return 1 if results.get('errors') else 0


if __name__ == '__main__':
    sys.exit(main())
