"""SiD's loss object: both losses of one iteration draw their noise, call the networks and return per-element losses.

Mirrors ``SID_EDMLoss`` in SiD's ``training/sid_loss.py``: the training loop generates ``x_g = G(init_sigma z)``
and hands it over; the loss draws sigma, noise (and augmentations) from ``generator``, calls the fake score and,
for the generator loss, the teacher, drops samples with non-finite values, and returns the per-element loss of the
kept samples. The loop owns the reduction (sum times ``ls`` or ``lsg`` over the per-process batch).

Random draws per sample, in this order: fake-score loss: log-normal sigma, augmentation, noise (EDM's order);
generator loss: u ~ U(0, tmax/1000), noise.
"""

from __future__ import annotations

import torch

from .losses import EDMLoss, finite_sample_mask, sample_sid_sigma, sid_generator_loss
from .rng import GeneratorArg, randn
from .sampling import augment_zeros

__all__ = ['SiDLoss']


class SiDLoss:
    """The fake-score and generator losses of SiD.

    Args:
        alpha: weight of the squared teacher-fake gap in the generator loss (1.2 in the paper's runs).
        tmax: upper end of the generator loss's noise range, in 1/1000 units of the rho-schedule (800: sigma <= 24.4).
        augment_pipe: :class:`sidlib.augment.AugmentPipe` applied to x_g in the fake-score loss, or None.
        P_mean, P_std, sigma_data: EDM's log-normal training distribution and data std (fake-score loss).
    """

    def __init__(self, alpha: float = 1.2, tmax: float = 800.0, augment_pipe=None, P_mean: float = -1.2,
                 P_std: float = 1.2, sigma_data: float = 0.5):
        self.alpha, self.tmax, self.augment_pipe = float(alpha), float(tmax), augment_pipe
        self.edm = EDMLoss(P_mean, P_std, sigma_data)

    def fake_score_loss(self, fake, x_g: torch.Tensor, labels=None, generator: GeneratorArg = None):
        """EDM loss of the fake score on generated images ``x_g`` ``[N, C, H, W]`` (no graph into G).

        Returns ``(loss [M, C, H, W] float32, keep [N] bool)``: the M rows whose loss is finite.
        """
        x_g = x_g.detach().to(torch.float32)
        aug = None if self.augment_pipe is not None else augment_zeros(fake, x_g.shape[0], x_g.device)
        loss = self.edm(fake, x_g, labels, augment_pipe=self.augment_pipe, generator=generator,
                        augment_labels=aug).to(torch.float32)
        keep = finite_sample_mask(loss)
        return (loss if bool(keep.all()) else loss[keep]), keep

    def generator_loss(self, teacher, fake, x_g: torch.Tensor, labels=None, generator: GeneratorArg = None):
        """SiD's generator loss for generated images ``x_g`` ``[N, C, H, W]`` (with graph into G).

        ``x_t = x_g + sigma n``; ``y_real = teacher(x_t)``, ``y_fake = fake(x_t)``; both networks are frozen by the
        caller and gradients reach G through ``x_t``. Returns ``(loss [M, C, H, W] float32, keep [N] bool)``,
        where the M kept rows are free of NaN/Inf in x_g, y_real and y_fake.
        """
        n = x_g.shape[0]
        x_g = x_g.to(torch.float32)
        sigma = sample_sid_sigma(n, self.tmax, generator=generator, device=x_g.device)
        noise = randn(n, x_g.shape[1:], generator, device=x_g.device)
        if x_g.dim() == 4 and not x_g.is_contiguous() and x_g.is_contiguous(memory_format=torch.channels_last):
            noise = noise.contiguous(memory_format=torch.channels_last)
        x_t = x_g + sigma * noise
        y_real = _call(teacher, x_t, sigma, labels)
        y_fake = _call(fake, x_t, sigma, labels)
        keep = finite_sample_mask(x_g, y_real, y_fake)
        if not bool(keep.all()):
            # Select before the formula: a bad row's NaN normaliser would turn its zero gradient into NaN on the
            # way back to G.
            x_g, y_real, y_fake = x_g[keep], y_real[keep], y_fake[keep]
        return sid_generator_loss(x_g, y_real, y_fake, self.alpha), keep


def _call(net, x, sigma, labels):
    aug = augment_zeros(net, x.shape[0], x.device)
    kw = {} if aug is None else {'augment_labels': aug}
    return net(x, sigma, labels, **kw).to(torch.float32)
