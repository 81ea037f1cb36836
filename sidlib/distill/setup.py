"""What a SiD run needs before its first iteration (teacher, students, device, optimisers) and SiD's gradient
cleaning. G and the fake score start from the teacher's weights (SiD's ``training/sid_training_loop.py``); for a
teacher without weights (registered with :func:`register_teacher`) they are built from the config's ``student``
kwargs with a seeded random initialisation, the fake score a copy of G.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from .. import distributed as dist_utils
from ..io import registry
from ..io.checkpoints import CheckpointError, effective_kwargs, load_network, read_network_meta
from ..networks import build_network
from ..rng import STUDENT_INIT_STREAM, derive_seed
from .config import ConfigError, DistillConfig, normalise

__all__ = ['Nets', 'register_teacher', 'registered_teachers', 'build_nets', 'resolve_device', 'clean_grads',
           'load_eval_fn']

_TEACHER_FACTORIES: Dict[str, Callable[[], torch.nn.Module]] = {}


def register_teacher(name: str, factory: Callable[[], torch.nn.Module]) -> None:
    """Register (or replace) an in-process teacher, e.g. an analytic denoiser: ``factory()`` returns an
    EDMPrecond-like module (``forward(x, sigma, class_labels=None, **kw)``, ``img_resolution``, ``img_channels``,
    ``label_dim``)."""
    if not isinstance(name, str) or not name:
        raise ValueError('teacher name must be a non-empty string')
    _TEACHER_FACTORIES[name] = factory


def registered_teachers() -> List[str]:
    return sorted(_TEACHER_FACTORIES)


@dataclass
class Nets:
    teacher: torch.nn.Module
    G: torch.nn.Module
    fake: torch.nn.Module
    provenance: dict


def _init_kwargs(net) -> dict:
    kw = getattr(net, 'init_kwargs', None)
    return dict(kw) if isinstance(kw, dict) else {}


def _mismatch(expected: dict, stored: dict) -> List[str]:
    """Keys of ``expected`` whose value differs from (or is absent in) ``stored``."""
    return sorted(k for k, v in expected.items() if k not in stored or normalise(stored[k]) != normalise(v))


def build_nets(cfg: DistillConfig) -> Nets:
    """Load or instantiate the teacher and build G and the fake score; raises ConfigError on bad input (also on a
    NaN or infinite weight: such a run would only drop samples)."""
    nets = _in_process_nets(cfg) if cfg.teacher in _TEACHER_FACTORIES else _checkpoint_nets(cfg)
    for name, net in (('teacher', nets.teacher), ('student', nets.G)):
        bad = sum(int((~torch.isfinite(t)).sum()) for t in [*net.parameters(), *net.buffers()] if t.is_floating_point())
        if bad:
            raise ConfigError(f'{name}: {bad} weight elements are NaN or infinite')
    return nets


def _checkpoint_nets(cfg: DistillConfig) -> Nets:
    src = cfg.teacher
    if not (registry.is_url(src) or src in registry.registered_names() or registry.local_checkpoint(src)):
        raise ConfigError(f'teacher: unknown teacher {cfg.teacher!r}: not a file, directory, URL, registered '
                          f'checkpoint name, or in-process teacher ({registered_teachers()})')
    try:
        meta = read_network_meta(cfg.teacher)
    except (CheckpointError, FileNotFoundError) as e:
        raise ConfigError(f'teacher: cannot read {cfg.teacher!r}: {e}') from e
    stored, class_name = dict(meta.get('init_kwargs') or {}), meta.get('class_name')
    if cfg.teacher_kwargs is not None:
        try:
            full = effective_kwargs(class_name, stored)
        except KeyError as e:
            raise ConfigError(f'teacher: unsupported network class {class_name!r}') from e
        bad = _mismatch(cfg.teacher_kwargs, full)
        if bad:
            detail = ', '.join(f'{k}: expected {cfg.teacher_kwargs[k]!r}, stored {full.get(k, "<absent>")!r}'
                               for k in bad)
            raise ConfigError(f'teacher_kwargs: teacher {cfg.teacher!r} architecture mismatch ({detail})')
    try:
        teacher = load_network(cfg.teacher, expected_kwargs=cfg.teacher_kwargs)
    except CheckpointError as e:
        raise ConfigError(f'teacher: {e}') from e
    class_name = class_name or type(teacher).__name__
    kwargs = {**(_init_kwargs(teacher) or stored), **(cfg.student or {})}
    if cfg.dropout is not None:
        kwargs['dropout'] = cfg.dropout
    try:
        G = build_network(class_name, kwargs)
        G.load_state_dict(teacher.state_dict(), strict=True)
    except (RuntimeError, TypeError, ValueError, KeyError) as e:
        raise ConfigError(f'student: kwargs {cfg.student} are incompatible with the teacher weights: {e}') from e
    prov = {'source': cfg.teacher, 'kind': 'network', 'class_name': class_name, 'init_kwargs': stored,
            'meta': normalise(meta.get('meta') or {}), 'sha256': meta['sha256']}
    return Nets(teacher, G, copy.deepcopy(G), prov)


def _in_process_nets(cfg: DistillConfig) -> Nets:
    teacher = _TEACHER_FACTORIES[cfg.teacher]()
    if cfg.teacher_kwargs is not None:
        bad = _mismatch(cfg.teacher_kwargs, _init_kwargs(teacher))
        if bad:
            raise ConfigError(f'teacher_kwargs: teacher {cfg.teacher!r} does not match expected kwargs {bad}')
    if not cfg.student:
        raise ConfigError(f'student: in-process teacher {cfg.teacher!r} has no weights to copy; '
                          'give the student architecture kwargs')
    kwargs = dict(cfg.student)
    if cfg.dropout is not None:
        kwargs['dropout'] = cfg.dropout
    for key in ('img_resolution', 'img_channels', 'label_dim'):
        want, have = int(getattr(teacher, key, 0) or 0), int(kwargs.get(key, 0) or 0)
        if want != have:
            raise ConfigError(f'student: {key}={have} does not match the teacher ({want})')
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(cfg.seed, STUDENT_INIT_STREAM))
        try:
            G = build_network(cfg.student_class, kwargs)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f'student: cannot build {cfg.student_class} from {kwargs}: {e}') from e
    prov = {'source': cfg.teacher, 'kind': 'in-process', 'init_kwargs': _init_kwargs(teacher)}
    return Nets(teacher, G, copy.deepcopy(G), prov)


def resolve_device(cfg: DistillConfig) -> torch.device:
    """``cfg.device`` as a torch device; 'auto' and 'cuda' pick this process's local GPU under torchrun."""
    if cfg.device == 'auto':
        return dist_utils.default_device()
    if cfg.device == 'cuda':
        return torch.device('cuda', dist_utils.env_local_rank())
    return torch.device(cfg.device)


def clean_grads(params, scaler=None, opt=None) -> torch.Tensor:
    """Count non-finite gradient elements and replace them (NaN -> 0, +-Inf -> +-1e5, as SiD); a dynamic scaler
    unscales first (and still skips the step). One fused check (GradScaler's kernel with scale 1, exact) first."""
    if scaler is not None:
        scaler.unscale_(opt)
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.long)
    dev = grads[0].device
    found = torch.zeros(1, device=dev)
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=dev))
    if found.item() == 0:
        return torch.zeros((), dtype=torch.long, device=dev)
    bad = sum((~torch.isfinite(g)).sum() for g in grads)
    for g in grads:
        torch.nan_to_num(g, nan=0.0, posinf=1e5, neginf=-1e5, out=g)
    return bad


def load_eval_fn(spec: Optional[str], kwargs: Optional[dict] = None) -> Optional[Callable]:
    """The function named ``'package.module:function'`` (an installed module), or what it returns when called with
    ``kwargs`` (a factory); None without a spec."""
    if spec is None:
        return None
    module, _, name = spec.partition(':')
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f'eval_fn: cannot import {spec!r}: {e}') from e
    if kwargs is None:
        return fn
    try:
        return fn(**kwargs)
    except TypeError as e:
        raise ConfigError(f'eval_kwargs: {spec} does not accept {sorted(kwargs)}: {e}') from e
