"""Importance criteria: one registry shared by element, N:M and channel pruning.

A criterion scores single weights (element and N:M pruning rank these; None where it only ranks whole
channels) and channels: the rows (`dim` 0: a producer's outputs) or columns (`dim` 1: a consumer's
inputs) of a weight, given its loss gradient and, for consumers, the RMS of each input on calibration
data. `gradients` is the one place that gathers loss gradients for them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from ..context import RunContext
from .losses import batch_loss

Rows = torch.Tensor  # a weight viewed as (index along dim, everything else)


@dataclass(frozen=True)
class Criterion:
    weight: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None
    channel: Callable[[Rows, Rows | None, torch.Tensor | None, int], torch.Tensor]
    needs: str | None = None  # "grads" (train_data) or "inputs" (calibration statistics)


def _l1(w: Rows, g: Rows | None, rms: torch.Tensor | None, dim: int) -> torch.Tensor:
    return w.abs().sum(1)


def _l2(w: Rows, g: Rows | None, rms: torch.Tensor | None, dim: int) -> torch.Tensor:
    return w.pow(2).sum(1).sqrt()


def _taylor(w: Rows, g: Rows | None, rms: torch.Tensor | None, dim: int) -> torch.Tensor:
    return _l1(w, g, rms, dim) if g is None else (w * g).abs().sum(1)  # no gradient: magnitude


def _activation(w: Rows, g: Rows | None, rms: torch.Tensor | None, dim: int) -> torch.Tensor:
    """What removing an input takes from the layer's output: the column's norm times the input's RMS
    (a producer's rows score nothing: its consumers say what its channels are worth)."""
    return w.pow(2).sum(1).sqrt() * rms if dim == 1 and rms is not None else torch.zeros(len(w))


def _bn_scale(w: Rows, g: Rows | None, rms: torch.Tensor | None, dim: int) -> torch.Tensor:
    return _l1(w, g, rms, dim)  # structured pruning replaces a group's sum by its BatchNorm |gamma|


CRITERIA: dict[str, Criterion] = {
    "magnitude": Criterion(lambda w, g: w.detach().abs(), _l1),
    "l1": Criterion(None, _l1),
    "l2": Criterion(None, _l2),
    "taylor": Criterion(lambda w, g: (w.detach() * g).abs(), _taylor, needs="grads"),
    "activation": Criterion(None, _activation, needs="inputs"),
    "bn_scale": Criterion(None, _bn_scale),
}


def gradients(model: nn.Module, run: RunContext, max_batches: int) -> Iterator[int]:
    """Backpropagate the training loss of up to `max_batches` train_data batches, one at a time: after
    each yield the parameters' `.grad` hold that batch's gradients. Gradients are cleared at the end."""
    data = run.require_train_data("the taylor criterion")
    model.eval()
    try:
        for i, batch in enumerate(data):
            if i >= max_batches:
                break
            model.zero_grad(set_to_none=True)
            batch_loss(model, batch, run).backward()
            yield i
    finally:
        model.zero_grad(set_to_none=True)
