"""Layers shared by the EDM-compatible networks.

Every layer here reproduces the behaviour, parameter names and parameter shapes of the corresponding
EDM layer, so that a state_dict saved by EDM loads strictly and computes the same function:

* ``Linear``    weight ``[out, in]``, optional bias ``[out]``.
* ``Conv2d``    weight ``[out, in, k, k]`` (absent when ``kernel=0``), optional bias, and a
  ``resample_filter`` buffer ``[1, 1, L, L]`` whenever the layer resamples (``up`` or ``down``).
* ``GroupNorm`` weight/bias ``[C]``, ``min(32, C // 4)`` groups.
* ``UNetBlock`` the residual block of both U-Nets, with optional multi-head self-attention whose
  ``qkv`` projection uses EDM's *interleaved* channel layout.
* ``PositionalEmbedding`` / ``FourierEmbedding`` noise-level embeddings (the Fourier one stores its
  random frequencies as the buffer ``freqs``).

Weights are cast to the activation dtype at call time, so a network kept in fp32 can run on fp16 or
bf16 activations (explicitly or under ``torch.autocast``). Attention logits and softmax are always
computed in fp32, because fp16 logits overflow for large feature norms.

Attention backends (``UNetBlock.attn_backend``, switched network-wide by
:func:`set_attention_backend`):

* ``'math'`` (default): explicit einsums with an fp32 softmax; matches EDM bit-for-bit in fp32.
* ``'sdpa'``: :func:`torch.nn.functional.scaled_dot_product_attention` on the same interleaved
  q/k/v; equal to ``'math'`` up to float rounding, usually faster and lighter on memory (fused
  kernels avoid materialising the ``[L, L]`` weight matrix on GPU).
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    'ATTENTION_BACKENDS', 'drop_labels', 'weight_init', 'Linear', 'Conv2d', 'GroupNorm', 'attention',
    'UNetBlock', 'PositionalEmbedding', 'FourierEmbedding', 'set_attention_backend',
    'get_default_attention_backend', 'set_default_attention_backend',
]

ATTENTION_BACKENDS = ('math', 'sdpa')

# Backend that newly constructed UNetBlocks pick up; see set_default_attention_backend().
_default_attention_backend = 'math'


# ----------------------------------------------------------------------------------------------
# Initialisation (only matters for networks trained from scratch; loaded weights overwrite it).

def drop_labels(labels, p, training):
    """Zero whole rows of one-hot ``labels`` ``[N, label_dim]`` with probability ``p`` when ``training``.

    Zeroed rows mean "no class": the label dropout EDM's networks use for classifier-free guidance.
    """
    if not (training and p):
        return labels
    keep = torch.rand([labels.shape[0], 1], device=labels.device) >= p
    return labels * keep.to(labels.dtype)


def weight_init(shape, mode, fan_in, fan_out):
    """Random tensor of ``shape`` drawn with one of EDM's four initialisation rules.

    ``mode`` is 'xavier_uniform', 'xavier_normal', 'kaiming_uniform' or 'kaiming_normal';
    ``fan_in``/``fan_out`` count inputs/outputs per unit (times kernel area for convolutions).
    Tensors are created with the current default device, so building under
    ``torch.device('meta')`` allocates nothing.
    """
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'unknown init_mode {mode!r}')


def _cast(t, like):
    """``t`` in the dtype of ``like`` (None passes through)."""
    return None if t is None else t.to(like.dtype)


# ----------------------------------------------------------------------------------------------
# Dense layers.

class Linear(torch.nn.Module):
    """Fully connected layer ``y = x W^T + b``.

    Args:
        in_features, out_features: sizes; ``weight`` is ``[out_features, in_features]``.
        bias: whether a ``bias`` ``[out_features]`` parameter exists.
        init_mode, init_weight, init_bias: initialisation rule (see :func:`weight_init`) and the
            multipliers applied to the weight and bias draws.

    Shapes: ``x [..., in_features] -> [..., out_features]``.
    """

    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        return F.linear(x, _cast(self.weight, x), _cast(self.bias, x))


def _resample_filter(taps):
    """Separable 2-D low-pass filter ``outer(v, v) / sum(v)^2`` as a ``[1, 1, L, L]`` tensor."""
    v = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(v, v) / v.sum().square()).reshape(1, 1, len(taps), len(taps))


class Conv2d(torch.nn.Module):
    """2-D convolution with optional 2x up/down-sampling by a separable FIR filter.

    Args:
        in_channels, out_channels: channel counts.
        kernel: square kernel size ``k``; ``0`` means no weights (the layer only resamples, and
            then ``in_channels`` must equal ``out_channels``). Padding is ``k // 2`` ("same").
        bias: whether a ``bias`` ``[out_channels]`` exists (only when ``kernel > 0``).
        up, down: 2x nearest-style upsampling / filtered downsampling.
        resample_filter: 1-D taps ``v`` of the filter ``outer(v, v) / sum(v)^2``; ``[1, 1]`` is a
            box (average pooling / nearest neighbour), ``[1, 3, 3, 1]`` the NCSN++ blur filter.
            Stored as the buffer ``resample_filter`` ``[1, 1, L, L]`` only when ``up or down``.
        fused_resample: convolve first and resample inside the same pass (used by NCSN++'s
            ``aux_residual`` down-sampling layers; changes the padding arithmetic, see forward).
        init_mode, init_weight, init_bias: see :class:`Linear`.

    Shapes: ``[N, in_channels, H, W] -> [N, out_channels, H', W']`` with ``H' = 2H`` (up),
    ``H / 2`` (down) or ``H``.

    Without fusion the resampling happens *before* the convolution, in this order: upsample by a
    depthwise transposed convolution with ``4 f`` (stride 2), or downsample by a depthwise
    convolution with ``f`` (stride 2); both use padding ``(L - 1) // 2``. The bias is added last.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=[1, 1], fused_resample=False, init_mode='kaiming_normal',
                 init_weight=1, init_bias=0):
        assert not (up and down), 'a layer resamples in one direction only'
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                    fan_out=out_channels * kernel * kernel)
        self.weight = (torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = (torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias)
                     if kernel and bias else None)
        # Registered as a (persistent) buffer because EDM state_dicts contain it; None keeps it out
        # of the state_dict for layers that do not resample, exactly as in EDM.
        self.register_buffer('resample_filter', _resample_filter(resample_filter) if (up or down) else None)

    def _depthwise(self, f, channels):
        # One copy of the filter per channel for a grouped (depthwise) convolution; materialised
        # (it is tiny) because some convolution backends reject zero-stride weights.
        return f.expand(channels, 1, f.shape[-2], f.shape[-1]).contiguous()

    def forward(self, x):
        w = _cast(self.weight, x)
        b = _cast(self.bias, x)
        f = _cast(self.resample_filter, x)
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            # Upsample with the (padded) filter, then convolve; the paddings are split so that the
            # output is exactly 2H x 2W.
            x = F.conv_transpose2d(x, self._depthwise(f * 4, self.in_channels), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # Convolve with enlarged padding, then filter with stride 2 and no further padding.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, self._depthwise(f, self.out_channels), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, self._depthwise(f * 4, self.in_channels), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, self._depthwise(f, self.in_channels), groups=self.in_channels,
                             stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(torch.nn.Module):
    """Group normalisation with EDM's group-count rule.

    ``num_groups = min(num_groups, num_channels // min_channels_per_group)``, i.e. 32 groups unless
    that would leave fewer than 4 channels per group. ``eps`` is 1e-6 in SongUNet and 1e-5 in
    DhariwalUNet. Shapes: ``[N, C, ...] -> [N, C, ...]``.
    """

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, num_groups=self.num_groups, weight=_cast(self.weight, x),
                            bias=_cast(self.bias, x), eps=self.eps)


# ----------------------------------------------------------------------------------------------
# Attention.

def attention(q, k, v, backend='math'):
    """Single-head dot-product attention over spatial positions, batched over ``B``.

    Args:
        q, k, v: ``[B, C_head, L]`` (channels first, L = H*W positions), any float dtype.
        backend: 'math' or 'sdpa' (see the module docstring).

    Returns ``a [B, C_head, L]`` with ``a[:, :, i] = sum_j softmax_j(q_i . k_j / sqrt(C_head)) v[:, :, j]``.
    """
    if backend == 'math':
        # Logits and softmax in (at least) fp32 even under autocast, as in EDM: fp16 logits overflow.
        # float64 inputs stay float64 so that double-precision checks remain exact.
        dtype = torch.promote_types(q.dtype, torch.float32)
        with torch.autocast(device_type=q.device.type, enabled=False):
            w = torch.einsum('bcq,bck->bqk', q.to(dtype), k.to(dtype) / math.sqrt(k.shape[1])).softmax(dim=2)
        return torch.einsum('bqk,bck->bcq', w.to(v.dtype), v)
    if backend == 'sdpa':
        # SDPA wants [B, L, C_head]; its kernels accumulate the softmax in fp32.
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return a.transpose(1, 2)
    raise ValueError(f'unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}')


# ----------------------------------------------------------------------------------------------
# Residual U-Net block.

class UNetBlock(torch.nn.Module):
    """Residual block with noise-embedding conditioning and optional self-attention.

    Args:
        in_channels, out_channels: channel counts.
        emb_channels: width of the conditioning embedding ``emb [N, emb_channels]``.
        up, down: 2x resampling, applied inside ``conv0`` (before its 3x3 convolution) and in the
            skip path.
        attention: add a multi-head self-attention layer after the residual part.
        num_heads: number of heads; if None, ``out_channels // channels_per_head``.
        dropout: dropout probability before ``conv1`` (active only in training mode).
        skip_scale: multiplier after each residual sum (sqrt(0.5) in SongUNet, 1 in DhariwalUNet).
        eps: GroupNorm epsilon.
        resample_filter: taps of the resampling filter (see :class:`Conv2d`).
        resample_proj: give the skip path a 1x1 convolution even when the channel count does not
            change (SongUNet: True).
        adaptive_scale: ``emb`` gives a per-channel scale and shift (ADM) instead of an additive
            bias (DDPM++/NCSN++).
        init, init_zero, init_attn: initialisation kwargs for ordinary, near-zero (``conv1``,
            ``proj``) and ``qkv`` layers.

    Shapes: ``x [N, in_channels, H, W], emb [N or 1, emb_channels] -> [N, out_channels, H', W']``.

    The ``qkv`` 1x1 convolution outputs ``3 * out_channels`` channels in EDM's interleaved order:
    channel ``(h * C_head + c) * 3 + j`` holds slot ``j`` (0 = query, 1 = key, 2 = value) of channel
    ``c`` of head ``h``. The attention output channel ``h * C_head + c`` then feeds ``proj``.
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0, skip_scale=1, eps=1e-5,
                 resample_filter=[1, 1], resample_proj=False, adaptive_scale=True,
                 init=dict(), init_zero=dict(init_weight=0), init_attn=None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        self.attn_backend = _default_attention_backend

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A weightless resampler suffices when only the resolution changes (ADM);
            # SongUNet always projects (resample_proj).
            kernel = 1 if (resample_proj or out_channels != in_channels) else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(init_attn if init_attn is not None else init))
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
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            n, c, h, w = x.shape
            # [N, 3C, H, W] -> [N*heads, C_head, 3, H*W]: this reshape *defines* the interleaved layout.
            qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, h * w)
            q, k, v = qkv.unbind(2)
            a = attention(q, k, v, backend=self.attn_backend)
            x = self.proj(a.reshape(n, c, h, w)) + x
            x = x * self.skip_scale
        return x


def get_default_attention_backend():
    """Backend that UNetBlocks built from now on will use ('math' unless changed)."""
    return _default_attention_backend


def set_default_attention_backend(backend):
    """Set the backend for UNetBlocks constructed afterwards (existing blocks are unchanged)."""
    global _default_attention_backend
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f'unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}')
    _default_attention_backend = backend


def set_attention_backend(net, backend):
    """Switch every attention layer inside ``net`` to ``backend`` ('math' or 'sdpa').

    Changes no weights and no state_dict entries; returns ``net`` for chaining. The backends agree
    up to float rounding (tested to 1e-5 in fp32).
    """
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f'unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}')
    for module in net.modules():
        if isinstance(module, UNetBlock):
            module.attn_backend = backend
    return net


# ----------------------------------------------------------------------------------------------
# Noise-level embeddings.

class PositionalEmbedding(torch.nn.Module):
    """Sinusoidal embedding of a scalar per sample (transformer style).

    ``freqs_i = (1 / max_positions) ** (i / (C/2 - endpoint))`` for ``i = 0 .. C/2 - 1``;
    output ``[cos(x freqs), sin(x freqs)]``. ``endpoint=True`` (SongUNet) makes the last
    frequency exactly ``1 / max_positions``.

    Shapes: ``x [N] -> [N, num_channels]``.
    """

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(torch.nn.Module):
    """Random Fourier features of a scalar per sample (NCSN++).

    ``freqs ~ N(0, scale^2)`` (``num_channels // 2`` values) is a persistent buffer, so the
    frequencies stored in a checkpoint are the ones used. Output ``[cos(2 pi x freqs), sin(2 pi x freqs)]``.

    Shapes: ``x [N] -> [N, num_channels]``.
    """

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
