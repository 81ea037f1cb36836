"""Preconditioning wrappers ``D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c)``.

``EDMPrecond``, ``VPPrecond`` and ``VEPrecond`` take EDM's constructor kwargs, so the
``_init_kwargs`` stored in an EDM/SiD pickle build them directly, and they hold the inner network
as the child ``model`` (state_dict keys ``model.*``, no tensors of their own).

Precision: the wrappers always take and return fp32; the inner network's precision is one setting,
:func:`set_precision` (``'fp32'``, ``'bf16'`` or ``'fp16'``), which the distillation loop applies to all four
networks from ``DistillConfig.precision``. ``'fp32'`` is full precision whatever the checkpoint's ``use_fp16``
says; ``'bf16'``/``'fp16'`` run the inner network under ``torch.autocast``. A network whose precision was never
set behaves as EDM's does: fp16 on CUDA when built with ``use_fp16``, else fp32 (EDM's ``force_fp32`` argument
keeps its meaning).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import numbers

import numpy as np
import torch

from .dhariwal_unet import DhariwalUNet
from .mlp import MLPNet
from .song_unet import SongUNet

__all__ = ['EDMPrecond', 'VPPrecond', 'VEPrecond', 'MODEL_TYPES', 'PRECOND_TYPES', 'PRECISIONS', 'build_network',
           'set_precision']

MODEL_TYPES = {'SongUNet': SongUNet, 'DhariwalUNet': DhariwalUNet, 'MLPNet': MLPNet}

#: Precision name -> autocast dtype of the inner network (None: no autocast).
PRECISIONS = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _jsonable(value):
    """``value`` with tuples turned into lists and numpy scalars/arrays into Python objects."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, str, type(None))) or isinstance(value, numbers.Number):
        return value
    raise TypeError(f'constructor argument {value!r} of type {type(value).__name__} is not JSON-serialisable')


def _records_init_kwargs(cls):
    """Class decorator: store the constructor arguments actually passed as ``self.init_kwargs``.

    Positional arguments are recorded under their names; ``**model_kwargs`` are flattened in; defaults
    that were not passed are left out (as in EDM's ``_init_kwargs``), so ``cls(**net.init_kwargs)``
    rebuilds the same architecture and the dict stays small.
    """
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        recorded = {}
        for name, value in bound.arguments.items():
            if name == 'self':
                continue
            if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
                recorded.update(value)
            else:
                recorded[name] = value
        original(self, *args, **kwargs)
        self.init_kwargs = _jsonable(recorded)

    cls.__init__ = __init__
    return cls


class _Precond(torch.nn.Module):
    """Shared machinery: label handling, precision policy and the skip combination."""

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f'unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}')
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.precision = None  # see set_precision()
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def coefficients(self, sigma):
        """``(c_skip, c_out, c_in, c_noise)`` for fp32 ``sigma`` (any shape; returned in that shape)."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        """Nearest noise level the network supports (identity for continuous-time wrappers)."""
        return torch.as_tensor(sigma)

    def autocast_dtype(self, device, force_fp32=False):
        """dtype the inner network runs in under autocast on ``device``, or None for plain fp32."""
        if force_fp32:
            return None
        if self.precision is not None:
            return PRECISIONS[self.precision]
        return torch.float16 if (self.use_fp16 and torch.device(device).type == 'cuda') else None

    def _labels(self, class_labels, x):
        if self.label_dim == 0:
            return None
        if class_labels is None:
            # EDM feeds an all-zero label row (broadcast over the batch) when none is given.
            return torch.zeros([1, self.label_dim], device=x.device)
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        """Denoised estimate ``D(x; sigma, class_labels)``.

        Args:
            x: noisy images ``[N, C, R, R]`` (any float dtype; computed in fp32).
            sigma: noise level(s) in data units: a scalar, ``[N]`` or ``[N, 1, 1, 1]``.
            class_labels: one-hot ``[N, label_dim]`` (or None -> zero row) for conditional nets.
            force_fp32: run the inner network in fp32 whatever the precision (EDM's argument).
            augment_labels: ``[N, augment_dim]`` augmentation conditioning, or None.

        Returns the fp32 denoised images ``[N, C, R, R]``.
        """
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        class_labels = self._labels(class_labels, x)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        dtype = self.autocast_dtype(x.device, force_fp32)
        context = (torch.autocast(device_type=x.device.type, dtype=dtype) if dtype is not None
                   else contextlib.nullcontext())
        with context:
            F_x = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels,
                             augment_labels=augment_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


@_records_init_kwargs
class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1).

    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``,
    ``c_noise = ln(s) / 4`` with ``s = sigma`` and ``sd = sigma_data``.

    Args:
        img_resolution, img_channels: image side length and channels.
        label_dim: number of classes (0 = unconditional).
        use_fp16: EDM's flag: fp16 on CUDA unless :func:`set_precision` says otherwise.
        sigma_min, sigma_max: supported noise range (informational, used by samplers).
        sigma_data: data standard deviation (0.5 for images in [-1, 1]).
        model_type: 'SongUNet', 'DhariwalUNet' or 'MLPNet'.
        **model_kwargs: passed to the inner network.

    Attributes: the arguments above, ``model`` and ``init_kwargs`` (the passed constructor kwargs).
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


@_records_init_kwargs
class VPPrecond(_Precond):
    """Variance-preserving preconditioning (DDPM++ "VP" in EDM's Table 1).

    ``c_skip = 1``, ``c_out = -sigma``, ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_noise = (M - 1) t(sigma)``
    with the VP schedule ``sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)``.
    ``sigma_min = sigma(epsilon_t)``, ``sigma_max = sigma(1)``.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9,
                 beta_min=0.1, M=1000, epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        """Noise level at time ``t`` in [0, 1]."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """Time ``t`` at which the schedule reaches ``sigma``."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


@_records_init_kwargs
class VEPrecond(_Precond):
    """Variance-exploding preconditioning (NCSN++ "VE" in EDM's Table 1).

    ``c_skip = 1``, ``c_out = sigma``, ``c_in = 1``, ``c_noise = ln(sigma / 2)``.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02,
                 sigma_max=100, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        c_skip = torch.ones_like(sigma)
        c_out = sigma
        c_in = torch.ones_like(sigma)
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


PRECOND_TYPES = {'EDMPrecond': EDMPrecond, 'VPPrecond': VPPrecond, 'VEPrecond': VEPrecond}


def build_network(class_name, init_kwargs):
    """Instantiate a preconditioned network from its class name and constructor kwargs.

    ``class_name`` is a key of :data:`PRECOND_TYPES`; ``init_kwargs`` is e.g. the ``_init_kwargs``
    of an EDM pickle or the ``init_kwargs`` saved beside a sidlib checkpoint. Weights are freshly
    initialised; load a state_dict afterwards.
    """
    if class_name not in PRECOND_TYPES:
        raise ValueError(f'unknown network class {class_name!r}; expected one of {sorted(PRECOND_TYPES)}')
    return PRECOND_TYPES[class_name](**dict(init_kwargs))


def set_precision(net: torch.nn.Module, precision: str | None) -> torch.nn.Module:
    """Set how every preconditioned network inside ``net`` computes: ``'fp32'``, ``'bf16'``, ``'fp16'``, or None
    for EDM's default (``use_fp16``). Other modules (e.g. an analytic teacher) are left as they are. Returns ``net``."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {sorted(PRECISIONS)} or None, got {precision!r}')
    for m in net.modules():
        if isinstance(m, _Precond):
            m.precision = precision
    return net
