"""Low-precision compute: `precision: {dtype: bf16}` stores every Linear layer's weight (and, with
`embeddings`, every embedding table) in 16 bits, as `runtime.half`'s Linear16 / Embedding16, which run
16-bit products where the CPU has them natively and fp32 elsewhere; the stage logs which. For the
whole model in bf16 (activations too) and compiled, see `modelpress.accelerate`.
"""
from __future__ import annotations

import logging
from typing import ClassVar, Iterable, Literal

import torch
from torch import nn

from ..capabilities import native
from ..context import RunContext
from ..errors import ModelpressError
from ..runtime.half import DTYPES, Embedding16, Linear16
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from ..surgery import fixed_layers
from .common import excluded, replace_module

log = logging.getLogger(__name__)



@register_stage
class PrecisionConfig(StageConfig):
    """Linear weights in 16 bits, and 16-bit products where the CPU has them (see the module docstring)."""

    key: ClassVar[str] = "precision"
    dtype: Literal["bf16", "fp16"] = "bf16"
    embeddings: bool = True


@handles(PrecisionConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: PrecisionConfig, run: RunContext) -> None:
    to_precision(model, state, cfg.dtype, embeddings=cfg.embeddings, exclude=run.excluded(cfg))


def to_precision(model: nn.Module, state: CompressionState, precision: str = "bf16", embeddings: bool = True,
                 exclude: Iterable[str] = ()) -> int:
    """Replace each Linear by a Linear16 of `precision` (and each nn.Embedding by an Embedding16); returns
    how many. Layers already pruned, clustered or quantized, and weights shared with another layer, stay
    as they are (a warning names them)."""
    exclude, kept, swapped, fixed = list(exclude), [], 0, fixed_layers(model)
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    kinds = (nn.Linear, nn.Embedding) if embeddings else (nn.Linear,)
    for name, m in list(model.named_modules()):
        if type(m) not in kinds or excluded(name, exclude):
            continue
        if f"{name}.weight" in state.params or counts.get(id(m.weight), 0) > 1 or name in fixed or \
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
        log.warning("precision %s: %d layer(s) stay as they are (already compressed, a shared weight, read "
                    "directly by an attention layer, or an embedding with max_norm / sparse gradients): %s",
                    precision, len(kept), ", ".join(kept[:6]) + (", ..." if len(kept) > 6 else ""))
    if swapped == 0:
        raise ModelpressError(f"precision {precision}: no Linear layer or embedding to convert (after 'exclude' "
                              "and the layers an earlier stage compressed)")
    log.info("precision %s: %d layers; Linear products run %s on this CPU", precision, swapped,
             f"in {precision} (native)" if native(precision) else "in fp32 from the 16-bit weights (no native "
             f"{precision} product here)")
    return swapped
