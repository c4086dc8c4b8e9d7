"""Low-rank factorization: a Linear becomes two thin Linears by truncated SVD, a Conv2d becomes a
1x1 / k x k / 1x1 chain by Tucker-2 (higher-order SVD of the output and input channel modes).
The rank is given (`rank`), a fraction of the full rank (`rank_ratio`), or the smallest that keeps
`energy` of the squared singular values, and never below `min_rank` (a 10-class head cut to rank 1
can tell few classes apart, and no fine-tuning brings that back). A layer whose factorized form
would not have fewer parameters is left as it is."""
from __future__ import annotations

import logging
from typing import ClassVar, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..context import RunContext
from ..errors import ModelpressError
from ..runtime.lowrank import LowRankLinear, TuckerConv2d
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from ..surgery import fixed_layers
from .common import excluded, replace_module

log = logging.getLogger(__name__)


@register_stage
class FactorizeConfig(StageConfig):
    """Low-rank factorization of Linear (SVD) and Conv2d (Tucker-2) layers; give exactly one of
    `rank`, `rank_ratio` (of each layer's full rank) or `energy` (share of squared singular values)."""

    key: ClassVar[str] = "factorize"
    rank: Optional[int] = Field(default=None, ge=1, le=2**20)
    rank_ratio: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    energy: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    min_rank: int = Field(default=8, ge=1, le=2**20)  # no layer goes below this rank

    @model_validator(mode="after")
    def _one_rule(self) -> "FactorizeConfig":
        given = [k for k in ("rank", "rank_ratio", "energy") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of rank, rank_ratio or energy (got {given or 'none'})")
        return self


@handles(FactorizeConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: FactorizeConfig, run: RunContext) -> None:
    factorize(model, state, rank=cfg.rank, rank_ratio=cfg.rank_ratio, energy=cfg.energy, min_rank=cfg.min_rank,
              exclude=run.excluded(cfg))


def choose_rank(singular: torch.Tensor, *, rank: int | None = None, rank_ratio: float | None = None,
                energy: float | None = None, min_rank: int = 1) -> int:
    """The rank to keep from a descending vector of singular values."""
    full = singular.numel()
    if rank is not None:
        r = rank
    elif rank_ratio is not None:
        r = round(rank_ratio * full)
    else:
        power = singular.double() ** 2
        kept = torch.cumsum(power, 0) / power.sum().clamp_min(1e-30)
        r = int((kept < energy - 1e-12).sum()) + 1
    return max(1, min(full, max(r, min_rank)))


def factorize_linear(layer: nn.Linear, **how) -> LowRankLinear | None:
    """Truncated SVD, the singular values split evenly between the two factors; None if no saving."""
    W = layer.weight.detach().float()
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    r = choose_rank(S, **how)
    out, inp = W.shape
    if r * (out + inp) >= out * inp:
        return None
    root = S[:r].sqrt()
    new = LowRankLinear(inp, out, r, bias=layer.bias is not None)
    with torch.no_grad():
        new.first.weight.copy_(root[:, None] * Vh[:r])
        new.second.weight.copy_(U[:, :r] * root)
        if layer.bias is not None:
            new.second.bias.copy_(layer.bias)
    return new


def factorize_conv(layer: nn.Conv2d, **how) -> TuckerConv2d | None:
    """Tucker-2 by higher-order SVD; None for grouped or 1x1 convs, or if there is no saving."""
    if layer.groups != 1 or layer.kernel_size == (1, 1) or not isinstance(layer.padding, tuple) \
            or layer.padding_mode != "zeros":
        return None
    W = layer.weight.detach().float()  # (out, in, kh, kw)
    out, inp, kh, kw = W.shape
    U_out, S_out, _ = torch.linalg.svd(W.flatten(1), full_matrices=False)
    U_in, S_in, _ = torch.linalg.svd(W.transpose(0, 1).flatten(1), full_matrices=False)
    r_out, r_in = choose_rank(S_out, **how), choose_rank(S_in, **how)
    if inp * r_in + r_in * r_out * kh * kw + r_out * out >= out * inp * kh * kw:
        return None
    A, B = U_out[:, :r_out], U_in[:, :r_in]  # (out, r_out), (in, r_in)
    core = torch.einsum("oikl,or,is->rskl", W, A, B)  # (r_out, r_in, kh, kw)
    new = TuckerConv2d(inp, out, layer.kernel_size, r_in, r_out, layer.stride, layer.padding, layer.dilation,
                       bias=layer.bias is not None)
    with torch.no_grad():
        new.first.weight.copy_(B.t()[:, :, None, None])
        new.core.weight.copy_(core)
        new.last.weight.copy_(A[:, :, None, None])
        if layer.bias is not None:
            new.last.bias.copy_(layer.bias)
    return new


def factorize(model: nn.Module, state: CompressionState, *, rank: int | None = None,
              rank_ratio: float | None = None, energy: float | None = None, min_rank: int = 8,
              exclude: tuple[str, ...] = ()) -> list[tuple[str, int, int]]:
    """Replace Linear and Conv2d layers by factorized ones where that saves parameters.
    Returns (layer, parameters before, after) for each replaced layer."""
    how = {"rank": rank, "rank_ratio": rank_ratio, "energy": energy, "min_rank": min_rank}
    done, fixed = [], fixed_layers(model)
    for name, m in list(model.named_modules()):
        if not isinstance(m, (nn.Linear, nn.Conv2d)) or excluded(name, exclude) or not name or name in fixed:
            continue
        if any(k.startswith(name + ".") for k in state.params):
            raise ModelpressError(f"factorize: layer {name!r} is already pruned, clustered or quantized; "
                                  "put factorize before those stages in the recipe")
        new = factorize_linear(m, **how) if isinstance(m, nn.Linear) else factorize_conv(m, **how)
        if new is None:
            continue
        replace_module(model, name, new)
        done.append((name, sum(p.numel() for p in m.parameters()), sum(p.numel() for p in new.parameters())))
    if not done:
        log.warning("factorize: no layer would get fewer parameters at these settings; nothing changed")
    for name, before, after in done:
        log.info("factorize %s: %d -> %d parameters", name, before, after)
    return done
