"""ONNX export of a compressed model, runnable by onnxruntime.

int8 layers (`runtime.Int8Linear`) become the same per-token int8 x int8 product in standard ONNX
ops (ReduceMax/Round/Cast for the activation codes, MatMulInteger on the int8 weights), so the
graph keeps modelpress's quantization and its fidelity. Weight-only quantized layers (and a loaded
model's packed ones) are exported with their dequantized float weights (ONNX has no standard op for our
group-wise low-bit grids).
"""
from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import surgery
from .batches import logits_of
from .errors import ModelpressError
from .runtime.packed import PackedEmbedding, PackedLinear, unpacked

OPSET = 17


class _Positional(nn.Module):
    """Calls the model with named inputs passed positionally and returns its main output tensor."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(**dict(zip(self.names, args))))


def example_inputs(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """Inputs to trace with: from `input_shape` (a float tensor), or from a transformers config."""
    if input_shape is not None:
        return {"input": torch.randn(*input_shape)}
    config = getattr(model, "config", None)
    if config is None:
        raise ModelpressError("exporting a model that is not a transformers model needs the input shape, "
                              "e.g. --input-shape 1,1,28,28")
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        return {name: torch.randn(1, getattr(config, "num_channels", 3), size, size)}
    ids = torch.randint(0, int(getattr(config, "vocab_size", 2)), (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


def to_onnx(model: nn.Module, path: str | os.PathLike, inputs: dict[str, torch.Tensor] | None = None,
            input_shape: tuple[int, ...] | None = None) -> Path:
    """Write `model` as an ONNX graph with dynamic batch (and sequence) axes; returns the path."""
    inputs = inputs if inputs is not None else example_inputs(model, input_shape)
    names = list(inputs)
    target = copy.deepcopy(model).eval()  # exporting can change the module it traces
    for name, m in list(target.named_modules()):
        if name and isinstance(m, (PackedLinear, PackedEmbedding)):
            surgery.replace(target, name, unpacked(m))
    wrapper = _Positional(target, names) if getattr(model, "config", None) is not None else target
    axes = {n: ({0: "batch", 1: "sequence"} if t.dim() == 2 and not t.is_floating_point() else {0: "batch"})
            for n, t in inputs.items()}
    axes["output"] = {0: "batch", 1: "sequence"} if any(1 in a for a in axes.values()) else {0: "batch"}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs.values()), str(tmp), input_names=names, output_names=["output"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    os.replace(tmp, path)
    return path
