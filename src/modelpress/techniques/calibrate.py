"""Statistics of layer inputs on calibration data, gathered with forward hooks in one pass.

`calib_data` is an iterable of model-input batches: a tensor, a tuple of positional inputs, or a
dict of keyword inputs (a tokenizer's output), exactly what `model(...)` takes."""
from __future__ import annotations

import logging
from typing import Callable, Iterable

import torch
from torch import nn

from ..batches import call_model, split_batch
from ..errors import ModelpressError

log = logging.getLogger(__name__)

_HOW = ("pass compress(..., calib_data=batches) where each batch is what the model's forward takes: a tensor, "
        "a tuple of positional inputs, or a dict of keyword inputs such as a tokenizer's output")


def calibration_batches(calib_data: Iterable | None, what: str) -> list:
    """The calibration batches as a list; a clear error if there are none."""
    if calib_data is None:
        raise ModelpressError(f"{what} needs calibration data; {_HOW}")
    if isinstance(calib_data, (torch.Tensor, dict)):
        raise ModelpressError(f"{what}: calib_data must be an iterable of batches, not one "
                              f"{type(calib_data).__name__}; wrap it in a list: calib_data=[batch]")
    batches = list(calib_data)
    if not batches:
        raise ModelpressError(f"{what}: calib_data is empty; {_HOW}")
    return batches


@torch.no_grad()
def collect_hessians(model: nn.Module, layers: dict[str, nn.Linear], calib_data: Iterable | None,
                     progress: Callable[[str, float], None] | None = None) -> dict[str, torch.Tensor]:
    """H = 2/n X^T X of each Linear's inputs over the calibration batches, keyed like `layers`."""
    batches = calibration_batches(calib_data, "method: gptq")
    sums = {name: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for name, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook(name: str):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]
        return fn

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for i, batch in enumerate(batches):
            inputs, _ = split_batch(batch)
            try:
                call_model(model, inputs)
            except Exception as e:
                raise ModelpressError(f"calib_data batch {i + 1} could not be passed to the model "
                                      f"({type(e).__name__}: {e}); {_HOW}") from None
            if progress is not None:
                progress("calibrate", (i + 1) / len(batches))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    bad = [name for name, h in sums.items() if not bool(torch.isfinite(h).all())]
    if bad:
        raise ModelpressError(f"calib_data gives non-finite inputs (NaN or Inf) to {len(bad)} layer(s): "
                              f"{', '.join(bad[:5])}; check the calibration batches (and the model's outputs "
                              "on them) for NaN or Inf")
    unseen = [name for name, n in counts.items() if n == 0]
    if unseen:
        log.warning("no calibration input reached %d layer(s) (%s); they are rounded to nearest instead",
                    len(unseen), ", ".join(unseen[:5]))
    return {name: 2 * sums[name] / n for name, n in counts.items() if n > 0}
