"""int8 x int8 linear layers: weights quantized per output channel, activations per token at run time.

The integer matrix multiply has several CPU implementations and none is fastest everywhere
(`torch._int_mm` is 7x faster than fp32 on a CPU with VNNI and 60x slower on one with only AVX2;
oneDNN's u8 x s8 kernel is fast on both). Each layer shape picks its kernel the first time it runs,
by timing the candidates on this CPU, so it is never slower than the fp32 layer it replaces
(the dequantized fp32 weight is one candidate). All integer kernels accumulate exactly, so the
choice changes speed, not results beyond float rounding. The choices live in a `KernelCache` (one
shared by default, keyed by layer shape; give a layer its own to keep it apart); a layer's `kernel`
attribute, or `MODELPRESS_INT8_KERNEL` in the environment when the module is imported, forces one.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("int_mm", "onednn", "dequant")
FORCED_KERNEL = os.environ.get("MODELPRESS_INT8_KERNEL") or None  # read once, at import


class KernelCache:
    """The fastest kernel measured for each (in, out, rows bucket), so that layers of one shape time
    the candidates once."""

    def __init__(self) -> None:
        self.choices: dict[tuple[int, int, int], str] = {}

    def choose(self, m: "Int8Linear", x: torch.Tensor) -> str:
        bucket = 1 << max(0, (x.shape[0] - 1).bit_length())
        key = (m.in_features, m.out_features, min(bucket, 4096))
        if key not in self.choices:
            self.choices[key] = _time_kernels(m, x)
        return self.choices[key]


DEFAULT_CACHE = KernelCache()


def quantize_rows(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of each row of a 2-D float tensor (+ `offset`, as float) and the row scales."""
    amax = torch.maximum(x.amax(1), x.amin(1).neg_()).clamp_min_(1e-12)
    q = torch.mul(x, (127.0 / amax).unsqueeze(1)).round_()
    if offset:
        q.add_(offset)
    return q, amax / 127.0


def available_kernels() -> list[str]:
    """The kernels this torch build and CPU can run (fastest first by expectation, fp32 last)."""
    out = []
    vnni = getattr(torch.cpu, "_is_vnni_supported", lambda: False)() or \
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    if hasattr(torch, "_int_mm") and vnni:
        out.append("int_mm")  # on CPUs without VNNI it is tens of times slower than fp32: never a candidate
    if hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available():
        out.append("onednn")
    return out + ["dequant"]


class Int8Linear(nn.Module):
    """A drop-in `nn.Linear` holding int8 weights and per-output-channel float scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel: str | None = FORCED_KERNEL  # None: the fastest measured on this CPU
        self.cache = DEFAULT_CACHE
        self._packed: tuple | None = None       # (key, weight in the layout of the kernel that ran last)

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
        return self.weight.float() * self.weight_scale.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return _OnnxInt8Linear.apply(x, self.weight, self.weight_scale, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if torch.is_grad_enabled() and (x2.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            kernel = "dequant"  # training through the layer: a differentiable float path
        else:
            kernel = self.kernel or self.cache.choose(self, x2)
        y = _run(self, kernel, x2)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


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
    """The weight in the layout `kernel` wants, built once and rebuilt if the weight changes."""
    key = (kernel, m.weight.data_ptr(), m.weight._version, m.weight_scale.data_ptr())
    cached = getattr(m, "_packed", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    if kernel == "int_mm":
        packed = m.weight.t().contiguous()
    elif kernel == "onednn":
        packed = torch.ops.onednn.qlinear_prepack(m.weight, None)
    else:
        packed = m.dequantized()
    m._packed = (key, packed)
    return packed


def _run(m: Int8Linear, kernel: str, x: torch.Tensor) -> torch.Tensor:
    if kernel not in KERNELS:
        raise ValueError(f"unknown int8 kernel {kernel!r}; choose from {KERNELS}")
    packed = packed_weight(m, kernel)
    if kernel == "dequant":
        return F.linear(x, packed, m.bias)
    if kernel == "int_mm":
        q, sx = quantize_rows(x)
        y = torch._int_mm(q.to(torch.int8), packed) * m.weight_scale
    else:
        q, sx = quantize_rows(x, offset=128)
        zero = torch.zeros(m.out_features, dtype=torch.long)
        y = torch.ops.onednn.qlinear_pointwise(q.to(torch.uint8), 1.0, 128, packed, m.weight_scale, zero, None,
                                               1.0, 0, torch.float32, "none", [None], "")
    y.mul_(sx.unsqueeze(1))
    return y.add_(m.bias) if m.bias is not None else y


def _time_kernels(m: Int8Linear, x: torch.Tensor) -> str:
    """The fastest available kernel on this input shape (best of three timed runs each)."""
    sample = x[: 4096] if x.shape[0] > 4096 else x
    best, best_t = "dequant", float("inf")
    with torch.no_grad():
        for kernel in available_kernels():
            try:
                t = _best_time(lambda: _run(m, kernel, sample))
            except Exception:  # a kernel this build cannot run on this input
                continue
            if t < best_t:
                best, best_t = kernel, t
    return best


def _best_time(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
