"""modelpress: make trained PyTorch models smaller and faster, and prove it with measurements."""
from . import forms  # noqa: F401  (registers the stored forms first: every import of modelpress runs this)
from .api import CompressionResult, compress, load
from .errors import FormatError, ModelpressError, RecipeError
from .keras_model import array_batches, from_keras, to_keras
from .recipe import Recipe
from .runtime.compiled import accelerate
from .compare import Comparison, compare  # noqa: E402  (after api: compare builds on it)
from .auto import AutoResult, auto  # noqa: E402

__all__ = ["compress", "load", "accelerate", "compare", "auto", "from_keras", "to_keras", "array_batches", "Recipe",
           "CompressionResult", "Comparison", "AutoResult", "ModelpressError", "FormatError", "RecipeError"]
__version__ = "0.1.0"
