"""Stored forms: one module per way a parameter is represented (dense, masked, codebook, quantized
grid), each writing it to the file, reading it back bitwise, and keeping training on it (a
parametrization). Registered by importing the module here: one line each."""
from . import codebook  # noqa: F401
from . import dense  # noqa: F401
from . import grid  # noqa: F401
from . import masked  # noqa: F401
