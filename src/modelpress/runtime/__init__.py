"""Modules that run compressed layers fast on CPU. The runtime never imports a technique."""
from .int8 import Int8Linear
from .lowrank import LowRankLinear, TuckerConv2d

RUNTIME_MODULES = {cls.__name__: cls for cls in (Int8Linear, LowRankLinear, TuckerConv2d)}

__all__ = ["Int8Linear", "LowRankLinear", "TuckerConv2d", "RUNTIME_MODULES"]
