"""Tiny stand-ins for the evaluation tests: an Inception-like feature extractor, reference stats, a generator.

Importing this module registers :data:`TINY` with torch-fidelity (idempotently), so subprocesses (torchrun ranks) load
it with ``python -m sidlib.metrics calc --import eval_fixtures ...`` when ``tests/`` is on ``PYTHONPATH``.

:class:`TinyInception` mimics torch-fidelity's Inception interface on small inputs: uint8 ``[N, 3, H, W]`` in, a
``"pool"`` feature of :data:`DIM` dims (the stand-in for the 2048-d pool features) and ``"logits_unbiased"``
(10 classes, for the Inception Score). Weights are a fixed function of a seed, so every process computes the same
features.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch_fidelity.feature_extractor_base import FeatureExtractorBase

from sidlib import metrics

TINY = "tiny-inception-test"
DIM = 16


class TinyInception(FeatureExtractorBase):
    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(1234)
        self.register_buffer("conv", torch.randn(DIM, 3, 3, 3, generator=g) / 3.0)
        self.register_buffer("head", torch.randn(10, DIM, generator=g))

    @staticmethod
    def get_provided_features_list():
        return "pool", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"fid": "pool", "kid": "pool", "prc": "pool", "isc": "logits_unbiased"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        raise NotImplementedError

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        h = (x.to(torch.float64) - 128.0) / 128.0
        h = torch.tanh(F.conv2d(h, self.conv.to(torch.float64), padding=1))
        pool = h.mean(dim=(2, 3))
        out = {"pool": pool.float(), "logits_unbiased": (pool @ self.head.to(torch.float64).T).float()}
        return tuple(out[f] for f in self.features_list)


metrics.register_feature_extractor(TINY, TinyInception)


def random_images(n: int, res: int = 8, channels: int = 3, seed: int = 0, shift: int = 0) -> torch.Tensor:
    """uint8 ``[n, channels, res, res]`` images, deterministic in ``seed`` (``shift`` brightens them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256 - shift, (n, channels, res, res), generator=g) + shift
    return x.to(torch.uint8)


def write_reference_npz(path, images: torch.Tensor, extractor: str = TINY) -> tuple[np.ndarray, np.ndarray]:
    """Write ``{'mu', 'sigma'}`` of ``images``' features (EDM's npz layout) to ``path``; returns (mu, sigma)."""
    with metrics.FeatureExtractor(extractor, ["fid"]) as fe:
        feats = fe.extract(images)["fid"]
    mu, sigma = metrics.feature_statistics(feats)
    np.savez(path, mu=mu, sigma=sigma)
    return mu, sigma


def tiny_edm(label_dim: int = 0, res: int = 8, seed: int = 0, arch: str = "ddpmpp", cres=(1, 2)):
    """A very small EDMPrecond of EDM's DDPM++ (``arch='ddpmpp'``) or ADM (``'adm'``) family, deterministic in ``seed``."""
    from sidlib.networks import EDMPrecond, edm_kwargs

    torch.manual_seed(seed)
    kw = edm_kwargs(arch, img_resolution=res, channel_mult=list(cres), label_dim=label_dim,
                    model_channels=64 if arch == "adm" else 8, channel_mult_emb=1, num_blocks=1, attn_resolutions=[],
                    dropout=0.0)
    return EDMPrecond(**kw).eval()
