"""Quantized grid (`q`): integer codes times float16 scales (of either sign) per tensor, per output channel or per
group of inputs (the scales' two byte planes entropy-coded where there are many), plus a mask where
storing it apart is smaller. Training moves latent weights; rounding is straight-through."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CorruptStream
from ..format.codecs import (DEFAULT_MASK_CODER, PLANE_MIN, cheapest_split, decode_codes, decode_planes,
                             encode_planes, from_bytes, int_field, scatter, stream)
from ..state import ParamState, broadcast_scale, code_range, register_form


class RoundSTE(torch.autograd.Function):
    """round() forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x):  # noqa: D401
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Quant(nn.Module):
    """W = round(V / s).clamp(lo, hi) * s (masked), straight-through for the rounding."""

    def __init__(self, scale: torch.Tensor, bits: int, mask: torch.Tensor | None):
        super().__init__()
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.lo, self.hi = code_range(bits)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        w = RoundSTE.apply(v / self.scale).clamp(self.lo, self.hi) * self.scale
        return w if self.mask is None else w * self.mask


@dataclass
class GridWeight:
    """A grid-quantized tensor as the file stores it: signed integer codes (the tensor's shape) times
    `scale`, one per tensor (a 0-d or 1-element tensor), per row (rows,) or per `group` inputs of a row
    (rows, groups); `group` 0 when not grouped."""

    codes: torch.Tensor
    scale: torch.Tensor
    group: int
    bits: int


class Grid:
    name = "quant"
    file_kinds = ("q",)

    def encode(self, key: str, t: torch.Tensor, st: ParamState, entry: dict) -> tuple[dict, dict[str, bytes]]:
        mask = st.mask if st.mask is not None and not bool(st.mask.all()) else None
        qmax = code_range(st.bits)[1]
        full = bool(st.codes.numel()) and int(st.codes.min()) < -qmax  # the extra negative code is used
        codes = st.codes.to(torch.int32) + qmax + full  # non-negative symbols; qmax (+1 if full) means 0
        entry.update(kind="q", bits=int(st.bits), nscale=int(st.scale.numel()))
        if full:
            entry["full_range"] = True
        if st.group is not None and st.scale.dim() == 2:
            entry["group"] = int(st.group)
        scale = st.scale.half().flatten()
        whole = {"scale": scale, "codes": codes}
        split = {"scale": scale, "codes": codes[mask] if mask is not None else None}
        masked, streams, n_side, coder = cheapest_split(key, tuple(t.shape), mask, whole, split, "scale")
        entry["masked"] = masked
        if masked and coder != DEFAULT_MASK_CODER:
            entry["mask_coder"] = coder
        if n_side >= PLANE_MIN:  # many scales: code their two byte planes
            planes = encode_planes(scale)
            if sum(map(len, planes)) < len(streams[f"{key}/scale"]):
                del streams[f"{key}/scale"]
                streams[f"{key}/scale_hi"], streams[f"{key}/scale_lo"] = planes
                entry["scale_planes"] = True
        return entry, streams

    def decode(self, name: str, entry: dict, streams: dict[str, bytes], key: str, shape: tuple[int, ...],
               dtype: torch.dtype, numel: int) -> torch.Tensor:
        g, mask = self.decode_grid(name, entry, streams, key, shape, dtype, numel)
        w = g.codes.float() * broadcast_scale(g.scale, g.codes, g.group or None)
        return w if mask is None else w * mask

    def decode_grid(self, name: str, entry: dict, streams: dict[str, bytes], key: str, shape: tuple[int, ...],
                    dtype: torch.dtype, numel: int) -> tuple["GridWeight", torch.Tensor | None]:
        """The codes and scales as stored, and the mask (None where not `masked`)."""
        mask, codes = decode_codes(name, entry, streams, key, shape, dtype, numel)
        bits = int_field(name, entry, "bits", 1, 16)
        rows = shape[0] if shape else 1
        group, allowed = None, {1, rows}
        if "group" in entry:
            group = int_field(name, entry, "group", 1, 2 ** 31)
            cols = numel // rows if rows else 0
            allowed = {rows * -(-cols // group)}
        nscale = int_field(name, entry, "nscale", 1, max(1, numel))
        if nscale not in allowed:
            raise CorruptStream(f"tensor {name!r}: {nscale} scales for shape {list(shape)}")
        if entry.get("scale_planes"):
            scale = decode_planes(name, streams, key, nscale).float()
        else:
            scale = from_bytes(name, stream(streams, f"{key}/scale"), torch.float16, nscale).float()
        if group is not None:
            scale = scale.reshape(rows, -1)
        qmax = code_range(bits)[1]
        zero = qmax + (entry.get("full_range") is True)  # the symbol of code 0: files without the field are symmetric
        if codes.numel() and int(codes.max()) > zero + qmax:
            raise CorruptStream(f"tensor {name!r}: a code is outside the {bits}-bit range")
        q = (scatter(codes, mask, shape, fill=zero) - zero).to(torch.int32)
        return GridWeight(q, scale, group or 0, bits), mask

    def parametrize(self, st: ParamState, weight: torch.Tensor) -> nn.Module | None:
        return _Quant(broadcast_scale(st.scale, weight, st.group), st.bits, st.mask)

    def learned(self, st: ParamState, module: nn.Module, attr: str) -> None:
        w = getattr(module, attr).detach()
        st.codes = torch.round(w / broadcast_scale(st.scale, w, st.group)).to(torch.int32)


register_form(Grid())
