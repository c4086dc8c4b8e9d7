"""Unstructured (element) pruning: magnitude or gradient x weight (Taylor) importance, global or
per-layer thresholds, one-shot or gradual with the AGP schedule (Zhu & Gupta 2017) and recovery
training between steps. Masks only ever grow sparser, and stay fixed in later training."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ModelpressError
from ..state import CompressionState
from .common import target_params
from .finetune import TrainContext, batch_loss, require_data, train

log = logging.getLogger(__name__)


def magnitude_scores(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {n: p.detach().abs() for n, p in params.items()}


def taylor_scores(model: nn.Module, params: dict[str, nn.Parameter], ctx: TrainContext,
                  max_batches: int = 32) -> dict[str, torch.Tensor]:
    """|w * dL/dw| accumulated over up to `max_batches` batches: the first-order loss change of removing w."""
    data = require_data(ctx, "the taylor criterion")
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for i, batch in enumerate(data):
        if i >= max_batches:
            break
        model.zero_grad(set_to_none=True)
        batch_loss(model, batch, ctx).backward()
        for n, p in params.items():
            if p.grad is not None:
                scores[n] += (p.detach() * p.grad).abs()
    model.zero_grad(set_to_none=True)
    return scores


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float, scope: str,
                      old: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Keep the highest scores; weights pruned before stay pruned. `scope` is 'global' or 'layer'."""
    ranked = {}
    for n, s in scores.items():
        s = s.float().clone()
        if old.get(n) is not None:
            s[~old[n]] = -1.0  # already pruned: ranked below every live weight
        ranked[n] = s
    if scope == "global":
        flat = torch.cat([s.flatten() for s in ranked.values()])
        k = int(round(sparsity * flat.numel()))
        thr = torch.kthvalue(flat, k).values if k > 0 else None
        return {n: (s > thr) if thr is not None else torch.ones_like(s, dtype=torch.bool)
                for n, s in ranked.items()}
    out = {}
    for n, s in ranked.items():
        k = int(round(sparsity * s.numel()))
        if k == 0:
            out[n] = torch.ones_like(s, dtype=torch.bool)
            continue
        # exact count: keep the top (numel - k) by score, ties broken by position
        keep = torch.zeros(s.numel(), dtype=torch.bool)
        keep[torch.topk(s.flatten(), s.numel() - k, sorted=False).indices] = True
        out[n] = keep.reshape(s.shape)
    return out


def agp_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Sparsity after each of `steps` steps: s_t = s_f + (s_i - s_f) (1 - t/n)^3."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def prune(model: nn.Module, state: CompressionState, *, sparsity: float, criterion: str = "magnitude",
          scope: str = "global", schedule: str = "oneshot", steps: int = 10, epochs: float = 0.0,
          lr: float = 1e-3, exclude: tuple[str, ...] = (), ctx: TrainContext | None = None) -> None:
    """Prune Linear/Conv weights to `sparsity`, training `epochs` in all (spread over the AGP steps)."""
    params = target_params(model, exclude)
    if not params:
        raise ModelpressError("prune: the model has no Linear or Conv layer left after 'exclude'")
    ctx = ctx or TrainContext(None)
    if epochs > 0:
        require_data(ctx, "pruning with fine-tuning (epochs > 0)")
    targets = agp_schedule(sparsity, steps) if schedule == "agp" else [sparsity]
    for i, s in enumerate(targets):
        scores = taylor_scores(model, params, ctx) if criterion == "taylor" else magnitude_scores(params)
        with torch.no_grad():
            masks = masks_from_scores(scores, s, scope, {n: state.get(n).mask for n in params})
            for n, p in params.items():
                state.get(n).mask = masks[n]
                p.mul_(masks[n])
        log.info("prune step %d/%d: sparsity %.4f", i + 1, len(targets), s)
        if epochs > 0:
            train(model, state, ctx, epochs=epochs / len(targets), lr=lr, label=f"prune {i + 1}/{len(targets)}")
