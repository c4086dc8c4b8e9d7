"""Low-precision compute: `precision: {dtype: bf16}` stores every Linear layer's weight (and, with
`embeddings`, every embedding table, gathered then widened) in 16 bits (half the bytes) and runs the
Linear products in 16 bits where the CPU does that natively (bf16: AMX or AVX512_BF16;
fp16: AMX-FP16), accumulating in fp32, with fp32 inputs, bias and outputs. Where the CPU has no native
16-bit product the layer widens its weight to fp32 once and computes in fp32, so it is never slower than
the fp32 layer; which path each layer takes is logged when the stage runs.
"""
from __future__ import annotations

import logging
from typing import ClassVar, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..context import RunContext
from ..errors import ModelpressError
from ..runtime import register_runtime_module
from ..runtime.layouts import cached_layout
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from .common import excluded, replace_module

log = logging.getLogger(__name__)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def native(precision: str) -> bool:
    """True where this CPU multiplies in `precision` natively (else the layer computes in fp32)."""
    cpu = torch.cpu
    if precision == "bf16":
        return bool(getattr(cpu, "_is_amx_tile_supported", lambda: False)()
                    or getattr(cpu, "_is_avx512_bf16_supported", lambda: False)())
    return bool(getattr(cpu, "_is_amx_fp16_supported", lambda: False)())


_NATIVE = {p: native(p) for p in DTYPES}  # read once: the CPU does not change


@register_stage
class PrecisionConfig(StageConfig):
    """Linear weights in 16 bits, and 16-bit products where the CPU has them (see the module docstring)."""

    key: ClassVar[str] = "precision"
    dtype: Literal["bf16", "fp16"] = "bf16"
    embeddings: bool = True


@handles(PrecisionConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: PrecisionConfig, run: RunContext) -> None:
    to_precision(model, state, cfg.dtype, embeddings=cfg.embeddings, exclude=run.excluded(cfg))


@register_runtime_module
class Linear16(nn.Module):
    """A drop-in nn.Linear with a 16-bit weight (`precision`: "bf16" or "fp16") and an fp32 bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, precision: str = "bf16") -> None:
        super().__init__()
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, not {precision!r}")
        self.in_features, self.out_features, self.precision = in_features, out_features, precision
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=DTYPES[precision]))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"precision={self.precision}, native={_NATIVE[self.precision]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # a training stage after this one: fp32 products, gradients to the 16-bit weight
            return F.linear(x.float(), self.weight.float(), self.bias).to(x.dtype)
        if _NATIVE[self.precision]:
            y = F.linear(x.to(self.weight.dtype), self.weight).float()
            return (y if self.bias is None else y.add_(self.bias)).to(x.dtype)
        widened = cached_layout(self, "fp32", lambda: self.weight.detach().float(), self.weight)
        return F.linear(x.float(), widened, self.bias).to(x.dtype)


@register_runtime_module
class Embedding16(nn.Module):
    """A drop-in nn.Embedding with a 16-bit table (`precision`), rows widened to fp32 as they are gathered."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int = -1, precision: str = "bf16") -> None:
        super().__init__()
        if precision not in DTYPES:
            raise ValueError(f"precision must be one of {sorted(DTYPES)}, not {precision!r}")
        self.num_embeddings, self.embedding_dim, self.precision = num_embeddings, embedding_dim, precision
        self.padding_idx = padding_idx  # -1: none (an int, so that files describe it like any argument)
        self.weight = nn.Parameter(torch.zeros(num_embeddings, embedding_dim, dtype=DTYPES[precision]))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, precision={self.precision}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pad = None if self.padding_idx < 0 else self.padding_idx  # its row gets no gradient, as in nn.Embedding
        return F.embedding(ids, self.weight, pad).float()


def to_precision(model: nn.Module, state: CompressionState, precision: str = "bf16", embeddings: bool = True,
                 exclude: Iterable[str] = ()) -> int:
    """Replace each Linear by a Linear16 of `precision` (and each nn.Embedding by an Embedding16); returns
    how many. Layers already pruned, clustered or quantized, and weights shared with another layer, stay
    as they are (a warning names them)."""
    exclude, kept, swapped = list(exclude), [], 0
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    for name, m in list(model.named_modules()):
        if type(m) not in kinds or excluded(name, exclude):
            continue
        if f"{name}.weight" in state.params or counts.get(id(m.weight), 0) > 1 or \
                isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse or m.scale_grad_by_freq):
            kept.append(name)
            continue
        if isinstance(m, nn.Linear):
            new: nn.Module = Linear16(m.in_features, m.out_features, m.bias is not None, precision)
        else:
            pad = -1 if m.padding_idx is None else int(m.padding_idx) % m.num_embeddings
            new = Embedding16(m.num_embeddings, m.embedding_dim, pad, precision)
        with torch.no_grad():
            new.weight.copy_(m.weight.detach().to(DTYPES[precision]))
            if getattr(m, "bias", None) is not None:
                new.bias.copy_(m.bias.detach())
        new.weight.requires_grad_(m.weight.requires_grad)
        replace_module(model, name, new.train(m.training))
        swapped += 1
    if kept:
        log.warning("precision %s: %d layer(s) stay as they are (already compressed, a shared weight, or an "
                    "embedding with max_norm / sparse gradients): %s",
                    precision, len(kept), ", ".join(kept[:6]) + (", ..." if len(kept) > 6 else ""))
    if swapped == 0:
        raise ModelpressError(f"precision {precision}: no Linear layer or embedding to convert (after 'exclude' "
                              "and the layers an earlier stage compressed)")
    log.info("precision %s: %d layers; Linear products run %s on this CPU", precision, swapped,
             f"in {precision} (native)" if _NATIVE[precision] else "in fp32 from the 16-bit weights (no native "
             f"{precision} product here)")
    return swapped
