"""modelpress: make trained PyTorch models smaller and faster, and prove it with measurements."""
from .api import CompressionResult, compress, load
from .errors import FormatError, ModelpressError, RecipeError
from .recipe import Recipe

__all__ = ["compress", "load", "Recipe", "CompressionResult", "ModelpressError", "FormatError", "RecipeError"]
__version__ = "0.1.0"
