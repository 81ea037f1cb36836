"""The SiD training loop (SiD's ``training/sid_training_loop.py``), in-process and under ``torchrun``.

Each iteration: (1) fake-score step: EDM loss of the fake score on the (augmented) ``x_g = G(init_sigma z)`` (G in
eval mode, no graph), one Adam step; (2) generator step: G in train mode, new z and labels, SiD's generator loss with
the teacher and fake score frozen, one Adam step on G; (3) EMA of G. Draws come from the named streams of
:mod:`sidlib.rng`. As SiD: losses summed times ``ls`` (``lsg``) / per-process batch (DDP averages over processes);
non-finite gradient elements replaced (NaN -> 0, +-Inf -> +-1e5) and counted, every step taken (unless
``loss_scaler='dynamic'`` skips it); on CUDA, TF32 and reduced-precision fp16 reductions off.

Faults: a non-finite sample costs only its own row (:mod:`sidlib.sid_loss`); when G yields non-finite rows, the
generator step regenerates the finite rows alone (same draws), so G's gradient stays finite. :class:`TrainingFault`
stops a run after ``max_bad_iterations`` consecutive iterations in which a phase kept no sample or had a non-finite
loss.
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
from ..io.atomic import atomic_path
from ..io.checkpoints import save_network
from ..io.jsonio import write_json
from ..io.logs import JsonlLogger
from ..io.training_state import capture_rng, load_training_state, restore_rng, save_training_state
from ..losses import finite_sample_mask
from ..networks import set_attention_backend, set_precision
from ..rng import (DROPOUT_STREAM, PHASE_FAKE, PHASE_G, RANK_STREAM, BatchStream, derive_seed, inputs_for_seeds,
                   randn, random_labels, reseed_global, sample_generators)
from ..sampling import augment_dim, generate_onestep
from ..sid_loss import SiDLoss
from .config import G_INIT_DEFAULTS, ConfigError, DistillConfig, check_resume
from .init import run_g_init
from .setup import build_nets, clean_grads, load_eval_fn, resolve_device

__all__ = ['distill', 'TrainingFault', 'STATE_FILE', 'LOG_FILE', 'CONFIG_FILE']

STATE_FILE = 'training-state.pt'
LOG_FILE = 'log.jsonl'
CONFIG_FILE = 'config.json'

#: Summed per iteration, then per tick, on the device (a tick costs one synchronisation): each phase's kept samples
#: and loss sum, the per-step counts (the same on every process) and the fault bookkeeping.
STATS = ('kept_fake', 'loss_fake', 'kept_G', 'loss_G', 'nonfinite_grads_fake', 'nonfinite_grads_G',
         'skipped_steps_fake', 'skipped_steps_G', 'bad_iterations', 'fault')
PER_STEP = STATS[4:8]
KEPT, LOSSES = slice(0, 4, 2), slice(1, 4, 2)  # STATS[KEPT]: kept_fake, kept_G; STATS[LOSSES]: loss_*


class TrainingFault(RuntimeError):
    """The run stopped because its losses or samples were non-finite for too long (see ``max_bad_iterations``)."""


def distill(config, run_dir: Optional[str | os.PathLike] = None, *, eval_fn: Optional[Callable] = None) -> Path:
    """Run (or resume) SiD from a :class:`DistillConfig` or a plain dict; returns the run directory (``run_dir``
    overrides the config's). ``eval_fn(G_ema, kimg) -> dict`` (or the config's) runs on rank 0 at every snapshot,
    logged under ``metrics``. Everything is validated before anything is computed or written."""
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(config)
    if run_dir is not None:
        cfg = cfg.replace(run_dir=str(run_dir))
    if not cfg.run_dir:
        raise ConfigError('run_dir: a run directory is required')
    cfg.validate(dist_utils.env_world_size())
    eval_fn = eval_fn if eval_fn is not None else load_eval_fn(cfg.eval_fn, cfg.eval_kwargs)
    if cfg.snapshot_keep_best is not None and eval_fn is None:
        raise ConfigError('snapshot_keep_best: needs an eval_fn whose result holds that key')
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
            check_resume(state['config'], cfg, state.get('teacher'), nets.provenance)
        created = dist_utils.init(device)
        try:
            return _train(cfg, nets, device, run_dir, state, eval_fn)
        finally:
            if created:
                dist_utils.shutdown()
    finally:
        torch.set_num_threads(old_threads)


def _train(cfg: DistillConfig, nets, device: torch.device, run_dir: Path, state: Optional[dict], eval_fn) -> Path:
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main_proc = rank == 0
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # as SiD: fp32 means fp32, fp16 sums are not shortened
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()

    teacher, G, fake = nets.teacher, nets.G, nets.fake
    teacher.eval().requires_grad_(False).to(device), G.to(device), fake.to(device)
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

    adam = dict(eps=cfg.resolved_adam_eps(), **({'fused': True} if cfg.fused_adam else {}))
    opt_fake = torch.optim.Adam(fake.parameters(), lr=cfg.lr, betas=(0.0, cfg.beta2), **adam)
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.glr, betas=(cfg.g_beta1, cfg.beta2), **adam)
    scaler_fake, scaler_G = (torch.amp.GradScaler(device.type, enabled=cfg.loss_scaler == 'dynamic') for _ in 'fG')

    logger = JsonlLogger(run_dir / LOG_FILE, enabled=main_proc)
    totals = dict.fromkeys(('nan_samples_fake', 'nan_samples_G', *PER_STEP, 'bad_iterations'), 0)
    start_it, cur_nimg, tick, tick_start_nimg, snapshots = 0, 0, 0, 0, []
    stateful = {'G': G, 'fake': fake, 'G_ema': G_ema, 'opt_G': opt_G, 'opt_fake': opt_fake, 'scaler_G': scaler_G,
                'scaler_fake': scaler_fake}  # training-state key -> object
    if state is not None:
        for key, obj in stateful.items():
            obj.load_state_dict(state[key])
        restore_rng(state['rng'])
        start_it, cur_nimg = int(state['iteration']), int(state['images_seen'])
        tick, tick_start_nimg = int(state['tick']), int(state['tick_start_nimg'])
        totals.update({k: int(v) for k, v in state['totals'].items()})
        snapshots = list(state.get('snapshots', []))
        logger.truncate_after(start_it)
    elif main_proc:
        write_json(run_dir / CONFIG_FILE, cfg.to_dict())
        (run_dir / LOG_FILE).unlink(missing_ok=True)
        if init_record is not None:
            logger.log({'iteration': 0, 'images_seen': 0, 'kimg': 0.0, **init_record})
    dist_utils.barrier()

    # Execution wrappers: DDP for the trained networks, torch.compile when asked; the raw modules keep the state.
    ddp_fake, ddp_G = None, None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP  # imported late: seconds of start-up
        ddp_fake, ddp_G = DDP(fake, broadcast_buffers=False), DDP(G, broadcast_buffers=False)
    run = torch.compile if cfg.compile else (lambda module: module)
    fake_train, G_train, teacher_run = run(ddp_fake or fake), run(ddp_G or G), run(teacher)
    G_eval, fake_eval = run(G), run(fake)

    total_iters = cfg.total_iterations()
    per_rank = cfg.batch // world
    micro = min(cfg.batch_gpu or per_rank, per_rank)
    rounds = per_rank // micro
    shape = [int(G.img_channels), int(G.img_resolution), int(G.img_resolution)]
    label_dim = int(getattr(teacher, 'label_dim', 0) or 0)

    def draw(it, phase, r, batch_stream):
        """This micro-batch's random stream, labels and latents; reseeds dropout. Again: the same draws."""
        first = rank * per_rank + r * micro
        if cfg.rng == 'per_batch':
            gens = batch_stream.view(first, micro)
        elif cfg.rng == 'per_sample':
            gens = sample_generators(range(first, first + micro), cfg.seed, it, phase)
        else:
            gens = torch.Generator(device=device).manual_seed(derive_seed(cfg.seed, it, phase, RANK_STREAM + rank, r))
        labels = random_labels(micro, label_dim, gens, device=device, probs=cfg.label_probs)
        z = randn(micro, shape, gens, device=device).to(memory_format=mem_fmt)
        reseed_global(derive_seed(cfg.seed, it, phase, DROPOUT_STREAM, rank, r), device)
        return gens, labels, z

    def no_sync_unless_last(module, r):  # gradient accumulation: DDP all-reduces on the last micro-batch only
        return module.no_sync() if module is not None and r < rounds - 1 else contextlib.nullcontext()

    def add(name, value):  # to this iteration's statistics
        it_sums[STATS.index(name)] += value

    def step(opt, scaler, params, kind):  # a dynamic scaler may skip the step (a disabled one only steps)
        bad = clean_grads(params, scaler, opt)
        add(f'nonfinite_grads_{kind}', bad)
        if scaler.is_enabled():
            add(f'skipped_steps_{kind}', (bad > 0).double())
        scaler.step(opt)
        scaler.update()

    def snapshot(it_done, metrics):
        kimg = cur_nimg // 1000
        meta = {'init_sigma': cfg.init_sigma, 'alpha': cfg.alpha, 'tmax': cfg.tmax, 'kimg': cur_nimg / 1000,
                'images_seen': cur_nimg, 'iteration': it_done, 'teacher': nets.provenance,
                'precision': cfg.precision, 'seed': cfg.seed}
        name = f'network-snapshot-{kimg:06d}'
        save_network(run_dir / name, G_ema, meta=meta)
        _save_grid(run_dir / f'samples-{kimg:06d}.png', G_ema, cfg, label_dim, device, micro)
        value = (metrics or {}).get(cfg.snapshot_keep_best) if cfg.snapshot_keep_best else None
        value = float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
        index = snapshots[-1]['index'] + 1 if snapshots else 0  # the newest is always kept
        snapshots[:] = [s for s in snapshots if s['name'] != name]  # overwritten (two snapshots in one kimg)
        snapshots.append({'name': name, 'tick': tick, 'index': index, 'metric': value})
        return _apply_retention(run_dir, snapshots, cfg)

    def training_state(it_done):
        return {**{key: obj.state_dict() for key, obj in stateful.items()},
                'rng': capture_rng(), 'iteration': it_done, 'images_seen': cur_nimg, 'tick': tick,
                'tick_start_nimg': tick_start_nimg, 'totals': dict(totals), 'config': cfg.to_dict(),
                'snapshots': copy.deepcopy(snapshots),
                # Every stream is a pure function of (seed, iteration, phase, index): the position is the iteration.
                'streams': {'scheme': cfg.rng, 'seed': cfg.seed, 'position': it_done},
                'world_size': world, 'teacher': nets.provenance}

    if state is None and main_proc and cfg.grid_size > 0:
        _save_grid(run_dir / 'fakes_init.png', G_ema, cfg, label_dim, device, micro)
    pbar = tqdm(total=total_iters, initial=start_it, disable=not (main_proc and cfg.progress), unit='it',
                dynamic_ncols=True, desc='SiD')
    tick_sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    streak = torch.zeros((), dtype=torch.float64, device=device)  # consecutive bad iterations, on the device
    snap_at = set(cfg.extra_snap_ticks or ())
    tick_t0, tick_iters = time.time(), 0

    for it in range(start_it, total_iters):
        it_sums = torch.zeros_like(tick_sums)
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
            add('kept_fake', keep.sum())
            add('loss_fake', loss.detach().sum())
        fake.eval().requires_grad_(False)
        step(opt_fake, scaler_fake, list(fake.parameters()), 'fake')

        # ---- 2. generator step -----------------------------------------------------------------------------
        G.train().requires_grad_(True)
        opt_G.zero_grad(set_to_none=True)
        stream = BatchStream((cfg.seed, it, PHASE_G), cfg.batch, 'cpu') if cfg.rng == 'per_batch' else None
        for r in range(rounds):
            gens, labels, z = draw(it, PHASE_G, r, stream)
            with no_sync_unless_last(ddp_G, r):
                x_g = generate_onestep(G_train, z, cfg.init_sigma, labels)
                loss, keep = sid_loss.generator_loss(teacher_run, fake_eval, x_g, labels, generator=gens)
                g_ok = None if bool(keep.all()) else finite_sample_mask(x_g)
                if g_ok is not None and not bool(g_ok.all()):
                    # NaN inside G: its graph would turn the dropped rows' zero gradient into NaN. Regenerate
                    # the finite rows alone, with this micro-batch's draws again.
                    ok = g_ok.nonzero().squeeze(1)
                    gens, labels, z = draw(it, PHASE_G, r, stream)
                    x_ok = generate_onestep(G_train, z[ok], cfg.init_sigma, None if labels is None else labels[ok])
                    x_g = torch.full_like(x_g, math.nan).index_put((ok,), x_ok)
                    loss, keep = sid_loss.generator_loss(teacher_run, fake_eval, x_g, labels, generator=gens)
                scaler_G.scale(loss.sum() * (cfg.lsg / per_rank)).backward()
            add('kept_G', keep.sum())
            add('loss_G', loss.detach().sum())
        G.eval()
        step(opt_G, scaler_G, list(G.parameters()), 'G')

        # ---- 3. EMA, fault bookkeeping ---------------------------------------------------------------------
        beta = ema_beta(cfg.batch, cur_nimg, cfg.ema_halflife_kimg, cfg.ema_rampup)
        update_ema(G_ema, G, beta)
        cur_nimg += cfg.batch
        it_done = it + 1
        tick_iters += 1
        pbar.update(1)
        bad = ((it_sums[KEPT] == 0) | ~torch.isfinite(it_sums[LOSSES])).any().double()
        streak = (streak + 1) * bad
        add('bad_iterations', bad)
        if cfg.max_bad_iterations > 0:
            add('fault', (streak >= cfg.max_bad_iterations).double())
        tick_sums += it_sums

        # ---- tick maintenance: log, fault check, snapshot + evaluation, retention, training state ----------
        done = it_done == total_iters
        if not (tick == 0 or done or cur_nimg >= tick_start_nimg + cfg.tick_kimg * 1000):
            continue
        s = dict(zip(STATS, dist_utils.all_reduce_sum(tick_sums).tolist()))
        tick_sums.zero_()
        s = {k: v / world if k in PER_STEP else v for k, v in s.items()}
        images = tick_iters * cfg.batch  # drawn per phase in the tick, over all processes
        s.update(nan_samples_fake=images - s['kept_fake'], nan_samples_G=images - s['kept_G'])
        for k in totals:
            totals[k] += int(s[k])
        dt = time.time() - tick_t0
        record = {
            'tick': tick, 'iteration': it_done, 'images_seen': cur_nimg, 'kimg': cur_nimg / 1000,
            'loss_fake': s['loss_fake'] / s['kept_fake'] if s['kept_fake'] else None,
            'loss_G': s['loss_G'] / s['kept_G'] if s['kept_G'] else None,
            **{k: int(s[k]) for k in totals}, 'totals': dict(totals), 'ema_beta': beta, 'sec_per_tick': dt,
            'sec_per_iter': dt / max(tick_iters, 1), 'images_per_sec': images / max(dt, 1e-9),
            'loss_scale_G': float(scaler_G.get_scale()) if scaler_G.is_enabled() else None, 'time': time.time(),
        }
        if device.type == 'cuda':
            record['peak_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        if s['fault'] > 0:
            if main_proc:
                logger.log({**record, 'fault': True})
            raise TrainingFault(
                f'{cfg.max_bad_iterations} consecutive iterations (up to iteration {it_done}) kept no sample in a '
                f'phase or had a non-finite loss; this tick kept {int(s["kept_fake"])} fake-score and '
                f'{int(s["kept_G"])} generator samples of {images} each (non-finite teacher, G or '
                f'fake-score outputs?). Set max_bad_iterations=0 to run on regardless.')
        if done or (cfg.snap_ticks > 0 and tick % cfg.snap_ticks == 0) or tick in snap_at:
            if main_proc:
                metrics = dict(eval_fn(G_ema, cur_nimg / 1000) or {}) if eval_fn is not None else None
                if metrics is not None:
                    record['metrics'] = metrics
                deleted = snapshot(it_done, metrics)
                if deleted:
                    record['snapshots_deleted'] = deleted
            dist_utils.barrier()
        if main_proc:
            logger.log(record)
            pbar.set_postfix(loss_fake=f"{record['loss_fake'] or 0:.4g}", loss_G=f"{record['loss_G'] or 0:.4g}",
                             refresh=False)
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


def _apply_retention(run_dir: Path, snapshots: list, cfg: DistillConfig) -> list:
    """Delete the snapshots the retention policy lets go (``DistillConfig``); returns their names. Files leave by
    atomic renames, sidecar first, so a reader never finds a sidecar without its weights."""
    if cfg.snapshot_keep_every <= 0 or len(snapshots) < 2:
        return []
    keep = {snapshots[-1]['name']} | {s['name'] for s in snapshots if s['index'] % cfg.snapshot_keep_every == 0}
    scored = [s for s in snapshots if s['metric'] is not None]
    if cfg.snapshot_keep_best and scored:
        sign = 1 if cfg.snapshot_best_mode == 'min' else -1
        keep.add(min(scored, key=lambda s: (sign * s['metric'], s['index']))['name'])
    gone = [s for s in snapshots if s['name'] not in keep]
    trash = run_dir / '.deleting'
    trash.mkdir(exist_ok=True)
    for s in gone:
        for f in (f"{s['name']}.json", f"{s['name']}.safetensors", f"samples-{s['name'].rsplit('-', 1)[1]}.png"):
            if (run_dir / f).exists():
                os.replace(run_dir / f, trash / f)
    for f in trash.iterdir():  # also what an interrupted deletion left
        f.unlink()
    snapshots[:] = [s for s in snapshots if s['name'] in keep]
    return [s['name'] for s in gone]


@torch.no_grad()
def _save_grid(path: Path, G_ema, cfg: DistillConfig, label_dim: int, device, chunk: int) -> None:
    """PNG grid of G_ema samples for seeds 0..grid_size-1 (images with 1 or 3 channels only)."""
    C, R = int(getattr(G_ema, 'img_channels', 0)), int(getattr(G_ema, 'img_resolution', 0))
    if cfg.grid_size <= 0 or C not in (1, 3) or R < 4:
        return
    from torchvision.utils import save_image
    n, imgs = cfg.grid_size, []
    for i in range(0, n, chunk):
        inputs = inputs_for_seeds(range(i, min(i + chunk, n)), [C, R, R], label_dim, device)
        imgs.append(generate_onestep(G_ema, inputs.latents, cfg.init_sigma, inputs.labels).float().cpu())
    with atomic_path(path) as tmp:
        save_image((torch.cat(imgs).clamp(-1, 1) + 1) / 2, tmp, format='png', nrow=math.ceil(math.sqrt(n)))
