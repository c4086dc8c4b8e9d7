"""Structured pruning: remove whole channels (conv filters, Linear neurons) so layers really shrink.

`graph.trace` groups the layers that share a channel axis; each unfrozen group loses its least
important channels in every producer (output rows), coupled layer (BatchNorm, LayerNorm, depthwise
conv) and consumer (input columns, at the channel's positions after concatenation or flattening).
The result is a plain, smaller model: no masks."""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal, Union

import torch
from pydantic import Field, field_validator
from torch import nn

from ..batches import call_model, split_batch
from ..context import RunContext
from ..errors import ModelpressError
from ..graph import ChannelGraph, Layout, trace
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from ..surgery import keep_inputs, keep_outputs
from .common import excluded
from .criteria import CRITERIA, gradients
from .stopping import agp_schedule, check_sparsity, gradual

log = logging.getLogger(__name__)
UNITS = {"channel": "all", "filter": "channels", "neuron": "channels", "head": "heads"}


@register_stage
class ChannelPruneConfig(StageConfig):
    """Pruning whole channels, neurons and attention heads to `sparsity`, so layers shrink (channel: all of
    them; filter or neuron: conv filters and Linear neurons; head: attention heads). With `refit`, a
    Linear that loses inputs is refitted to its calibration outputs. With `epochs`, pruning goes in
    `steps` steps (AGP) with recovery training after each; `sparsity: auto` stops where the model, measured
    on val_data or a tenth of train_data held out from its training, loses more than `tolerance` points (by
    more than the noise of that data)."""

    key: ClassVar[str] = "prune"
    route: ClassVar[dict] = {"granularity": tuple(UNITS)}
    sparsity: Union[float, Literal["auto"]]
    granularity: Literal["channel", "filter", "neuron", "head"]
    criterion: Literal["magnitude", "taylor", "l1", "l2", "bn_scale", "activation"] = "magnitude"
    scope: Literal["global", "layer"] = "global"
    refit: bool = True
    max_sparsity: float = Field(default=0.9, gt=0.0, lt=1.0)  # for sparsity: auto
    tolerance: float = Field(default=1.5, gt=0.0, le=100.0)   # points lost on held-out data, for auto
    steps: int = Field(default=6, ge=1, le=100)               # with epochs or auto
    epochs: float = Field(default=0.0, ge=0.0, le=1000)       # recovery training, in all
    lr: float = Field(default=1e-3, gt=0.0, lt=1.0)
    distill: bool = False  # recovery by distillation from the original, even where batches have labels

    _sparsity = field_validator("sparsity", mode="before")(check_sparsity)

    def without_training(self) -> "ChannelPruneConfig":
        return self.model_copy(update={"epochs": 0.0})


@handles(ChannelPruneConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: ChannelPruneConfig, run: RunContext) -> None:
    prune_channels(model, state, sparsity=cfg.sparsity, criterion=cfg.criterion, scope=cfg.scope,
                   exclude=run.excluded(cfg), run=run, units=UNITS[cfg.granularity], refit=cfg.refit,
                   max_sparsity=cfg.max_sparsity, tolerance=cfg.tolerance, steps=cfg.steps, epochs=cfg.epochs,
                   lr=cfg.lr, distill=cfg.distill)


def channel_importance(model: nn.Module, graph: ChannelGraph, criterion: str,
                       grads: dict[str, torch.Tensor] | None = None,
                       inputs: dict[str, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Per group, one score per channel, summed over the weights the channel owns: its producers' rows
    and its consumers' columns. |w . grad| (taylor), norms (l1 or magnitude, l2; also taylor's fallback
    where a layer has no gradient), BatchNorm |gamma| (bn_scale), or, for `activation`, what removing the channel
    takes from each consumer's output: the column's norm times the input's RMS on calibration data."""
    grads, inputs = grads or {}, inputs or {}
    channel = CRITERIA[criterion].channel

    def per_index(w: torch.Tensor, name: str, dim: int) -> torch.Tensor:  # one score per index of `dim`
        g = grads.get(name)
        return channel(w.detach().transpose(0, dim).flatten(1),
                       None if g is None else g.transpose(0, dim).flatten(1), inputs.get(name), dim)

    scores = {gid: torch.zeros(g.size) for gid, g in graph.groups.items()}
    for gid, g in graph.groups.items():
        for name in g.producers:
            scores[gid] += per_index(model.get_submodule(name).weight, name, 0)
    for name, layout in graph.consumers.items():
        cols, offset = per_index(model.get_submodule(name).weight, name, 1), 0
        for s in layout:
            width = s.length * s.inner
            if s.group in scores:
                scores[s.group] += cols[offset:offset + width].view(s.length, s.inner).sum(1)
            offset += width
    if criterion == "bn_scale":
        for gid, g in graph.groups.items():
            bns = [model.get_submodule(n) for n in g.coupled]
            bns = [m for m in bns if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.weight is not None]
            if bns:
                scores[gid] = sum(m.weight.detach().abs() for m in bns)
    return scores


_MAX_REFIT_INPUTS = 8192  # E[x x^T] of a wider Linear (8 bytes a cell) is not gathered; it is sliced instead


@dataclass
class InputStats:
    """A consumer's inputs on calibration data: each feature's mean square (Linear columns, conv
    channels), and for a Linear the mean and the second-moment matrix E[x x^T]."""
    mean_square: torch.Tensor
    mean: torch.Tensor | None = None
    moment: torch.Tensor | None = None


@torch.no_grad()
def input_stats(model: nn.Module, run: RunContext, names: list[str], batches: int = 8) -> dict[str, InputStats]:
    """`InputStats` of the named layers over up to `batches` calibration (else training) batches."""
    acc: dict[str, list] = {}

    def hook(name: str):
        def fn(m, args):
            x = args[0].detach().double()
            linear = isinstance(m, nn.Linear)
            x = x.reshape(-1, x.shape[-1]) if linear else x.transpose(0, 1).flatten(1).T
            a = acc.setdefault(name, [0, 0.0, 0.0, 0.0])
            a[0] += x.shape[0]
            a[1] = a[1] + x.pow(2).sum(0)
            if linear and x.shape[1] <= _MAX_REFIT_INPUTS:
                a[2], a[3] = a[2] + x.sum(0), a[3] + x.T @ x
        return fn

    data = run.calib_data if run.calib_data is not None else run.train_data
    if data is None:
        raise ModelpressError("structured pruning needs calib_data or train_data (a few batches of inputs) to "
                              "measure what each layer receives")
    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    training = model.training
    model.eval()
    try:
        for i, batch in enumerate(data):
            if i >= batches:
                break
            call_model(model, split_batch(batch)[0])
    finally:
        for h in handles:
            h.remove()
        model.train(training)
    return {n: InputStats(ms / k, None if isinstance(s1, float) else s1 / k, None if isinstance(m2, float) else m2 / k)
            for n, (k, ms, s1, m2) in acc.items()}


def compensate(m: nn.Linear, cols: torch.Tensor, stats: InputStats, damp: float = 1e-2) -> None:
    """Keep input columns `cols` of `m`, refitting the kept weights (and the bias) by least squares so
    that the layer's output on the calibration inputs changes as little as possible: the removed
    features' contribution is carried by the kept features they correlate with, and by their mean."""
    w = m.weight.detach().double()
    cov = stats.moment - torch.outer(stats.mean, stats.mean) if m.bias is not None else stats.moment
    kk = cov[cols][:, cols]
    kk = kk + damp * kk.diagonal().mean().clamp_min(1e-12) * torch.eye(len(cols), dtype=kk.dtype)
    new = torch.linalg.solve(kk, (w @ cov[:, cols]).T).T
    if m.bias is not None:
        m.bias.data = (m.bias.detach().double() + w @ stats.mean - new @ stats.mean[cols]).to(m.bias.dtype)
    m.weight = nn.Parameter(new.to(m.weight.dtype), requires_grad=m.weight.requires_grad)
    m.in_features = len(cols)


def _taylor_grads(model: nn.Module, run: RunContext, names: list[str], batches: int = 8) -> dict[str, torch.Tensor]:
    """Each named layer's weight gradient summed over up to `batches` training batches."""
    weights = {n: model.get_submodule(n).weight for n in names}
    grads: dict[str, torch.Tensor] = {}
    for _ in gradients(model, run, batches):
        for n, w in weights.items():
            if w.grad is not None:
                grads[n] = w.grad.detach().clone() if n not in grads else grads[n].add_(w.grad)
    # label-free data gives no gradient before anything changed (the student is the teacher): such
    # layers fall back to l1 magnitude
    grads = {n: g for n, g in grads.items() if bool(g.abs().sum() > 0)}
    if not grads:
        log.warning("criterion taylor: no gradient signal (label-free data?); ranking channels by l1 instead")
    return grads


def choose_kept(scores: dict[int, torch.Tensor], sparsity: float, scope: str,
                blocks: dict[int, int] | None = None) -> dict[int, torch.Tensor]:
    """Sorted indices of the channels each group keeps (at least one unit). A group with a block size
    (attention heads) is ranked and kept in whole blocks, each scored by the sum of its channels."""
    blocks = blocks or {}
    units = {g: s.view(-1, blocks.get(g, 1)).sum(1) for g, s in scores.items()}
    if scope == "layer":
        keep = {g: _top(u, max(1, u.numel() - int(sparsity * u.numel()))) for g, u in units.items()}
    else:
        normed = {g: u / u.mean().clamp_min(1e-12) for g, u in units.items()}  # comparable across layers
        allv = torch.cat(list(normed.values()))
        n_prune = int(sparsity * allv.numel())
        if n_prune == 0:
            keep = {g: torch.arange(u.numel()) for g, u in units.items()}
        else:
            threshold = allv.kthvalue(n_prune).values
            keep = {g: _top(u, max(1, int((u > threshold).sum()))) for g, u in normed.items()}
    return {g: (k[:, None] * blocks.get(g, 1) + torch.arange(blocks.get(g, 1))).flatten() for g, k in keep.items()}


def _top(s: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(s, k).indices.sort().values


def example_input(run: RunContext) -> Any:
    for batch in run.calib_data if run.calib_data is not None else (run.train_data or []):
        inputs, _ = split_batch(batch)
        if isinstance(inputs, dict):
            return {k: v[:2] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return inputs[:2] if isinstance(inputs, torch.Tensor) else inputs
    raise ModelpressError("structured pruning needs one example batch to trace shapes: pass train_data or calib_data")


def prune_channels(model: nn.Module, state: CompressionState, *, sparsity: float | str, criterion: str = "l1",
                   scope: str = "global", exclude: Iterable[str] = (), run: RunContext,
                   units: str = "all", refit: bool = True, max_sparsity: float = 0.9, tolerance: float = 1.5,
                   steps: int = 6, epochs: float = 0.0, lr: float = 1e-3, distill: bool = False) -> dict[str, Any]:
    """Remove `sparsity` of the prunable channels; returns a summary (channels before/after, sparsity, notes).

    With `refit`, each Linear that loses input columns has its kept weights refitted by least squares
    on calibration inputs (`compensate`). With `epochs`, the channels go in `steps` AGP steps, each
    followed by recovery training (labels where batches carry them, else distillation from the
    original); `sparsity="auto"` steps towards `max_sparsity` and keeps the last step that loses at most
    `tolerance` points (plus one standard error) on val_data or a held-out tenth of train_data
    (`stopping.gradual`).

    `units`: "all" (channels and whole attention heads), "channels" (conv filters and Linear neurons
    only) or "heads" (attention heads only)."""
    if state.params:
        raise ModelpressError("structured pruning must come before unstructured pruning, clustering or "
                              "quantization in the recipe")
    auto = sparsity == "auto"
    if epochs > 0 or auto:
        run.require_train_data("channel pruning with recovery training or sparsity 'auto'")
    final = max_sparsity if auto else float(sparsity)
    targets = agp_schedule(final, steps) if epochs > 0 or auto else [final]
    summary: dict[str, Any] = {}  # of the last step: channels before it and after it, the tracer's notes
    first: dict[str, int] = {}

    def prune_to(s: float, run: RunContext) -> None:
        kept = summary["channels_after"] / first["channels"] if summary else 1.0
        summary.update(_prune_once(model, max(0.0, 1 - (1 - s) / kept), criterion, scope, exclude, run, units, refit))
        if not first and summary["notes"]:
            notes = summary["notes"]
            log.warning("structured pruning keeps the channels that reach %d operation(s) it does not follow: %s",
                        len(notes), "; ".join(notes[:6]) + ("; ..." if len(notes) > 6 else ""))
        first.setdefault("channels", summary["channels_before"])

    def restore(saved: tuple[nn.Module, dict]) -> None:
        vars(model).update(vars(saved[0]))
        summary.clear()
        summary.update(saved[1])

    reached = gradual(model, state, run, targets, prune_to, epochs=epochs, lr=lr, distill=distill, auto=auto,
                      tolerance=tolerance,
                      snapshot=lambda: (copy.deepcopy(model), dict(summary)), restore=restore)
    before = first.get("channels", 0)
    return {"channels_before": before, "channels_after": summary.get("channels_after", before),
            "sparsity": reached, "notes": summary.get("notes", [])}


def _prune_once(model: nn.Module, sparsity: float, criterion: str, scope: str, exclude: Iterable[str],
                run: RunContext, units: str, refit: bool) -> dict[str, Any]:
    """Remove `sparsity` of the model's prunable channels as they are now."""
    graph = trace(model, example_input(run))
    exclude = list(exclude)
    for g in graph.groups.values():
        if any(excluded(n, exclude) for n in g.producers + g.coupled) or \
                units == "heads" and g.block == 1 or units == "channels" and g.block > 1:
            g.frozen = True
    live = {gid: g for gid, g in graph.groups.items() if not g.frozen}
    if not live:
        what = {"heads": "attention heads", "channels": "channels"}.get(units, "channels")
        raise ModelpressError(f"structured pruning found no {what} it can remove" +
                              (": " + "; ".join(graph.notes[:3]) if graph.notes else ""))
    names = [n for g in live.values() for n in g.producers] + list(graph.consumers)
    grads = _taylor_grads(model, run, names) if criterion == "taylor" else None
    touched = [n for n, layout in graph.consumers.items() if any(s.group in live for s in layout)]
    stats = input_stats(model, run, touched) if criterion == "activation" or refit else {}
    inputs = {n: st.mean_square.sqrt().float() for n, st in stats.items()}
    unseen = [n for n in touched if n not in inputs]
    if criterion == "activation" and unseen:
        log.warning("criterion activation: %d layer(s) received no calibration input, so their input channels "
                    "score as their other uses alone: %s", len(unseen), ", ".join(unseen[:6]))
    scores = channel_importance(model, ChannelGraph(live, graph.consumers), criterion, grads, inputs)
    kept = choose_kept(scores, sparsity, scope, {gid: g.block for gid, g in live.items()})
    before = sum(g.size for g in live.values())
    with torch.no_grad():
        for gid, idx in kept.items():
            for name in live[gid].producers + live[gid].coupled:
                keep_outputs(model.get_submodule(name), idx)
        for name, layout in graph.consumers.items():
            cols, m = _kept_columns(layout, kept), model.get_submodule(name)
            st = stats.get(name)
            if cols is not None and refit and isinstance(m, nn.Linear) and st is not None and st.moment is not None:
                compensate(m, cols, st)
            elif cols is not None:
                keep_inputs(m, cols)
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
