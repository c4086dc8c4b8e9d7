"""Layer surgery: how each standard layer type keeps a subset of its output channels or input columns,
or takes the sizes of a file's tensors. One registry, shared by channel pruning (which cuts layers)
and the loader (which resizes a skeleton's layers to a pruned file); a new layer type is one entry."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Sizes:
    """A layer type's size attributes: `set_out(m, n)` for n output channels (the tensors in `per_out`
    have one entry per output channel along dim 0), `set_in(m, n)` for n inputs (None: no inputs of
    its own, as in a norm)."""

    set_out: Callable[[nn.Module, int], None]
    set_in: Callable[[nn.Module, int], None] | None = None
    per_out: tuple[str, ...] = ("weight", "bias")


def _depthwise(m: nn.Module) -> bool:
    return m.groups > 1 and m.groups == m.in_channels == m.out_channels


def _conv_out(m: nn.Module, n: int) -> None:
    if _depthwise(m):  # one input channel per output channel, kept together
        m.groups = m.in_channels = n
    m.out_channels = n


def _linear_out(m: nn.Module, n: int) -> None:
    m.out_features = n


def _linear_in(m: nn.Module, n: int) -> None:
    m.in_features = n


def _conv_in(m: nn.Module, n: int) -> None:
    m.in_channels = n


def _bn_out(m: nn.Module, n: int) -> None:
    m.num_features = n


def _ln_out(m: nn.Module, n: int) -> None:
    m.normalized_shape = (n,)


SIZES: dict[type, Sizes] = {
    nn.Linear: Sizes(_linear_out, _linear_in),
    nn.Conv1d: Sizes(_conv_out, _conv_in),
    nn.Conv2d: Sizes(_conv_out, _conv_in),
    nn.BatchNorm1d: Sizes(_bn_out, per_out=("weight", "bias", "running_mean", "running_var")),
    nn.BatchNorm2d: Sizes(_bn_out, per_out=("weight", "bias", "running_mean", "running_var")),
    nn.LayerNorm: Sizes(_ln_out),
}


def sizes_of(m: nn.Module) -> Sizes | None:
    """The registry entry for exactly this layer type (a subclass may add sizes of its own)."""
    return SIZES.get(type(m))


def keep_outputs(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output channels `idx` of a layer, with every per-channel parameter and buffer."""
    sizes = _required(m)
    for name in sizes.per_out:
        t = getattr(m, name, None)
        if t is not None:
            setattr(m, name, _select(t, idx, 0))
    sizes.set_out(m, int(idx.numel()))


def keep_inputs(m: nn.Module, cols: torch.Tensor) -> None:
    """Keep input columns `cols` (positions along the weight's dim 1) of a layer."""
    sizes = _required(m)
    if sizes.set_in is None:
        raise TypeError(f"{type(m).__name__} has no input columns to cut")
    m.weight = _select(m.weight, cols, 1)
    sizes.set_in(m, int(cols.numel()))


def resize_to(m: nn.Module, prefix: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Give a layer the sizes of the file's weight `prefix + "weight"`, with placeholder (meta) tensors
    of the file's shapes that loading then assigns. False if the type is not in the registry."""
    sizes, w = sizes_of(m), shapes.get(prefix + "weight")
    if sizes is None or w is None or len(w) != m.weight.dim():
        return False
    grouped_in = None if isinstance(m, (nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)) or _depthwise(m) \
        else w[1] * m.groups
    sizes.set_out(m, w[0])
    if isinstance(m, nn.Linear):
        sizes.set_in(m, w[1])
    elif grouped_in is not None:
        sizes.set_in(m, grouped_in)
    for table in (m._parameters, m._buffers):
        for k, t in table.items():
            if t is not None and prefix + k in shapes:
                new = torch.empty(shapes[prefix + k], dtype=t.dtype, device="meta")
                table[k] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new
    return True


def _required(m: nn.Module) -> Sizes:
    sizes = sizes_of(m)
    if sizes is None:
        raise TypeError(f"no layer surgery is registered for {type(m).__name__}; add it to surgery.SIZES")
    return sizes


def _select(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    kept = t.detach().index_select(dim, idx).clone()
    return nn.Parameter(kept, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else kept


_READ_DIRECTLY = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def fixed_layers(model: nn.Module) -> set[str]:
    """Layers whose owner reads their tensors instead of calling them, so they must stay the class they
    are: nn.MultiheadAttention's out_proj, and nn.TransformerEncoderLayer's linear1 / linear2 / norms
    (its eval-mode fast path passes their weights to one fused op)."""
    return {f"{name}.{child}" if name else child for name, m in model.named_modules()
            if isinstance(m, _READ_DIRECTLY) for child, _ in m.named_children()}


def replace(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is ("" is not a submodule: the model itself stays)."""
    parent, _, child = name.rpartition(".")
    if not child:
        raise ValueError("the model itself cannot be replaced inside itself")
    setattr(model.get_submodule(parent) if parent else model, child, new)
