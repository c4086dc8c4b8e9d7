"""Which parameters a technique may touch, chosen by layer type and the recipe's exclude patterns."""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from ..state import split_name

WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                 nn.ConvTranspose3d)
_MATRIX_PREFIXES = {  # the weight matrices of layers that hold several, by parameter name
    nn.RNNBase: ("weight_ih_l", "weight_hh_l", "weight_hr_l"),  # RNN, LSTM (projections too), GRU
    nn.MultiheadAttention: ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"),
}


def excluded(name: str, patterns: Iterable[str]) -> bool:
    """A layer is excluded when its name matches any glob pattern (a pattern also matches its children)."""
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*") for p in patterns)


def layer_weights(module: nn.Module, bias: bool = False) -> dict[str, nn.Parameter]:
    """A layer's own weight tensors a technique may touch, by attribute name: `weight` of Linear and
    (transposed) Conv layers, every weight matrix of recurrent layers and of nn.MultiheadAttention's
    packed input projection (its out_proj is a Linear of its own); their biases too if asked."""
    if isinstance(module, WEIGHT_LAYERS):
        names = ["weight"] + (["bias"] if bias and module.bias is not None else [])
    else:
        prefixes = next((p for cls, p in _MATRIX_PREFIXES.items() if isinstance(module, cls)), None)
        if prefixes is None:
            return {}
        names = [n for n, p in module.named_parameters(recurse=False)
                 if p is not None and (n.startswith(prefixes) or bias and n.startswith(("bias_", "in_proj_bias")))]
    return {n: getattr(module, n) for n in names}


def target_params(model: nn.Module, exclude: Iterable[str] = (), *, bias: bool = False) -> dict[str, nn.Parameter]:
    """Weights (and biases, if asked) of the Linear, Conv, recurrent and attention layers not excluded
    (`layer_weights`), by qualified name."""
    exclude = list(exclude)
    out: dict[str, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if excluded(mod_name, exclude):
            continue
        for attr, p in layer_weights(module, bias).items():
            out[f"{mod_name}.{attr}" if mod_name else attr] = p
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
