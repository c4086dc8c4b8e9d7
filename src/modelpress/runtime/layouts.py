"""A runtime layer's weight in the layout its kernel wants, built once and kept on the layer."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _Layouts(dict):
    """A layer's cached layouts: rebuilt on demand, so copies and pickles of the layer start without them
    (some, oneDNN's prepacked weights and sparse CSR tensors, cannot be copied at all)."""

    def __deepcopy__(self, memo: dict) -> "_Layouts":
        return _Layouts()

    def __reduce__(self):
        return (_Layouts, ())


def _key(sources: tuple[torch.Tensor, ...]) -> tuple:
    # the tensors themselves (held, so that a freed tensor's id or memory cannot be mistaken for a new one)
    # and their in-place versions
    return sources + tuple(t._version for t in sources)


def cached_layout(m: nn.Module, kind: str, make: Callable[[], torch.Tensor], *sources: torch.Tensor) -> torch.Tensor:
    """`make()`, kept on `m` under `kind` and rebuilt only when one of `sources` (the tensors it is made
    from) is replaced or changed in place."""
    hit = current(m, kind, *sources)
    if hit is None:
        hit = make()
        m.__dict__.setdefault("_layouts", _Layouts())[kind] = (_key(sources), hit)
    return hit


def current(m: nn.Module, kind: str, *sources: torch.Tensor) -> torch.Tensor | None:
    """The layout `m` keeps under `kind` if it was built from `sources` as they are now, else None."""
    hit = m.__dict__.get("_layouts", {}).get(kind)
    return hit[1] if hit is not None and _same(hit[0], sources) else None


def _same(key: tuple, sources: tuple[torch.Tensor, ...]) -> bool:
    n = len(sources)
    return len(key) == 2 * n and all(key[i] is sources[i] and key[n + i] == sources[i]._version for i in range(n))


def small_layer_weight(m: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The fp32 weight a small layer keeps for its one-op path (see `keep_small_layer_weight`), if it is
    current and `x` is an fp32 input outside any trace or compile; else None. Kept lean: at batch 1 on a
    small layer, each microsecond here is a tenth of the layer's time."""
    hit = m.__dict__.get("_small")
    if hit is None or x.dtype is not torch.float32 or torch._C._get_tracing_state() is not None \
            or torch.compiler.is_compiling():
        return None
    b = m._buffers
    key = hit[0]
    if key[0] is b[key[2]] and key[1] is b[key[3]] and key[4] == key[0]._version and key[5] == key[1]._version:
        return hit[1]
    return None


def keep_small_layer_weight(m: nn.Module, names: tuple[str, str], weight: torch.Tensor) -> None:
    """Remember `weight`, made from `m`'s buffers `names`, for `small_layer_weight`."""
    a, b = m._buffers[names[0]], m._buffers[names[1]]
    m.__dict__["_small"] = ((a, b, names[0], names[1], a._version, b._version), weight)
