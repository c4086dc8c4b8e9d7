"""Which parameters a technique may touch, chosen by layer type and the recipe's exclude patterns."""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from ..state import split_name

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def excluded(name: str, patterns: Iterable[str]) -> bool:
    """A layer is excluded when its name matches any glob pattern (a pattern also matches its children)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def target_params(model: nn.Module, exclude: Iterable[str] = (), *, bias: bool = False) -> dict[str, nn.Parameter]:
    """Weights (and biases, if asked) of the Linear and Conv layers not excluded, by qualified name."""
    exclude = list(exclude)
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if not isinstance(module, WEIGHT_LAYERS) or excluded(mod_name, exclude):
            continue
        out[f"{mod_name}.weight"] = module.weight
        if bias and module.bias is not None:
            out[f"{mod_name}.bias"] = module.bias
    return out


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule called `name` is."""
    parent, child = split_name(name)
    setattr(model.get_submodule(parent) if parent else model, child, new)


def linearize(model: nn.Module) -> int:
    """Replace transformers' `Conv1D` (GPT-2's Linear with a transposed weight) by an equivalent
    `nn.Linear`, so every technique sees one layer type. Returns how many were replaced."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return 0
    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, m in swaps:
        lin = nn.Linear(m.weight.shape[0], m.weight.shape[1], bias=m.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(m.weight.t())
            if m.bias is not None:
                lin.bias.copy_(m.bias)
        replace_module(model, name, lin)
    return len(swaps)
