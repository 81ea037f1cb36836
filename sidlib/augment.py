"""Geometric augmentation of EDM's ``training/augment.py`` ``AugmentPipe`` (SiD uses it in the fake-score loss).

Each enabled transform is applied to a sample with probability ``strength * p`` and reported as *augment labels*,
which a network built with ``augment_dim=9`` is conditioned on. With every transform on (:meth:`sid_default`) the
9 labels are, in order: xflip, yflip (0/1); scale (the normal draw w, scale ``2^(w scale_std)``); rotation
``cos(a) - 1, sin(a)``; anisotropy ``w cos(r), w sin(r)`` (scale ``2^(w aniso_std)`` along the axis at angle r);
translation ``tx, ty`` (normal draws, shift ``t translate_frac_std`` of the image size). A transform not applied
reports 0, so untouched samples have all-zero labels, as the generator and the teacher receive.

Geometry follows EDM's convention. In pixel coordinates centred on the image (x right, y down) the output pixel p
samples the input at ``G_inv p`` with ``G_inv = S(1/s) rot(a) rot(-r) S(1/s_a, s_a) rot(r) T(-t)`` (scale, rotation,
anisotropy, translation), ``rot(a) = [[cos a, -sin a], [sin a, cos a]]``: content moves by ``rot(-a)`` (on screen,
counter-clockwise for a > 0) and stretches by ``s_a`` along ``(cos r, -sin r)``.

Resampling is EDM's scheme (reflect padding, 2x upsampling with the sym6 low-pass filter, bilinear sampling, 2x
downsampling), applied to the samples with a geometric transform only; equal to EDM's ``AugmentPipe`` up to fp32
rounding (``tests/test_official.py``). Every sample consumes 11 uniform and 4 normal numbers from ``generator``
whatever ``p`` and the enabled transforms, so per-sample streams stay aligned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rng import GeneratorArg, rand, randn

__all__ = ['AugmentPipe']

_NUM_UNIFORM, _NUM_NORMAL = 11, 4

#: Low-pass decomposition filter of the sym6 wavelet (PyWavelets ``pywt.Wavelet('sym6').dec_lo``).
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633, 0.4910559419267466,
        0.787641141030194, 0.3379294217276218, -0.07263752278646252, -0.021060292512300564, 0.04472490177066578,
        0.0017677118642428036, -0.007800708325034148)


def _mat(rows, like):
    """Batch of 3x3 matrices from nine ``[N]`` tensors / numbers (row-major)."""
    return torch.stack([torch.as_tensor(v, dtype=like.dtype, device=like.device).expand_as(like) for v in rows],
                       -1).reshape(-1, 3, 3)


def _rot(theta):
    c, s = theta.cos(), theta.sin()
    return _mat([c, -s, 0, s, c, 0, 0, 0, 1], theta)


def _scale(sx, sy):
    return _mat([sx, 0, 0, 0, sy, 0, 0, 0, 1], sx)


def _translate(tx, ty):
    return _mat([1, 0, tx, 0, 1, ty, 0, 0, 1], tx)


class AugmentPipe:
    """EDM's geometric augmentations: ``__call__(images [N, C, H, W], generator=None) -> (images, labels [N, L])``.

    ``p``: overall probability multiplier (SiD's ``--augment``). ``xflip, yflip, scale, rotate_frac, aniso,
    translate_frac``: per-transform strengths (enabled when > 0, applied with probability ``strength * p``).
    ``scale_std`` / ``aniso_std``: log2 std; ``rotate_frac_max``: largest angle as a fraction of pi;
    ``aniso_rotate_prob``: probability of a random anisotropy axis; ``translate_frac_std``: as a fraction of the size.
    """

    def __init__(self, p=1.0, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0,
                 scale_std=0.2, rotate_frac_max=1.0, aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125):
        if not 0 <= float(p) <= 1:
            raise ValueError(f'augment probability p must be in [0, 1], got {p}')
        self.p = float(p)
        self.xflip, self.yflip, self.scale = float(xflip), float(yflip), float(scale)
        self.rotate_frac, self.aniso, self.translate_frac = float(rotate_frac), float(aniso), float(translate_frac)
        self.scale_std, self.rotate_frac_max = float(scale_std), float(rotate_frac_max)
        self.aniso_std, self.aniso_rotate_prob = float(aniso_std), float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)

    @classmethod
    def sid_default(cls, p: float) -> 'AugmentPipe':
        """SiD's pipeline (``sid_train.py``): x-flip by a fair coin always, the rest gated by ``p``; 9 labels."""
        return cls(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    def __call__(self, images: torch.Tensor, generator: GeneratorArg = None):
        n, _, h, w = images.shape
        dev = images.device
        u = rand(n, [_NUM_UNIFORM], generator, device=dev)
        g = randn(n, [_NUM_NORMAL], generator, device=dev)
        zero = torch.zeros(n, device=dev)
        labels = []

        def gate(col, strength):
            return u[:, col] < strength * self.p

        x = images
        for strength, coin, col, dim in ((self.xflip, 0, 1, 3), (self.yflip, 2, 3, 2)):
            if strength > 0:
                flip = (u[:, coin] < 0.5) & gate(col, strength)
                x = torch.where(flip[:, None, None, None], x.flip(dim), x)
                labels.append(flip.float())
        G_inv = torch.eye(3, device=dev).expand(n, 3, 3)
        geometric = torch.zeros(n, dtype=torch.bool, device=dev)
        if self.scale > 0:
            ws = torch.where(gate(4, self.scale), g[:, 0], zero)
            s = torch.exp2(ws * self.scale_std)
            G_inv, geometric = G_inv @ _scale(1 / s, 1 / s), geometric | (ws != 0)
            labels.append(ws)
        if self.rotate_frac > 0:
            ang = torch.where(gate(6, self.rotate_frac), (u[:, 5] * 2 - 1) * (math.pi * self.rotate_frac_max), zero)
            G_inv, geometric = G_inv @ _rot(ang), geometric | (ang != 0)
            labels += [ang.cos() - 1, ang.sin()]
        if self.aniso > 0:
            wa = torch.where(gate(8, self.aniso), g[:, 1], zero)
            r = torch.where(u[:, 9] < self.aniso_rotate_prob, (u[:, 7] * 2 - 1) * math.pi, zero)
            s = torch.exp2(wa * self.aniso_std)
            G_inv, geometric = G_inv @ _rot(-r) @ _scale(1 / s, s) @ _rot(r), geometric | (wa != 0)
            labels += [wa * r.cos(), wa * r.sin()]
        if self.translate_frac > 0:
            on = gate(10, self.translate_frac)
            tx, ty = torch.where(on, g[:, 2], zero), torch.where(on, g[:, 3], zero)
            G_inv = G_inv @ _translate(-tx * w * self.translate_frac_std, -ty * h * self.translate_frac_std)
            geometric |= (tx != 0) | (ty != 0)
            labels += [tx, ty]
        if bool(geometric.any()):
            idx = geometric.nonzero().squeeze(1)
            x = x.clone()
            x[idx] = _warp(x[idx].float(), G_inv[idx]).to(x.dtype)
        lab = torch.stack(labels, 1).to(torch.float32) if labels else torch.zeros([n, 0], device=dev)
        return x, lab


def _warp(x, G_inv):
    """Resample ``x [M, C, H, W]`` so that output pixel p shows input position ``G_inv[m] p`` (centred pixel units),
    with EDM's wavelet scheme (module docstring)."""
    m, c, h, w = x.shape
    taps = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
    kx, ky = taps.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1), taps.reshape(1, 1, -1, 1).repeat(c, 1, 1, 1)
    L, q = len(SYM6), len(SYM6) // 4  # q: the margin, in input pixels, that the filters need
    # Reflect padding that covers where the image corners land (plus the filters' support), at most size - 1.
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = torch.tensor([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], dtype=x.dtype, device=x.device)
    reach = (G_inv @ corners)[:, :2]  # [M, xy, corner]
    centre, limit = torch.tensor([cx, cy], device=x.device), torch.tensor([w - 1, h - 1], device=x.device)
    pad = torch.stack([(-reach).amax(dim=(0, 2)), reach.amax(dim=(0, 2))]) + 2 * q - centre  # [before/after, xy]
    (px0, py0), (px1, py1) = pad.clamp(min=0).minimum(limit).ceil().int().tolist()
    x = F.pad(x, [px0, px1, py0, py1], mode='reflect')
    wp, hp = w + px0 + px1, h + py0 + py1
    # 2x upsampling (transposed convolution with the filter, separable: x, then y).
    x = F.conv_transpose2d(x, kx, stride=(1, 2), padding=(0, L // 2 - 1), groups=c)
    x = F.conv_transpose2d(x, ky, stride=(2, 1), padding=(L // 2 - 1, 0), groups=c)
    # Sampling grid: 2(H + 2q) x 2(W + 2q) points; point j sits at (j + 1) / 2 - (size + 2q) / 2 in centred input
    # pixels; its source G_inv p, shifted into the padded image, lies at upsampled pixel 2 q_pad + size_pad - 1.
    gx = (torch.arange(2 * (w + 2 * q), dtype=x.dtype, device=x.device) + 1) / 2 - (w + 2 * q) / 2
    gy = (torch.arange(2 * (h + 2 * q), dtype=x.dtype, device=x.device) + 1) / 2 - (h + 2 * q) / 2
    yy, xx = torch.meshgrid(gy, gx, indexing='ij')
    src = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(1, -1, 3) @ G_inv.transpose(1, 2)
    ix = 2 * (src[..., 0] + (px0 - px1) / 2) + wp - 1
    iy = 2 * (src[..., 1] + (py0 - py1) / 2) + hp - 1
    grid = torch.stack([(2 * ix + 1) / (2 * wp) - 1, (2 * iy + 1) / (2 * hp) - 1], -1).reshape(m, *yy.shape, 2)
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    # 2x downsampling with the filter, dropping the q-pixel margin.
    x = F.conv2d(x, kx, stride=(1, 2), padding=(0, L // 2 - 1), groups=c)[:, :, :, q:-q]
    return F.conv2d(x, ky, stride=(2, 1), padding=(L // 2 - 1, 0), groups=c)[:, :, q:-q, :]
