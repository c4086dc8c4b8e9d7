"""Masked (`sp`): a pruned float tensor as its mask (by the cheapest registered mask coder) and the
kept values. Training updates the kept weights only."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CorruptStream
from ..format.codecs import DEFAULT_MASK_CODER, decode_mask_of, encode_mask_cheapest, from_bytes, stream
from ..state import ParamState, register_form


class _Masked(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.mask


class Masked:
    name = "masked"
    file_kinds = ("sp",)

    def encode(self, key: str, t: torch.Tensor, st: ParamState, entry: dict) -> tuple[dict, dict[str, bytes]]:
        entry["kind"], values = "sp", t[st.mask].contiguous().numpy().tobytes()
        coder, data = encode_mask_cheapest(st.mask, tuple(t.shape))
        if coder != DEFAULT_MASK_CODER:
            entry["mask_coder"] = coder
        return entry, {f"{key}/mask": data, f"{key}/values": values}

    def decode(self, name: str, entry: dict, streams: dict[str, bytes], key: str, shape: tuple[int, ...],
               dtype: torch.dtype, numel: int) -> torch.Tensor:
        if dtype != torch.float32:
            raise CorruptStream(f"tensor {name!r}: kind 'sp' needs dtype f32")
        mask = decode_mask_of(name, entry, stream(streams, f"{key}/mask"), shape)
        w = torch.zeros(shape, dtype=torch.float32)
        w[mask] = from_bytes(name, stream(streams, f"{key}/values"), torch.float32, int(mask.sum()))
        return w

    def parametrize(self, st: ParamState, weight: torch.Tensor) -> nn.Module | None:
        return _Masked(st.mask)

    def learned(self, st: ParamState, module: nn.Module, attr: str) -> None:
        pass


register_form(Masked())
