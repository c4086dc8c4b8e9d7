"""What the compression stages know about each parameter, and how training respects it.

A compressed model stays a plain `nn.Module` with dense float weights; beside it, a
`CompressionState` records per parameter the mask, codebook or quantization grid the weights
must stay on. Training loops wrap the model in `constrained(...)`, which registers a
parametrization per constrained parameter so that gradients flow to what may still change:
the kept weights of a pruned tensor, the centroids of a clustered one (the gradients of all
weights that share a centroid are summed by autograd), the latent weights of a quantized one
(straight-through rounding).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize


@dataclass
class ParamState:
    """How one parameter is represented. `mask` True = kept; `codes` index `codebook` or count grid steps."""

    mask: torch.Tensor | None = None
    codebook: torch.Tensor | None = None
    codes: torch.Tensor | None = None
    scale: torch.Tensor | None = None  # per tensor (1,), per output channel (out,) or per group (out, groups)
    bits: int | None = None
    group: int | None = None  # inputs per scale along the flattened input dims, when scale is per group

    @property
    def kind(self) -> str:
        if self.codebook is not None:
            return "codebook"
        if self.scale is not None:
            return "quant"
        return "masked" if self.mask is not None else "dense"


@dataclass
class CompressionState:
    """Per-parameter states, keyed by the parameter's qualified name."""

    params: dict[str, ParamState] = field(default_factory=dict)

    def get(self, name: str) -> ParamState:
        return self.params.setdefault(name, ParamState())


def split_name(name: str) -> tuple[str, str]:
    """'features.0.weight' -> ('features.0', 'weight')."""
    module, _, attr = name.rpartition(".")
    return module, attr


class _Masked(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return v * self.mask


class _Codebook(nn.Module):
    """W = codebook[codes] (masked). The trainable tensor is the codebook itself."""

    def __init__(self, codes: torch.Tensor, mask: torch.Tensor | None, codebook: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes, persistent=False)
        self.register_buffer("mask", mask if mask is not None else torch.ones_like(codes, dtype=torch.bool),
                             persistent=False)
        self._init = codebook

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return c[self.codes] * self.mask

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return self._init.clone()


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D401
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Quant(nn.Module):
    """W = round(V / s).clamp(-qmax, qmax) * s (masked), straight-through for the rounding."""

    def __init__(self, scale: torch.Tensor, bits: int, mask: torch.Tensor | None):
        super().__init__()
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.qmax = 2 ** (bits - 1) - 1

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        w = _RoundSTE.apply(v / self.scale).clamp(-self.qmax, self.qmax) * self.scale
        return w if self.mask is None else w * self.mask


def broadcast_scale(scale: torch.Tensor, weight: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """A per-tensor, per-channel (dim 0) or per-group (out, groups) scale shaped to broadcast against
    `weight`; groups run along the flattened input dims, `group` inputs each (the last may be short)."""
    if group is not None and scale.dim() == 2:
        cols = weight[0].numel() if weight.shape[0] else 0
        return scale.repeat_interleave(group, dim=1)[:, :cols].reshape(weight.shape)
    return scale.reshape(-1, *([1] * (weight.dim() - 1))) if scale.numel() > 1 else scale.reshape(())


def _parametrization(st: ParamState, weight: torch.Tensor) -> nn.Module | None:
    if st.kind == "codebook":
        return _Codebook(st.codes, st.mask, st.codebook)
    if st.kind == "quant":
        return _Quant(broadcast_scale(st.scale, weight, st.group), st.bits, st.mask)
    if st.kind == "masked":
        return _Masked(st.mask)
    return None


@contextlib.contextmanager
def constrained(model: nn.Module, state: CompressionState) -> Iterator[nn.Module]:
    """Train `model` under the constraints of `state`; on exit, weights are plain tensors again
    and the state's codebooks / codes are updated from what was learned."""
    registered = []
    for name, st in state.params.items():
        mod_name, attr = split_name(name)
        module = model.get_submodule(mod_name)
        original = getattr(module, attr)
        p = _parametrization(st, original)
        if p is not None:
            parametrize.register_parametrization(module, attr, p, unsafe=True)
            registered.append((name, module, attr, original))
    try:
        yield model
    finally:
        for name, module, attr, original in registered:
            st = state.params[name]
            if st.kind == "codebook":
                st.codebook = module.parametrizations[attr].original.detach().clone()
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
            with torch.no_grad():  # keep the caller's Parameter object: optimizers and references stay valid
                original.copy_(getattr(module, attr))
            module._parameters[attr] = original
            if st.kind == "quant":
                w = original.detach()
                st.codes = torch.round(w / broadcast_scale(st.scale, w, st.group)).to(torch.int32)
