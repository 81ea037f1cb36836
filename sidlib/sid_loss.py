"""SiD's two losses of one iteration (``SID_EDMLoss`` in SiD's ``training/sid_loss.py``): draw the noise, call the
networks, return the per-element losses of the kept samples (the loop sums them times ``ls`` / ``lsg`` over the
per-process batch). Draws per sample, in order, for every row kept or not: fake-score loss: log-normal sigma,
augmentation, noise (EDM's order); generator loss: u ~ U(0, tmax/1000), noise.

Non-finite samples cost only their own row (SiD drops them after the networks ran, where 0 * NaN poisons every
weight gradient): a non-finite row of ``x_g`` is zeroed before any network sees it and dropped from the loss; when
a network yields non-finite values from finite rows, the loss is recomputed on the rows whose outputs were finite
with the same sigma, noise and augmentation (the fake score's dropout in its own loss is drawn anew), and rows
still non-finite are dropped (their gradients left to the loop's NaN -> 0 replacement, as SiD). NaN produced inside
G itself is the loop's business (``sidlib.distill.loop``).
"""

from __future__ import annotations

import torch

from .losses import EDMLoss, finite_sample_mask, sample_sid_sigma, sid_generator_loss
from .rng import GeneratorArg, randn
from .sampling import augment_zeros, sid_call

__all__ = ['SiDLoss']


def _finite_loss(loss_fn, x, *tensors):
    """``loss_fn(x, *tensors)`` -> per-element loss, on rows of ``x [N, ...]`` and ``tensors`` (``[N, ...]`` or None)
    whose non-finite rows of x are zeroed first. Returns ``(loss of the kept rows, keep [N])`` with no NaN in the
    graph of the kept rows (module docstring)."""
    ok = finite_sample_mask(x)
    x = torch.where(ok.reshape(-1, *[1] * (x.dim() - 1)), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def run(rows):  # rows: indices, None for all
        return loss_fn(*[t if t is None or rows is None else t[rows] for t in (x, *tensors)])
    loss = run(None)
    keep = ok & finite_sample_mask(loss)
    if bool(keep.all()):  # the one synchronisation of the usual case
        return loss, keep
    if bool((keep == ok).all()) or not bool(keep.any()):  # only zeroed input rows (exactly zero gradient), or none
        return loss[keep], keep
    idx = keep.nonzero().squeeze(1)
    loss = run(idx)
    again = finite_sample_mask(loss)
    keep[idx[~again]] = False
    return loss[again], keep


class SiDLoss:
    """SiD's fake-score and generator losses. ``alpha``: weight of the squared teacher-fake gap (1.2 in the paper);
    ``tmax``: top of the generator loss's noise range in 1/1000 of the rho-schedule (800: sigma <= 24.4);
    ``augment_pipe``: applied to x_g in the fake-score loss, or None; ``P_mean, P_std, sigma_data``: EDM's."""

    def __init__(self, alpha: float = 1.2, tmax: float = 800.0, augment_pipe=None, P_mean: float = -1.2,
                 P_std: float = 1.2, sigma_data: float = 0.5):
        self.alpha, self.tmax, self.augment_pipe = float(alpha), float(tmax), augment_pipe
        self.edm = EDMLoss(P_mean, P_std, sigma_data)

    def fake_score_loss(self, fake, x_g: torch.Tensor, labels=None, generator: GeneratorArg = None):
        """EDM loss of the fake score on ``x_g [N, C, H, W]`` (detached). Returns ``(loss [M, C, H, W] float32,
        keep [N] bool)``."""
        x_g = x_g.detach().to(torch.float32)
        n, dev = x_g.shape[0], x_g.device
        sigma = self.edm.sample_sigma(n, generator, device=dev)
        if self.augment_pipe is not None:
            y, aug = self.augment_pipe(x_g, generator=generator)
        else:
            y, aug = x_g, augment_zeros(fake, n, dev)
        noise = randn(n, y.shape[1:], generator, device=dev)

        def loss_fn(y, labels, sigma, noise, aug):
            return self.edm(fake, y, labels, sigma=sigma, noise=noise, augment_labels=aug).to(torch.float32)
        return _finite_loss(loss_fn, y, labels, sigma, noise, aug)

    def generator_loss(self, teacher, fake, x_g: torch.Tensor, labels=None, generator: GeneratorArg = None):
        """SiD's generator loss for ``x_g [N, C, H, W]`` (with graph into G): ``x_t = x_g + sigma n``,
        ``y_real = teacher(x_t)``, ``y_fake = fake(x_t)`` (both frozen by the caller; gradients reach G through
        ``x_t``). Returns ``(loss [M, C, H, W] float32, keep [N] bool)``."""
        n = x_g.shape[0]
        x_g = x_g.to(torch.float32)
        sigma = sample_sid_sigma(n, self.tmax, generator=generator, device=x_g.device)
        noise = randn(n, x_g.shape[1:], generator, device=x_g.device)
        if x_g.dim() == 4 and not x_g.is_contiguous() and x_g.is_contiguous(memory_format=torch.channels_last):
            noise = noise.contiguous(memory_format=torch.channels_last)

        def loss_fn(x_g, labels, sigma, noise):
            x_t = x_g + sigma * noise
            return sid_generator_loss(x_g, sid_call(teacher, x_t, sigma, labels), sid_call(fake, x_t, sigma, labels),
                                      self.alpha)
        return _finite_loss(loss_fn, x_g, labels, sigma, noise)
