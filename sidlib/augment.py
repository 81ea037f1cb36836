"""Geometric augmentation pipeline in the style of EDM's ``AugmentPipe`` (used only in SiD's fake-score loss).

Each enabled transform is applied to a sample with probability ``strength * p`` and reports its
parameters as *augment labels*, which an EDM network built with ``augment_dim=9`` is conditioned on
(so the network can learn the un-augmented distribution). With every transform enabled
(:meth:`AugmentPipe.sid_default`, SiD's setting: xflip=1e8, yflip=scale=rotate_frac=aniso=translate_frac=1)
the 9 labels are, in order:

====  =========================================================
0     xflip (1 if flipped horizontally, else 0)
1     yflip (1 if flipped vertically)
2     scale: the normal draw w, isotropic scale 2^(w * scale_std)
3, 4  rotate: cos(angle) - 1, sin(angle)
5, 6  aniso: w cos(r), w sin(r) for scale 2^(w * aniso_std) along direction r
7, 8  translate: tx, ty (normal draws; shift = t * translate_frac_std * image size)
====  =========================================================

A transform that is not applied reports its neutral value (0), so identity samples have all-zero
labels, which is what the generator and the teacher receive.

Resampling is a bilinear ``grid_sample`` with reflection padding (not EDM's wavelet up/down
sampling), applied only to the samples that received a geometric transform.

Randomness: every sample consumes exactly 11 uniform and 4 normal numbers regardless of ``p`` and
of which transforms are enabled, from ``generator`` (one generator, per-sample generators, or torch's
global RNG), so per-sample streams stay aligned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .rng import GeneratorArg, rand, randn

__all__ = ['AugmentPipe']

_NUM_UNIFORM = 11
_NUM_NORMAL = 4


def _rot(theta):
    """Batch of 3x3 homogeneous rotation matrices by angle ``theta [N]`` (counter-clockwise)."""
    c, s = theta.cos(), theta.sin()
    z, o = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(-1, 3, 3)


def _scale(sx, sy):
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], -1).reshape(-1, 3, 3)


def _translate(tx, ty):
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], -1).reshape(-1, 3, 3)


class AugmentPipe:
    """EDM-style geometric augmentations; ``__call__(images, generator=None) -> (images, labels)``.

    Args:
        p: overall probability multiplier (SiD's ``--augment``, e.g. 0.12).
        xflip, yflip, scale, rotate_frac, aniso, translate_frac: per-transform strengths; a transform is
            enabled when > 0 and applied with probability ``min(1, strength * p)``.
        scale_std: log2 std of isotropic scaling; rotate_frac_max: max rotation as a fraction of pi;
        aniso_std: log2 std of anisotropic scaling; aniso_rotate_prob: probability of a random axis;
        translate_frac_std: std of translation as a fraction of the image size.

    Shapes: images ``[N, C, H, W]`` -> ``([N, C, H, W], labels [N, L] float32)`` where L counts the
    labels of the enabled transforms (9 when all are enabled).
    """

    def __init__(self, p=1.0, xflip=0, yflip=0, scale=0, rotate_frac=0, aniso=0, translate_frac=0,
                 scale_std=0.2, rotate_frac_max=1.0, aniso_std=0.2, aniso_rotate_prob=0.5,
                 translate_frac_std=0.125):
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
        """SiD's pipeline (its ``run_sid.sh`` augment settings): x-flip by a fair coin always, the rest gated by ``p``; 9 labels."""
        return cls(p=p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)

    @property
    def num_labels(self) -> int:
        return sum(k for on, k in [(self.xflip, 1), (self.yflip, 1), (self.scale, 1), (self.rotate_frac, 2),
                                   (self.aniso, 2), (self.translate_frac, 2)] if on > 0)

    def __call__(self, images: torch.Tensor, generator: GeneratorArg = None):
        n, _, h, w = images.shape
        dev = images.device
        u = rand(n, [_NUM_UNIFORM], generator, device=dev)
        g = randn(n, [_NUM_NORMAL], generator, device=dev)
        p = self.p
        labels = []

        def gate(col, strength):
            return u[:, col] < strength * p

        x = images
        if self.xflip > 0:
            flip = (u[:, 0] < 0.5) & gate(1, self.xflip)
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            labels.append(flip.float())
        if self.yflip > 0:
            flip = (u[:, 2] < 0.5) & gate(3, self.yflip)
            x = torch.where(flip[:, None, None, None], x.flip(2), x)
            labels.append(flip.float())

        # Inverse geometric transform: maps output pixel coordinates to input coordinates.
        eye = torch.eye(3, device=dev).expand(n, 3, 3)
        G_inv = eye
        geometric = torch.zeros(n, dtype=torch.bool, device=dev)
        if self.scale > 0:
            ws = torch.where(gate(4, self.scale), g[:, 0], torch.zeros_like(g[:, 0]))
            s = torch.exp2(ws * self.scale_std)
            G_inv = G_inv @ _scale(1 / s, 1 / s)
            geometric |= ws != 0
            labels.append(ws)
        if self.rotate_frac > 0:
            ang = (u[:, 5] * 2 - 1) * (math.pi * self.rotate_frac_max)
            ang = torch.where(gate(6, self.rotate_frac), ang, torch.zeros_like(ang))
            G_inv = G_inv @ _rot(-ang)
            geometric |= ang != 0
            labels += [ang.cos() - 1, ang.sin()]
        if self.aniso > 0:
            wa = torch.where(gate(8, self.aniso), g[:, 1], torch.zeros_like(g[:, 1]))
            r = (u[:, 7] * 2 - 1) * math.pi
            r = torch.where(u[:, 9] < self.aniso_rotate_prob, r, torch.zeros_like(r))
            s = torch.exp2(wa * self.aniso_std)
            G_inv = G_inv @ _rot(r) @ _scale(1 / s, s) @ _rot(-r)
            geometric |= wa != 0
            labels += [wa * r.cos(), wa * r.sin()]
        if self.translate_frac > 0:
            on = gate(10, self.translate_frac)
            tx = torch.where(on, g[:, 2], torch.zeros_like(g[:, 2]))
            ty = torch.where(on, g[:, 3], torch.zeros_like(g[:, 3]))
            G_inv = G_inv @ _translate(-tx * w * self.translate_frac_std, -ty * h * self.translate_frac_std)
            geometric |= (tx != 0) | (ty != 0)
            labels += [tx, ty]

        if bool(geometric.any()):
            x = self._warp(x, G_inv, geometric)
        lab = torch.stack(labels, 1).to(torch.float32) if labels else torch.zeros([n, 0], device=dev)
        return x, lab

    @staticmethod
    def _warp(x, G_inv, which):
        """Resample the samples selected by ``which`` [N] bool through ``G_inv`` [N, 3, 3] (pixel units, centred)."""
        idx = which.nonzero().squeeze(1)
        xs = x[idx]
        m, c, h, w = xs.shape
        dev = x.device
        # Pixel centres in centred pixel units (x right, y down).
        px = torch.arange(w, device=dev, dtype=torch.float32) + 0.5 - w / 2
        py = torch.arange(h, device=dev, dtype=torch.float32) + 0.5 - h / 2
        yy, xx = torch.meshgrid(py, px, indexing='ij')
        coords = torch.stack([xx, yy, torch.ones_like(xx)], -1).reshape(1, h * w, 3)
        src = coords @ G_inv[idx].transpose(1, 2)  # [m, HW, 3]
        grid = torch.stack([src[..., 0] / (w / 2), src[..., 1] / (h / 2)], -1).reshape(m, h, w, 2)
        warped = F.grid_sample(xs.float(), grid, mode='bilinear', padding_mode='reflection',
                               align_corners=False).to(x.dtype)
        out = x.clone()
        out[idx] = warped
        return out
