"""What the compression stages know about each parameter, and how training respects it.

A compressed model stays a plain `nn.Module` with dense float weights; beside it, a
`CompressionState` records per parameter the mask, codebook or quantization grid the weights
must stay on. Each kind of state has a stored form (`modelpress/forms/`) that writes, reads and
trains it. Training loops wrap the model in `constrained(...)`, which registers the form's
parametrization per constrained parameter so that gradients flow to what may still change:
the kept weights of a pruned tensor, the centroids of a clustered one (the gradients of all
weights that share a centroid are summed by autograd), the latent weights of a quantized one
(straight-through rounding).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Protocol

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
    """Per-parameter states, keyed by the parameter's qualified name, and the original name of each
    module that moved when layers were removed (so distillation matches it with the right teacher block)."""

    params: dict[str, ParamState] = field(default_factory=dict)
    renamed: dict[str, str] = field(default_factory=dict)   # name in the model -> name in the original

    def get(self, name: str) -> ParamState:
        return self.params.setdefault(name, ParamState())


def split_name(name: str) -> tuple[str, str]:
    """'features.0.weight' -> ('features.0', 'weight')."""
    module, _, attr = name.rpartition(".")
    return module, attr


def code_range(bits: int) -> tuple[int, int]:
    """The integer codes a `bits`-bit grid uses: all 2^bits levels below 8 bits (a scale's sign puts a
    group's largest weight on the extra level, as llama.cpp's Q4_0 does), [-127, 127] at 8 bits and above,
    which int8 kernels take as symmetric."""
    top = 2 ** (bits - 1) - 1
    return (-top - 1 if bits < 8 else -top), top


def broadcast_scale(scale: torch.Tensor, weight: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """A per-tensor, per-channel (dim 0) or per-group (out, groups) scale shaped to broadcast against
    `weight`; groups run along the flattened input dims, `group` inputs each (the last may be short)."""
    if group is not None and scale.dim() == 2:
        cols = weight[0].numel() if weight.shape[0] else 0
        return scale.repeat_interleave(group, dim=1)[:, :cols].reshape(weight.shape)
    return scale.reshape(-1, *([1] * (weight.dim() - 1))) if scale.numel() > 1 else scale.reshape(())


class Form(Protocol):
    """A stored form: how a parameter whose state has this `name` (`ParamState.kind`) is written to the
    file as one of its `file_kinds`, read back exactly, and trained under its constraint. The forms
    live in `modelpress/forms/`, one module each, and register with `register_form`."""

    name: str
    file_kinds: tuple[str, ...]

    def encode(self, key: str, t: torch.Tensor, st: ParamState | None, entry: dict
               ) -> tuple[dict, dict[str, bytes]]: ...

    def decode(self, name: str, entry: dict, streams: dict[str, bytes], key: str, shape: tuple[int, ...],
               dtype: torch.dtype, numel: int) -> torch.Tensor: ...

    def parametrize(self, st: ParamState, weight: torch.Tensor) -> nn.Module | None: ...

    def learned(self, st: ParamState, module: nn.Module, attr: str) -> None: ...


FORMS: dict[str, Form] = {}


def register_form(form: Form) -> Form:
    FORMS[form.name] = form
    return form


def form_of(st: ParamState) -> Form:
    form = FORMS.get(st.kind)
    if form is None:
        raise KeyError(f"no stored form is registered for {st.kind!r} (modelpress.forms registers them)")
    return form


@contextlib.contextmanager
def constrained(model: nn.Module, state: CompressionState) -> Iterator[nn.Module]:
    """Train `model` under the constraints of `state`; on exit, weights are plain tensors again
    and the state's codebooks / codes are updated from what was learned."""
    registered = []
    for name, st in state.params.items():
        mod_name, attr = split_name(name)
        module = model.get_submodule(mod_name)
        original = getattr(module, attr)
        p = form_of(st).parametrize(st, original)
        if p is not None:
            parametrize.register_parametrization(module, attr, p, unsafe=True)
            registered.append((name, module, attr, original))
    try:
        yield model
    finally:
        for name, module, attr, original in registered:
            st = state.params[name]
            with torch.no_grad():
                form_of(st).learned(st, module, attr)  # read what training changed into the state
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
            with torch.no_grad():  # keep the caller's Parameter object: optimizers and references stay valid
                original.copy_(getattr(module, attr))
            module._parameters[attr] = original
