"""Structured pruning: remove whole channels (conv filters, Linear neurons) so layers really shrink.

`graph.trace` groups the layers that share a channel axis; each unfrozen group loses its least
important channels in every producer (output rows), coupled layer (BatchNorm, LayerNorm, depthwise
conv) and consumer (input columns, at the channel's positions after concatenation or flattening).
The result is a plain, smaller model: no masks."""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from ..errors import ModelpressError
from ..graph import ChannelGraph, Layout, trace
from ..state import CompressionState
from .common import excluded
from .finetune import TrainContext, batch_loss, split_batch

log = logging.getLogger(__name__)


def channel_importance(model: nn.Module, graph: ChannelGraph, criterion: str,
                       grads: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Per group, one score per channel, summed over the group's producers: |w . grad| (taylor),
    row norms (l1, l2; also taylor's fallback where a layer has no gradient), or BatchNorm |gamma|."""
    scores = {}
    for gid, g in graph.groups.items():
        s = torch.zeros(g.size)
        for name in g.producers:
            w = model.get_submodule(name).weight.detach().flatten(1)
            if criterion == "taylor" and grads and name in grads:
                s += (w * grads[name].flatten(1)).abs().sum(1)
            elif criterion == "l2":
                s += w.pow(2).sum(1).sqrt()
            else:
                s += w.abs().sum(1)
        if criterion == "bn_scale":
            bns = [model.get_submodule(n) for n in g.coupled]
            bns = [m for m in bns if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.weight is not None]
            if bns:
                s = sum(m.weight.detach().abs() for m in bns)
        scores[gid] = s
    return scores


def _taylor_grads(model: nn.Module, ctx: TrainContext, names: list[str], batches: int = 8) -> dict[str, torch.Tensor]:
    if ctx.train_data is None:
        raise ModelpressError("criterion: taylor needs train_data (a few batches give the gradients)")
    model.zero_grad(set_to_none=True)
    for i, batch in enumerate(ctx.train_data):
        if i >= batches:
            break
        batch_loss(model, batch, ctx).backward()
    grads = {n: model.get_submodule(n).weight.grad.detach().clone() for n in names
             if model.get_submodule(n).weight.grad is not None}
    # label-free data gives no gradient before anything changed (the student is the teacher): such
    # layers fall back to l1 magnitude
    grads = {n: g for n, g in grads.items() if bool(g.abs().sum() > 0)}
    if not grads:
        log.warning("criterion taylor: no gradient signal (label-free data?); ranking channels by l1 instead")
    model.zero_grad(set_to_none=True)
    return grads


def choose_kept(scores: dict[int, torch.Tensor], sparsity: float, scope: str) -> dict[int, torch.Tensor]:
    """Sorted indices of the channels each group keeps (at least one)."""
    if scope == "layer":
        return {g: _top(s, max(1, s.numel() - int(sparsity * s.numel()))) for g, s in scores.items()}
    normed = {g: s / s.mean().clamp_min(1e-12) for g, s in scores.items()}  # comparable across layers
    allv = torch.cat(list(normed.values()))
    n_prune = int(sparsity * allv.numel())
    if n_prune == 0:
        return {g: torch.arange(s.numel()) for g, s in scores.items()}
    threshold = allv.kthvalue(n_prune).values
    return {g: _top(s, max(1, int((s > threshold).sum()))) for g, s in normed.items()}


def _top(s: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(s, k).indices.sort().values


def example_input(ctx: TrainContext) -> Any:
    for batch in ctx.calib_data if ctx.calib_data is not None else (ctx.train_data or []):
        inputs, _ = split_batch(batch)
        return inputs[:2] if isinstance(inputs, torch.Tensor) else inputs
    raise ModelpressError("structured pruning needs one example batch to trace shapes: pass train_data or calib_data")


def prune_channels(model: nn.Module, state: CompressionState, *, sparsity: float, criterion: str = "l1",
                   scope: str = "global", exclude: Iterable[str] = (), ctx: TrainContext) -> dict[str, Any]:
    """Remove `sparsity` of the prunable channels; returns a summary (channels before/after, notes)."""
    if state.params:
        raise ModelpressError("structured pruning must come before unstructured pruning, clustering or "
                              "quantization in the recipe")
    graph = trace(model, example_input(ctx))
    exclude = list(exclude)
    for g in graph.groups.values():
        if any(excluded(n, exclude) for n in g.producers + g.coupled):
            g.frozen = True
    live = {gid: g for gid, g in graph.groups.items() if not g.frozen}
    for note in graph.notes:
        log.warning("structured pruning: %s", note)
    if not live:
        raise ModelpressError("structured pruning found no channels it can remove" +
                              (": " + "; ".join(graph.notes[:3]) if graph.notes else ""))
    grads = _taylor_grads(model, ctx, [n for g in live.values() for n in g.producers]) if criterion == "taylor" else None
    scores = channel_importance(model, ChannelGraph(live, graph.consumers), criterion, grads)
    kept = choose_kept(scores, sparsity, scope)
    before = sum(g.size for g in live.values())
    with torch.no_grad():
        for gid, idx in kept.items():
            for name in live[gid].producers:
                _slice_out(model.get_submodule(name), idx)
            for name in live[gid].coupled:
                _slice_out(model.get_submodule(name), idx)
        for name, layout in graph.consumers.items():
            cols = _kept_columns(layout, kept)
            if cols is not None:
                _slice_in(model.get_submodule(name), cols)
    after = sum(int(k.numel()) for k in kept.values())
    return {"channels_before": before, "channels_after": after, "notes": graph.notes}


def _kept_columns(layout: Layout, kept: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """Input positions a consumer keeps, or None if none of its channels were pruned."""
    parts, offset, changed = [], 0, False
    for s in layout:
        idx = kept.get(s.group)
        if idx is None:
            idx = torch.arange(s.length)
        else:
            changed = True
        parts.append(offset + (idx[:, None] * s.inner + torch.arange(s.inner)[None, :]).flatten())
        offset += s.length * s.inner
    return torch.cat(parts) if changed else None


def _keep(p: nn.Parameter | torch.Tensor | None, idx: torch.Tensor, dim: int):
    if p is None:
        return None
    t = p.detach().index_select(dim, idx).clone()
    return nn.Parameter(t, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else t


def _slice_out(m: nn.Module, idx: torch.Tensor) -> None:
    """Keep output channels `idx` of a producer or coupled layer (and its parameters and buffers)."""
    n = int(idx.numel())
    m.weight = _keep(m.weight, idx, 0)
    if getattr(m, "bias", None) is not None:
        m.bias = _keep(m.bias, idx, 0)
    if isinstance(m, nn.Conv2d):
        if m.groups > 1:  # depthwise: one input channel per output channel
            m.in_channels = m.groups = n
        m.out_channels = n
    elif isinstance(m, nn.Linear):
        m.out_features = n
    elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        m.running_mean = _keep(m.running_mean, idx, 0)
        m.running_var = _keep(m.running_var, idx, 0)
        m.num_features = n
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (n,)


def _slice_in(m: nn.Module, cols: torch.Tensor) -> None:
    m.weight = _keep(m.weight, cols, 1)
    if isinstance(m, nn.Conv2d):
        m.in_channels = int(cols.numel())
    else:
        m.in_features = int(cols.numel())
