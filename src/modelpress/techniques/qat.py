"""Quantization-aware training of weights and activations: `qat: {epochs: 2}`.

Every Linear and Conv2d gets int8 weights (a per-output-channel grid held in the compression state, so
training moves latent weights through straight-through rounding) and int8 inputs: a per-tensor
symmetric scale, first chosen on calibration batches as the clip of max|x| with the least squared
error, then learned with the weights by distillation from the original model (LSQ: the scale's
gradient through the rounding, scaled by 1/sqrt(elements x 127)), or kept as calibrated
(`ranges: calibrated`). After training the layers are exported as `StaticInt8Linear` /
`StaticInt8Conv2d`: int8 weight codes, their scales and the learned input scale, quantizing their
input at run time exactly as trained.

The Linear layer runs oneDNN's u8 x s8 kernel with the input scale and the bias applied inside it
where `runtime.int8.plan` picks that kernel (big layers, many rows); elsewhere its products are float32
sums of the integer codes, exact while a sum has fewer than 2**24 / 127**2 = 1,040 terms. The conv
layer convolves the integer input codes with the weight times its per-channel scales in float32 (the
same values up to float rounding; no integer conv kernel is used), so it runs a little slower than the
fp32 conv it replaces.
"""
from __future__ import annotations

import logging
from typing import ClassVar, Iterable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..batches import call_model, split_batch
from ..capabilities import native_bf16
from ..context import RunContext
from ..errors import ModelpressError
from ..forms.grid import RoundSTE
from ..runtime import register_runtime_module
from ..runtime.int8 import Int8Linear, packed_weight, plan
from ..runtime.layouts import cached_layout
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState, broadcast_scale
from ..surgery import fixed_layers
from .common import excluded, replace_module
from .finetune import train
from .grid import group_scale, quantize_tensor
from .losses import Objective

log = logging.getLogger(__name__)
QMAX = 127
_CLIPS = torch.linspace(1.0, 0.3, 15)  # candidate clips of max|x| for the calibrated input scale


@register_stage
class QATConfig(StageConfig):
    """int8 weights and inputs for Linear and Conv2d layers, trained `epochs` with the quantization in
    the loop, by distillation from the original model (`distill: false`: from the batches' labels where
    they have them); input ranges `learned` (initialised by calibration) or `calibrated` (fixed)."""

    key: ClassVar[str] = "qat"
    bits: Literal[8] = 8
    epochs: float = Field(ge=0.0, le=1000)
    lr: float = Field(default=3e-5, gt=0.0, lt=1.0)
    distill: bool = True
    ranges: Literal["learned", "calibrated"] = "learned"
    calib_batches: int = Field(default=8, ge=1, le=10_000)

    def without_training(self) -> "QATConfig":
        return self.model_copy(update={"epochs": 0.0, "ranges": "calibrated"})


@handles(QATConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: QATConfig, run: RunContext) -> None:
    qat(model, state, epochs=cfg.epochs, lr=cfg.lr, ranges=cfg.ranges, calib_batches=cfg.calib_batches,
        distill=cfg.distill, exclude=run.excluded(cfg), run=run)


class InputQuant(nn.Module):
    """Fake int8 quantization of a layer's input with one scale (trainable when `learned`)."""

    def __init__(self, scale: float, learned: bool):
        super().__init__()
        value = torch.tensor([scale], dtype=torch.float32)
        if learned:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale.abs().clamp_min(1e-12)
        if self.scale.requires_grad:  # LSQ's gradient scale: the step size learns at the weights' pace
            g = (x.numel() * QMAX) ** -0.5
            s = s * g + (s - s * g).detach()
        return RoundSTE.apply(x / s).clamp(-QMAX, QMAX) * s


def _fake_quant_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quant(args[0]), *args[1:])


@register_runtime_module
class StaticInt8Linear(Int8Linear):
    """An Int8Linear (int8 weights per output channel) whose inputs are quantized at one static, trained
    scale instead of per token."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("input_scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x.float() / self.input_scale).clamp_(-QMAX, QMAX)
        q2 = q.reshape(-1, self.in_features)
        kernel = self.kernel or plan(self.in_features, self.out_features, q2.shape[0])
        if kernel == "onednn" and not torch.is_grad_enabled():  # scales and bias inside the kernel
            zero = torch.zeros(self.out_features, dtype=torch.long)
            y = torch.ops.onednn.qlinear_pointwise(
                q2.add_(128).to(torch.uint8), float(self.input_scale), 128, packed_weight(self, "onednn"),
                self.weight_scale.float(), zero, None if self.bias is None else self.bias.float(), 1.0, 0,
                torch.bfloat16 if native_bf16() else torch.float32, "none", [None], "").float()
            return y.reshape(*q.shape[:-1], self.out_features).to(x.dtype)
        y = F.linear(q2, cached_layout(self, "float", self.weight.float, self.weight))
        y = y.reshape(*q.shape[:-1], self.out_features) * (self.input_scale * self.weight_scale)
        return (y if self.bias is None else y + self.bias).to(x.dtype)


@register_runtime_module
class StaticInt8Conv2d(nn.Module):
    """A Conv2d (zero padding) with int8 weights (per output channel) and int8 inputs at one static scale."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride = tuple(kernel_size), tuple(stride)
        self.padding, self.dilation = tuple(padding), tuple(dilation)
        self.register_buffer("weight", torch.zeros(out_channels, in_channels // max(1, groups), *self.kernel_size,
                                                   dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_channels))
        self.register_buffer("input_scale", torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.input_scale
        q = torch.div(x.float(), s).round_().clamp_(-QMAX, QMAX)
        # y = s * (q (*) (w * w_scale) + bias / s): the per-channel scale and the bias ride in the conv
        w = cached_layout(self, "scaled", lambda: self.weight.float() * self.weight_scale.view(-1, 1, 1, 1),
                          self.weight, self.weight_scale)
        bias = None if self.bias is None else self.bias / s
        return F.conv2d(q, w, bias, self.stride, self.padding, self.dilation, self.groups).mul_(s).to(x.dtype)


def targets(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Module]:
    """The Linear and (zero-padded) Conv2d layers QAT quantizes, by name; a warning names the weight
    layers it leaves in float."""
    exclude, out, left = list(exclude), {}, []
    shared, fixed = _shared_weights(model), fixed_layers(model)
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or excluded(name, exclude):
            continue
        ok = type(m) is nn.Linear or type(m) is nn.Conv2d and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
        if ok and id(m.weight) not in shared and name not in fixed:
            out[name] = m
        else:
            left.append(name)
    if left:
        log.warning("qat: %d layer(s) stay float (other layer types, 'same' padding, shared weights, or read "
                    "directly by an attention layer): %s",
                    len(left), ", ".join(left[:6]) + (", ..." if len(left) > 6 else ""))
    return out


def qat(model: nn.Module, state: CompressionState, *, epochs: float, lr: float = 3e-5, ranges: str = "learned",
        calib_batches: int = 8, distill: bool = True, exclude: Iterable[str] = (), run: RunContext) -> dict[str, float]:
    """Quantize, train with the quantization in the loop, export to the static int8 runtime layers.
    Returns each layer's input scale."""
    layers = targets(model, exclude)
    if not layers:
        raise ModelpressError("qat: the model has no Linear or Conv2d layer left after 'exclude'; nothing to quantize")
    done = [n for n in layers if f"{n}.weight" in state.params
            and (state.params[f"{n}.weight"].scale is not None or state.params[f"{n}.weight"].codebook is not None)]
    if done:
        raise ModelpressError(f"qat: {done[0]!r} is already quantized or clustered; qat quantizes weights itself: "
                              "put it before other quantize / cluster stages, or drop those")
    scales = calibrate_inputs(model, layers, run, calib_batches)
    with torch.no_grad():
        for name, m in layers.items():
            st = state.get(f"{name}.weight")
            st.scale = group_scale(m.weight, 8, None)
            st.codes = quantize_tensor(m.weight, st.scale, 8)
            st.bits, st.group = 8, None
            w = st.codes.float() * broadcast_scale(st.scale, m.weight)
            m.weight.copy_(w if st.mask is None else w * st.mask)
    hooks = []
    for name, m in layers.items():
        m.input_quant = InputQuant(scales[name], learned=ranges == "learned")
        hooks.append(m.register_forward_pre_hook(_fake_quant_input))
    try:
        if epochs > 0:
            train(model, state, run, epochs=epochs, lr=lr, label="qat", objective=Objective(distill=distill))
        learned = {n: float(m.input_quant.scale.detach().abs().clamp_min(1e-12)) for n, m in layers.items()}
    finally:
        for h in hooks:
            h.remove()
        for m in layers.values():
            del m.input_quant
    for name, m in layers.items():
        _export(model, state, name, m, learned[name])
    return learned


@torch.no_grad()
def calibrate_inputs(model: nn.Module, layers: dict[str, nn.Module], run: RunContext, batches: int,
                     sample: int = 1 << 16) -> dict[str, float]:
    """Per layer, the input scale max|x| * c / 127 whose int8 rounding of the calibration inputs has the
    least squared error, over clips c in [0.3, 1]."""
    data = run.calib_data if run.calib_data is not None else run.train_data
    if data is None:
        raise ModelpressError("qat needs calib_data or train_data (a few batches of inputs) to set the input ranges")
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in layers}

    def hook(name: str):
        def fn(m, args):
            x = args[0].detach().float().flatten()
            seen[name].append(x[:: max(1, x.numel() // sample)])
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    model.eval()
    try:
        for _, batch in zip(range(batches), data):
            call_model(model, split_batch(batch)[0])
    finally:
        for h in handles:
            h.remove()
    scales = {}
    for name, xs in seen.items():
        if not xs:
            raise ModelpressError(f"qat: layer {name!r} received no input on the calibration batches; exclude it")
        x = torch.cat(xs)
        amax = float(x.abs().max())
        if amax == 0:
            scales[name] = 1.0
            continue
        cands = (amax * _CLIPS / QMAX).unsqueeze(1)
        err = ((torch.round(x / cands).clamp(-QMAX, QMAX) * cands - x) ** 2).sum(1)
        scales[name] = float(cands[int(err.argmin())])
    return scales


def _shared_weights(model: nn.Module) -> set[int]:
    count: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        count[id(p)] = count.get(id(p), 0) + 1
    return {k for k, v in count.items() if v > 1}


@torch.no_grad()
def _export(model: nn.Module, state: CompressionState, name: str, m: nn.Module, input_scale: float) -> None:
    """Replace a trained layer by its static int8 runtime layer; its state entries go (the codes live in
    the new layer's int8 weight)."""
    st = state.params.pop(f"{name}.weight")
    state.params.pop(f"{name}.bias", None)
    codes = st.codes if st.mask is None else st.codes * st.mask
    if isinstance(m, nn.Linear):
        new: nn.Module = StaticInt8Linear(m.in_features, m.out_features, m.bias is not None)
    else:
        new = StaticInt8Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                               m.groups, m.bias is not None)
    new.weight = codes.to(torch.int8).contiguous()
    new.weight_scale = st.scale.detach().float().reshape(-1).clone()
    new.input_scale = torch.tensor([input_scale], dtype=torch.float32)
    if m.bias is not None:
        new.bias = nn.Parameter(m.bias.detach().float().clone())
    replace_module(model, name, new)
