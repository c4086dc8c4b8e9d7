"""Weight sharing by per-layer k-means (Deep Compression): each tensor's kept weights take one of
2**bits shared values. Centroids start linearly spaced between the min and max weight (the paper's
best initialisation); pruned zeros stay zero and are not clustered. Centroids are rounded to
float16 so the file stores them exactly in half the bytes."""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from ..context import RunContext
from ..errors import ModelpressError
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from .common import target_params


@register_stage
class ClusterConfig(StageConfig):
    """Weight sharing: per-layer k-means codebook of 2**bits values."""

    key: ClassVar[str] = "cluster"
    bits: int = Field(ge=1, le=8)
    include_bias: bool = True


@handles(ClusterConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: ClusterConfig, run: RunContext) -> None:
    cluster(model, state, bits=cfg.bits, include_bias=cfg.include_bias, exclude=run.excluded(cfg))


def kmeans_1d(values: torch.Tensor, k: int, iters: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's algorithm on scalars with linear initialisation. Returns (sorted centroids, codes)."""
    v = values.flatten().float()
    k = max(1, min(k, v.numel()))
    lo, hi = v.min(), v.max()
    c = torch.linspace(float(lo), float(hi), k) if k > 1 else v.mean().reshape(1)
    for _ in range(iters):
        codes = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        sums = torch.zeros(k).scatter_add_(0, codes, v)
        counts = torch.zeros(k).scatter_add_(0, codes, torch.ones_like(v))
        new = torch.where(counts > 0, sums / counts.clamp_min(1), c)
        new, _ = torch.sort(new)
        if torch.allclose(new, c, rtol=0, atol=1e-9):
            c = new
            break
        c = new
    c = c.half().float()
    return c, torch.bucketize(v, (c[1:] + c[:-1]) / 2).reshape(values.shape)


def cluster(model: nn.Module, state: CompressionState, *, bits: int, include_bias: bool = True,
            exclude: tuple[str, ...] = ()) -> None:
    """Replace each target tensor's weights by the nearest of its own 2**bits centroids."""
    params = target_params(model, exclude, bias=include_bias)
    if not params:
        raise ModelpressError("cluster: the model has no Linear or Conv layer left after 'exclude'")
    with torch.no_grad():
        for name, p in params.items():
            st = state.get(name)
            kept = st.mask if st.mask is not None else torch.ones_like(p, dtype=torch.bool)
            if not kept.any():
                continue
            centroids, codes_kept = kmeans_1d(p[kept], 2 ** bits)
            codes = torch.zeros(p.shape, dtype=torch.long)
            codes[kept] = codes_kept
            st.codebook, st.codes, st.bits, st.scale = centroids, codes, bits, None
            p.copy_(centroids[codes] * kept)
