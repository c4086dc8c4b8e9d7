"""Uniform symmetric weight quantization: per tensor, per output channel or per group of inputs,
`bits` bits, zero exactly representable (so pruned weights stay zero). Scales are float16-exact
so the file stores them losslessly. Below 8 bits each scale is the one, among shrunken copies of
max|w|, that minimises the squared error of its group (clipping the rare largest weights is worth
the finer grid). `method="gptq"` compensates each column's rounding error in the columns not yet
quantized, weighted by the layer's input Hessian from calibration data. On a clustered tensor the
codebook itself is snapped to a per-tensor grid, so codes stay shared. With `activations="int8"`,
8-bit Linear layers become `runtime.Int8Linear` (int8 x int8 products, activations per token)."""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from ..errors import ModelpressError
from ..runtime.int8 import Int8Linear
from ..state import CompressionState, broadcast_scale, split_name
from .calibrate import calibration_batches, collect_hessians
from .common import excluded, replace_module, target_params
from .gptq import gptq
from .mixed import allocate, sensitivities

log = logging.getLogger(__name__)
_SHRINK = torch.linspace(1.0, 0.5, 11)  # candidate clip ratios of max|w| below 8 bits


def symmetric_scale(w: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """max|w| / qmax per output channel (or per tensor), float16-representable and never zero."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().flatten(1).amax(1) if per_channel and w.dim() > 1 else w.abs().max().reshape(1)
    return _f16_scale(amax / qmax)


def _f16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round to 8 significant bits (0.4% steps: no measurable loss) inside float16, so that the
    file's entropy coder stores a scale in about half of float16's 16 bits."""
    mantissa, exponent = torch.frexp(scale)
    scale = torch.ldexp(torch.round(mantissa * 256) / 256, exponent).half().float()
    tiny = torch.finfo(torch.float16).tiny
    return torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(tiny)


def row_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """One scale per row of a 2-D tensor; below 8 bits the clip ratio with the least squared error."""
    qmax = 2 ** (bits - 1) - 1
    amax = w.abs().amax(1)
    if bits >= 8:
        return _f16_scale(amax / qmax)
    cands = _f16_scale((amax.unsqueeze(0) * _SHRINK.unsqueeze(1)) / qmax)  # (ratios, rows)
    best = torch.empty_like(amax)
    step = max(1, 2 ** 22 // (len(_SHRINK) * max(1, w.shape[1])))  # bounded memory on big tables
    for r in range(0, w.shape[0], step):
        c, x = cands[:, r:r + step].unsqueeze(2), w[r:r + step].unsqueeze(0)
        err = ((torch.round(x / c).clamp(-qmax, qmax) * c - x) ** 2).sum(2)
        best[r:r + step] = c.squeeze(2).gather(0, err.argmin(0, keepdim=True)).squeeze(0)
    return best


def group_scale(w: torch.Tensor, bits: int, group: int | None) -> torch.Tensor:
    """Scales of a weight per output channel (`group` None) or (out, groups) per `group` flattened inputs."""
    w2 = w.detach().flatten(1).float()
    if group is None:
        return row_scale(w2, bits)
    out, cols = w2.shape
    n = -(-cols // group)
    padded = torch.nn.functional.pad(w2, (0, n * group - cols))  # zero padding never raises a max
    return row_scale(padded.reshape(out * n, group), bits).reshape(out, n)


def quantize_tensor(w: torch.Tensor, scale: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    """Integer codes of w on the grid `scale`, clamped to the signed `bits` range."""
    qmax = 2 ** (bits - 1) - 1
    return torch.round(w / broadcast_scale(scale, w, group)).clamp(-qmax, qmax).to(torch.int32)


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
             avg_bits: float | None = None, budget_mb: float | None = None,
             calib_data: Iterable | None = None, progress: Callable[[str, float], None] | None = None) -> None:
    """Snap target weights (or their codebooks) to a uniform grid of `bits` bits, or of per-tensor
    bits chosen by measured sensitivity when `avg_bits` or `budget_mb` is given."""
    params = quant_targets(model, exclude, bias=include_bias, embeddings=embeddings)
    if not params:
        raise ModelpressError("quantize: the model has no Linear, Conv or Embedding layer left after 'exclude'; "
                              "nothing to quantize")
    widths = dict.fromkeys(params, bits)
    if avg_bits is not None or budget_mb is not None:
        widths = mixed_bits(model, params, bits, group_size, avg_bits, budget_mb, calib_data, progress)
    hessians = {}
    if method == "gptq":
        owners = {n: model.get_submodule(split_name(n)[0]) for n in params if n.endswith(".weight")}
        linears = {n: m for n, m in owners.items() if isinstance(m, nn.Linear)}
        hessians = collect_hessians(model, linears, calib_data, progress=progress)
    with torch.no_grad():
        for i, (name, p) in enumerate(params.items()):
            st = state.get(name)
            if st.kind == "codebook":
                s = symmetric_scale(st.codebook, bits, per_channel=False)
                st.codebook = quantize_tensor(st.codebook, s, bits).float() * s
                p.copy_(st.codebook[st.codes] * (st.mask if st.mask is not None else 1))
                continue
            group = _group_for(p, group_size)
            b = widths[name]
            if name in hessians and per_channel:
                st.codes, st.scale = gptq(p.detach(), hessians.pop(name), b, group, mask=st.mask)
            elif p.dim() > 1 and per_channel:
                st.scale = group_scale(p, b, group)
                st.codes = quantize_tensor(p, st.scale, b, group)
            else:
                group = None
                st.scale = symmetric_scale(p, b, per_channel=False)
                st.codes = quantize_tensor(p, st.scale, b)
            st.bits, st.group = b, group
            w = st.codes.float() * broadcast_scale(st.scale, p, group)
            p.copy_(w if st.mask is None else w * st.mask)
            if progress is not None:
                progress(f"quantize {bits}-bit", (i + 1) / len(params))
    if activations == "int8":
        to_int8_linear(model, state)


def mixed_bits(model: nn.Module, params: dict[str, nn.Parameter], bits: int, group_size: int | None,
               avg_bits: float | None, budget_mb: float | None, calib_data: Iterable | None,
               progress: Callable[[str, float], None] | None) -> dict[str, int]:
    """Bits per tensor under the tighter of the two budgets (code bits only; scales and the
    tensors left in float are subtracted from `budget_mb` first)."""
    batches = calibration_batches(calib_data, "per-layer bits (avg_bits / budget_mb)")[:2]
    sizes = {k: p.numel() for k, p in params.items()}
    budget = float("inf")
    if avg_bits is not None:
        budget = avg_bits * sum(sizes.values())
    if budget_mb is not None:
        scales = sum(_n_scales(p, group_size) for p in params.values())
        rest = sum(t.numel() * t.element_size() for k, t in model.state_dict().items() if k not in params)
        budget = min(budget, budget_mb * 8e6 - 16 * scales - 8 * rest)
    if budget < bits * sum(sizes.values()):
        raise ModelpressError(f"quantize: the size budget ({budget_mb} MB / avg_bits {avg_bits}) is smaller than "
                              f"{bits} bits for every weight; lower 'bits' or raise the budget")
    g = {k: _group_for(p, group_size) for k, p in params.items()}

    def rtn(name: str, w: torch.Tensor) -> torch.Tensor:
        group = g[name]
        scale = group_scale(w, bits, group)
        return quantize_tensor(w, scale, bits, group).float() * broadcast_scale(scale, w, group)

    sens = sensitivities(model, params, rtn, batches, progress)
    widths = allocate(sizes, sens, bits, budget)
    log.info("per-layer bits: %s", widths)
    return widths


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
    swapped = 0
    for name, module in list(model.named_modules()):
        st = state.params.get(f"{name}.weight")
        if not isinstance(module, nn.Linear) or st is None or st.kind != "quant" or st.bits != 8 \
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
    if swapped == 0:
        raise ModelpressError("activations: int8 found no Linear layer quantized to 8 bits per channel")
    return swapped

