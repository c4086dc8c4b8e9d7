"""Unstructured (element) pruning: magnitude or gradient x weight (Taylor) importance, global or
per-layer thresholds, one-shot or gradual with the AGP schedule (Zhu & Gupta 2017) and recovery
training between steps. Masks only ever grow sparser, and stay fixed in later training."""
from __future__ import annotations

import math
from typing import ClassVar, Literal, Union

import torch
from pydantic import Field, field_validator
from torch import nn

from ..context import RunContext
from ..errors import ModelpressError
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from .common import target_params
from .criteria import CRITERIA, gradients
from .stopping import agp_schedule, check_sparsity, gradual


@register_stage
class PruneConfig(StageConfig):
    """Pruning single weights to `sparsity` (granularity: element, the default), with recovery training
    spread over the schedule; `sparsity: auto` stops where the model, measured on val_data or a tenth of
    train_data held out from its training, loses more than `tolerance` points against the original (by more
    than the noise of that data) two steps in a row."""

    key: ClassVar[str] = "prune"
    sparsity: Union[float, Literal["auto"]]
    granularity: Literal["element"] = "element"
    max_sparsity: float = Field(default=0.99, gt=0.0, lt=1.0)  # for sparsity: auto
    tolerance: float = Field(default=1.5, gt=0.0, le=100.0)    # points lost on held-out data, for auto
    criterion: Literal["magnitude", "taylor"] = "magnitude"
    scope: Literal["global", "layer"] = "global"
    schedule: Literal["oneshot", "agp"] = "oneshot"
    steps: int = Field(default=10, ge=1, le=1000)
    epochs: float = Field(default=0.0, ge=0.0, le=1000)
    lr: float = Field(default=1e-3, gt=0.0, lt=1.0)
    distill: bool = False  # recovery training by distillation from the original, even where batches have labels

    _sparsity = field_validator("sparsity", mode="before")(check_sparsity)

    def without_training(self) -> "PruneConfig":
        return self.model_copy(update={"schedule": "oneshot", "epochs": 0.0, "criterion": "magnitude"})


@handles(PruneConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: PruneConfig, run: RunContext) -> None:
    prune(model, state, sparsity=cfg.sparsity, criterion=cfg.criterion, scope=cfg.scope, schedule=cfg.schedule,
          steps=cfg.steps, epochs=cfg.epochs, lr=cfg.lr, max_sparsity=cfg.max_sparsity, tolerance=cfg.tolerance,
          distill=cfg.distill, exclude=run.excluded(cfg), run=run)


def magnitude_scores(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    score = CRITERIA["magnitude"].weight
    return {n: score(p, None) for n, p in params.items()}


def taylor_scores(model: nn.Module, params: dict[str, nn.Parameter], run: RunContext,
                  max_batches: int = 32) -> dict[str, torch.Tensor]:
    """|w * dL/dw| summed over up to `max_batches` batches: the first-order loss change of removing w."""
    score = CRITERIA["taylor"].weight
    scores = {n: torch.zeros_like(p) for n, p in params.items()}
    for _ in gradients(model, run, max_batches):
        for n, p in params.items():
            if p.grad is not None:
                scores[n] += score(p, p.grad)
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
    if scope == "layer":
        return {n: _keep_top(s, s.numel() - int(round(sparsity * s.numel()))) for n, s in ranked.items()}
    budget = _global_budget(list(ranked.values()), sparsity)
    return {n: _keep_top(s, k) for (n, s), k in zip(ranked.items(), budget)}


def _keep_top(s: torch.Tensor, keep: int) -> torch.Tensor:
    """Mask of the `keep` highest scores (ties broken by position)."""
    out = torch.zeros(s.numel(), dtype=torch.bool)
    if keep > 0:
        out[torch.topk(s.flatten(), keep, sorted=False).indices] = True
    return out.reshape(s.shape)


def _global_budget(scores: list[torch.Tensor], sparsity: float, floor_share: float = 0.25) -> list[int]:
    """How many weights each layer keeps under one global threshold, so that the total kept is exact.

    Raw global ranking can empty a small layer whose weights are on a smaller scale, which cuts the
    network; each layer therefore keeps at least `floor_share` of the overall keep fraction.
    """
    numels = [s.numel() for s in scores]
    total_keep = sum(numels) - int(round(sparsity * sum(numels)))
    floors = [min(n, int(math.ceil(floor_share * total_keep / sum(numels) * n))) for n in numels]
    fixed: dict[int, int] = {}
    while True:
        free = [i for i in range(len(scores)) if i not in fixed]
        budget = total_keep - sum(fixed.values())
        flat = torch.cat([scores[i].flatten() for i in free])
        budget = max(0, min(budget, flat.numel()))
        if budget == 0:
            counts = {i: 0 for i in free}
        else:
            thr = torch.topk(flat, budget, sorted=True).values[-1]
            counts = {i: int((scores[i] > thr).sum()) for i in free}
            ties = budget - sum(counts.values())  # hand weights equal to the threshold out in order
            for i in free:
                take = min(ties, int((scores[i] == thr).sum()))
                counts[i] += take
                ties -= take
        short = [i for i in free if counts[i] < floors[i]]
        if not short:
            fixed.update(counts)
            return [fixed[i] for i in range(len(scores))]
        fixed.update({i: floors[i] for i in short})


def prune(model: nn.Module, state: CompressionState, *, sparsity: float | str, criterion: str = "magnitude",
          scope: str = "global", schedule: str = "oneshot", steps: int = 10, epochs: float = 0.0,
          lr: float = 1e-3, max_sparsity: float = 0.99, tolerance: float = 1.5,
          distill: bool = False, exclude: tuple[str, ...] = (), run: RunContext | None = None) -> float:
    """Prune Linear/Conv weights to `sparsity`, training `epochs` in all (spread over the AGP steps), with
    labels where batches carry them, or by distillation from the original (`distill`, or no labels).

    `sparsity="auto"` follows the AGP schedule towards `max_sparsity` and stops at the last step whose
    fine-tuned model loses at most `tolerance` points (plus one standard error) against the original on
    val_data, else on every 10th sample of train_data, held out from training and scoring
    (`stopping.gradual`). Returns the sparsity reached.
    """
    params = target_params(model, exclude)
    if not params:
        raise ModelpressError("prune: the model has no Linear or Conv layer left after 'exclude'")
    run = run or RunContext()
    auto = sparsity == "auto"
    if epochs > 0 or auto:
        run.require_train_data("pruning with fine-tuning or sparsity 'auto'")
    final = max_sparsity if auto else float(sparsity)
    targets = agp_schedule(final, steps) if schedule == "agp" or auto else [final]

    def prune_to(s: float, run: RunContext) -> None:
        scores = taylor_scores(model, params, run) if criterion == "taylor" else magnitude_scores(params)
        with torch.no_grad():
            masks = masks_from_scores(scores, s, scope, {n: state.get(n).mask for n in params})
            for n, p in params.items():
                state.get(n).mask = masks[n]
                p.mul_(masks[n])

    return gradual(model, state, run, targets, prune_to, epochs=epochs, lr=lr, distill=distill, auto=auto,
                   tolerance=tolerance,
                   snapshot=lambda: _snapshot(model, state, params),
                   restore=lambda saved: _restore(model, state, params, saved))


def _snapshot(model: nn.Module, state: CompressionState, params: dict) -> tuple:
    masks = {n: state.get(n).mask for n in params}
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, masks


def _restore(model: nn.Module, state: CompressionState, params: dict, saved: tuple) -> None:
    weights, masks = saved
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(weights[k])
    for n in params:
        state.get(n).mask = masks[n]
