"""Which parameters a technique may touch, chosen by layer type and the recipe's exclude patterns."""
from __future__ import annotations

import fnmatch
from typing import Iterable

from torch import nn

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
