"""Modules that run compressed layers fast on CPU. The runtime never imports a technique."""
from .int8 import Int8Linear

RUNTIME_MODULES = {cls.__name__: cls for cls in (Int8Linear,)}

__all__ = ["Int8Linear", "RUNTIME_MODULES"]
