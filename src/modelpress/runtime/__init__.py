"""Modules that run compressed layers fast on CPU. The runtime never imports a technique.

`RUNTIME_MODULES` is what a file's architecture may name besides standard torch.nn layers; a
technique that brings its own runtime layer adds it with `register_runtime_module`."""
from __future__ import annotations

from torch import nn

from .half import Embedding16, Linear16
from .int8 import Int8Linear
from .lowrank import LowRankLinear, TuckerConv2d
from .packed import PackedEmbedding, PackedLinear
from .sparse import SparseLinear

RUNTIME_MODULES: dict[str, type[nn.Module]] = {
    cls.__name__: cls for cls in (Int8Linear, LowRankLinear, TuckerConv2d, Linear16, Embedding16, PackedLinear,
                                  PackedEmbedding, SparseLinear)}


def register_runtime_module(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: let files name `cls` in their architecture. Its constructor arguments are
    checked like torch.nn's (format/guard.py), and it builds its own children."""
    RUNTIME_MODULES[cls.__name__] = cls
    return cls


__all__ = ["Int8Linear", "Linear16", "Embedding16", "PackedLinear", "PackedEmbedding", "SparseLinear", "LowRankLinear",
           "TuckerConv2d",
           "RUNTIME_MODULES", "register_runtime_module"]
