"""Recovery training under the current masks / codebooks / grids: fine-tuning with labels, or
label-free self-distillation from the original model when the batches carry no targets.

`train_data` is an iterable of batches, each either `(inputs, targets)` (classification with
cross-entropy, or the user's `loss_fn(outputs, targets)`) or inputs alone. Constraints recorded
in the `CompressionState` hold throughout (`state.constrained`).
"""
from __future__ import annotations

import contextlib
import math
from typing import ClassVar, Iterable, NamedTuple

import torch
from pydantic import Field
from torch import nn

from ..batches import call_model, logits_of, split_batch, summary
from ..context import RunContext
from ..errors import ModelpressError
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState, constrained
from .losses import Objective, batch_loss, token_weights


@register_stage
class FinetuneConfig(StageConfig):
    """Recovery training under the current masks / codebooks / grids (distillation if data has no labels)."""

    key: ClassVar[str] = "finetune"
    trains: ClassVar[bool] = True
    epochs: float = Field(gt=0.0, le=1000)
    lr: float = Field(default=1e-4, gt=0.0, lt=1.0)


@handles(FinetuneConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: FinetuneConfig, run: RunContext) -> None:
    train(model, state, run, epochs=cfg.epochs, lr=cfg.lr, label="finetune")


def train(model: nn.Module, state: CompressionState, run: RunContext, *, epochs: float, lr: float,
          label: str = "finetune", objective: Objective = Objective(), weight_decay: float = 0.0) -> int:
    """Train for `epochs` passes (fractions allowed) over train_data under the state's constraints.

    Returns the number of optimizer steps taken. Adam with a cosine-decayed learning rate. BatchNorm
    layers keep the running statistics the model came with (their scale and shift still train): statistics
    re-estimated from the few small batches recovery trains on wreck a pretrained CNN (EfficientNet-Lite0,
    `w4` then 2 epochs of distillation on 448 crops of 7 photos: 56.8% top-1 agreement with fp32 on other
    photos, 85.2% with the statistics kept).
    """
    data = run.require_train_data(label)
    if epochs <= 0:
        return 0
    n_batches = _count(data)
    total = max(1, int(round(epochs * n_batches)))
    steps = 0
    with constrained(model, state), _no_dropout(model, objective.distill):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
        model.train()
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        while steps < total:
            j = -1
            for j, batch in enumerate(data):
                opt.zero_grad(set_to_none=True)
                try:
                    loss = batch_loss(model, batch, run, objective)
                except ModelpressError:
                    raise
                except Exception as e:  # the first batch was tried up front: this one differs from it
                    raise ModelpressError(f"{label}: train_data batch {j} ({summary(batch)}) failed: {type(e).__name__}: "
                                          f"{e}. Every batch must have the form of the first") from e
                if not torch.isfinite(loss):
                    raise ModelpressError(f"{label}: the loss became {loss.item()} on train_data batch {j} (step "
                                          f"{steps + 1} of {total}); lower the lr ({lr}) or check that batch for "
                                          "NaN or Inf")
                loss.backward()
                opt.step()
                sched.step()
                steps += 1
                run.report(label, steps / total)
                if steps >= total:
                    break
            if j < 0:  # e.g. a generator, used up by an earlier pass
                raise ModelpressError(
                    f"{label}: a pass over train_data gave no batch (after {steps} of {total} steps); train_data "
                    "must give its batches on every pass: a list or a DataLoader, not a one-shot iterator such as "
                    "a generator")
        model.eval()
    return steps


@contextlib.contextmanager
def _no_dropout(model: nn.Module, active: bool):
    """Dropout off while a student distills: it should match the teacher's function, not a noisy copy
    of it (transformers read their attention dropout from the Dropout layers' `p`, so `p` goes to 0)."""
    saved = {m: m.p for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)} if active else {}
    for m in saved:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in saved.items():
            m.p = p


def _count(data: Iterable) -> int:
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = sum(1 for _ in data)
    if n == 0:
        raise ModelpressError("train_data is empty: it must yield at least one batch")
    return n


class Lost(NamedTuple):
    """What a compressed model lost against the original on held-out batches."""

    points: float  # accuracy points below the original (or percent of top-1 decisions changed)
    noise: float   # one standard error of `points` from the sample's size (paired: both models saw the same samples)
    what: str      # "accuracy" or "top-1 agreement"
    samples: int


@torch.no_grad()
def points_lost(model: nn.Module, teacher: nn.Module, data: Iterable, max_batches: int = 50) -> Lost:
    """Accuracy points below the teacher's where the batches carry integer class labels, else the percent
    of samples whose top-1 class is not the teacher's (label-free); with the standard error of that figure
    from the number of samples (400 samples cannot tell 0.5 points from noise: a loss of 2 of them)."""
    model.eval()
    same = total = worse = better = 0  # worse: the teacher right and the model wrong; better: the reverse
    labelled = True
    for i, batch in enumerate(data):
        if i >= max_batches:
            break
        inputs, targets = split_batch(batch)
        s, t = logits_of(call_model(model, inputs)), logits_of(call_model(teacher, inputs))
        if s.shape[-1] < 2:
            raise ModelpressError("top-1 agreement needs class scores (a last dimension of 2 or more); "
                                  f"the model outputs shape {list(s.shape)}: give a numeric sparsity instead")
        s, t = s.argmax(-1), t.argmax(-1)
        labelled = labelled and isinstance(targets, torch.Tensor) and not targets.is_floating_point() \
            and targets.shape == s.shape
        if labelled:
            worse += int(((t == targets) & (s != targets)).sum())
            better += int(((s == targets) & (t != targets)).sum())
        same += int((s == t).sum())
        total += s.numel()
    n = max(1, total)
    # the standard errors count one more changed decision each way than seen (a Laplace prior): from a
    # handful of changes the plain estimate is far too sure (4 of 400 lost and none gained: 0.50 points,
    # which made LeNet-300-100's sparsity auto stop at 88% on a loss of 1.0 point, one sample past)
    if labelled and total:  # the mean of per-sample differences in {-1, 0, 1}, and its standard error
        mean, square = (worse - better) / n, (worse + better + 2) / (n + 2)
        return Lost(100.0 * mean, 100.0 * math.sqrt(max(0.0, square - mean * mean) / n), "accuracy", total)
    changed, prior = (total - same) / n, (total - same + 1) / (n + 2)
    return Lost(100.0 * changed, 100.0 * math.sqrt(prior * (1 - prior) / n), "top-1 agreement", total)


@torch.no_grad()
def output_cosine(model: nn.Module, teacher: nn.Module, data: Iterable, max_batches: int = 50) -> float:
    """Mean cosine, over the samples of up to `max_batches` batches, of the model's output to the teacher's:
    per sample the whole output flattened, except an output over tokens with a tokenizer's attention_mask,
    which is first averaged over the real tokens (a sentence embedding)."""
    model.eval()
    cos: list[torch.Tensor] = []
    for i, batch in enumerate(data):
        if i >= max_batches:
            break
        inputs = split_batch(batch)[0]
        s, t = logits_of(call_model(model, inputs)).float(), logits_of(call_model(teacher, inputs)).float()
        w = token_weights(inputs.get("attention_mask") if isinstance(inputs, dict) else None, t)
        if w is not None:
            s, t = (s * w).sum(1), (t * w).sum(1)  # the mean's 1 / tokens scale does not change a cosine
        rows = s.shape[0] if s.dim() else 1
        cos.append(torch.nn.functional.cosine_similarity(s.reshape(rows, -1), t.reshape(rows, -1), dim=1, eps=1e-12))
    if not cos:
        raise ModelpressError("the held-out data gave no batch to measure the outputs' cosine on")
    return float(torch.cat(cos).mean())
