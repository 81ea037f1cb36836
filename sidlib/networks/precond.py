"""Preconditioning ``D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c)`` (EDM's ``training/networks.py``).

The wrappers take EDM's constructor kwargs (so an EDM/SiD pickle's ``_init_kwargs`` builds them) and hold the inner
network as ``model`` (state_dict keys ``model.*``). They take and return fp32; :func:`set_precision` decides how the
inner network computes: ``'fp32'``; ``'fp16'`` (EDM's ``use_fp16``: ``c_in x`` cast to fp16, weights cast at call
time, attention logits/softmax and the mapping network from the fp32 noise and class labels in fp32, no autocast);
``'bf16'`` (``torch.autocast(bfloat16)``); None (EDM's default: fp16 as above on CUDA when built with ``use_fp16``,
else fp32). ``force_fp32=True`` (EDM's argument) runs one call in fp32 whatever the setting.
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

#: Precision name -> dtype of the inner network's activations.
PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (bool, str, type(None))) or isinstance(value, numbers.Number):
        return value
    raise TypeError(f'constructor argument {value!r} of type {type(value).__name__} is not JSON-serialisable')


class _Precond(torch.nn.Module):
    """Shared machinery: labels, precision, the skip combination and ``init_kwargs``; subclasses define
    ``coefficients(sigma) -> (c_skip, c_out, c_in, c_noise)`` for fp32 ``sigma``."""

    def __init_subclass__(cls, **kwargs):
        """Subclasses record ``self.init_kwargs`` = the constructor arguments actually passed (``**model_kwargs``
        flattened in, defaults left out, as EDM's ``_init_kwargs``), so ``cls(**net.init_kwargs)`` rebuilds the net."""
        super().__init_subclass__(**kwargs)
        original = cls.__init__
        signature = inspect.signature(original)

        @functools.wraps(original)
        def __init__(self, *args, **kwargs):
            recorded = dict(signature.bind(self, *args, **kwargs).arguments)
            del recorded['self']
            recorded.update(recorded.pop('model_kwargs', {}))
            original(self, *args, **kwargs)
            self.init_kwargs = _jsonable(recorded)

        cls.__init__ = __init__

    def __init__(self, img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs):
        super().__init__()
        if model_type not in MODEL_TYPES:
            raise ValueError(f'unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}')
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.use_fp16 = use_fp16
        self.precision = None  # see set_precision()
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                             out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)

    def compute_dtype(self, device, force_fp32=False):
        """dtype of the inner network's activations on ``device`` (see the module docstring)."""
        if force_fp32:
            return torch.float32
        if self.precision is not None:
            return PRECISIONS[self.precision]
        return torch.float16 if (self.use_fp16 and torch.device(device).type == 'cuda') else torch.float32

    def forward(self, x, sigma, class_labels=None, force_fp32=False, augment_labels=None, **model_kwargs):
        """``D(x; sigma, class_labels)`` in fp32. ``x [N, C, R, R]``; ``sigma`` scalar, ``[N]`` or ``[N, 1, 1, 1]``;
        ``class_labels [N, label_dim]`` one-hot (None: EDM's all-zero row); ``augment_labels [N, augment_dim]``."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        dtype = self.compute_dtype(x.device, force_fp32)
        autocast = dtype == torch.bfloat16
        with torch.autocast(x.device.type, dtype=dtype) if autocast else contextlib.nullcontext():
            F_x = self.model((c_in * x).to(torch.float32 if autocast else dtype), c_noise.flatten(),
                             class_labels=class_labels, augment_labels=augment_labels, **model_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


class EDMPrecond(_Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1): with ``s = sigma``, ``sd = sigma_data``,
    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``,
    ``c_noise = ln(s) / 4``. ``model_type``: 'SongUNet', 'DhariwalUNet' or 'MLPNet'; ``**model_kwargs`` go to it."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float('inf'), sigma_data=0.5, model_type='DhariwalUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefficients(self, sigma):
        sd2 = self.sigma_data ** 2
        return (sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt(),
                1 / (sd2 + sigma ** 2).sqrt(), sigma.log() / 4)


class VPPrecond(_Precond):
    """Variance-preserving preconditioning (EDM's Table 1, "VP"): ``c_skip = 1``, ``c_out = -sigma``,
    ``c_in = 1 / sqrt(sigma^2 + 1)``, ``c_noise = (M - 1) t(sigma)`` for ``sigma(t) = sqrt(exp(beta_d t^2 / 2 +
    beta_min t) - 1)``; ``sigma_min = sigma(epsilon_t)``, ``sigma_max = sigma(1)``."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9,
                 beta_min=0.1, M=1000, epsilon_t=1e-5, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min, self.sigma_max = float(self.sigma(epsilon_t)), float(self.sigma(1))

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Variance-exploding preconditioning (EDM's Table 1, "VE"): ``c_skip = 1``, ``c_out = sigma``, ``c_in = 1``,
    ``c_noise = ln(sigma / 2)``."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02,
                 sigma_max=100, model_type='SongUNet', **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, model_kwargs)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


PRECOND_TYPES = {'EDMPrecond': EDMPrecond, 'VPPrecond': VPPrecond, 'VEPrecond': VEPrecond}


def build_network(class_name, init_kwargs):
    """A freshly initialised ``PRECOND_TYPES[class_name](**init_kwargs)`` (e.g. from an EDM pickle's
    ``_init_kwargs``); load a state_dict afterwards."""
    if class_name not in PRECOND_TYPES:
        raise ValueError(f'unknown network class {class_name!r}; expected one of {sorted(PRECOND_TYPES)}')
    return PRECOND_TYPES[class_name](**dict(init_kwargs))


def set_precision(net: torch.nn.Module, precision: str | None) -> torch.nn.Module:
    """Set how every preconditioned network inside ``net`` computes: ``'fp32'``, ``'bf16'``, ``'fp16'``, or None
    for EDM's default (``use_fp16``); see the module docstring. Other modules are left alone. Returns ``net``."""
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {sorted(PRECISIONS)} or None, got {precision!r}')
    for m in net.modules():
        if isinstance(m, _Precond):
            m.precision = precision
    return net
