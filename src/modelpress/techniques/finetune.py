"""Recovery training: fine-tuning with labels, or label-free self-distillation from the original model.

`train_data` is an iterable of batches, each either `(inputs, targets)` (classification with
cross-entropy, or the user's `loss_fn(outputs, targets)`) or inputs alone, in which case the
student learns the teacher's outputs (KL divergence of softened logits). Constraints recorded
in the `CompressionState` (masks, codebooks, quantization grids) hold throughout.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelpressError
from ..state import CompressionState, constrained

log = logging.getLogger(__name__)


@dataclass
class TrainContext:
    """What a training step needs besides the model: data, the teacher, a loss and a progress hook."""

    train_data: Iterable | None
    teacher: nn.Module | None = None
    loss_fn: Callable | None = None
    progress: Callable[[str, float], None] | None = None
    temperature: float = 2.0
    calib_data: Iterable | None = None
    distill: bool = False  # learn from the teacher even when batches carry targets
    hidden: bool = False   # distillation also matches the outputs of shared blocks


def split_batch(batch: Any) -> tuple[Any, Any | None]:
    """(inputs, targets) pairs -> both; anything else -> (inputs, None)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        return batch[0], None
    return batch, None


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Call a model on a batch's inputs: a dict is passed as keywords, a tuple as positionals."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def logits_of(output: Any) -> torch.Tensor:
    """The main output tensor of a model: the tensor itself, `.logits`, or the first element."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        if hasattr(output, key):
            return getattr(output, key)
        if isinstance(output, dict) and key in output:
            return output[key]
    if isinstance(output, (tuple, list)) and output:
        return logits_of(output[0])
    raise ModelpressError(f"cannot find an output tensor in a model output of type {type(output).__name__}")


def summary(x: Any) -> str:
    """A short type and shape summary of a batch: "Tensor float32 [64, 20]", "(Tensor ..., int)"."""
    if isinstance(x, torch.Tensor):
        return f"Tensor {str(x.dtype).removeprefix('torch.')} {list(x.shape)}"
    if isinstance(x, dict):
        items = [f"{k}: {summary(v)}" for k, v in list(x.items())[:6]]
        return "{" + ", ".join(items + ["..."] * (len(x) > 6)) + "}"
    if isinstance(x, (tuple, list)):
        items = [summary(v) for v in x[:6]] + ["..."] * (len(x) > 6)
        return ("(%s)" if isinstance(x, tuple) else "[%s]") % ", ".join(items)
    return type(x).__name__


def reusable(data: Iterable | None, name: str) -> Iterable | None:
    """`data` in a form that can be read more than once: a one-shot iterator (a generator, a `map`,
    `iter(...)`) is read into a list, once. A clear error for what is not an iterable of batches."""
    if data is None:
        return None
    if isinstance(data, (torch.Tensor, dict)) or not (hasattr(data, "__iter__") or hasattr(data, "__getitem__")):
        raise ModelpressError(f"{name} must be an iterable of batches (a list, a DataLoader, a generator), not "
                              f"one {type(data).__name__}; to pass a single batch, wrap it in a list: {name}=[batch]")
    if isinstance(data, Iterator):
        data = list(data)
        log.info("%s is a one-shot iterator: read its %d batches into a list, to use them more than once",
                 name, len(data))
    return data


@torch.no_grad()
def check_batches(model: nn.Module, data: Iterable | None, name: str) -> None:
    """Call `model` on the inputs of the first batch of `data`: a clear error now if it can't take them.
    Random states are left as they were (a shuffling DataLoader draws from its generator, or torch's),
    so that the check changes no result."""
    if data is None:
        return
    gens = {g for g in (getattr(data, "generator", None), getattr(getattr(data, "sampler", None), "generator", None))
            if isinstance(g, torch.Generator)}
    states = [(g, g.get_state()) for g in gens]
    try:
        with torch.random.fork_rng(devices=[]):
            batch = next(iter(data), None)
            if batch is not None:  # empty: the stage that needs the data says so
                _call_first(model, batch, name)
    finally:
        for g, state in states:
            g.set_state(state)


def _call_first(model: nn.Module, batch: Any, name: str) -> None:
    inputs, _ = split_batch(batch)
    try:
        call_model(model, inputs)
    except Exception as e:
        raise ModelpressError(
            f"{name} batch 0: the model could not be called on its inputs ({summary(inputs)}): "
            f"{type(e).__name__}: {e}. Batches must be (inputs, targets) pairs or model inputs: a tensor, a "
            "tuple of positional inputs or a dict of keyword inputs, exactly what the model's forward takes") from e


def cross_entropy(logits: torch.Tensor, targets: Any) -> torch.Tensor:
    """The default loss, with a clear error for targets it can't take. Float targets are class
    probabilities (soft labels): shaped like the logits, non-negative, summing to 1 over the classes."""
    if isinstance(targets, torch.Tensor) and targets.is_floating_point():
        classes = min(1, targets.dim() - 1)
        if targets.shape != logits.shape or bool((targets < 0).any()) \
                or bool(((targets.sum(classes) - 1).abs() > 1e-3).any()):
            raise ModelpressError(_bad_targets(logits, targets, "float targets are read as class probabilities, "
                                               "which must be shaped like the outputs, >= 0 and sum to 1"))
    try:
        return F.cross_entropy(logits, targets)
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        raise ModelpressError(_bad_targets(logits, targets, f"{type(e).__name__}: {str(e).rstrip('.')}")) from e


def _bad_targets(logits: torch.Tensor, targets: Any, why: str) -> str:
    return (f"cross-entropy, the default loss, can't use train_data's targets ({summary(targets)}) with the "
            f"model's outputs ({summary(logits)}): {why}. It needs integer class indices (0 to "
            f"{(logits.shape[1] if logits.dim() > 1 else logits.numel()) - 1}), or class probabilities shaped "
            "like the outputs; for regression or other targets pass compress(..., loss_fn=...), "
            "e.g. loss_fn=torch.nn.functional.mse_loss")


def batch_loss(model: nn.Module, batch: Any, ctx: TrainContext) -> torch.Tensor:
    """The loss of one batch: supervised when the batch carries targets (and the stage is not a
    distillation), distillation from the teacher otherwise."""
    inputs, targets = split_batch(batch)
    if targets is None or ctx.distill:
        from .distill import distill_batch_loss  # distill builds on this module's helpers

        return distill_batch_loss(model, inputs, ctx, hidden=ctx.hidden)
    out = call_model(model, inputs)
    if ctx.loss_fn is not None:
        return ctx.loss_fn(out, targets)
    return cross_entropy(logits_of(out), targets)


def require_data(ctx: TrainContext, what: str) -> Iterable:
    if ctx.train_data is None:
        raise ModelpressError(
            f"{what} needs train_data: pass an iterable of (inputs, targets) or input-only batches "
            "to compress(..., train_data=...), or remove the training from the recipe")
    return ctx.train_data


def train(model: nn.Module, state: CompressionState, ctx: TrainContext, *, epochs: float, lr: float,
          label: str = "finetune", weight_decay: float = 0.0) -> int:
    """Train for `epochs` passes (fractions allowed) over train_data under the state's constraints.

    Returns the number of optimizer steps taken. Adam with a cosine-decayed learning rate.
    """
    data = require_data(ctx, label)
    if epochs <= 0:
        return 0
    n_batches = _count(data)
    total = max(1, int(round(epochs * n_batches)))
    steps = 0
    with constrained(model, state), _no_dropout(model, ctx.distill):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
        model.train()
        while steps < total:
            j = -1
            for j, batch in enumerate(data):
                opt.zero_grad(set_to_none=True)
                try:
                    loss = batch_loss(model, batch, ctx)
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
                if ctx.progress is not None:
                    ctx.progress(label, steps / total)
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


@torch.no_grad()
def agreement(model: nn.Module, teacher: nn.Module, data: Iterable, max_batches: int = 50) -> float:
    """Percent of samples whose top-1 class is the teacher's: a label-free fidelity measure."""
    model.eval()
    same = total = 0
    for i, batch in enumerate(data):
        if i >= max_batches:
            break
        inputs, _ = split_batch(batch)
        s, t = logits_of(call_model(model, inputs)), logits_of(call_model(teacher, inputs))
        if s.shape[-1] < 2:
            raise ModelpressError("top-1 agreement needs class scores (a last dimension of 2 or more); "
                                  f"the model outputs shape {list(s.shape)}: give a numeric sparsity instead")
        same += int((s.argmax(-1) == t.argmax(-1)).sum())
        total += s.argmax(-1).numel()
    return 100.0 * same / max(1, total)
