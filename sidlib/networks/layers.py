"""Layers of EDM's networks (EDM's ``training/networks.py``) with EDM's parameter names and shapes, so an EDM
state_dict loads strictly and computes the same function. Weights are cast to the activation dtype at call time
(as EDM does), so fp32 weights serve fp16 activations and autocast alike; attention logits and softmax are fp32.

Attention backends (``UNetBlock.attn_backend``; :func:`set_attention_backend` switches a whole network):
``'sdpa'`` (default, :func:`torch.nn.functional.scaled_dot_product_attention`, equal to ``'math'`` up to fp32
rounding, tested to 1e-5) and ``'math'`` (EDM's explicit einsums and fp32 softmax, bit-exact with EDM in fp32).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ['ATTENTION_BACKENDS', 'drop_labels', 'weight_init', 'Linear', 'Conv2d', 'GroupNorm', 'attention',
           'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding', 'noise_embedding', 'song_embed',
           'set_attention_backend', 'get_default_attention_backend', 'set_default_attention_backend']

ATTENTION_BACKENDS = ('math', 'sdpa')
_default_attention_backend = 'sdpa'  # picked up by UNetBlocks built afterwards


def drop_labels(labels, p, training):
    """Zero whole rows of one-hot ``labels [N, label_dim]`` with probability ``p`` in training (label dropout)."""
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def weight_init(shape, mode, fan_in, fan_out):
    """EDM's initialisation rules that its networks use: 'xavier_uniform', 'kaiming_uniform', 'kaiming_normal'."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init_mode {mode!r}')


def _check_backend(backend):
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f'unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}')


def _cast(t, like):
    return None if t is None else t.to(like.dtype)


class Linear(torch.nn.Module):
    """``y = x W^T + b``; weight ``[out, in]``, optional bias ``[out]``."""

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


def _resample(x, f, up, padding=0):
    """Depthwise 2x resampling of ``x`` by the filter ``f [1, 1, k, k]``: transposed with ``4 f`` (up) or strided."""
    c = x.shape[1]
    # Materialised (it is tiny): some convolution backends reject zero-stride weights.
    if up:
        return F.conv_transpose2d(x, (f * 4).expand(c, 1, *f.shape[2:]).contiguous(), groups=c, stride=2,
                                  padding=padding)
    return F.conv2d(x, f.expand(c, 1, *f.shape[2:]).contiguous(), groups=c, stride=2, padding=padding)


class Conv2d(torch.nn.Module):
    """2-D convolution ("same" padding) with optional 2x up/down-sampling by the FIR filter ``outer(v, v) / sum(v)^2``
    of the ``resample_filter`` taps v (a buffer only when ``up or down``); ``kernel=0``: resampling only. Unfused,
    resampling comes first; ``fused_resample`` (NCSN++) does both in one pass with EDM's padding arithmetic."""

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False, resample_filter=[1, 1],
                 fused_resample=False, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        assert not (up and down), 'a layer resamples in one direction only'
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        self.weight = (torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans)
                                          * init_weight) if kernel else None)
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = (torch.outer(f, f) / f.sum().square())[None, None]
        self.register_buffer('resample_filter', f if (up or down) else None)

    def forward(self, x):
        w, b, f = _cast(self.weight, x), _cast(self.bias, x), _cast(self.resample_filter, x)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv2d(_resample(x, f, up=True, padding=max(f_pad - w_pad, 0)), w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = _resample(F.conv2d(x, w, padding=w_pad + f_pad), f, up=False)
        else:
            if self.up or self.down:
                x = _resample(x, f, self.up, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups (EDM's rule)."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=_cast(self.weight, x), bias=_cast(self.bias, x),
                            eps=self.eps)


def attention(q, k, v, backend='sdpa'):
    """Single-head attention over positions: ``q, k, v [B, C_head, L] -> [B, C_head, L]``,
    ``a[:, :, i] = sum_j softmax_j(q_i . k_j / sqrt(C_head)) v[:, :, j]``."""
    _check_backend(backend)
    if backend == 'math':
        # EDM's AttentionOp: logits and softmax in fp32 (float64 stays float64), k scaled in its own dtype first.
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            w = torch.einsum('bcq,bck->bqk', q.to(dtype), (k / math.sqrt(k.shape[1])).to(dtype)).softmax(dim=2)
        return torch.einsum('bqk,bck->bcq', w.to(v.dtype), v)
    # 'sdpa': its kernels accumulate the logits and the softmax in fp32.
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class UNetBlock(torch.nn.Module):
    """EDM's residual U-Net block ``x [N, in, H, W], emb [N, emb_channels] -> [N, out, H', W']`` with optional 2x
    resampling (``conv0`` and the skip path) and self-attention. ``adaptive_scale``: ``emb`` gives a per-channel scale
    and shift (ADM) instead of a bias. ``qkv`` output channel ``(h * C_head + c) * 3 + j`` is slot j (q, k, v) of
    channel c of head h (EDM's interleaved layout)."""

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5, resample_filter=[1, 1],
                 resample_proj=False, adaptive_scale=True, init=dict(), init_zero=dict(init_weight=0),
                 init_attn=None):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, skip_scale, adaptive_scale
        self.attn_backend = _default_attention_backend

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter,
                            **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0  # weightless resampler (ADM)
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale
        if self.num_heads:
            n, c, h, w = x.shape
            # [N, 3C, H, W] -> [N * heads, C_head, 3, H * W]: this reshape defines the interleaved layout.
            q, k, v = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            x = self.proj(attention(q, k, v, backend=self.attn_backend).reshape(n, c, h, w)) + x
            x = x * self.skip_scale
        return x


def get_default_attention_backend():
    return _default_attention_backend


def set_default_attention_backend(backend):
    """Backend of UNetBlocks constructed afterwards (existing blocks keep theirs)."""
    global _default_attention_backend
    _check_backend(backend)
    _default_attention_backend = backend


def set_attention_backend(net, backend):
    """Switch every attention layer inside ``net`` to ``backend`` ('math' or 'sdpa'); no weights change."""
    _check_backend(backend)
    for module in net.modules():
        if isinstance(module, UNetBlock):
            module.attn_backend = backend
    return net


class PositionalEmbedding(torch.nn.Module):
    """``[cos(x f), sin(x f)]`` with ``f_i = (1 / max_positions) ** (i / (C/2 - endpoint))``: ``[N] -> [N, C]``."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = (1 / self.max_positions) ** (torch.arange(half, dtype=torch.float32, device=x.device)
                                             / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """``[cos(2 pi x f), sin(2 pi x f)]`` with random ``f ~ N(0, scale^2)`` stored as the buffer ``freqs``."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def noise_embedding(embedding_type, num_channels):
    """SongUNet's and MLPNet's noise embedding: 'positional' (with endpoint) or 'fourier'."""
    if embedding_type == 'positional':
        return PositionalEmbedding(num_channels, endpoint=True)
    if embedding_type == 'fourier':
        return FourierEmbedding(num_channels)
    raise ValueError(f'embedding_type must be fourier or positional, not {embedding_type!r}')


def song_embed(net, emb, class_labels, augment_labels):
    """SongUNet's mapping network after ``map_noise``: labels (scaled by sqrt(label_dim)), augment labels, two
    SiLU layers."""
    if net.map_label is not None:
        labels = drop_labels(class_labels, net.label_dropout, net.training)
        emb = emb + net.map_label(labels * np.sqrt(net.map_label.in_features))
    if net.map_augment is not None and augment_labels is not None:
        emb = emb + net.map_augment(augment_labels)
    emb = F.silu(net.map_layer0(emb))
    return F.silu(net.map_layer1(emb))
