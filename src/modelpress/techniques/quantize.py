"""Uniform symmetric weight quantization: per output channel, `bits` bits, zero exactly representable
(so pruned weights stay zero). Scales are rounded to float16 for storage. On a clustered tensor it
quantizes the codebook to a per-tensor grid instead, so codes stay shared."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import ModelpressError
from ..state import CompressionState, broadcast_scale
from .common import target_params


def symmetric_scale(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """max|w| / qmax per output channel (or per tensor), float16-representable and never zero."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().flatten(1).amax(1) if per_channel and w.dim() > 1 else w.abs().max().reshape(1)
    scale = (amax / qmax).half().float()
    tiny = torch.finfo(torch.float16).tiny
    return torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(tiny)


def quantize_tensor(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of w on the grid `scale`, clamped to the signed `bits` range."""
    qmax = 2 ** (bits - 1) - 1
    return torch.round(w / broadcast_scale(scale, w)).clamp(-qmax, qmax).to(torch.int32)


def quantize(model: nn.Module, state: CompressionState, *, bits: int, per_channel: bool = True,
             include_bias: bool = False, exclude: tuple[str, ...] = ()) -> None:
    """Snap target weights (or their codebooks) to a uniform `bits`-bit grid."""
    params = target_params(model, exclude, bias=include_bias)
    if not params:
        raise ModelpressError("quantize: the model has no Linear or Conv layer left after 'exclude'")
    with torch.no_grad():
        for name, p in params.items():
            st = state.get(name)
            if st.kind == "codebook":
                s = symmetric_scale(st.codebook, bits, per_channel=False)
                st.codebook = quantize_tensor(st.codebook, s, bits).float() * s
                p.copy_(st.codebook[st.codes] * (st.mask if st.mask is not None else 1))
                continue
            s = symmetric_scale(p, bits, per_channel and p.dim() > 1)
            st.scale, st.bits = s, bits
            st.codes = quantize_tensor(p, s, bits)
            w = st.codes.float() * broadcast_scale(s, p)
            p.copy_(w if st.mask is None else w * st.mask)
