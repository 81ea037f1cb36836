"""EDM-compatible networks (EDM's ``training/networks.py``): the preconditioning wrappers ``EDMPrecond``,
``VPPrecond``, ``VEPrecond`` (:data:`PRECOND_TYPES`), the inner networks ``SongUNet`` (DDPM++/NCSN++),
``DhariwalUNet`` (ADM) and ``MLPNet`` (:data:`MODEL_TYPES`), :func:`build_network`, :func:`set_precision`,
:func:`set_attention_backend`, and EDM's architectures and the paper's networks (:mod:`.architectures`).
state_dict keys and shapes equal EDM's, so EDM weights load strictly.
"""

from .dhariwal_unet import DhariwalUNet
from .layers import (ATTENTION_BACKENDS, Conv2d, FourierEmbedding, GroupNorm, Linear, PositionalEmbedding,
                     UNetBlock, get_default_attention_backend, set_attention_backend,
                     set_default_attention_backend)
from .mlp import MLPNet
from .architectures import ARCHITECTURES, PAPER_NETWORKS, edm_kwargs, paper_network
from .precond import (MODEL_TYPES, PRECISIONS, PRECOND_TYPES, EDMPrecond, VEPrecond, VPPrecond, build_network,
                      set_precision)
from .song_unet import SongUNet

__all__ = [
    'EDMPrecond', 'VPPrecond', 'VEPrecond', 'SongUNet', 'DhariwalUNet', 'MLPNet',
    'MODEL_TYPES', 'PRECOND_TYPES', 'PRECISIONS', 'build_network', 'set_precision',
    'ARCHITECTURES', 'PAPER_NETWORKS', 'edm_kwargs', 'paper_network',
    'ATTENTION_BACKENDS', 'set_attention_backend', 'set_default_attention_backend', 'get_default_attention_backend',
    'Linear', 'Conv2d', 'GroupNorm', 'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding',
]
