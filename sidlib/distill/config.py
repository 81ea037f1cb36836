"""The configuration of a SiD run: :meth:`DistillConfig.from_dict` (the only way from a mapping; unknown keys and
wrong types raise :class:`ConfigError` naming the key) and :meth:`DistillConfig.validate` (every range, before
anything is computed or written). Units: learning rates per Adam step; ``tmax`` in 1/1000 of the rho-schedule
(SiD's ``--tmax``); ``*_kimg`` in thousands of generator images; ``*_ticks`` in ticks.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ['ConfigError', 'DistillConfig', 'RESUMABLE_CHANGES', 'RNG_SCHEMES', 'G_INIT_DEFAULTS', 'check_resume']

#: How training noise is drawn (see :mod:`sidlib.rng`): one generator per sample, one per global batch (both
#: independent of the process count), or one per process and micro-batch (fastest on GPUs, not split-independent).
RNG_SCHEMES = ('per_sample', 'per_batch', 'per_rank')

#: Settings of the data-free start of G (``g_init``), see :mod:`sidlib.distill.init`; ``cache_dir`` (optional) keeps
#: each start for reuse by runs that share it (e.g. an alpha sweep).
G_INIT_DEFAULTS = {'pairs': 20_000, 'heun_steps': 18, 'steps': 2000, 'batch': 256, 'lr': 1e-3, 'fake_steps': 1000,
                   'cache_dir': None}


class ConfigError(ValueError):
    """Invalid distillation configuration; the message names the offending key(s)."""


#: Keys that may change between a run and its resumption (they do not define the trajectory).
RESUMABLE_CHANGES = frozenset({
    'duration_kimg', 'iterations', 'tick_kimg', 'snap_ticks', 'state_ticks', 'numbered_state_ticks', 'run_dir',
    'eval_fn', 'eval_kwargs', 'grid_size', 'progress', 'resume', 'device', 'num_threads', 'compile', 'channels_last',
    'attention', 'fused_adam', 'batch_gpu', 'extra_snap_ticks', 'snapshot_keep_every', 'snapshot_keep_best',
    'snapshot_best_mode', 'max_bad_iterations',
})


@dataclass
class DistillConfig:
    """Plain-data configuration of a SiD run (units in the module docstring)."""

    # Teacher and students.
    teacher: str = ''  # a sidlib.load_network source, or an in-process teacher's name (see register_teacher)
    teacher_kwargs: Optional[dict] = None  # expected constructor kwargs; a stored teacher that differs is refused
    student: Optional[dict] = None  # G's and the fake score's kwargs: overrides of the teacher's (in-process: all)
    student_class: str = 'EDMPrecond'
    alpha: float = 1.2  # SiD's alpha, tmax and init_sigma
    tmax: float = 800.0
    init_sigma: float = 2.5
    # Optimisation.
    batch: int = 256  # global
    batch_gpu: Optional[int] = None  # micro-batch per process; None = the whole per-process batch
    lr: float = 1e-5  # fake score
    glr: float = 1e-5  # G
    g_beta1: float = 0.0
    beta2: float = 0.999
    adam_eps: Optional[float] = None  # None = 1e-8, or 1e-6 for fp16 as SiD
    ls: float = 1.0  # static loss scales of the fake score and G
    lsg: float = 100.0
    #: 'static': SiD's, non-finite gradient elements replaced NaN -> 0, +-Inf -> +-1e5, every step taken; 'dynamic':
    #: torch's GradScaler on top, whose skipped steps count as skipped_steps_*.
    loss_scaler: str = 'static'
    dropout: Optional[float] = None  # None = the networks'
    augment_p: float = 0.0  # fake-score augmentation; needs augment_dim=9
    ema_halflife_kimg: float = 500.0
    ema_rampup: Optional[float] = 0.05
    # Length and bookkeeping.
    iterations: Optional[int] = None  # exactly one of iterations / duration_kimg
    duration_kimg: Optional[float] = None
    tick_kimg: float = 10.0
    snap_ticks: int = 50  # G_ema snapshot + grid + eval every N ticks and at the end; 0 = at the end only
    extra_snap_ticks: Optional[list] = None  # further such ticks; SiD's loop: [0, 10, ..., 100] with snap_ticks 50
    #: Keep every N-th snapshot, the newest and, with snapshot_keep_best, the best by that eval key
    #: (snapshot_best_mode 'min' | 'max'); delete the rest. 0 = keep all.
    snapshot_keep_every: int = 0
    snapshot_keep_best: Optional[str] = None
    snapshot_best_mode: str = 'min'
    state_ticks: int = 10  # training state every N ticks and at the end
    numbered_state_ticks: int = 0  # also keep training-state-<kimg>.pt every N ticks; 0 = never
    #: Stop after this many consecutive iterations in which a phase kept no sample or had a non-finite loss, checked
    #: every tick; 0 = never.
    max_bad_iterations: int = 20
    # Randomness.
    seed: int = 0
    rng: str = 'per_sample'  # see RNG_SCHEMES
    label_probs: Optional[list] = None  # class probabilities; None = uniform
    # Start.
    #: None = G and the fake score copy the teacher; a mapping of G_INIT_DEFAULTS keys = first regress G on the
    #: teacher's own sampler (see sidlib.distill.init).
    g_init: Optional[dict] = None
    # Numerics / performance.
    precision: str = 'fp32'  # see sidlib.networks.set_precision
    device: str = 'auto'  # 'auto' | 'cpu' | 'cuda' | 'cuda:N'
    channels_last: bool = False
    compile: bool = False
    attention: Optional[str] = None  # None = the networks' default
    fused_adam: bool = False
    num_threads: Optional[int] = None
    # Outputs.
    run_dir: Optional[str] = None
    #: 'package.module:function' of an installed module, called as fn(G_ema, kimg) -> dict at snapshots; with
    #: eval_kwargs it is a factory called once as fn(**eval_kwargs).
    eval_fn: Optional[str] = None
    eval_kwargs: Optional[dict] = None
    grid_size: int = 64  # images in the PNG sample grid; 0 = none
    progress: bool = True  # tqdm bar
    resume: bool = True

    @classmethod
    def from_dict(cls, d: Optional[dict] = None, *, where: str = '') -> 'DistillConfig':
        """Build and type-check a config from plain data; unknown keys and wrong types raise ConfigError naming the
        key, prefixed by ``where`` (e.g. ``'digits.distill.'``)."""
        d = d or {}
        hints = typing.get_type_hints(cls)
        unknown = sorted(set(d) - set(hints))
        if unknown:
            raise ConfigError(f'unknown config key(s): {", ".join(where + k for k in unknown)}; '
                              f'valid keys: {", ".join(sorted(hints))}')
        return cls(**{k: _coerce(where + k, v, hints[k]) for k, v in d.items()})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # a deep copy

    def replace(self, **changes) -> 'DistillConfig':
        return DistillConfig.from_dict({**self.to_dict(), **changes})

    def total_iterations(self) -> int:
        if self.iterations is not None:
            return int(self.iterations)
        return int(math.ceil(self.duration_kimg * 1000 / self.batch))

    def resolved_adam_eps(self) -> float:
        if self.adam_eps is not None:
            return float(self.adam_eps)
        return 1e-6 if self.precision == 'fp16' else 1e-8

    def validate(self, world_size: int = 1, *, where: str = '') -> None:
        """Raise ConfigError naming every out-of-range key (prefixed by ``where``); touches no files."""
        errs = []

        def need(cond, key, msg):
            if not cond:
                errs.append(f'{where}{key}: {msg}')

        def check(key, ok, what, null=False):
            v = getattr(self, key)
            need(null and v is None or ok(v), key, f'must be {what}, got {v!r}')

        def positive(v):
            return v > 0

        need(isinstance(self.teacher, str) and self.teacher.strip() != '', 'teacher', 'a teacher source is required')
        check('alpha', lambda v: math.isfinite(v) and -10 <= v <= 10, 'finite in [-10, 10]')
        for key in ('tmax', 'init_sigma'):
            check(key, lambda v: math.isfinite(v) and 0 < v <= 1000, 'in (0, 1000]')
        check('batch', positive, 'positive')
        check('batch_gpu', positive, 'positive', null=True)
        if self.batch > 0 and (self.batch_gpu is None or self.batch_gpu > 0):
            per = self.batch_gpu if self.batch_gpu is not None else self.batch // max(world_size, 1)
            need(per > 0 and self.batch % (per * world_size) == 0, 'batch',
                 f'batch {self.batch} must be divisible by batch_gpu ({self.batch_gpu}) x world size ({world_size})')
        for key in ('lr', 'glr', 'ls', 'lsg', 'adam_eps'):
            check(key, lambda v: math.isfinite(v) and v > 0, 'positive', null=key == 'adam_eps')
        for key in ('g_beta1', 'beta2', 'dropout'):
            check(key, lambda v: 0 <= v < 1, 'in [0, 1)', null=key == 'dropout')
        check('augment_p', lambda v: 0 <= v <= 1, 'in [0, 1]')
        check('ema_halflife_kimg', lambda v: v >= 0, '>= 0')
        check('ema_rampup', positive, 'positive or null', null=True)
        need((self.iterations is None) != (self.duration_kimg is None), 'iterations',
             'give exactly one of iterations / duration_kimg')
        for key in ('iterations', 'duration_kimg'):
            check(key, positive, 'positive', null=True)
        check('tick_kimg', positive, 'positive')
        for key in ('snap_ticks', 'state_ticks', 'numbered_state_ticks', 'grid_size', 'snapshot_keep_every',
                    'max_bad_iterations'):
            check(key, lambda v: v >= 0, '>= 0')
        check('extra_snap_ticks', lambda v: all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v),
              'a list of tick numbers >= 0', null=True)
        check('seed', lambda v: v >= 0, '>= 0')
        for key, choices in (('rng', RNG_SCHEMES), ('precision', ('fp32', 'bf16', 'fp16')), ('attention', (
                None, 'math', 'sdpa')), ('loss_scaler', ('static', 'dynamic')), ('snapshot_best_mode', ('min', 'max'))):
            check(key, lambda v: v in choices, f'one of {choices}')
        check('num_threads', positive, 'positive', null=True)
        if self.g_init is not None:
            bad = sorted(set(self.g_init) - set(G_INIT_DEFAULTS))
            need(not bad, 'g_init', f'unknown key(s) {bad}; valid: {sorted(G_INIT_DEFAULTS)}')
            cache = self.g_init.get('cache_dir')
            need(cache is None or isinstance(cache, str), 'g_init.cache_dir', f'must be a path or null, got {cache!r}')
            for k, v in self.g_init.items():
                if k in G_INIT_DEFAULTS and k != 'cache_dir':
                    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                    need(ok and (k == 'lr' or float(v).is_integer()), f'g_init.{k}',
                         f'must be a positive {"number" if k == "lr" else "integer"}, got {v!r}')
        if self.label_probs is not None:
            ok = len(self.label_probs) > 0 and all(isinstance(p, (int, float)) and math.isfinite(p) and p >= 0
                                                   for p in self.label_probs) and sum(self.label_probs) > 0
            need(ok, 'label_probs', 'must be a non-empty list of non-negative numbers with a positive sum')
        dev = self.device
        need(dev in ('auto', 'cpu', 'cuda') or dev.startswith('cuda:'), 'device',
             f"must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
        need(not dev.startswith('cuda') or torch.cuda.is_available(), 'device',
             f'{dev!r} requested but CUDA is not available')
        need(self.eval_fn is None or ':' in self.eval_fn, 'eval_fn', "must look like 'package.module:function'")
        if errs:
            raise ConfigError('invalid distillation config:\n  ' + '\n  '.join(errs))


def _coerce(key: str, value, tp):
    """Check ``value`` against the dataclass annotation ``tp`` (ints accepted for floats)."""
    optional = typing.get_origin(tp) is typing.Union
    if optional:
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if value is None:
        if optional:
            return None
        raise ConfigError(f'{key}: must not be null')
    accepts, what, convert = _FIELD_TYPES[tp]
    if not accepts(value):
        raise ConfigError(f'{key}: expected {what}, got {value!r}')
    return convert(value)


#: Annotation -> (accepts the value, what is expected, conversion).
_FIELD_TYPES = {
    bool: (lambda v: isinstance(v, bool), 'true/false', bool),
    int: (lambda v: not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, float) and v.is_integer())),
          'an integer', int),
    float: (lambda v: not isinstance(v, bool) and isinstance(v, (int, float)), 'a number', float),
    str: (lambda v: isinstance(v, str), 'a string', str),
    dict: (lambda v: isinstance(v, dict), 'a mapping', copy.deepcopy),
    list: (lambda v: isinstance(v, (list, tuple)), 'a list', list),
}


def normalise(v):
    """Tuples as lists, recursively: stored JSON and live configs compare equal."""
    if isinstance(v, (list, tuple)):
        return [normalise(x) for x in v]
    if isinstance(v, dict):
        return {k: normalise(x) for k, x in v.items()}
    return v


def check_resume(stored: dict, cfg: DistillConfig, stored_teacher: Optional[dict] = None,
                 teacher: Optional[dict] = None) -> None:
    """Refuse to resume a state written with a config that differs in a key outside :data:`RESUMABLE_CHANGES`.
    ``stored_teacher``/``teacher``: the state's and this run's teacher provenance; when both hold the weights'
    ``sha256``, the teacher is compared by its weights, not its path (a moved checkout resumes, new weights do not).
    ``g_init.cache_dir`` only says where a start is kept, so it may differ too."""
    shas = [(t or {}).get('sha256') for t in (stored_teacher, teacher)]
    if all(shas) and shas[0] != shas[1]:
        raise ConfigError(f'teacher: cannot resume: the teacher {cfg.teacher!r} has other weights (sha256 '
                          f'{shas[1][:12]}...) than the one the run directory\'s state was trained with '
                          f'({shas[0][:12]}...)')
    skip = RESUMABLE_CHANGES | ({'teacher'} if all(shas) else set())

    def value(config, k):
        v = config.get(k)
        return normalise({a: b for a, b in v.items() if a != 'cache_dir'} if k == 'g_init' and v else v)

    now = cfg.to_dict()
    diff = sorted(k for k in set(stored) | set(now) if k not in skip and value(stored, k) != value(now, k))
    if diff:
        detail = ', '.join(f'{k}: state {stored.get(k)!r} vs config {now.get(k)!r}' for k in diff)
        raise ConfigError(f'cannot resume: the run directory holds a state made with a different config ({detail})')
