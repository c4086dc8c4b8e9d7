"""int8 x int8 linear layers: weights quantized per output channel, activations per token at run time.

Two kernels:
- "onednn": the int8 x int8 product, per-token int8 inputs times the int8 weights, by oneDNN's u8 x s8
  matrix multiply (AMX or VNNI where the CPU has them, AVX2 otherwise). On a CPU with native bf16 it
  writes its result in bf16, which on AMX is 8x faster than asking it for fp32 (1.9 ms against 15 ms for
  8192x384 @ 384x1536 on a Xeon with AMX), at bf16's rounding of each output.
- "dequant": the fp32 inputs times a cached fp32 copy of the dequantized weight (weight-only int8), for
  layers too small for the integer kernel's fixed cost to pay: at batch 1 a 768x768 layer runs 2.6x
  slower through oneDNN than in fp32, and quantizing the inputs alone, in eager PyTorch's separate
  elementwise passes, costs a small layer as much as its product.
The two differ by the rounding of the inputs to int8 (relative error about 1e-2 on the outputs of
random layers, 0.9997 against 0.9977 mean embedding cosine on MiniLM). The choice is a rule on the
layer's shape and the number of rows (`plan`): a busy machine cannot change it, and the same layer
given the same number of rows always computes the same way. A layer's `kernel` attribute, or
`MODELPRESS_INT8_KERNEL` in the environment when the module is imported, forces one. `torch._int_mm`
is not used: on AMX it runs oneDNN's older s8 x s8 path, 10x slower than the u8 x s8 one.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import native_bf16
from .layouts import cached_layout, keep_small_layer_weight, small_layer_weight

KERNELS = ("onednn", "dequant")
FORCED_KERNEL = os.environ.get("MODELPRESS_INT8_KERNEL") or None  # read once, at import
ONEDNN = hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()
BIG_WEIGHT = 1 << 20    # in x out: an integer product this big pays at any batch (memory-bound at batch 1)
BIG_PRODUCT = 1 << 24   # rows x in x out: multiply-adds enough to repay quantizing the inputs


def plan(in_features: int, out_features: int, rows: int) -> str:
    """The kernel an int8 layer of this shape uses for `rows` input rows."""
    weight = in_features * out_features
    if ONEDNN and (weight >= BIG_WEIGHT or rows * weight >= BIG_PRODUCT):
        return "onednn"
    return "dequant"


def quantize_rows(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of a 2-D float tensor (+ `offset`, as float) and the row scales."""
    amax = torch.maximum(x.amax(1), x.amin(1).neg_()).clamp_min_(1e-12)
    q = torch.mul(x, (127.0 / amax).unsqueeze(1)).round_()
    if offset:
        q.add_(offset)
    return q, amax / 127.0


class Int8Linear(nn.Module):
    """A drop-in `nn.Linear` holding int8 weights and per-output-channel float scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel: str | None = FORCED_KERNEL  # None: `plan` decides per call

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        """From integer codes in [-127, 127] (out, in) and per-output-channel scales."""
        m = cls(codes.shape[1], codes.shape[0], bias is not None)
        m.weight = codes.to(torch.int8).contiguous()
        m.weight_scale = scale.detach().float().reshape(-1).clone()
        if bias is not None:
            m.bias = nn.Parameter(bias.detach().float().clone())
        return m

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale.float().unsqueeze(1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() * self.out_features < BIG_PRODUCT and self.kernel != "onednn":
            w = small_layer_weight(self, x)  # small layers: one op, as in nn.Linear
            if w is not None:
                return F.linear(x, w, self.bias)
        if torch.onnx.is_in_onnx_export():
            return _OnnxInt8Linear.apply(x, self.weight, self.weight_scale, self.bias)
        if torch.compiler.is_compiling():
            if (self.kernel or plan(self.in_features, self.out_features, x.numel() // x.shape[-1])) == "dequant":
                return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
            return _traced(self, x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if torch.is_grad_enabled() and (x2.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            y = F.linear(x2, self.dequantized(), self.bias)  # training through the layer: differentiable
        else:
            y = _run(self, self.kernel or plan(self.in_features, self.out_features, x2.shape[0]), x2)
        y = y.reshape(*shape[:-1], self.out_features) if len(shape) != 2 else y
        return y if y.dtype == x.dtype else y.to(x.dtype)


class _OnnxInt8Linear(torch.autograd.Function):
    """Exported as the same per-token int8 x int8 product in standard ONNX ops (MatMulInteger)."""

    @staticmethod
    def forward(ctx, x, weight, weight_scale, bias):  # noqa: D102 - traced only for shapes
        y = F.linear(x, weight.float() * weight_scale.unsqueeze(1))
        return y if bias is None else y + bias

    @staticmethod
    def symbolic(g, x, weight, weight_scale, bias):  # noqa: D102
        amax = g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1)
        scale = g.op("Max", g.op("Div", amax, _const(g, 127.0)), _const(g, 1e-12 / 127.0))
        # codes shifted to uint8 with zero point 128: onnxruntime's fast u8 x s8 kernels (s8 x s8 is slow)
        q = g.op("Cast", g.op("Add", g.op("Round", g.op("Div", x, scale)), _const(g, 128.0)), to_i=2)  # UINT8
        zero = g.op("Constant", value_t=torch.tensor(128, dtype=torch.uint8))
        wt = g.op("Transpose", weight, perm_i=[1, 0])
        acc = g.op("Cast", g.op("MatMulInteger", q, wt, zero), to_i=1)  # 1: FLOAT
        y = g.op("Mul", g.op("Mul", acc, scale), weight_scale)
        return y if bias is None or bias.node().mustBeNone() else g.op("Add", y, bias)


def _const(g, value: float):
    return g.op("Constant", value_t=torch.tensor(value, dtype=torch.float32))


def packed_weight(m: Int8Linear, kernel: str) -> torch.Tensor:
    """The weight in the layout `kernel` wants, built once and rebuilt if the weight changes: oneDNN's
    prepacked int8, or for "dequant" the codes times their scales in fp32."""
    if kernel == "onednn":
        return cached_layout(m, "onednn", lambda: torch.ops.onednn.qlinear_prepack(m.weight, None), m.weight)
    return cached_layout(m, "fp32", m.dequantized, m.weight, m.weight_scale)


def _run(m: Int8Linear, kernel: str, x: torch.Tensor) -> torch.Tensor:
    if kernel == "dequant":
        w = packed_weight(m, kernel)
        if m.in_features * m.out_features < BIG_WEIGHT:
            keep_small_layer_weight(m, ("weight", "weight_scale"), w)
        return F.linear(x, w, m.bias)
    if kernel != "onednn":
        raise ValueError(f"unknown int8 kernel {kernel!r}; choose from {KERNELS}")
    q, sx = quantize_rows(x, offset=128)
    zero = torch.zeros(m.out_features, dtype=torch.long)
    out = torch.bfloat16 if native_bf16() else torch.float32
    y = torch.ops.onednn.qlinear_pointwise(q.to(torch.uint8), 1.0, 128, packed_weight(m, kernel),
                                           m.weight_scale.float(), zero, None, 1.0, 0, out, "none", [None], "")
    y = y.float().mul_(sx.unsqueeze(1))
    return y.add_(m.bias.float()) if m.bias is not None else y


def _traced(m: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """The same product written as quantize / dequantize around a float linear, the pattern inductor's
    freezing passes turn into one oneDNN int8 kernel, with the quantization fused into the ops before it
    and the per-token scale and bias into the ops after it (runtime/compiled.py)."""
    dq = torch.ops.quantized_decomposed
    x2 = x.float()
    amax = torch.maximum(x2.amax(-1, keepdim=True), x2.amin(-1, keepdim=True).neg()).clamp_min(1e-12)
    q = torch.mul(x2, 127.0 / amax).round().add(128).to(torch.uint8)
    xd = dq.dequantize_per_tensor(q, 1.0, 128, 0, 255, torch.uint8)
    zero = torch.zeros(m.out_features, dtype=torch.long)
    wd = dq.dequantize_per_channel(m.weight, m.weight_scale.float(), zero, 0, -128, 127, torch.int8)
    if native_bf16():  # the kernel writes bf16 (see the module docstring)
        xd, wd = xd.to(torch.bfloat16), wd.to(torch.bfloat16)
    y = F.linear(xd, wd).float() * (amax / 127.0)
    return (y if m.bias is None else y + m.bias.float()).to(x.dtype)
