"""A runtime layer's weight in the layout its kernel wants, built once and kept on the layer."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def cached_layout(m: nn.Module, kind: str, make: Callable[[], torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
    """`make()`, kept on `m` under `kind` and rebuilt only when one of `sources` (the tensors it is made
    from) is replaced or changed in place."""
    key = tuple((t.data_ptr(), t._version) for t in sources)
    cache = m.__dict__.setdefault("_layouts", {})
    hit = cache.get(kind)
    if hit is None or hit[0] != key:
        hit = cache[kind] = (key, make())
    return hit[1]
