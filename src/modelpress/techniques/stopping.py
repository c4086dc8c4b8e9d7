"""Gradual pruning and `sparsity: auto`, shared by element and channel pruning: step up a schedule of
sparsities with recovery training after each step and, for `auto`, stop where the model loses more than
`tolerance` points against the original on held-out data (`val_data`, else a tenth of train_data held out
from training and scoring), by more than that data's sampling noise can explain."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from torch import nn

from ..batches import hold_out
from ..context import RunContext
from ..state import CompressionState
from .finetune import points_lost, train
from .losses import Objective

log = logging.getLogger(__name__)


def check_sparsity(cls: type, v: Any) -> Any:
    """A prune stage's `sparsity`: a fraction in [0, 1), or 'auto'."""
    if v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1):
        return v
    raise ValueError("must be a float in [0, 1) or 'auto'")


def agp_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Sparsity after each of `steps` steps: s_t = s_f + (s_i - s_f) (1 - t/n)^3 (Zhu & Gupta 2017)."""
    return [final + (initial - final) * (1 - t / steps) ** 3 for t in range(1, steps + 1)]


def measured_on(run: RunContext, stage: str, rule: str) -> tuple[RunContext, Any, str]:
    """(run, data, its name) for a stopping `rule` of `stage` that measures the model against the original:
    `val_data`; else every 10th sample of train_data, held out of training (the run returned trains on the
    rest); else, with a warning, train_data itself (or calib_data where there is none), which flatters it."""
    if run.val_data is not None:
        return run, run.val_data, "val_data"
    fit, held = hold_out(run.train_data) if run.train_data is not None else (None, None)
    if held is not None:
        return dataclasses.replace(run, train_data=fit), held, "held-out data (the tenth of train_data held out)"
    data, name = (run.train_data, "train_data") if run.train_data is not None else (run.calib_data, "calib_data")
    log.warning("%s: nothing held out to check %s on (no val_data, and no train_data of 10 or more batches, or "
                "DataLoader over a dataset, to hold a tenth out of), so it is measured on %s, which flatters the "
                "model; pass val_data", stage, rule, name)
    return run, data, name


def gradual(model: nn.Module, state: CompressionState, run: RunContext, targets: list[float],
            prune_to: Callable[[float, RunContext], None], *, epochs: float, lr: float, distill: bool, auto: bool,
            tolerance: float, snapshot: Callable[[], Any], restore: Callable[[Any], None]) -> float:
    """For each target, `prune_to(sparsity, run)` and then recovery training (`epochs` in all, spread over
    the targets; labels where batches carry them, else or with `distill` distillation from the
    original); returns the sparsity reached.

    With `auto`, after each step the model is measured against `run.teacher` on `run.val_data`, or where
    there is none, on every 10th sample of train_data, held out of pruning and recovery
    (`batches.hold_out`): accuracy points where the batches carry class labels, else points of top-1
    agreement. A step is past `tolerance` when the points lost, less one standard error of that figure,
    exceed it: on 400 samples a step that changes a dozen decisions has a standard error near 0.9 points,
    and stopping on the bare figure stopped LeNets anywhere from 67% to 96% sparsity by chance. One step
    past is forgiven when the next step's recovery brings it back; two in a row, or the last step,
    `restore` the `snapshot` of the last step within it. Where train_data can't be split (an
    iterable that is neither a list nor a DataLoader over a dataset), it measures on the training data,
    which lets it go too far."""
    if auto:
        run, held, where = measured_on(run, "prune", "sparsity auto")
    reached = 0.0
    good, strikes = None, 0  # auto: (snapshot, sparsity) of the last step within tolerance; steps past it since
    for i, s in enumerate(targets):
        if auto and strikes == 0:
            good = (snapshot(), reached)
        prune_to(s, run)
        if epochs > 0:
            train(model, state, run, epochs=epochs / len(targets), lr=lr, label=f"prune {i + 1}/{len(targets)}",
                  objective=Objective(distill=distill))
        if auto:
            lost = points_lost(model, run.teacher, held)
            if i == 0 and 100.0 / max(1, lost.samples) > tolerance:
                log.warning("sparsity auto: one of the %d held-out samples is %.2f points, more than the tolerance "
                            "(%.2g), so the stopping point is mostly chance; pass more val_data or a larger "
                            "tolerance", lost.samples, 100.0 / max(1, lost.samples), tolerance)
            log.info("prune step %d: sparsity %.4f, %s %.2f +- %.2f points below the original on %d samples of %s",
                     i + 1, s, lost.what, lost.points, lost.noise, lost.samples, where)
            if lost.points - lost.noise > tolerance:  # one step past it may be noise too: the next step's
                strikes += 1                          # recovery gets one chance; a second (or the last step) ends it
                if strikes == 2 or i == len(targets) - 1:
                    restore(good[0])
                    return good[1]
            else:
                strikes = 0
        reached = s
    return reached
