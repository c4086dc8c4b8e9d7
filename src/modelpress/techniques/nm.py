"""N:M semi-structured sparsity: in every group of M consecutive weights of a row, keep the N most
important (2:4 is what sparse tensor cores run). Rows are the (output channel, rest) view of a weight
that mask files use (`format.codecs.mask_2d`), so groups run along a Linear's inputs and along a
conv's flattened (in, kh, kw) positions. Masks only ever grow sparser and stay fixed in later training.

Stored form: the "nm" mask coder, one header byte ((N - 1) << 4 | (M - 1)) and each group's pattern
index (its rank among the C(M, N) M-bit patterns with N bits set, in increasing value, bit j =
position j) coded with `encode_symbols`: about log2 C(M, N) / M bits per weight, 0.646 for 2:4,
where the default adaptive bit coder needs about 1 for a half-dense mask.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from ..context import RunContext
from ..errors import CorruptStream, ModelpressError
from ..format.codecs import MaskCoder, mask_2d, register_mask_coder
from ..format.entropy import decode_symbols, encode_symbols
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from .common import target_params
from .finetune import train
from .prune import magnitude_scores, taylor_scores

log = logging.getLogger(__name__)
MAX_M = 16  # C(16, 8) = 12,870 patterns: still inside encode_symbols' 2**16 alphabet
_PATTERN = re.compile(r"\s*([0-9]{1,3})\s*:\s*([0-9]{1,3})\s*")
_PATTERN_HELP = f"must be 'N:M' with 1 <= N < M <= {MAX_M}, e.g. '2:4'"


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4); ValueError with the accepted form otherwise."""
    match = _PATTERN.fullmatch(text)
    n, m = (int(g) for g in match.groups()) if match else (0, 0)
    if not 1 <= n < m <= MAX_M:
        raise ValueError(_PATTERN_HELP)
    return n, m


@register_stage
class NMPruneConfig(StageConfig):
    """N:M pruning (`pattern: '2:4'`): keep the N most important of every M consecutive weights of a row,
    by |w| (magnitude) or |w * grad| (taylor), then fine-tune `epochs` under the mask. A layer whose rows
    are not a multiple of M stays dense, with a warning naming it."""

    key: ClassVar[str] = "prune"
    route: ClassVar[dict] = {"pattern": ...}
    pattern: str
    criterion: Literal["magnitude", "taylor"] = "magnitude"
    epochs: float = Field(default=0.0, ge=0.0, le=1000)
    lr: float = Field(default=1e-3, gt=0.0, lt=1.0)

    @field_validator("pattern", mode="before")
    @classmethod
    def _pattern(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 60:
            # YAML 1.1 reads an unquoted 2:4 as the base-60 number 2 * 60 + 4
            raise ValueError(f"{_PATTERN_HELP}, as a quoted string: YAML reads an unquoted {v // 60}:{v % 60} "
                             f"as the number {v}; write pattern: '{v // 60}:{v % 60}'")
        if not isinstance(v, str):
            raise ValueError(_PATTERN_HELP)
        n, m = parse_pattern(v)
        return f"{n}:{m}"

    @property
    def n(self) -> int:
        return parse_pattern(self.pattern)[0]

    @property
    def m(self) -> int:
        return parse_pattern(self.pattern)[1]

    def without_training(self) -> "NMPruneConfig":
        return self.model_copy(update={"epochs": 0.0, "criterion": "magnitude"})


@handles(NMPruneConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: NMPruneConfig, run: RunContext) -> None:
    prune_nm(model, state, n=cfg.n, m=cfg.m, criterion=cfg.criterion, epochs=cfg.epochs, lr=cfg.lr,
             exclude=run.excluded(cfg), run=run)


def nm_mask(scores: torch.Tensor, n: int, m: int, old: torch.Tensor | None = None) -> torch.Tensor:
    """Mask (shaped like `scores`) keeping the `n` highest scores of every `m` consecutive entries of each
    row of the (out, rest) view; ties go to the lower position. Entries False in `old` stay pruned, so a
    group that had fewer than `n` live entries keeps fewer."""
    rows, cols = mask_2d(tuple(scores.shape))
    if cols % m:
        raise ValueError(f"rows of {cols} entries do not split into groups of {m}")
    s = scores.detach().float().reshape(rows, cols // m, m)
    if old is not None:
        s = s.masked_fill(~old.reshape(s.shape), -math.inf)  # ranked below every live entry
    keep = torch.argsort(s, dim=-1, descending=True, stable=True)[..., :n]
    mask = torch.zeros(s.shape, dtype=torch.bool).scatter_(-1, keep, True)
    if old is not None:
        mask &= old.reshape(s.shape)
    return mask.reshape(scores.shape)


def prune_nm(model: nn.Module, state: CompressionState, *, n: int, m: int, criterion: str = "magnitude",
             epochs: float = 0.0, lr: float = 1e-3, exclude: tuple[str, ...] = (),
             run: RunContext | None = None) -> int:
    """Mask the Linear/Conv weights to N:M, zero what is pruned, then fine-tune `epochs` under the masks.
    Returns the number of layers masked; layers whose rows are not a multiple of `m` stay dense."""
    if not 1 <= n < m <= MAX_M:
        raise ValueError(f"prune N:M: got {n}:{m}; the pattern {_PATTERN_HELP}")
    run = run or RunContext()
    params = target_params(model, exclude)
    if not params:
        raise ModelpressError("prune N:M: the model has no Linear or Conv layer left after 'exclude'")
    if epochs > 0:
        run.require_train_data(f"prune {n}:{m} with epochs > 0")
    fixed = [name for name in params if name in state.params and state.params[name].kind in ("codebook", "quant")]
    if fixed:
        raise ModelpressError(f"prune {n}:{m}: {fixed[0]!r} is already quantized or clustered; put the N:M prune "
                              "stage before quantize / cluster stages in the recipe")
    eligible = {}
    for name, p in params.items():
        cols = mask_2d(tuple(p.shape))[1]
        if cols % m:
            log.warning("prune %d:%d: layer %r (weight %s) has rows of %d weights, not a multiple of %d; it stays "
                        "dense (add it to 'exclude' to silence this)", n, m, name.rpartition(".")[0],
                        list(p.shape), cols, m)
        else:
            eligible[name] = p
    if not eligible:
        raise ModelpressError(f"prune {n}:{m}: no layer has rows that are a multiple of {m} (see the warnings); "
                              "choose an M that divides the layers' input sizes")
    scores = taylor_scores(model, eligible, run) if criterion == "taylor" else magnitude_scores(eligible)
    with torch.no_grad():
        for name, p in eligible.items():
            st = state.get(name)
            st.mask = nm_mask(scores[name], n, m, st.mask)
            p.mul_(st.mask)
    kept = sum(int(state.get(name).mask.sum()) for name in eligible)
    total = sum(p.numel() for p in eligible.values())
    log.info("prune %d:%d: %d of %d layers masked (%d weights, sparsity %.4f)", n, m, len(eligible), len(params),
             total, 1 - kept / total)
    if epochs > 0:
        train(model, state, run, epochs=epochs, lr=lr, label=f"prune {n}:{m}")
    return len(eligible)


# ---------------------------------------------------------------- stored form

@functools.lru_cache(maxsize=None)
def _patterns(n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(table, rank): the C(m, n) groups with n entries kept, as a (C, m) bool table ordered by their value
    as m-bit numbers (bit j = position j), and each m-bit value's row in it (-1 if it has not n bits set)."""
    values = np.arange(1 << m, dtype=np.int64)
    bits = ((values[:, None] >> np.arange(m)) & 1).astype(bool)
    chosen = bits.sum(1) == n
    rank = np.full(1 << m, -1, dtype=np.int64)
    rank[chosen] = np.arange(int(chosen.sum()))
    return bits[chosen], rank


def _structure(mask: np.ndarray) -> tuple[int, int] | None:
    """(N, M) for the smallest M in 2..16 dividing the row length such that every group of M holds the same
    N in [1, M); None if there is none. An N:M mask is also kN:kM, and the finest grouping is the most
    constrained, so the smallest M is chosen."""
    rows, cols = mask.shape
    if mask.size == 0:
        return None
    for m in range(2, min(MAX_M, cols) + 1):
        if cols % m:
            continue
        first = mask[0].reshape(-1, m).sum(1)  # the first row rejects most candidates cheaply
        n = int(first[0])
        if not 1 <= n < m or (first != n).any():
            continue
        if (mask.reshape(rows, -1, m).sum(2) == n).all():
            return n, m
    return None


def encode_nm(mask: np.ndarray) -> bytes | None:
    """One header byte ((N - 1) << 4 | (M - 1)) and the groups' pattern indices; None unless the 2-D
    `mask` holds exactly N of every M consecutive entries of each row (see `_structure`)."""
    mask = np.asarray(mask, dtype=bool)
    found = _structure(mask) if mask.ndim == 2 else None
    if found is None:
        return None
    n, m = found
    values = mask.reshape(-1, m).astype(np.int64) @ (np.int64(1) << np.arange(m))
    return bytes([(n - 1) << 4 | (m - 1)]) + encode_symbols(_patterns(n, m)[1][values])


def decode_nm(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of `encode_nm` for a (rows, cols) mask. Raises ValueError on anything inconsistent (the codec
    layer reports it as CorruptStream naming the tensor)."""
    rows, cols = (int(s) for s in shape)
    if rows < 0 or cols < 0:
        raise ValueError(f"negative mask shape {shape}")
    if len(data) < 2:
        raise ValueError(f"the N:M mask stream has {len(data)} bytes: too short for its header and patterns")
    n, m = (data[0] >> 4) + 1, (data[0] & 15) + 1
    if not n < m:
        raise ValueError(f"the N:M mask header declares {n}:{m}; N must be below M")
    if cols % m:
        raise ValueError(f"the N:M mask header declares groups of {m}, which do not divide rows of {cols}")
    try:
        index = decode_symbols(bytes(data[1:]), rows * cols // m)
    except CorruptStream as e:
        raise ValueError(f"the N:M pattern indices do not decode: {e}") from None
    table = _patterns(n, m)[0]
    if index.size and int(index.max()) >= len(table):
        raise ValueError(f"N:M mask pattern index {int(index.max())} is outside the {len(table)} patterns "
                         f"of {n}:{m}")
    return table[index].reshape(rows, cols)  # one byte per entry: no wider temporary than the mask itself


register_mask_coder("nm", MaskCoder(encode_nm, decode_nm))
