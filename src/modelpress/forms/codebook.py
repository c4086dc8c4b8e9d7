"""Codebook (`cb`): weight sharing, float16 centroids plus entropy-coded indices (and a mask, where
storing it apart is smaller; otherwise pruned positions take an extra code whose table value is 0).
Training learns the centroids: the gradients of all weights that share one are summed."""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CorruptStream
from ..format.codecs import (DEFAULT_MASK_CODER, cheapest_split, decode_codes, from_bytes, int_field, ones_or,
                             scatter, stream)
from ..state import ParamState, register_form


class _Codebook(nn.Module):
    """W = codebook[codes] (masked). The trainable tensor is the codebook itself."""

    def __init__(self, codes: torch.Tensor, mask: torch.Tensor | None, codebook: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("mask", mask if mask is not None else torch.ones_like(codes, dtype=torch.bool),
                             persistent=False)
        self._init = codebook

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return c[self.codes] * self.mask

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return self._init.clone()


class Codebook:
    name = "codebook"
    file_kinds = ("cb",)

    def encode(self, key: str, t: torch.Tensor, st: ParamState, entry: dict) -> tuple[dict, dict[str, bytes]]:
        mask = st.mask if st.mask is not None and not bool(st.mask.all()) else None
        table, codes = st.codebook.half(), st.codes.to(torch.int64)
        whole = {"table": torch.cat([table, table.new_zeros(1)]) if mask is not None else table,
                 "codes": codes.masked_fill(~mask, len(table)) if mask is not None else codes}
        split = {"table": table, "codes": codes[mask] if mask is not None else None}
        masked, streams, n_side, coder = cheapest_split(key, tuple(t.shape), mask, whole, split, "table")
        entry.update(kind="cb", masked=masked)
        if masked and coder != DEFAULT_MASK_CODER:
            entry["mask_coder"] = coder
        entry["k"] = n_side
        return entry, streams

    def decode(self, name: str, entry: dict, streams: dict[str, bytes], key: str, shape: tuple[int, ...],
               dtype: torch.dtype, numel: int) -> torch.Tensor:
        mask, codes = decode_codes(name, entry, streams, key, shape, dtype, numel)
        k = int_field(name, entry, "k", 1, 2 ** 16)
        table = from_bytes(name, stream(streams, f"{key}/table"), torch.float16, k).float()
        if codes.numel() and int(codes.max()) >= k:
            raise CorruptStream(f"tensor {name!r}: a code is outside its codebook of {k}")
        return table[scatter(codes, mask, shape)] * ones_or(mask, shape)

    def parametrize(self, st: ParamState, weight: torch.Tensor) -> nn.Module | None:
        return _Codebook(st.codes, st.mask, st.codebook)

    def learned(self, st: ParamState, module: nn.Module, attr: str) -> None:
        st.codebook = module.parametrizations[attr].original.detach().clone()


register_form(Codebook())
