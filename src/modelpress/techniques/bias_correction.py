"""Bias correction (Nagel et al., "Data-Free Quantization", 2019; the analytic form, with means measured on
calibration data): rounding a layer's weights moves the mean of each of its outputs by E[(W - Wq) x], and that
shift, the same for every input on average, travels down the network as a systematic error which GPTQ's
least squares per layer leave in place. It is computed from the layer's mean input row (gathered with the
Hessian, in the same pass) and put back: added to the layer's bias or, for a layer without one whose output
goes straight into a BatchNorm (a convolution before its BN), subtracted from that BatchNorm's running mean.
No module changes shape and the file holds the same tensors, so artifacts load into the original class."""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..batches import call_model, split_batch


def output_shift(before: torch.Tensor, after: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """E[(before - after) x] per output channel, (out,) in float64, for a weight whose flattened inputs
    have the mean row `mean`: (groups, k), one row per group of a grouped convolution."""
    groups, k = mean.shape
    diff = (before.detach().double() - after.detach().double()).reshape(groups, -1, k)
    return torch.einsum("grk,gk->gr", diff, mean.double()).reshape(-1)


@torch.no_grad()
def batchnorm_readers(model: nn.Module, layers: dict[str, nn.Module], batch: Any) -> dict[str, list[_BatchNorm]]:
    """Per layer (by name), the BatchNorms in eval mode with running statistics that read its output as it
    came out (the same tensor, not changed in place in between), found by passing one calibration batch;
    a BatchNorm fed by more than one layer is left out."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None and not m.training]
    if not norms:  # a transformer: no forward pass to make
        return {}
    made: dict[int, tuple[str, weakref.ref, int]] = {}
    fed: dict[_BatchNorm, set[str]] = {}

    def wrote(name: str):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                made[id(out)] = (name, weakref.ref(out), out._version)
        return hook

    def read(bn: _BatchNorm):
        def hook(module, args):
            x = args[0] if args else None
            hit = made.get(id(x)) if isinstance(x, torch.Tensor) else None
            if hit is not None and hit[1]() is x and x._version == hit[2]:
                fed.setdefault(bn, set()).add(hit[0])
        return hook

    handles = [m.register_forward_hook(wrote(name)) for name, m in layers.items()]
    handles += [m.register_forward_pre_hook(read(m)) for m in norms]
    was_training = model.training
    model.eval()
    try:
        call_model(model, split_batch(batch)[0])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    readers: dict[str, list[_BatchNorm]] = {}
    for bn, names in fed.items():
        if len(names) == 1:
            readers.setdefault(next(iter(names)), []).append(bn)
    return readers


@torch.no_grad()
def correct(layer: nn.Module, shift: torch.Tensor, readers: list[_BatchNorm], into_bias: bool = True) -> str | None:
    """Put `shift` back where `layer`'s outputs go: "bias" (unless not `into_bias`: a bias that is itself
    quantized), "batchnorm" (`readers`), or None where there is no such place."""
    bias = getattr(layer, "bias", None)
    if isinstance(bias, torch.Tensor) and into_bias and bias.shape == shift.shape:
        bias.add_(shift.to(bias.dtype))
        return "bias"
    targets = [bn for bn in readers if bn.running_mean.shape == shift.shape]
    for bn in targets:
        bn.running_mean.sub_(shift.to(bn.running_mean.dtype))
    return "batchnorm" if targets else None
