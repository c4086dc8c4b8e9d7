"""ONNX export of a compressed model, runnable by onnxruntime.

int8 layers (`runtime.Int8Linear`) become the same per-token int8 x int8 product in standard ONNX
ops (ReduceMax/Round/Cast for the activation codes, MatMulInteger on the int8 weights), so the graph
keeps modelpress's quantization and its fidelity; a loaded model's packed low-bit layers and
weight-only quantized layers are exported with their dequantized float weights.

With `nbits=True`, packed layers (2-4 bits as 4-bit codes, 5-8 bits as 8-bit, in groups or per channel)
and int8 layers become onnxruntime's `MatMulNBits` (com.microsoft) holding the file's codes and scales,
run with int8 activations per block of inputs (accuracy_level 4). Measured on all-MiniLM-L6-v2 (batch
64 x 128, Xeon with AMX, 2 threads, onnxruntime 1.32): int8 1,011 ms at mean cosine 0.99911 against
868 ms at 0.99772 for the MatMulInteger graph and 656 ms at 0.99284 for onnxruntime's own
quantize_dynamic graph; so it is not the default. Packed embedding tables, and layers whose group
MatMulNBits cannot take (other than 16-256, powers of two), keep float weights.
"""
from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import surgery
from .batches import logits_of
from .errors import ModelpressError
from .runtime import PackedEmbedding, PackedLinear, SparseLinear, quantized_weight

OPSET = 17


class _Positional(nn.Module):
    """Calls the model with named inputs passed positionally and returns its main output tensor."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(**dict(zip(self.names, args))))


_INPUT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                 "int64": torch.int64, "int32": torch.int32}
MAX_RECORDED_NUMEL = 1 << 24


def recorded_input(meta: dict) -> torch.Tensor | None:
    """A tensor like the input a file recorded at compress time (`meta["input"]`: shape for a batch of
    1, dtype), or None if it recorded none or a malformed one (the file is not trusted)."""
    rec = meta.get("input") if isinstance(meta, dict) else None
    if not isinstance(rec, dict) or rec.get("dtype") not in _INPUT_DTYPES:
        return None
    shape = rec.get("shape")
    if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or \
            not all(type(d) is int and 1 <= d <= MAX_RECORDED_NUMEL for d in shape):
        return None
    if math.prod(shape) > MAX_RECORDED_NUMEL:
        return None
    dtype = _INPUT_DTYPES[rec["dtype"]]
    return torch.randn(shape).to(dtype) if dtype.is_floating_point else torch.zeros(shape, dtype=dtype)


def example_inputs(model: nn.Module, input_shape: tuple[int, ...] | None = None,
                   recorded: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Inputs to trace with: from `input_shape` (a float tensor), the input the file recorded, or a
    transformers config."""
    if input_shape is not None:
        return {"input": torch.randn(*input_shape)}
    config = getattr(model, "config", None)
    if config is None and recorded is not None:
        return {"input": recorded}
    if config is None:
        raise ModelpressError("exporting a model that is not a transformers model needs its input shape (this file "
                              f"recorded none), e.g. --input-shape {_shape_hint(model)}")
    name = getattr(model, "main_input_name", "input_ids")
    if name == "pixel_values":
        size = getattr(config, "image_size", 224)
        return {name: torch.randn(1, getattr(config, "num_channels", 3), size, size)}
    ids = torch.randint(0, int(getattr(config, "vocab_size", 2)), (2, 8))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(config, "type_vocab_size", 0):
        inputs["token_type_ids"] = torch.zeros_like(ids)
    return inputs


class _MatMulNBits(torch.autograd.Function):
    """onnxruntime's MatMulNBits in the graph; in the trace, the float product of the same weight."""

    @staticmethod
    def forward(ctx, x, blob, scales, bias, weight, k, n, bits, block):  # noqa: D102 - traced for shapes
        y = F.linear(x, weight)
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, x, blob, scales, bias, weight, k, n, bits, block):  # noqa: D102
        y = g.op("com.microsoft::MatMulNBits", x, blob, scales, K_i=k, N_i=n, bits_i=bits, block_size_i=block,
                 accuracy_level_i=4)
        return y if bias is None or bias.node().mustBeNone() else g.op("Add", y, bias)


class _NBitsLinear(nn.Module):
    """A Linear as MatMulNBits: unsigned codes (offset 8 or 128, onnxruntime's default zero points) packed
    per block of `block` inputs, and a scale per block."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bits: int, block: int, bias: torch.Tensor | None):
        super().__init__()
        n, k = codes.shape
        blocks = -(-k // block)
        scale = scale.float().reshape(n, -1)
        if scale.shape[1] == 1:  # per channel: the row's scale for each of its blocks
            scale = scale.expand(n, blocks)
        u = F.pad(codes.to(torch.int32), (0, blocks * block - k)) + (8 if bits == 4 else 128)  # pad: code 0
        u = u.to(torch.uint8).reshape(n, blocks, block)
        blob = u[..., 0::2] | (u[..., 1::2] << 4) if bits == 4 else u
        self.k, self.n, self.bits, self.block = k, n, bits, block
        self.register_buffer("blob", blob.contiguous())
        self.register_buffer("scales", scale.contiguous())
        self.register_buffer("weight", codes.float() * scale.repeat_interleave(block, 1)[:, :k])
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _MatMulNBits.apply(x, self.blob, self.scales, self.bias, self.weight, self.k, self.n, self.bits,
                                  self.block)


def _as_float(m: nn.Module) -> nn.Module | None:
    """A packed or sparse layer as the plain float layer it stands for (the file's weights exactly); None
    for any other module. Exporters have no ops for packed codes or CSR products."""
    if isinstance(m, PackedEmbedding):
        new: nn.Module = nn.Embedding(m.num_embeddings, m.embedding_dim, None if m.padding_idx < 0 else m.padding_idx)
        new.weight.data = m.dequantized()
        return new
    if not isinstance(m, (PackedLinear, SparseLinear)):
        return None
    new = nn.Linear(m.in_features, m.out_features, m.bias is not None)
    new.weight.data = m.dense_weight() if isinstance(m, SparseLinear) else m.dequantized()
    if m.bias is not None:
        new.bias.data = m.bias.detach().float().clone()
    return new


def _nbits(m: nn.Module) -> nn.Module | None:
    """The MatMulNBits form of a packed or int8 layer, where onnxruntime's op can hold it exactly."""
    q = quantized_weight(m)
    if q is None:
        return None
    codes, scale, bits, group = q
    block = group or max(16, min(128, 1 << (int(codes.shape[1]) - 1).bit_length()))
    if block not in (16, 32, 64, 128, 256):
        return None
    return _NBitsLinear(codes, scale, 4 if bits <= 4 else 8, block, m.bias)


def _shape_hint(model: nn.Module) -> str:
    """An input shape to suggest, from the model's first layer that says what it takes."""
    for m in model.modules():
        channels, features = getattr(m, "in_channels", None), getattr(m, "in_features", None)
        if isinstance(channels, int):
            spatial = {1: "L", 3: "D,H,W"}.get(len(getattr(m, "kernel_size", ())), "H,W")
            return f"1,{channels},{spatial} (with your inputs' sizes for {spatial})"
        if isinstance(features, int):
            return f"1,{features}"
    return "1,C,H,W"


def to_onnx(model: nn.Module, path: str | os.PathLike, inputs: dict[str, torch.Tensor] | None = None,
            input_shape: tuple[int, ...] | None = None, nbits: bool = False,
            recorded: torch.Tensor | None = None) -> Path:
    """Write `model` as an ONNX graph with dynamic batch (and sequence) axes; returns the path. With
    `nbits`, packed and int8 Linear layers become onnxruntime's MatMulNBits (see the module docstring).
    The traced input is `inputs`, else one of `input_shape`, else `recorded` (`recorded_input`)."""
    inputs = inputs if inputs is not None else example_inputs(model, input_shape, recorded)
    names = list(inputs)
    target = copy.deepcopy(model).eval()  # exporting can change the module it traces
    for name, m in list(target.named_modules()):
        new = _nbits(m) if nbits and name else None
        if new is None and name:
            new = _as_float(m)
        if new is not None:
            surgery.replace(target, name, new)
    wrapper = _Positional(target, names) if getattr(model, "config", None) is not None else target
    axes = {n: ({0: "batch", 1: "sequence"} if t.dim() == 2 and not t.is_floating_point() else {0: "batch"})
            for n, t in inputs.items()}
    axes["output"] = {0: "batch", 1: "sequence"} if any(1 in a for a in axes.values()) else {0: "batch"}
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(wrapper, tuple(inputs.values()), str(tmp), input_names=names, output_names=["output"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False,
                          custom_opsets={"com.microsoft": 1})
    os.replace(tmp, path)
    return path
