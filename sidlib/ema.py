"""Exponential moving average of the generator with a half-life and ramp-up (EDM's and SiD's training loops):
``beta = 0.5 ** (batch / max(h, 1e-8))``, ``h = min(halflife_kimg * 1000, rampup * cur_nimg)`` (without ramp-up
``h = halflife_kimg * 1000``); with ramp-up beta = 0 at cur_nimg = 0, so the EMA starts as an exact copy.
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ['ema_beta', 'update_ema']


def ema_beta(batch: int, cur_nimg: int, halflife_kimg: float, rampup: Optional[float] = 0.05) -> float:
    """EMA decay for one update of ``batch`` images when ``cur_nimg`` images were seen before it."""
    h = float(halflife_kimg) * 1000.0
    if rampup is not None:
        h = min(h, float(rampup) * float(cur_nimg))
    return 0.5 ** (float(batch) / max(h, 1e-8))


@torch.no_grad()
def update_ema(ema_net: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    """``p_ema <- beta * p_ema + (1 - beta) * p`` for every parameter, matched by name; buffers (EDM's constant
    resampling filters and Fourier frequencies) are copied."""
    src = dict(net.named_parameters())
    dst = list(ema_net.named_parameters())
    # One fused multi-tensor lerp instead of one kernel per parameter.
    torch._foreach_lerp_([p for _, p in dst], [src[n].detach().to(p.dtype) for n, p in dst], 1.0 - beta)
    src_b = dict(net.named_buffers())
    for name, b_ema in ema_net.named_buffers():
        if name in src_b:
            b_ema.copy_(src_b[name])
