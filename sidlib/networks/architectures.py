"""EDM's architectures: :data:`ARCHITECTURES` (the inner-network kwargs of EDM's/SiD's ``--arch`` names in EDM's
``train.py``: ``ddpmpp`` DDPM++ (VP), ``ncsnpp`` NCSN++ (VE), ``adm`` ADM (ImageNet)), :data:`PAPER_NETWORKS` (the full
``EDMPrecond`` kwargs of SiD's teachers as stored in EDM's pickles, with parameter counts) and :func:`edm_kwargs`
(such kwargs for any resolution and channel multipliers).
"""

from __future__ import annotations

import copy

__all__ = ['ARCHITECTURES', 'PAPER_NETWORKS', 'edm_kwargs', 'paper_network']

#: ``--arch`` name -> inner-network kwargs (EDM's ``train.py``).
ARCHITECTURES: dict[str, dict] = {
    'ddpmpp': dict(model_type='SongUNet', embedding_type='positional', encoder_type='standard',
                   decoder_type='standard', channel_mult_noise=1, resample_filter=[1, 1], model_channels=128),
    'ncsnpp': dict(model_type='SongUNet', embedding_type='fourier', encoder_type='residual',
                   decoder_type='standard', channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128),
    'adm': dict(model_type='DhariwalUNet', model_channels=192),
}


def edm_kwargs(arch: str, *, img_resolution: int, channel_mult, img_channels: int = 3, label_dim: int = 0,
               **overrides) -> dict:
    """``EDMPrecond`` kwargs for ``arch`` at a resolution and channel multipliers (EDM's ``--cres``); ``overrides``
    (e.g. ``augment_dim``, ``dropout``, ``use_fp16``, ``model_channels``) are added last."""
    if arch not in ARCHITECTURES:
        raise ValueError(f'unknown architecture {arch!r}; expected one of {sorted(ARCHITECTURES)}')
    kw = dict(img_resolution=int(img_resolution), img_channels=int(img_channels), label_dim=int(label_dim),
              use_fp16=False, **copy.deepcopy(ARCHITECTURES[arch]), channel_mult=[int(c) for c in channel_mult])
    return {**kw, **overrides}


#: The networks of the paper's runs: EDMPrecond kwargs exactly as EDM's pickles store them, and parameter counts.
PAPER_NETWORKS: dict[str, dict] = {
    'cifar10-uncond': dict(arch='ddpmpp', parameters=55_733_891, kwargs=edm_kwargs(
        'ddpmpp', img_resolution=32, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)),
    'cifar10-cond': dict(arch='ddpmpp', parameters=55_735_299, kwargs=edm_kwargs(
        'ddpmpp', img_resolution=32, channel_mult=[2, 2, 2], label_dim=10, augment_dim=9, dropout=0.13)),
    'ffhq64': dict(arch='ddpmpp', parameters=61_805_571, kwargs=edm_kwargs(
        'ddpmpp', img_resolution=64, channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.05)),
    # EDM trained its AFHQv2 model with dropout 0.25 (SiD's students use 0.05, set by the preset).
    'afhqv2-64': dict(arch='ddpmpp', parameters=61_805_571, kwargs=edm_kwargs(
        'ddpmpp', img_resolution=64, channel_mult=[1, 2, 2, 2], augment_dim=9, dropout=0.25)),
    'imagenet64-cond': dict(arch='adm', parameters=295_899_267, kwargs=edm_kwargs(
        'adm', img_resolution=64, channel_mult=[1, 2, 3, 4], label_dim=1000, use_fp16=True, dropout=0.1)),
    # Not distilled by SiD; EDM's VE model of CIFAR-10, kept to test the NCSN++ code path.
    'cifar10-ncsnpp': dict(arch='ncsnpp', parameters=56_397_827, kwargs=edm_kwargs(
        'ncsnpp', img_resolution=32, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13)),
}


def paper_network(name: str) -> dict:
    """A deep copy of ``PAPER_NETWORKS[name]['kwargs']``; unknown names raise ``KeyError`` listing the known ones."""
    if name not in PAPER_NETWORKS:
        raise KeyError(f'unknown paper network {name!r}; known: {sorted(PAPER_NETWORKS)}')
    return copy.deepcopy(PAPER_NETWORKS[name]['kwargs'])
