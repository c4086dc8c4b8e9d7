"""Modules that run compressed layers fast on CPU. The runtime never imports a technique.

`RUNTIME_MODULES` is what a file's architecture may name besides standard torch.nn layers; a
technique that brings its own runtime layer adds it with `register_runtime_module`."""
from __future__ import annotations

import torch
from torch import nn

from .half import Embedding16, Linear16
from .int8 import Int8Linear
from .lowrank import LowRankLinear, TuckerConv2d
from .packed import PackedEmbedding, PackedLinear
from .sparse import SparseLinear

RUNTIME_MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (Int8Linear, LowRankLinear, TuckerConv2d, Linear16, Embedding16, PackedLinear,
                                  PackedEmbedding, SparseLinear)}


def quantized_weight(m: nn.Module, embeddings: bool = False) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """(signed codes (rows, cols), float32 scales (rows, groups or 1), bits, group size or 0 for one scale per
    row) of a quantized Linear, and with `embeddings` of a quantized Embedding; None for any other module.
    What the exporters write other formats from, so that nothing is quantized twice."""
    if isinstance(m, PackedLinear) or (embeddings and isinstance(m, PackedEmbedding)):
        codes, scale, bits, group = m.signed_codes(), m.scale, m.bits, m.group
    elif type(m) is Int8Linear:
        codes, scale, bits, group = m.weight, m.weight_scale, 8, 0
    else:
        return None
    return codes, scale.float().reshape(codes.shape[0], -1), bits, group


def register_runtime_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: let files name `cls` in their architecture. Its constructor arguments are
    checked like torch.nn's (format/guard.py), and it builds its own children."""
    RUNTIME_MODULES[cls.__name__] = cls
    return cls


__all__ = ["Int8Linear", "Linear16", "Embedding16", "PackedLinear", "PackedEmbedding", "SparseLinear", "LowRankLinear",
           "TuckerConv2d",
           "RUNTIME_MODULES", "register_runtime_module", "quantized_weight"]
