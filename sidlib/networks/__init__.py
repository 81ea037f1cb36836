"""EDM-compatible networks: preconditioning wrappers, U-Nets and a small MLP.

Public API:

* ``EDMPrecond``, ``VPPrecond``, ``VEPrecond``: ``D(x; sigma, labels)`` wrappers with EDM's
  constructor kwargs; ``PRECOND_TYPES`` maps their names to the classes.
* ``SongUNet`` (DDPM++/NCSN++), ``DhariwalUNet`` (ADM), ``MLPNet`` (low-dimensional data);
  ``MODEL_TYPES`` maps ``model_type`` names to them.
* ``build_network(class_name, init_kwargs)``: instantiate from stored constructor kwargs.
* ``set_precision(net, 'fp32' | 'bf16' | 'fp16')``: how the networks compute (see :mod:`.precond`).
* ``ARCHITECTURES``, ``PAPER_NETWORKS``, ``edm_kwargs``: EDM's architectures and the paper's five networks.
* ``set_attention_backend(net, 'math' | 'sdpa')``: switch the attention implementation in place
  (``set_default_attention_backend`` for networks built afterwards).

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
