"""Uniform weight quantization (the grids are in `grid.py`: all 2^bits codes below 8 bits, symmetric at 8):
per tensor, per output channel or per group of inputs, round-to-nearest or error-compensating.
`method="gptq"` compensates each column's rounding error in the columns not yet quantized, weighted by
the layer's input Hessian from calibration data. On a clustered tensor the codebook itself is snapped to
a per-tensor grid, so codes stay shared. With `activations="int8"`, 8-bit Linear layers become
`runtime.Int8Linear` (int8 x int8 products, activations per token)."""
from __future__ import annotations

import logging
from typing import Callable, ClassVar, Iterable, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..context import RunContext
from ..errors import ModelpressError
from ..runtime.int8 import Int8Linear
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState, ParamState, broadcast_scale, split_name
from ..surgery import fixed_layers
from .bias_correction import batchnorm_readers, correct, output_shift
from .calibrate import HESSIAN_LAYERS, calibration_batches, collect_hessians
from .common import excluded, replace_module, target_params
from .gptq import gptq
from .grid import group_scale, quantize_tensor, symmetric_scale
from .mixed import allocate, layer_errors, sensitivities

log = logging.getLogger(__name__)


@register_stage
class QuantizeConfig(StageConfig):
    """Uniform weight quantization (per output channel, or per group of `group_size` inputs),
    round-to-nearest or GPTQ; `activations: int8` runs 8-bit Linear layers as int8 x int8 products."""

    key: ClassVar[str] = "quantize"
    bits: int = Field(ge=2, le=8)
    group_size: Optional[int] = Field(default=None, ge=8, le=65536)
    method: Literal["rtn", "gptq"] = "rtn"
    activations: Literal["none", "int8"] = "none"
    embeddings: bool = True
    per_channel: bool = True
    include_bias: bool = False
    avg_bits: Optional[float] = Field(default=None, gt=0.0, le=8.0)    # per-layer bits: mean code bits per weight
    budget_mb: Optional[float] = Field(default=None, gt=0.0, le=10**7)  # per-layer bits: file size budget
    sensitivity: Literal["output", "layer"] = "output"  # per-layer bits: the model's output, or each layer's
    bias_correction: bool = True  # with gptq: each layer's mean output shift goes back into its bias or BatchNorm
    act_order: Optional[bool] = None  # gptq: columns by decreasing Hessian diagonal; None: 2-D weights below 8 bits

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeConfig":
        if self.activations == "int8" and (self.bits != 8 or self.group_size is not None or not self.per_channel):
            raise ValueError("activations: int8 needs bits: 8, per_channel: true and no group_size "
                             f"(got bits={self.bits}, group_size={self.group_size}, per_channel={self.per_channel})")
        if self.method == "gptq" and not self.per_channel:
            raise ValueError("method: gptq solves per output channel; with per_channel: false use method: rtn")
        if self.avg_bits is not None and self.avg_bits < self.bits:
            raise ValueError(f"avg_bits ({self.avg_bits}) must be at least bits ({self.bits}): "
                             "'bits' is the lowest width any layer gets")
        if "sensitivity" in self.model_fields_set and self.avg_bits is None and self.budget_mb is None:
            raise ValueError(f"sensitivity: {self.sensitivity} ranks layers for per-layer bits, and there are none "
                             "to give: add avg_bits or budget_mb, or drop sensitivity")
        if (self.avg_bits is not None or self.budget_mb is not None) and self.activations == "int8":
            raise ValueError("per-layer bits (avg_bits / budget_mb) are for weight-only quantization; "
                             "drop them or use activations: none")
        return self

    def without_training(self) -> "QuantizeConfig":
        return self.model_copy(update={"method": "rtn"})


@handles(QuantizeConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: QuantizeConfig, run: RunContext) -> None:
    quantize(model, state, bits=cfg.bits, per_channel=cfg.per_channel, group_size=cfg.group_size,
             method=cfg.method, activations=cfg.activations, embeddings=cfg.embeddings,
             avg_bits=cfg.avg_bits, budget_mb=cfg.budget_mb, sensitivity=cfg.sensitivity,
             include_bias=cfg.include_bias, bias_correction=cfg.bias_correction, act_order=cfg.act_order,
             exclude=run.excluded(cfg), calib_data=run.calib_data, progress=run.progress)


def quant_targets(model: nn.Module, exclude: Iterable[str], *, bias: bool, embeddings: bool) -> dict[str, nn.Parameter]:
    """Weights of Linear/Conv layers (and of Embeddings if asked), each shared Parameter once."""
    params = dict(target_params(model, exclude, bias=bias))
    if embeddings:
        for name, m in model.named_modules():
            if isinstance(m, nn.Embedding) and not excluded(name, exclude):
                params[f"{name}.weight"] = m.weight
    seen, out = set(), {}
    for name, p in params.items():
        if id(p) not in seen:
            seen.add(id(p))
            out[name] = p
    return out


def quantize(model: nn.Module, state: CompressionState, *, bits: int, per_channel: bool = True,
             group_size: int | None = None, method: str = "rtn", activations: str = "none",
             embeddings: bool = True, include_bias: bool = False, exclude: tuple[str, ...] = (),
             avg_bits: float | None = None, budget_mb: float | None = None, sensitivity: str = "output",
             bias_correction: bool = True, act_order: bool | None = None, calib_data: Iterable | None = None,
             progress: Callable[[str, float], None] | None = None) -> None:
    """Snap target weights (or their codebooks) to a uniform grid of `bits` bits, or of per-tensor
    bits chosen by measured sensitivity (`sensitivity`: "output" or "layer", see `mixed.py`) when
    `avg_bits` or `budget_mb` is given. With GPTQ and `bias_correction`, each layer's mean output shift
    on the calibration data is put back (`bias_correction.py`); `act_order`: see `gptq.py`."""
    params = quant_targets(model, exclude, bias=include_bias, embeddings=embeddings)
    if not params:
        raise ModelpressError("quantize: the model has no Linear, Conv or Embedding layer left after 'exclude'; "
                              "nothing to quantize")
    if method == "gptq" and not per_channel:
        raise ModelpressError("quantize: method 'gptq' solves per output channel; with per_channel=False use "
                              "method 'rtn'")
    mixed = avg_bits is not None or budget_mb is not None
    budget = bit_budget(model, params, bits, group_size, avg_bits, budget_mb) if mixed else None
    hessians, means, readers = {}, None, {}
    if method == "gptq" or mixed and sensitivity == "layer":
        layers = hessian_layers(model, params)
        rest = [n for n in params if n not in layers and state.get(n).codebook is None]
        if rest and method == "gptq":
            log.info("quantize: GPTQ solves Linear, Conv1d and Conv2d layers; %d other tensor(s) are rounded to "
                     "nearest: %s", len(rest), ", ".join(rest[:6]) + (", ..." if len(rest) > 6 else ""))
        calib_data = calibration_batches(calib_data, "method: gptq")  # a list: it is passed over more than once
        means = {} if method == "gptq" and bias_correction else None
        hessians = collect_hessians(model, layers, calib_data, progress=progress, means=means)
        if means:
            readers = batchnorm_readers(model, {n: layers[n] for n in means}, calib_data[0])
    widths = dict.fromkeys(params, bits)
    if mixed:
        widths = mixed_bits(model, params, bits, group_size, budget, calib_data, progress,
                            hessians if sensitivity == "layer" else None)
    if method != "gptq":
        hessians = {}
    places: dict[str | None, list[str]] = {}
    for i, (name, p) in enumerate(params.items()):
        st = state.get(name)
        hessian = hessians.pop(name, None)
        before = p.detach().clone() if hessian is not None and means and name in means else None
        quantize_param(p, st, bits if st.codebook is not None else widths[name], group_size, hessian, per_channel,
                       act_order=act_order)
        if before is not None:
            layer = split_name(name)[0]
            shift = output_shift(before, p, means.pop(name))
            places.setdefault(correct(layers[name], shift, readers.get(name, []), f"{layer}.bias" not in params),
                              []).append(name)
        if progress is not None:
            progress(f"quantize {bits}-bit", (i + 1) / len(params))
    if places:
        log.info("bias correction: %d layer(s) into their bias, %d into the BatchNorm after them; %d with neither "
                 "(left as quantized): %s", len(places.get("bias", [])), len(places.get("batchnorm", [])),
                 len(places.get(None, [])), ", ".join(places.get(None, [])[:6]) or "-")
    if activations == "int8":
        to_int8_linear(model, state)


@torch.no_grad()
def quantize_param(p: nn.Parameter, st: ParamState, bits: int, group_size: int | None, hessian: torch.Tensor | None,
                   per_channel: bool = True, write_back: bool = True, act_order: bool | None = None) -> None:
    """Snap one parameter to its grid in place (GPTQ when its input Hessian is given), recording codes and
    scales in `st`; a clustered tensor's codebook is snapped instead, so its codes stay shared. Without
    `write_back` only `st` is set (the caller codes it and lets the parameter go). The Hessian is used up:
    GPTQ factors it in its own memory. `act_order` None: GPTQ's act order for a matrix weight (Linear,
    recurrent) below 8 bits, where it was measured to help (SmolLM2-135M w3 ppl 58.5 -> 52.5, all-MiniLM-L6-v2
    4 and 3 bits); convolutions and 8 bits keep the natural order, as act order lost top-1 agreement there
    (MobileNetV2 w4 85.5% -> 83.9%, int8 97.3% -> 96.8%)."""
    if st.codebook is not None:
        s = symmetric_scale(st.codebook, bits, per_channel=False)
        st.codebook = quantize_tensor(st.codebook, s, bits).float() * s
        p.copy_(st.codebook[st.codes] * (st.mask if st.mask is not None else 1))
        return
    group = _group_for(p, group_size)
    if hessian is not None and per_channel:
        order = p.dim() == 2 and bits < 8 if act_order is None else act_order
        st.codes, st.scale = gptq(p.detach(), hessian, bits, group, mask=st.mask, overwrite=True, act_order=order)
    elif p.dim() > 1 and per_channel:
        st.scale = group_scale(p, bits, group)
        st.codes = quantize_tensor(p, st.scale, bits, group)
    else:
        group = None
        st.scale = symmetric_scale(p, bits, per_channel=False)
        st.codes = quantize_tensor(p, st.scale, bits)
    st.bits, st.group = bits, group
    if write_back:
        p.copy_(dequantized(st, p))


def dequantized(st: ParamState, like: torch.Tensor) -> torch.Tensor:
    """The float weight a grid state stands for (codes times scales, masked), shaped like `like`."""
    w = st.codes.float() * broadcast_scale(st.scale, like, st.group)
    return w if st.mask is None else w * st.mask


def hessian_layers(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    """The layers whose input Hessian is collected: each Linear, Conv1d and Conv2d owning a target weight."""
    owners = {n: model.get_submodule(split_name(n)[0]) for n in params if n.endswith(".weight")}
    return {n: m for n, m in owners.items() if isinstance(m, HESSIAN_LAYERS) and m.weight is params[n]}


def mixed_bits(model: nn.Module, params: dict[str, nn.Parameter], bits: int, group_size: int | None,
               budget: float, calib_data: Iterable | None, progress: Callable[[str, float], None] | None,
               hessians: dict[str, torch.Tensor] | None = None) -> dict[str, int]:
    """Bits per tensor within `budget` code bits (`bit_budget`); sensitivities from each layer's
    Hessian when `hessians` is given, else from the model's output."""
    rtn = rounder(bits, group_size)
    if hessians is not None:
        sens = layer_errors(params, hessians, rtn)
    else:
        batches = calibration_batches(calib_data, "per-layer bits (avg_bits / budget_mb)")[:2]
        sens = sensitivities(model, params, rtn, batches, progress)
    widths = allocate({k: p.numel() for k, p in params.items()}, sens, bits, budget)
    log.info("per-layer bits: %s", widths)
    return widths


def bit_budget(model: nn.Module, params: dict[str, nn.Parameter], bits: int, group_size: int | None,
               avg_bits: float | None, budget_mb: float | None) -> float:
    """The code bits the target tensors may take: `avg_bits` per weight, and within `budget_mb` once
    the scales and the tensors left in float are paid for (shapes only: works on a meta model)."""
    n = sum(p.numel() for p in params.values())
    budget = float("inf")
    if avg_bits is not None:
        budget = avg_bits * n
    if budget_mb is not None:
        scales = sum(_n_scales(p, group_size) for p in params.values())
        rest = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in params)
        budget = min(budget, budget_mb * 8e6 - 16 * scales - 8 * rest)
    if budget < bits * n:
        raise ModelpressError(f"quantize: the size budget ({budget_mb} MB / avg_bits {avg_bits}) is smaller than "
                              f"{bits} bits for every weight; lower 'bits' or raise the budget")
    return budget


def rounder(bits: int, group_size: int | None) -> Callable[[str, torch.Tensor], torch.Tensor]:
    """Round to nearest at `bits` (per group of `group_size`, as the tensor would be), dequantized."""
    def rtn(name: str, w: torch.Tensor) -> torch.Tensor:
        group = _group_for(w, group_size)
        scale = group_scale(w, bits, group)
        return quantize_tensor(w, scale, bits, group).float() * broadcast_scale(scale, w, group)
    return rtn


def _group_for(p: torch.Tensor, group_size: int | None) -> int | None:
    """The group size a tensor is quantized with: none for vectors or groups as wide as a row."""
    return group_size if p.dim() > 1 and group_size is not None and group_size < p[0].numel() else None


def _n_scales(p: torch.Tensor, group_size: int | None) -> int:
    if p.dim() < 2:
        return 1
    group = _group_for(p, group_size)
    return p.shape[0] * (-(-p[0].numel() // group) if group is not None else 1)


def to_int8_linear(model: nn.Module, state: CompressionState) -> int:
    """Swap every Linear whose weight is on an 8-bit per-channel grid for an Int8Linear; returns how many."""
    swapped, fixed = 0, fixed_layers(model)
    for name, module in list(model.named_modules()):
        st = state.params.get(f"{name}.weight")
        if name in fixed:
            if isinstance(module, nn.Linear) and st is not None:
                log.info("activations: int8: %s stays a Linear with int8 weights (its owner reads its weight "
                         "directly)", name)
            continue
        if not isinstance(module, nn.Linear) or st is None or st.scale is None or st.codebook is not None or st.bits != 8 \
                or st.group is not None or st.scale.numel() != module.out_features:
            continue
        codes = st.codes if st.mask is None else st.codes * st.mask
        new = Int8Linear.from_codes(codes, st.scale, module.bias)
        tied = [n for n, p in model.named_parameters(remove_duplicate=False)
                if p is module.weight and n != f"{name}.weight"]  # e.g. an embedding tied to an LM head
        replace_module(model, name, new)
        del state.params[f"{name}.weight"]
        if tied:  # the other user keeps the float weight, still on the same grid
            state.params[tied[0]] = st
        state.params.pop(f"{name}.bias", None)
        swapped += 1
    if swapped == 0 and any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ModelpressError("activations: int8 found no Linear layer quantized to 8 bits per channel")
    if swapped == 0:  # e.g. an all-convolutional CNN: its int8 weights are stored, and computed in float
        log.warning("activations: int8 applies to Linear layers and the model has none; its weights are stored "
                    "as int8 and computed in float")
    return swapped

