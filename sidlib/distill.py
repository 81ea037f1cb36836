"""Score identity Distillation (SiD) of an EDM teacher into a one-step generator (spec §1).

In-process::

    from sidlib.distill import DistillConfig, distill
    run_dir = distill(DistillConfig.from_dict({'teacher': 'teacher.safetensors', 'batch': 8, 'iterations': 20,
                                               'run_dir': 'runs/demo'}))

Command line (also under ``torchrun --nproc_per_node N -m sidlib.distill ...``)::

    python -m sidlib.distill --config cfg.yaml --run-dir DIR [--set key=value ...] [--key=value ...]

Each iteration (spec §1.6):

1. fake-score phase: ``x_g = G(sigma_init z)`` with G in eval mode and no graph; EDM loss of the fake
   score on (augmented) ``x_g`` with the fake score in train mode; one Adam step on the fake score.
2. generator phase: G in train mode (dropout on), new z and labels; ``x_t = x_g + sigma n`` with sigma
   from the rho-schedule (u <= tmax/1000); teacher and fake score in eval mode with frozen
   parameters, gradients flowing through their inputs; SiD loss; one Adam step on G.
3. EMA of G with half-life and ramp-up; ``images_seen += batch``.

Reductions: per-element losses are summed over pixels and samples and multiplied by ``ls`` (resp.
``lsg``) / per-process batch; DDP averages over processes, so results do not depend on the world size.

Randomness: every random number (labels, z, sigma, noise, augmentation) is drawn from a generator
seeded by ``derive_seed(seed, iteration, phase, global_sample_index)`` (``rng='per_sample'``), so a
run on any number of processes / micro-batches draws the same numbers for the same sample. Dropout
uses torch's global RNG, reseeded before each micro-batch from ``(seed, iteration, phase, rank,
micro-batch)``: deterministic and exactly reproducible on resume, but its masks depend on how the
batch is split over processes and micro-batches (runs with ``dropout=0`` are split-independent).
``rng='per_rank'`` instead uses one device generator per (iteration, phase, rank, micro-batch):
faster on GPUs with huge batches, reproducible and resumable, but not split-independent.

Validation ranges (checked before any compute or file write; errors name the key):
alpha finite in [-10, 10]; tmax in (0, 1000]; init_sigma in (0, 1000]; lr, glr > 0; g_beta1, beta2 in
[0, 1); batch > 0 and divisible by batch_gpu * world_size; augment_p in [0, 1]; dropout in [0, 1).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from . import distributed as dist_utils
from .augment import AugmentPipe
from .ema import ema_beta, update_ema
from .logging_utils import JsonlLogger
from .losses import EDMLoss, finite_sample_mask, sample_sid_sigma, sid_generator_loss
from .sampling import (derive_seed, generate_onestep, labels_for_seeds, latents_for_seeds, randn, random_labels,
                       sample_generators)
from .training_state import capture_rng, load_training_state, restore_rng, save_training_state

__all__ = ['ConfigError', 'DistillConfig', 'register_teacher', 'registered_teachers', 'distill',
           'fake_score_loss', 'generator_loss', 'main', 'STATE_FILE', 'LOG_FILE']

STATE_FILE = 'training-state.pt'
LOG_FILE = 'log.jsonl'
CONFIG_FILE = 'config.json'

PHASE_FAKE, PHASE_G = 0, 1
_DROPOUT_STREAM = 7


class ConfigError(ValueError):
    """Invalid distillation configuration; the message names the offending key(s)."""


# ----------------------------------------------------------------------------------------------
# Analytic / in-process teachers.

_TEACHER_FACTORIES: Dict[str, Callable[[], torch.nn.Module]] = {}


def register_teacher(name: str, factory: Callable[[], torch.nn.Module]) -> None:
    """Register an in-process teacher (e.g. an analytic denoiser) under ``name``.

    ``factory()`` returns an EDMPrecond-like module: ``forward(x, sigma, class_labels=None, **kw)`` and
    attributes ``img_resolution``, ``img_channels``, ``label_dim``. Such a teacher has no weights to copy,
    so the generator and fake score are built from the config's ``student`` kwargs with a seeded
    random initialisation (the fake score starts as a copy of G).
    Re-registering a name replaces the factory.
    """
    if not isinstance(name, str) or not name:
        raise ValueError('teacher name must be a non-empty string')
    _TEACHER_FACTORIES[name] = factory


def registered_teachers() -> List[str]:
    return sorted(_TEACHER_FACTORIES)


# ----------------------------------------------------------------------------------------------
# Configuration.

# Keys that may change between a run and its resumption (they do not define the trajectory).
_RESUMABLE_CHANGES = {
    'duration_kimg', 'iterations', 'tick_kimg', 'snap_ticks', 'state_ticks', 'numbered_state_ticks', 'run_dir',
    'eval_fn', 'grid_size', 'progress', 'resume', 'device', 'num_threads', 'compile', 'channels_last',
    'attention', 'fused_adam', 'batch_gpu', 'preset',
}


@dataclass
class DistillConfig:
    """Plain-data configuration of a SiD run (see module docstring for semantics and valid ranges).

    Teacher and students:
        teacher: a ``sidlib.checkpoints.load_network`` source (file, directory, URL, registered name) or the
            name of an in-process teacher registered with :func:`register_teacher`.
        teacher_kwargs: expected teacher constructor kwargs; a stored teacher that differs is refused.
        student: constructor kwargs for G and the fake score: overrides of the teacher's (e.g. dropout)
            for network teachers, the full kwargs for in-process teachers.
        student_class: precond class of the students ('EDMPrecond').
    SiD: alpha (1.2), tmax (800, in 1/1000 units), init_sigma (2.5).
    Optimisation: batch (global), batch_gpu (micro-batch per process; None = whole per-process batch),
        lr / glr (fake score / G), g_beta1, beta2, adam_eps (None = 1e-8, or 1e-6 for fp16), ls / lsg,
        dropout (None = keep the networks'), augment_p (fake-score augmentation; needs augment_dim=9),
        ema_halflife_kimg, ema_rampup.
    Length and bookkeeping: iterations or duration_kimg (exactly one), tick_kimg, snap_ticks (G_ema
        snapshot + grid + eval every N ticks, 0 = only at the end), state_ticks (training state every N
        ticks and at the end), numbered_state_ticks (also keep training-state-<kimg>.pt every N ticks; 0 = never).
    Randomness: seed, rng ('per_sample' | 'per_rank'), label_probs (class probabilities; None = uniform).
    Numerics / performance: precision ('fp32' | 'bf16' | 'fp16'), device ('auto' | 'cpu' | 'cuda' | 'cuda:N'),
        channels_last, compile, attention (None | 'math' | 'sdpa'), fused_adam, num_threads.
    Outputs: run_dir, eval_fn ('module:function' called as fn(G_ema, kimg) -> dict at snapshots),
        grid_size (images in the PNG sample grid; 0 = none), progress (tqdm bar), resume (auto-resume).
    preset: name of a paper preset (``params.yaml`` ``paper.presets``, see :mod:`sidlib.presets`) whose
        values fill the keys not given.
    """

    teacher: str = ''
    teacher_kwargs: Optional[dict] = None
    student: Optional[dict] = None
    student_class: str = 'EDMPrecond'
    alpha: float = 1.2
    tmax: float = 800.0
    init_sigma: float = 2.5
    batch: int = 256
    batch_gpu: Optional[int] = None
    lr: float = 1e-5
    glr: float = 1e-5
    g_beta1: float = 0.0
    beta2: float = 0.999
    adam_eps: Optional[float] = None
    ls: float = 1.0
    lsg: float = 100.0
    dropout: Optional[float] = None
    augment_p: float = 0.0
    ema_halflife_kimg: float = 500.0
    ema_rampup: Optional[float] = 0.05
    iterations: Optional[int] = None
    duration_kimg: Optional[float] = None
    tick_kimg: float = 10.0
    snap_ticks: int = 50
    state_ticks: int = 10
    numbered_state_ticks: int = 0
    seed: int = 0
    rng: str = 'per_sample'
    label_probs: Optional[list] = None
    precision: str = 'fp32'
    device: str = 'auto'
    channels_last: bool = False
    compile: bool = False
    attention: Optional[str] = None
    fused_adam: bool = False
    num_threads: Optional[int] = None
    run_dir: Optional[str] = None
    eval_fn: Optional[str] = None
    grid_size: int = 64
    progress: bool = True
    resume: bool = True
    preset: Optional[str] = None

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Optional[dict] = None, **overrides) -> 'DistillConfig':
        """Build and type-check a config from plain data; unknown keys and wrong types raise ConfigError."""
        d = dict(d or {})
        d.update(overrides)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f'unknown config key(s): {", ".join(unknown)}')
        preset = d.get('preset')
        if preset is not None:
            from sidlib import presets  # the paper presets live in params.yaml's `paper:` block
            try:
                base = presets.preset_to_distill_config(preset)
            except presets.PresetError as e:
                raise ConfigError(f'preset: {e}') from None
            d = {**base, **d}
        hints = _field_types(cls)
        out = {}
        for k, v in d.items():
            out[k] = _coerce(k, v, hints[k])
        return cls(**out)

    def to_dict(self) -> dict:
        return copy.deepcopy(dataclasses.asdict(self))

    def replace(self, **changes) -> 'DistillConfig':
        return DistillConfig.from_dict({**self.to_dict(), **changes})

    # -- derived -----------------------------------------------------------------------------
    def total_iterations(self) -> int:
        if self.iterations is not None:
            return int(self.iterations)
        return int(math.ceil(self.duration_kimg * 1000 / self.batch))

    def resolved_adam_eps(self) -> float:
        if self.adam_eps is not None:
            return float(self.adam_eps)
        return 1e-6 if self.precision == 'fp16' else 1e-8

    def validate(self, world_size: int = 1) -> None:
        """Raise ConfigError (naming the key) for any out-of-range value; touches no files."""
        errs = []

        def need(cond, key, msg):
            if not cond:
                errs.append(f'{key}: {msg}')

        need(isinstance(self.teacher, str) and self.teacher.strip() != '', 'teacher', 'a teacher source is required')
        need(math.isfinite(self.alpha) and -10 <= self.alpha <= 10, 'alpha', f'must be finite in [-10, 10], got {self.alpha}')
        need(math.isfinite(self.tmax) and 0 < self.tmax <= 1000, 'tmax', f'must be in (0, 1000], got {self.tmax}')
        need(math.isfinite(self.init_sigma) and 0 < self.init_sigma <= 1000, 'init_sigma',
             f'must be in (0, 1000], got {self.init_sigma}')
        need(self.batch > 0, 'batch', f'must be positive, got {self.batch}')
        need(self.batch_gpu is None or self.batch_gpu > 0, 'batch_gpu', f'must be positive, got {self.batch_gpu}')
        if self.batch > 0 and (self.batch_gpu is None or self.batch_gpu > 0):
            per = self.batch_gpu if self.batch_gpu is not None else self.batch // max(world_size, 1)
            need(per > 0 and self.batch % (per * world_size) == 0, 'batch',
                 f'batch {self.batch} must be divisible by batch_gpu ({self.batch_gpu}) x world size ({world_size})')
        for key in ('lr', 'glr'):
            v = getattr(self, key)
            need(math.isfinite(v) and v > 0, key, f'must be a positive learning rate, got {v}')
        for key in ('g_beta1', 'beta2'):
            v = getattr(self, key)
            need(0 <= v < 1, key, f'must be in [0, 1), got {v}')
        need(self.adam_eps is None or (math.isfinite(self.adam_eps) and self.adam_eps > 0), 'adam_eps',
             f'must be positive, got {self.adam_eps}')
        for key in ('ls', 'lsg'):
            v = getattr(self, key)
            need(math.isfinite(v) and v > 0, key, f'must be a positive loss scale, got {v}')
        need(self.dropout is None or 0 <= self.dropout < 1, 'dropout', f'must be in [0, 1), got {self.dropout}')
        need(0 <= self.augment_p <= 1, 'augment_p', f'must be in [0, 1], got {self.augment_p}')
        need(self.ema_halflife_kimg >= 0, 'ema_halflife_kimg', f'must be >= 0, got {self.ema_halflife_kimg}')
        need(self.ema_rampup is None or self.ema_rampup > 0, 'ema_rampup', f'must be positive or null, got {self.ema_rampup}')
        need((self.iterations is None) != (self.duration_kimg is None), 'iterations',
             'give exactly one of iterations / duration_kimg')
        need(self.iterations is None or self.iterations > 0, 'iterations', f'must be positive, got {self.iterations}')
        need(self.duration_kimg is None or self.duration_kimg > 0, 'duration_kimg',
             f'must be positive, got {self.duration_kimg}')
        need(self.tick_kimg > 0, 'tick_kimg', f'must be positive, got {self.tick_kimg}')
        for key in ('snap_ticks', 'state_ticks', 'numbered_state_ticks', 'grid_size'):
            need(getattr(self, key) >= 0, key, f'must be >= 0, got {getattr(self, key)}')
        need(self.seed >= 0, 'seed', f'must be >= 0, got {self.seed}')
        need(self.rng in ('per_sample', 'per_rank'), 'rng', f"must be 'per_sample' or 'per_rank', got {self.rng!r}")
        need(self.precision in ('fp32', 'bf16', 'fp16'), 'precision', f"must be 'fp32', 'bf16' or 'fp16', got {self.precision!r}")
        need(self.attention in (None, 'math', 'sdpa'), 'attention', f"must be null, 'math' or 'sdpa', got {self.attention!r}")
        need(self.num_threads is None or self.num_threads > 0, 'num_threads', f'must be positive, got {self.num_threads}')
        if self.label_probs is not None:
            ok = len(self.label_probs) > 0 and all(math.isfinite(p) and p >= 0 for p in self.label_probs) \
                and sum(self.label_probs) > 0
            need(ok, 'label_probs', 'must be a non-empty list of non-negative numbers with a positive sum')
        dev = self.device
        need(dev in ('auto', 'cpu', 'cuda') or dev.startswith('cuda:'), 'device', f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
        if dev.startswith('cuda') and not torch.cuda.is_available():
            errs.append(f'device: {dev!r} requested but CUDA is not available')
        if self.eval_fn is not None:
            need(isinstance(self.eval_fn, str) and ':' in self.eval_fn, 'eval_fn', "must look like 'package.module:function'")
        if errs:
            raise ConfigError('invalid distillation config:\n  ' + '\n  '.join(errs))


def _field_types(cls):
    import typing
    return typing.get_type_hints(cls)


def _coerce(key, value, tp):
    """Check ``value`` against the dataclass annotation ``tp`` (ints accepted for floats)."""
    import typing
    optional = False
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = True
        tp = args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f'{key}: must not be null')
    base = typing.get_origin(tp) or tp
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f'{key}: expected true/false, got {value!r}')
        return value
    if base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f'{key}: expected an integer, got {value!r}')
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f'{key}: expected a number, got {value!r}')
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(f'{key}: expected a string, got {value!r}')
        return value
    if base is dict:
        if not isinstance(value, dict):
            raise ConfigError(f'{key}: expected a mapping, got {value!r}')
        return copy.deepcopy(value)
    if base is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f'{key}: expected a list, got {value!r}')
        return list(value)
    return value


# ----------------------------------------------------------------------------------------------
# Teacher and student construction.

@dataclass
class _Nets:
    teacher: torch.nn.Module
    G: torch.nn.Module
    fake: torch.nn.Module
    provenance: dict
    analytic: bool


def _norm(v):
    if isinstance(v, tuple):
        v = list(v)
    if isinstance(v, list):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def _kwargs_mismatch(expected: dict, stored: dict) -> List[str]:
    """Keys of ``expected`` whose value differs from (or is absent in) ``stored``."""
    return sorted(k for k, v in expected.items() if k not in stored or _norm(stored[k]) != _norm(v))


def _looks_like_source(src: str) -> bool:
    if '://' in src or Path(src).expanduser().exists():
        return True
    if any(Path(src + suffix).is_file() for suffix in ('.safetensors', '.json', '.pkl')):
        return True
    from . import checkpoints
    registries = ('TEACHERS', 'TEACHER_ALIASES', 'OTHER_EDM_PICKLES', 'SID_GENERATORS')
    return any(src in getattr(checkpoints, reg, {}) for reg in registries)


def _init_kwargs(net) -> dict:
    kw = getattr(net, 'init_kwargs', None)
    return dict(kw) if isinstance(kw, dict) else {}


def _build_nets(cfg: DistillConfig) -> _Nets:
    """Load/instantiate the teacher and build G and the fake score; raises ConfigError on bad input."""
    from .networks import build_network
    if cfg.teacher in _TEACHER_FACTORIES:
        teacher = _TEACHER_FACTORIES[cfg.teacher]()
        if cfg.teacher_kwargs is not None:
            bad = _kwargs_mismatch(cfg.teacher_kwargs, _init_kwargs(teacher))
            if bad:
                raise ConfigError(f'teacher_kwargs: teacher {cfg.teacher!r} does not match expected kwargs {bad}')
        if not cfg.student:
            raise ConfigError(f'student: in-process teacher {cfg.teacher!r} has no weights to copy; '
                              'give the student architecture kwargs')
        kwargs = dict(cfg.student)
        if cfg.dropout is not None:
            kwargs['dropout'] = cfg.dropout
        for attr, key in (('img_resolution', 'img_resolution'), ('img_channels', 'img_channels'),
                          ('label_dim', 'label_dim')):
            want = int(getattr(teacher, attr, 0) or 0)
            have = int(kwargs.get(key, 0) or 0)
            if want != have:
                raise ConfigError(f'student: {key}={have} does not match the teacher ({want})')
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.seed, 0xC0FFEE))
            try:
                G = build_network(cfg.student_class, kwargs)
            except (TypeError, ValueError, KeyError) as e:
                raise ConfigError(f'student: cannot build {cfg.student_class} from {kwargs}: {e}') from e
        fake = copy.deepcopy(G)
        prov = {'source': cfg.teacher, 'kind': 'in-process', 'init_kwargs': _init_kwargs(teacher)}
        return _Nets(teacher, G, fake, prov, analytic=True)

    if not _looks_like_source(cfg.teacher):
        raise ConfigError(f'teacher: unknown teacher {cfg.teacher!r}: not a file, directory, URL, registered '
                          f'checkpoint name, or in-process teacher ({registered_teachers()})')
    from .checkpoints import CheckpointError, effective_kwargs, load_network, read_network_meta
    try:
        meta = read_network_meta(cfg.teacher)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f'teacher: cannot read {cfg.teacher!r}: {e}') from e
    stored = dict(meta.get('init_kwargs') or {})
    class_name = meta.get('class_name')
    if cfg.teacher_kwargs is not None:
        try:
            full = effective_kwargs(class_name, stored)
        except KeyError as e:
            raise ConfigError(f'teacher: unsupported network class {class_name!r}') from e
        bad = _kwargs_mismatch(cfg.teacher_kwargs, full)
        if bad:
            detail = ', '.join(f'{k}: expected {cfg.teacher_kwargs[k]!r}, stored {full.get(k, "<absent>")!r}'
                               for k in bad)
            raise ConfigError(f'teacher_kwargs: teacher {cfg.teacher!r} architecture mismatch ({detail})')
    try:
        teacher = load_network(cfg.teacher, expected_kwargs=cfg.teacher_kwargs)
    except CheckpointError as e:
        raise ConfigError(f'teacher: {e}') from e
    class_name = class_name or type(teacher).__name__
    kwargs = _init_kwargs(teacher) or stored
    kwargs.update(cfg.student or {})
    if cfg.dropout is not None:
        kwargs['dropout'] = cfg.dropout
    try:
        G = build_network(class_name, kwargs)
        G.load_state_dict(teacher.state_dict(), strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise ConfigError(f'student: kwargs {cfg.student} are incompatible with the teacher weights: {e}') from e
    fake = copy.deepcopy(G)
    prov = {'source': cfg.teacher, 'kind': 'network', 'class_name': class_name, 'init_kwargs': stored,
            'meta': _norm(meta.get('meta') or {})}
    return _Nets(teacher, G, fake, prov, analytic=False)


def _augment_dim(net) -> int:
    return int(_init_kwargs(net).get('augment_dim', 0) or 0)


def _aug_zeros(dim, n, device):
    return torch.zeros([n, dim], device=device) if dim > 0 else None


# ----------------------------------------------------------------------------------------------
# Per-micro-batch losses (public so the gradient paths can be tested in isolation).

def fake_score_loss(G, fake, z, labels, *, init_sigma: float, loss_fn: EDMLoss, augment_pipe=None,
                    generator=None, aug_G=None, aug_fake=None, autocast=contextlib.nullcontext):
    """Fake-score loss of one micro-batch (spec §1.3). Returns ``(loss [M, C, H, W], keep [N] bool)``.

    ``x_g = G(sigma_init z)`` is computed without a graph (the caller puts G in eval mode); the EDM loss
    is then evaluated for ``fake`` on (augmented) ``x_g``. Samples whose loss is not finite (NaN/Inf
    in x_g or in the fake score's output) are dropped: the loss holds only the M ``keep`` rows.
    """
    with torch.no_grad(), autocast():
        x_g = generate_onestep(G, z, init_sigma, labels, augment_labels=aug_G)
    x_g = x_g.to(torch.float32).detach()
    with autocast():
        loss = loss_fn(fake, x_g, labels, augment_pipe=augment_pipe, generator=generator,
                       augment_labels=None if augment_pipe is not None else aug_fake)
    loss = loss.to(torch.float32)
    keep = finite_sample_mask(loss)
    return (loss if bool(keep.all()) else loss[keep]), keep


def generator_loss(G, teacher, fake, z, labels, sigma, noise, *, init_sigma: float, alpha: float,
                   aug_G=None, aug_teacher=None, aug_fake=None, autocast=contextlib.nullcontext):
    """SiD generator loss of one micro-batch (spec §1.4). Returns ``(loss [M, C, H, W], keep [N], x_g)``.

    ``x_g = G(sigma_init z)`` with graph; ``x_t = x_g + sigma * noise``; ``y_real = teacher(x_t)``,
    ``y_fake = fake(x_t)`` (parameters frozen by the caller, gradients flow through ``x_t``). Samples
    with NaN/Inf in x_g, y_real or y_fake are dropped: the loss holds only the M ``keep`` rows.
    """
    with autocast():
        x_g = generate_onestep(G, z, init_sigma, labels, augment_labels=aug_G)
    x_g = x_g.to(torch.float32)
    x_t = x_g + sigma * noise
    kw_t = {} if aug_teacher is None else {'augment_labels': aug_teacher}
    kw_f = {} if aug_fake is None else {'augment_labels': aug_fake}
    with autocast():
        y_real = teacher(x_t, sigma, labels, **kw_t)
        y_fake = fake(x_t, sigma, labels, **kw_f)
    y_real, y_fake = y_real.to(torch.float32), y_fake.to(torch.float32)
    keep = finite_sample_mask(x_g, y_real, y_fake)
    if bool(keep.all()):
        return sid_generator_loss(x_g, y_real, y_fake, alpha), keep, x_g
    # Select before the formula: the NaN normaliser of a bad row would otherwise turn its zero
    # gradient into NaN (0 / NaN) on the way back to G.
    return sid_generator_loss(x_g[keep], y_real[keep], y_fake[keep], alpha), keep, x_g


# ----------------------------------------------------------------------------------------------
# Helpers of the loop.

def _resolve_device(cfg: DistillConfig) -> torch.device:
    if cfg.device == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda', dist_utils.env_local_rank())
        return torch.device('cpu')
    if cfg.device == 'cuda':
        return torch.device('cuda', dist_utils.env_local_rank())
    return torch.device(cfg.device)


def _autocast_factory(precision: str, device: torch.device):
    if precision == 'fp32':
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == 'bf16' else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _make_adam(params, lr, betas, eps, fused: bool):
    kw = dict(lr=lr, betas=betas, eps=eps)
    if fused:
        kw['fused'] = True
    return torch.optim.Adam(params, **kw)


def _clean_grads(params) -> torch.Tensor:
    """Count non-finite gradient elements and replace them (NaN -> 0, +-Inf -> +-1e5, as SiD does).

    One fused finiteness check over all gradients (the kernel GradScaler uses, with scale 1, which is
    exact); the element-wise count and replacement run only when something was found.
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
        # Unscale first so the counted/cleaned values are real gradients; the scaler still skips the
        # step (and lowers its scale) when unscale_ found Inf/NaN.
        scaler.unscale_(opt)
    bad = _clean_grads(params)
    if scaler.is_enabled():
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return bad


def _load_eval_fn(spec: Optional[str]):
    if spec is None:
        return None
    mod, _, name = spec.partition(':')
    try:
        return getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f'eval_fn: cannot import {spec!r}: {e}') from e


def _save_grid(path: Path, G_ema, cfg: DistillConfig, label_dim: int, device, chunk: int) -> Optional[Path]:
    """PNG grid of G_ema samples for seeds 0..grid_size-1 (images with 1 or 3 channels only)."""
    C, R = int(getattr(G_ema, 'img_channels', 0)), int(getattr(G_ema, 'img_resolution', 0))
    if cfg.grid_size <= 0 or C not in (1, 3) or R < 4:
        return None
    try:
        from torchvision.utils import save_image
    except ImportError:
        return None
    seeds = list(range(cfg.grid_size))
    imgs = []
    with torch.no_grad():
        for i in range(0, len(seeds), chunk):
            s = seeds[i:i + chunk]
            z = latents_for_seeds(s, [C, R, R], device=device)
            lab = labels_for_seeds(s, label_dim, device=device)
            imgs.append(generate_onestep(G_ema, z, cfg.init_sigma, lab).float().cpu())
    x = torch.cat(imgs)
    from .atomic import atomic_path
    with atomic_path(path) as tmp:
        save_image((x.clamp(-1, 1) + 1) / 2, tmp, format='png', nrow=int(math.ceil(math.sqrt(len(seeds)))))
    return path


def _check_resume_config(stored: dict, cfg: DistillConfig) -> None:
    now = cfg.to_dict()
    diff = sorted(k for k in set(stored) | set(now)
                  if k not in _RESUMABLE_CHANGES and _norm(stored.get(k)) != _norm(now.get(k)))
    if diff:
        detail = ', '.join(f'{k}: state {stored.get(k)!r} vs config {now.get(k)!r}' for k in diff)
        raise ConfigError(f'cannot resume: the run directory holds a state made with a different config ({detail})')


# ----------------------------------------------------------------------------------------------
# The loop.

def distill(config, run_dir: Optional[str | os.PathLike] = None, *, eval_fn: Optional[Callable] = None) -> Path:
    """Run (or resume) SiD distillation; returns the run directory.

    ``config``: a :class:`DistillConfig` or a plain dict. ``run_dir`` overrides ``config.run_dir``.
    ``eval_fn(G_ema, kimg) -> dict`` (or the config's ``eval_fn`` import path) is called on rank 0 at
    every snapshot; its result is logged under ``metrics``.
    Every validation happens before anything is computed or written.
    """
    cfg = config if isinstance(config, DistillConfig) else DistillConfig.from_dict(config)
    if run_dir is not None:
        cfg = cfg.replace(run_dir=str(run_dir))
    if not cfg.run_dir:
        raise ConfigError('run_dir: a run directory is required')
    world = dist_utils.env_world_size()
    cfg.validate(world)
    if eval_fn is None:
        eval_fn = _load_eval_fn(cfg.eval_fn)
    device = _resolve_device(cfg)
    run_dir = Path(cfg.run_dir)
    state_path = run_dir / STATE_FILE
    old_threads = torch.get_num_threads()
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    try:
        nets = _build_nets(cfg)  # raises ConfigError before anything is written
        if cfg.augment_p > 0 and _augment_dim(nets.fake) != 9:
            raise ConfigError(f'augment_p: augmentation needs a fake score built with augment_dim=9 '
                              f'(has {_augment_dim(nets.fake)})')
        state = None
        if cfg.resume and state_path.exists():
            state = load_training_state(state_path)
            _check_resume_config(state['config'], cfg)
        created = dist_utils.init(device)
        try:
            return _run(cfg, nets, device, run_dir, state, eval_fn)
        finally:
            if created:
                dist_utils.shutdown()
    finally:
        torch.set_num_threads(old_threads)


def _run(cfg: DistillConfig, nets: _Nets, device, run_dir: Path, state: Optional[dict], eval_fn) -> Path:
    rank, world = dist_utils.rank(), dist_utils.world_size()
    main_proc = rank == 0
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        # SiD disables TF32 so that fp32 means fp32.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False

    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
    dist_utils.barrier()

    teacher, G, fake = nets.teacher, nets.G, nets.fake
    teacher.eval().requires_grad_(False).to(device)
    G.to(device)
    fake.to(device)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)
    mem_fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if cfg.channels_last:
        for net in (teacher, G, fake, G_ema):
            net.to(memory_format=torch.channels_last)
    if cfg.attention is not None:
        from .networks import set_attention_backend
        for net in (teacher, G, fake, G_ema):
            set_attention_backend(net, cfg.attention)

    eps = cfg.resolved_adam_eps()
    opt_fake = _make_adam(fake.parameters(), cfg.lr, (0.0, cfg.beta2), eps, cfg.fused_adam)
    opt_G = _make_adam(G.parameters(), cfg.glr, (cfg.g_beta1, cfg.beta2), eps, cfg.fused_adam)
    use_scaler = cfg.precision == 'fp16'
    scaler_fake = torch.amp.GradScaler(device.type, enabled=use_scaler)
    scaler_G = torch.amp.GradScaler(device.type, enabled=use_scaler)

    logger = JsonlLogger(run_dir / LOG_FILE, enabled=main_proc)
    totals = {'nan_samples_fake': 0, 'nan_samples_G': 0, 'nonfinite_grads_fake': 0, 'nonfinite_grads_G': 0}
    start_it, cur_nimg, tick, tick_start_nimg = 0, 0, 0, 0
    if state is not None:
        G.load_state_dict(state['G'])
        fake.load_state_dict(state['fake'])
        G_ema.load_state_dict(state['G_ema'])
        opt_G.load_state_dict(state['opt_G'])
        opt_fake.load_state_dict(state['opt_fake'])
        scaler_G.load_state_dict(state['scaler_G'])
        scaler_fake.load_state_dict(state['scaler_fake'])
        restore_rng(state['rng'])
        start_it, cur_nimg = int(state['iteration']), int(state['images_seen'])
        tick, tick_start_nimg = int(state['tick']), int(state['tick_start_nimg'])
        totals.update({k: int(v) for k, v in state['totals'].items()})
        logger.truncate_after(start_it)
    elif main_proc:
        from .atomic import atomic_write_text
        atomic_write_text(run_dir / CONFIG_FILE, json.dumps(cfg.to_dict(), indent=2))
        (run_dir / LOG_FILE).unlink(missing_ok=True)
    dist_utils.barrier()

    # Execution wrappers: DDP for the trained nets, torch.compile when asked. Raw modules keep the state.
    def compiled(m):
        return torch.compile(m) if cfg.compile else m
    fake_train, G_train = fake, G
    if world > 1:
        # Imported only here: importing DDP pulls in torch._dynamo (seconds of start-up).
        from torch.nn.parallel import DistributedDataParallel as DDP
        fake_train = DDP(fake, broadcast_buffers=False)
        G_train = DDP(G, broadcast_buffers=False)
    fake_train, G_train = compiled(fake_train), compiled(G_train)
    G_eval, fake_eval, teacher_run = compiled(G), compiled(fake), compiled(teacher)

    total_iters = cfg.total_iterations()
    per_rank = cfg.batch // world
    micro = min(cfg.batch_gpu or per_rank, per_rank)
    rounds = per_rank // micro
    shape = [int(G.img_channels), int(G.img_resolution), int(G.img_resolution)]
    label_dim = int(getattr(teacher, 'label_dim', 0) or 0)
    aug_dims = dict(G=_augment_dim(G), fake=_augment_dim(fake), teacher=_augment_dim(teacher))
    augment_pipe = AugmentPipe.sid_default(cfg.augment_p) if cfg.augment_p > 0 else None
    loss_fn = EDMLoss()
    autocast = _autocast_factory(cfg.precision, device)
    ddp_sync = world > 1

    def gens_for(it, phase, r):
        if cfg.rng == 'per_sample':
            base = rank * per_rank + r * micro
            return sample_generators(range(base, base + micro), cfg.seed, it, phase)
        g = torch.Generator(device=device)
        g.manual_seed(derive_seed(cfg.seed, it, phase, 1_000_003 + rank, r))
        return g

    def reseed_dropout(it, phase, r):
        torch.manual_seed(derive_seed(cfg.seed, it, phase, _DROPOUT_STREAM, rank, r))

    def sync_ctx(module, last):
        if ddp_sync and not last and hasattr(module, 'no_sync'):
            return module.no_sync()
        return contextlib.nullcontext()

    ddp_fake = fake_train if world > 1 else None
    ddp_G = G_train if world > 1 else None
    if cfg.compile and world > 1:
        ddp_fake, ddp_G = getattr(fake_train, '_orig_mod', fake_train), getattr(G_train, '_orig_mod', G_train)

    def state_dict_now(it_done):
        return {
            'G': G.state_dict(), 'fake': fake.state_dict(), 'G_ema': G_ema.state_dict(),
            'opt_G': opt_G.state_dict(), 'opt_fake': opt_fake.state_dict(),
            'scaler_G': scaler_G.state_dict(), 'scaler_fake': scaler_fake.state_dict(),
            'rng': capture_rng(), 'iteration': it_done, 'images_seen': cur_nimg, 'tick': tick,
            'tick_start_nimg': tick_start_nimg, 'totals': dict(totals), 'config': cfg.to_dict(),
            # Every random stream is a pure function of (seed, iteration, phase, sample index), so the
            # stream position is the iteration count.
            'streams': {'scheme': cfg.rng, 'seed': cfg.seed, 'position': it_done},
            'world_size': world, 'teacher': nets.provenance,
        }

    def snapshot(kimg_int):
        meta = {'init_sigma': cfg.init_sigma, 'alpha': cfg.alpha, 'tmax': cfg.tmax, 'kimg': cur_nimg / 1000,
                'images_seen': cur_nimg, 'iteration': it_done, 'teacher': nets.provenance,
                'precision': cfg.precision, 'seed': cfg.seed}
        from .checkpoints import save_network
        save_network(run_dir / f'network-snapshot-{kimg_int:06d}', G_ema, meta=meta)
        _save_grid(run_dir / f'samples-{kimg_int:06d}.png', G_ema, cfg, label_dim, device, micro)

    if state is None and main_proc and cfg.grid_size > 0:
        _save_grid(run_dir / 'fakes_init.png', G_ema, cfg, label_dim, device, micro)

    try:
        from tqdm.auto import tqdm
        pbar = tqdm(total=total_iters, initial=start_it, disable=not (main_proc and cfg.progress),
                    unit='it', dynamic_ncols=True, desc='SiD')
    except ImportError:
        pbar = None

    # Per-tick accumulators on the device (one sync per tick).
    acc = torch.zeros(8, dtype=torch.float64, device=device)
    tick_t0 = time.time()
    tick_iters = 0
    it_done = start_it
    for it in range(start_it, total_iters):
        # ---- 1. fake-score phase --------------------------------------------------------------
        G.eval()
        fake.train().requires_grad_(True)
        opt_fake.zero_grad(set_to_none=True)
        for r in range(rounds):
            gens = gens_for(it, PHASE_FAKE, r)
            labels = random_labels(micro, label_dim, gens, device=device, probs=cfg.label_probs)
            z = randn(micro, shape, gens, device=device).to(memory_format=mem_fmt)
            reseed_dropout(it, PHASE_FAKE, r)
            with sync_ctx(ddp_fake, r == rounds - 1):
                loss, keep = fake_score_loss(
                    G_eval, fake_train, z, labels, init_sigma=cfg.init_sigma, loss_fn=loss_fn,
                    augment_pipe=augment_pipe, generator=gens, aug_G=_aug_zeros(aug_dims['G'], micro, device),
                    aug_fake=_aug_zeros(aug_dims['fake'], micro, device), autocast=autocast)
                total = loss.sum() * (cfg.ls / per_rank)
                scaler_fake.scale(total).backward()
            with torch.no_grad():
                acc[0] += loss.detach().sum().double()
                acc[1] += keep.sum()
                acc[2] += (~keep).sum()
        fake.eval().requires_grad_(False)
        acc[6] += _optimizer_step(opt_fake, scaler_fake, list(fake.parameters())).to(device)

        # ---- 2. generator phase ---------------------------------------------------------------
        G.train().requires_grad_(True)
        opt_G.zero_grad(set_to_none=True)
        for r in range(rounds):
            gens = gens_for(it, PHASE_G, r)
            labels = random_labels(micro, label_dim, gens, device=device, probs=cfg.label_probs)
            z = randn(micro, shape, gens, device=device).to(memory_format=mem_fmt)
            sigma = sample_sid_sigma(micro, cfg.tmax, generator=gens, device=device)
            noise = randn(micro, shape, gens, device=device).to(memory_format=mem_fmt)
            reseed_dropout(it, PHASE_G, r)
            with sync_ctx(ddp_G, r == rounds - 1):
                loss, keep, _ = generator_loss(
                    G_train, teacher_run, fake_eval, z, labels, sigma, noise, init_sigma=cfg.init_sigma,
                    alpha=cfg.alpha, aug_G=_aug_zeros(aug_dims['G'], micro, device),
                    aug_teacher=_aug_zeros(aug_dims['teacher'], micro, device),
                    aug_fake=_aug_zeros(aug_dims['fake'], micro, device), autocast=autocast)
                total = loss.sum() * (cfg.lsg / per_rank)
                scaler_G.scale(total).backward()
            with torch.no_grad():
                acc[3] += loss.detach().sum().double()
                acc[4] += keep.sum()
                acc[5] += (~keep).sum()
        G.eval()
        acc[7] += _optimizer_step(opt_G, scaler_G, list(G.parameters())).to(device)

        # ---- 3. EMA ---------------------------------------------------------------------------
        beta = ema_beta(cfg.batch, cur_nimg, cfg.ema_halflife_kimg, cfg.ema_rampup)
        update_ema(G_ema, G, beta)
        cur_nimg += cfg.batch
        it_done = it + 1
        tick_iters += 1
        if pbar is not None:
            pbar.update(1)

        # ---- ticks, logs, snapshots, state ----------------------------------------------------
        done = it_done == total_iters
        if not (tick == 0 or done or cur_nimg >= tick_start_nimg + cfg.tick_kimg * 1000):
            continue
        stats = dist_utils.all_reduce_sum(acc.clone()).tolist()
        # Gradient counts are identical on every rank after DDP's all-reduce: count them once.
        stats[6] /= world
        stats[7] /= world
        acc.zero_()
        totals['nan_samples_fake'] += int(stats[2])
        totals['nan_samples_G'] += int(stats[5])
        totals['nonfinite_grads_fake'] += int(stats[6])
        totals['nonfinite_grads_G'] += int(stats[7])
        dt = time.time() - tick_t0
        record = {
            'tick': tick, 'iteration': it_done, 'images_seen': cur_nimg, 'kimg': cur_nimg / 1000,
            'loss_fake': stats[0] / max(stats[1], 1), 'loss_G': stats[3] / max(stats[4], 1),
            'nan_samples_fake': int(stats[2]), 'nan_samples_G': int(stats[5]),
            'nonfinite_grads_fake': int(stats[6]), 'nonfinite_grads_G': int(stats[7]),
            'totals': dict(totals), 'ema_beta': beta, 'sec_per_tick': dt,
            'sec_per_iter': dt / max(tick_iters, 1), 'images_per_sec': tick_iters * cfg.batch / max(dt, 1e-9),
            'loss_scale_G': float(scaler_G.get_scale()) if use_scaler else None,
            'time': time.time(),
        }
        if device.type == 'cuda':
            record['peak_mem_gb'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
        kimg_int = cur_nimg // 1000
        if done or (cfg.snap_ticks > 0 and tick % cfg.snap_ticks == 0):
            if main_proc:
                snapshot(kimg_int)
                if eval_fn is not None:
                    record['metrics'] = dict(eval_fn(G_ema, cur_nimg / 1000) or {})
            dist_utils.barrier()
        if main_proc:
            logger.log(record)
            if pbar is not None:
                pbar.set_postfix(loss_fake=f"{record['loss_fake']:.4g}", loss_G=f"{record['loss_G']:.4g}", refresh=False)
        tick += 1
        tick_start_nimg = cur_nimg
        tick_t0, tick_iters = time.time(), 0
        if done or (cfg.state_ticks > 0 and tick % cfg.state_ticks == 0):
            if main_proc:
                st = state_dict_now(it_done)
                save_training_state(run_dir / STATE_FILE, st)
                if cfg.numbered_state_ticks > 0 and tick % cfg.numbered_state_ticks == 0:
                    save_training_state(run_dir / f'training-state-{kimg_int:06d}.pt', st)
            dist_utils.barrier()
    if pbar is not None:
        pbar.close()
    return run_dir


# ----------------------------------------------------------------------------------------------
# Command line.

def _parse_value(text: str):
    import yaml
    return yaml.safe_load(text)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='python -m sidlib.distill', description=__doc__.split('\n')[0])
    p.add_argument('--config', help='YAML or JSON file with DistillConfig keys')
    p.add_argument('--run-dir', help='output / resume directory (overrides run_dir)')
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                   help='override one config key (value parsed as YAML); repeatable')
    args, rest = p.parse_known_args(argv)
    data: Dict[str, Any] = {}
    if args.config:
        import yaml
        with open(args.config, encoding='utf-8') as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            p.error(f'{args.config}: expected a mapping of config keys')
    overrides = list(args.set)
    for item in rest:
        if not item.startswith('--') or '=' not in item:
            p.error(f'unrecognised argument {item!r} (use --key=value or --set key=value)')
        overrides.append(item[2:])
    for item in overrides:
        key, sep, value = item.partition('=')
        if not sep:
            p.error(f'--set expects KEY=VALUE, got {item!r}')
        data[key.strip().replace('-', '_')] = _parse_value(value)
    if args.run_dir:
        data['run_dir'] = args.run_dir
    try:
        run_dir = distill(DistillConfig.from_dict(data))
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    if dist_utils.env_rank() == 0:
        print(str(run_dir))
    return 0


if __name__ == '__main__':
    sys.exit(main())
