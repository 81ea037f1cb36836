"""Image metrics of generated digits: FID, KID, precision and recall (torch-fidelity) in the 128-d features of the
pipeline's digit classifier, against the held-out test split; class accuracy of conditional samples."""
from __future__ import annotations

import torch

from sidlib.metrics import compute_metrics
from sidlib.rng import inputs_for_seeds
from sidlib.sampling import edm_sigmas, generate_onestep, heun_sampler, to_uint8

from .classifier import load_classifier, predict, register_digits_extractor
from .data import IMG_CHANNELS, IMG_RESOLUTION, load_digits_split

__all__ = ["ImageMetrics", "student_samples", "teacher_samples", "SHAPE"]

SHAPE = [IMG_CHANNELS, IMG_RESOLUTION, IMG_RESOLUTION]


class ImageMetrics:
    """``metrics(images [N, 1, 8, 8] in [-1, 1], labels [N, 10] | None) -> {fid, kid, precision, recall,
    class_accuracy}``. Images are quantised as EDM exports samples (:func:`sidlib.sampling.to_uint8`), like the
    reference images, before the classifier sees them."""

    def __init__(self, classifier, *, split_seed: int = 0, num_train: int = 1400):
        self.classifier = classifier if isinstance(classifier, torch.nn.Module) else load_classifier(classifier)[0]
        self.extractor = register_digits_extractor(self.classifier)
        self.reference = to_uint8(load_digits_split(split_seed, num_train).test_images)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor | None = None, *, kid: bool = True,
                 prc: bool = True) -> dict:
        gen = to_uint8(images.detach().float())
        raw = compute_metrics(gen, self.reference, feature_extractor=self.extractor, fid=True, kid=kid, prc=prc,
                              batch_size=1000)
        out = {"fid": raw["fid"]}
        if kid:
            out["kid"] = raw["kid_mean"]
        if prc:
            out.update(precision=raw["precision"], recall=raw["recall"])
        if labels is not None:
            out["class_accuracy"] = float((predict(self.classifier, gen) == labels.argmax(1).cpu()).double().mean())
        return out


@torch.no_grad()
def student_samples(G, seeds, init_sigma: float, label_dim: int, batch: int = 1000):
    """One-step samples ``[N, 1, 8, 8]`` and one-hot labels (or None) for ``seeds``: EDM's per-seed latents and labels
    (:func:`sidlib.rng.inputs_for_seeds`), the same as :func:`teacher_samples` draws for the same seeds."""
    xs, ls = [], []
    for i in range(0, len(seeds), batch):
        s = seeds[i:i + batch]
        z, lab, _ = inputs_for_seeds(s, SHAPE, label_dim)
        xs.append(generate_onestep(G, z, init_sigma, lab))
        ls.append(lab)
    return torch.cat(xs), (torch.cat(ls) if label_dim else None)


@torch.no_grad()
def teacher_samples(net, seeds, nfe: int, label_dim: int, batch: int = 1000):
    """Deterministic Heun samples at ``nfe`` network evaluations (EDM's grid; 18 steps for 35), integrated in float64
    as EDM does, from the same per-seed latents and labels as :func:`student_samples`. Returns (images, labels, nfe)."""
    sigmas = edm_sigmas((nfe + 1) // 2)
    xs, ls, used = [], [], 0
    for i in range(0, len(seeds), batch):
        s = seeds[i:i + batch]
        z, lab, _ = inputs_for_seeds(s, SHAPE, label_dim)
        x, used = heun_sampler(net, z.double() * sigmas[0], sigmas, class_labels=lab)
        xs.append(x.float())
        ls.append(lab)
    return torch.cat(xs), (torch.cat(ls) if label_dim else None), used
