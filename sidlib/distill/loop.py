"""The SiD training loop (SiD's ``training/sid_training_loop.py``), in-process and under ``torchrun``.

Each iteration:

1. fake-score step: ``x_g = G(init_sigma z)`` with G in eval mode and no graph; EDM loss of the fake score on
   (augmented) ``x_g``, fake score in train mode; one Adam step on the fake score.
2. generator step: G in train mode (dropout on), new z and labels; SiD's generator loss with the teacher and the
   fake score frozen in eval mode, gradients flowing through their inputs; one Adam step on G.
3. EMA of G with half-life and ramp-up; ``images_seen += batch``.

Reductions: per-element losses summed over pixels and samples, times ``ls`` (``lsg``) / per-process batch; DDP
averages over processes. Non-finite gradient elements are replaced (NaN -> 0, +-Inf -> +-1e5, as SiD does) and
counted. Every random draw comes from a named stream of :mod:`sidlib.rng`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from .. import distributed as dist_utils
from ..augment import AugmentPipe
from ..ema import ema_beta, update_ema
from ..io.checkpoints import save_network
from ..io.jsonio import write_json
from ..io.logs import JsonlLogger
from ..io.training_state import capture_rng, load_training_state, restore_rng, save_training_state
from ..networks import set_attention_backend, set_precision
from ..rng import (DROPOUT_STREAM, PHASE_FAKE, PHASE_G, RANK_STREAM, BatchStream, derive_seed, labels_for_seeds,
                   latents_for_seeds, randn, random_labels, sample_generators)
from ..sampling import generate_onestep
from ..sid_loss import SiDLoss
from .config import G_INIT_DEFAULTS, ConfigError, DistillConfig, check_resume
from .init import run_g_init
from .setup import augment_dim, build_nets, load_eval_fn, make_adam, resolve_device

__all__ = ['distill', 'STATE_FILE', 'LOG_FILE', 'CONFIG_FILE']

STATE_FILE = 'training-state.pt'
LOG_FILE = 'log.jsonl'
CONFIG_FILE = 'config.json'


def distill(config, run_dir: Optional[str | os.PathLike] = None, *, eval_fn: Optional[Callable] = None) -> Path:
    """Run (or resume) SiD distillation; returns the run directory.

    ``config``: a :class:`DistillConfig` or a plain dict. ``run_dir`` overrides ``config.run_dir``.
    ``eval_fn(G_ema, kimg) -> dict`` (or the config's ``eval_fn``) is called on rank 0 at every snapshot; its
    result is logged under ``metrics``. Every validation happens before anything is computed or written.
    """
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(config)
    if run_dir is not None:
        cfg = cfg.replace(run_dir=str(run_dir))
    if not cfg.run_dir:
        raise ConfigError('run_dir: a run directory is required')
    cfg.validate(dist_utils.env_world_size())
    eval_fn = eval_fn if eval_fn is not None else load_eval_fn(cfg.eval_fn, cfg.eval_kwargs)
    device = resolve_device(cfg)
    run_dir = Path(cfg.run_dir)
    old_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        nets = build_nets(cfg)
        if cfg.augment_p > 0 and augment_dim(nets.fake) != 9:
            raise ConfigError(f'augment_p: augmentation needs a fake score built with augment_dim=9 '
                              f'(has {augment_dim(nets.fake)})')
        state = None
        if cfg.resume and (run_dir / STATE_FILE).exists():
            state = load_training_state(run_dir / STATE_FILE)
            check_resume(state['config'], cfg)
        created = dist_utils.init(device)
        try:
            return _train(cfg, nets, device, run_dir, state, eval_fn)
        finally:
            if created:
                dist_utils.shutdown()
    finally:
        torch.set_num_threads(old_threads)


class TickStats:
    """Per-tick sums, kept on the device so that a tick costs one synchronisation."""

    NAMES = ('loss_fake', 'kept_fake', 'nan_samples_fake', 'loss_G', 'kept_G', 'nan_samples_G',
             'nonfinite_grads_fake', 'nonfinite_grads_G')

    def __init__(self, device):
        self.sums = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)

    def add(self, name: str, value) -> None:
        self.sums[self.NAMES.index(name)] += value

    def collect(self, world: int) -> dict:
        """Sums over all processes, then reset. Gradient counts are per step, identical on every rank."""
        out = dict(zip(self.NAMES, dist_utils.all_reduce_sum(self.sums.clone()).tolist()))
        self.sums.zero_()
        for k in ('nonfinite_grads_fake', 'nonfinite_grads_G'):
            out[k] /= world
        return out


def _train(cfg: DistillConfig, nets, device: torch.device, run_dir: Path, state: Optional[dict], eval_fn) -> Path:
    # ---- set-up ---------------------------------------------------------------------------------------------
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main_proc = rank == 0
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # SiD disables TF32 so that fp32 means fp32
        torch.backends.cudnn.allow_tf32 = False
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()

    teacher, G, fake = nets.teacher, nets.G, nets.fake
    teacher.eval().requires_grad_(False).to(device)
    G.to(device)
    fake.to(device)
    mem_fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    for net in (teacher, G, fake):
        set_precision(net, cfg.precision)
        if cfg.channels_last:
            net.to(memory_format=torch.channels_last)
        if cfg.attention is not None:
            set_attention_backend(net, cfg.attention)
    sid_loss = SiDLoss(cfg.alpha, cfg.tmax, AugmentPipe.sid_default(cfg.augment_p) if cfg.augment_p > 0 else None)
    init_record = None
    if state is None and cfg.g_init is not None:
        init_record = run_g_init(cfg, {**G_INIT_DEFAULTS, **cfg.g_init}, nets, sid_loss, device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)

    eps = cfg.resolved_adam_eps()
    opt_fake = make_adam(fake.parameters(), cfg.lr, (0.0, cfg.beta2), eps, cfg.fused_adam)
    opt_G = make_adam(G.parameters(), cfg.glr, (cfg.g_beta1, cfg.beta2), eps, cfg.fused_adam)
    scaler_fake = torch.amp.GradScaler(device.type, enabled=cfg.precision == 'fp16')
    scaler_G = torch.amp.GradScaler(device.type, enabled=cfg.precision == 'fp16')

    logger = JsonlLogger(run_dir / LOG_FILE, enabled=main_proc)
    totals = {'nan_samples_fake': 0, 'nan_samples_G': 0, 'nonfinite_grads_fake': 0, 'nonfinite_grads_G': 0}
    start_it, cur_nimg, tick, tick_start_nimg = 0, 0, 0, 0
    if state is not None:
        for obj, key in ((G, 'G'), (fake, 'fake'), (G_ema, 'G_ema'), (opt_G, 'opt_G'), (opt_fake, 'opt_fake'),
                         (scaler_G, 'scaler_G'), (scaler_fake, 'scaler_fake')):
            obj.load_state_dict(state[key])
        restore_rng(state['rng'])
        start_it, cur_nimg = int(state['iteration']), int(state['images_seen'])
        tick, tick_start_nimg = int(state['tick']), int(state['tick_start_nimg'])
        totals.update({k: int(v) for k, v in state['totals'].items()})
        logger.truncate_after(start_it)
    elif main_proc:
        write_json(run_dir / CONFIG_FILE, cfg.to_dict())
        (run_dir / LOG_FILE).unlink(missing_ok=True)
        if init_record is not None:
            logger.log({'iteration': 0, 'images_seen': 0, 'kimg': 0.0, **init_record})
    dist_utils.barrier()

    # Execution wrappers: DDP for the trained networks, torch.compile when asked; the raw modules keep the state.
    fake_train, G_train = fake, G
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP  # imported late: seconds of start-up
        fake_train, G_train = DDP(fake, broadcast_buffers=False), DDP(G, broadcast_buffers=False)
    ddp_fake, ddp_G = (fake_train, G_train) if world > 1 else (None, None)
    if cfg.compile:
        fake_train, G_train, teacher_run = torch.compile(fake_train), torch.compile(G_train), torch.compile(teacher)
        G_eval, fake_eval = torch.compile(G), torch.compile(fake)
    else:
        teacher_run, G_eval, fake_eval = teacher, G, fake

    total_iters = cfg.total_iterations()
    per_rank = cfg.batch // world
    micro = min(cfg.batch_gpu or per_rank, per_rank)
    rounds = per_rank // micro
    shape = [int(G.img_channels), int(G.img_resolution), int(G.img_resolution)]
    label_dim = int(getattr(teacher, 'label_dim', 0) or 0)

    def draw(it, phase, r, batch_stream):
        """This micro-batch's random stream, its class labels and latents, and the dropout reseed."""
        first = rank * per_rank + r * micro
        if cfg.rng == 'per_batch':
            gens = batch_stream.view(first, micro)
        elif cfg.rng == 'per_sample':
            gens = sample_generators(range(first, first + micro), cfg.seed, it, phase)
        else:
            gens = torch.Generator(device=device)
            gens.manual_seed(derive_seed(cfg.seed, it, phase, RANK_STREAM + rank, r))
        labels = random_labels(micro, label_dim, gens, device=device, probs=cfg.label_probs)
        z = randn(micro, shape, gens, device=device).to(memory_format=mem_fmt)
        torch.manual_seed(derive_seed(cfg.seed, it, phase, DROPOUT_STREAM, rank, r))
        return gens, labels, z

    def no_sync_unless_last(module, r):
        # Gradient accumulation: DDP all-reduces only on the last micro-batch.
        return module.no_sync() if module is not None and r < rounds - 1 else contextlib.nullcontext()

    def snapshot(it_done):
        kimg = cur_nimg // 1000
        meta = {'init_sigma': cfg.init_sigma, 'alpha': cfg.alpha, 'tmax': cfg.tmax, 'kimg': cur_nimg / 1000,
                'images_seen': cur_nimg, 'iteration': it_done, 'teacher': nets.provenance,
                'precision': cfg.precision, 'seed': cfg.seed}
        save_network(run_dir / f'network-snapshot-{kimg:06d}', G_ema, meta=meta)
        _save_grid(run_dir / f'samples-{kimg:06d}.png', G_ema, cfg, label_dim, device, micro)

    def training_state(it_done):
        return {'G': G.state_dict(), 'fake': fake.state_dict(), 'G_ema': G_ema.state_dict(),
                'opt_G': opt_G.state_dict(), 'opt_fake': opt_fake.state_dict(),
                'scaler_G': scaler_G.state_dict(), 'scaler_fake': scaler_fake.state_dict(),
                'rng': capture_rng(), 'iteration': it_done, 'images_seen': cur_nimg, 'tick': tick,
                'tick_start_nimg': tick_start_nimg, 'totals': dict(totals), 'config': cfg.to_dict(),
                # Every stream is a pure function of (seed, iteration, phase, index): the position is the iteration.
                'streams': {'scheme': cfg.rng, 'seed': cfg.seed, 'position': it_done},
                'world_size': world, 'teacher': nets.provenance}

    if state is None and main_proc and cfg.grid_size > 0:
        _save_grid(run_dir / 'fakes_init.png', G_ema, cfg, label_dim, device, micro)
    pbar = tqdm(total=total_iters, initial=start_it, disable=not (main_proc and cfg.progress), unit='it',
                dynamic_ncols=True, desc='SiD')
    stats = TickStats(device)
    tick_t0, tick_iters = time.time(), 0

    for it in range(start_it, total_iters):
        # ---- 1. fake-score step ----------------------------------------------------------------------------
        G.eval()
        fake.train().requires_grad_(True)
        opt_fake.zero_grad(set_to_none=True)
        stream = BatchStream((cfg.seed, it, PHASE_FAKE), cfg.batch, 'cpu') if cfg.rng == 'per_batch' else None
        for r in range(rounds):
            gens, labels, z = draw(it, PHASE_FAKE, r, stream)
            with torch.no_grad():
                x_g = generate_onestep(G_eval, z, cfg.init_sigma, labels)
            with no_sync_unless_last(ddp_fake, r):
                loss, keep = sid_loss.fake_score_loss(fake_train, x_g, labels, generator=gens)
                scaler_fake.scale(loss.sum() * (cfg.ls / per_rank)).backward()
            stats.add('loss_fake', loss.detach().sum().double())
            stats.add('kept_fake', keep.sum())
            stats.add('nan_samples_fake', (~keep).sum())
        fake.eval().requires_grad_(False)
        stats.add('nonfinite_grads_fake', _optimizer_step(opt_fake, scaler_fake, list(fake.parameters())).to(device))

        # ---- 2. generator step -----------------------------------------------------------------------------
        G.train().requires_grad_(True)
        opt_G.zero_grad(set_to_none=True)
        stream = BatchStream((cfg.seed, it, PHASE_G), cfg.batch, 'cpu') if cfg.rng == 'per_batch' else None
        for r in range(rounds):
            gens, labels, z = draw(it, PHASE_G, r, stream)
            with no_sync_unless_last(ddp_G, r):
                x_g = generate_onestep(G_train, z, cfg.init_sigma, labels)
                loss, keep = sid_loss.generator_loss(teacher_run, fake_eval, x_g, labels, generator=gens)
                scaler_G.scale(loss.sum() * (cfg.lsg / per_rank)).backward()
            stats.add('loss_G', loss.detach().sum().double())
            stats.add('kept_G', keep.sum())
            stats.add('nan_samples_G', (~keep).sum())
        G.eval()
        stats.add('nonfinite_grads_G', _optimizer_step(opt_G, scaler_G, list(G.parameters())).to(device))

        # ---- 3. EMA ----------------------------------------------------------------------------------------
        beta = ema_beta(cfg.batch, cur_nimg, cfg.ema_halflife_kimg, cfg.ema_rampup)
        update_ema(G_ema, G, beta)
        cur_nimg += cfg.batch
        it_done = it + 1
        tick_iters += 1
        pbar.update(1)

        # ---- tick maintenance: log, snapshot + evaluation, training state ----------------------------------
        done = it_done == total_iters
        if not (tick == 0 or done or cur_nimg >= tick_start_nimg + cfg.tick_kimg * 1000):
            continue
        s = stats.collect(world)
        for k in totals:
            totals[k] += int(s[k])
        dt = time.time() - tick_t0
        record = {
            'tick': tick, 'iteration': it_done, 'images_seen': cur_nimg, 'kimg': cur_nimg / 1000,
            'loss_fake': s['loss_fake'] / max(s['kept_fake'], 1), 'loss_G': s['loss_G'] / max(s['kept_G'], 1),
            **{k: int(s[k]) for k in totals}, 'totals': dict(totals), 'ema_beta': beta, 'sec_per_tick': dt,
            'sec_per_iter': dt / max(tick_iters, 1), 'images_per_sec': tick_iters * cfg.batch / max(dt, 1e-9),
            'loss_scale_G': float(scaler_G.get_scale()) if scaler_G.is_enabled() else None, 'time': time.time(),
        }
        if device.type == 'cuda':
            record['peak_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if done or (cfg.snap_ticks > 0 and tick % cfg.snap_ticks == 0):
            if main_proc:
                snapshot(it_done)
                if eval_fn is not None:
                    record['metrics'] = dict(eval_fn(G_ema, cur_nimg / 1000) or {})
            dist_utils.barrier()
        if main_proc:
            logger.log(record)
            pbar.set_postfix(loss_fake=f"{record['loss_fake']:.4g}", loss_G=f"{record['loss_G']:.4g}", refresh=False)
        tick += 1
        tick_start_nimg = cur_nimg
        tick_t0, tick_iters = time.time(), 0
        if done or (cfg.state_ticks > 0 and tick % cfg.state_ticks == 0):
            if main_proc:
                st = training_state(it_done)
                save_training_state(run_dir / STATE_FILE, st)
                if cfg.numbered_state_ticks > 0 and tick % cfg.numbered_state_ticks == 0:
                    save_training_state(run_dir / f'training-state-{cur_nimg // 1000:06d}.pt', st)
            dist_utils.barrier()
    pbar.close()
    return run_dir


def _clean_grads(params) -> torch.Tensor:
    """Count non-finite gradient elements and replace them (NaN -> 0, +-Inf -> +-1e5, as SiD does).

    One fused finiteness check over all gradients (GradScaler's kernel with scale 1, which is exact); the
    element-wise count and replacement run only when something was found.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.long)
    dev = grads[0].device
    found = torch.zeros(1, device=dev)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=dev))
    if found.item() == 0:
        return torch.zeros((), dtype=torch.long, device=dev)
    bad = torch.zeros((), dtype=torch.long, device=dev)
    for g in grads:
        bad += (~torch.isfinite(g)).sum()
        torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)
    return bad


def _optimizer_step(opt, scaler, params) -> torch.Tensor:
    if scaler.is_enabled():
        # Unscale first so that the counted and cleaned values are real gradients; the scaler still skips the
        # step (and lowers its scale) when unscale_ found Inf/NaN.
        scaler.unscale_(opt)
    bad = _clean_grads(params)
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return bad


@torch.no_grad()
def _save_grid(path: Path, G_ema, cfg: DistillConfig, label_dim: int, device, chunk: int) -> None:
    """PNG grid of G_ema samples for seeds 0..grid_size-1 (images with 1 or 3 channels only)."""
    C, R = int(getattr(G_ema, 'img_channels', 0)), int(getattr(G_ema, 'img_resolution', 0))
    if cfg.grid_size <= 0 or C not in (1, 3) or R < 4:
        return
    from torchvision.utils import save_image

    from ..io.atomic import atomic_path
    seeds = list(range(cfg.grid_size))
    imgs = [generate_onestep(G_ema, latents_for_seeds(s, [C, R, R], device=device), cfg.init_sigma,
                             labels_for_seeds(s, label_dim, device=device)).float().cpu()
            for s in (seeds[i:i + chunk] for i in range(0, len(seeds), chunk))]
    with atomic_path(path) as tmp:
        save_image((torch.cat(imgs).clamp(-1, 1) + 1) / 2, tmp, format='png', nrow=math.ceil(math.sqrt(len(seeds))))
