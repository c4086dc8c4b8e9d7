"""The losses recovery training minimises: cross-entropy on labelled batches, the user's `loss_fn`,
or distillation from the uncompressed teacher (label-free, so any batches of inputs work).

Class scores (a plain tensor or `.logits`) are matched by Hinton's softened KL; other outputs (an
encoder's `last_hidden_state`) by mean squared error relative to the teacher's mean square. With
`hidden`, the outputs of the blocks that both models have, under the same name and of the same
shape (the children of the root and of every ModuleList: a Sequential's layers, a transformer's
blocks), are matched too."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..batches import call_model, logits_of, split_batch, summary
from ..context import RunContext
from ..errors import ModelpressError


@dataclass(frozen=True)
class Objective:
    """What a training stage learns from: distillation even when batches carry targets, the hidden
    block outputs too, and the softening temperature."""

    distill: bool = False
    hidden: bool = False
    temperature: float = 2.0
    renamed: tuple[tuple[str, str], ...] = ()  # (student block, teacher block) where layers were removed


def batch_loss(model: nn.Module, batch: Any, run: RunContext, objective: Objective = Objective()) -> torch.Tensor:
    """The loss of one batch: supervised when the batch carries targets (and the objective is not
    distillation), distillation from the teacher otherwise."""
    inputs, targets = split_batch(batch)
    if targets is None or objective.distill:
        return distill_batch_loss(model, inputs, run.teacher, objective)
    out = call_model(model, inputs)
    if run.loss_fn is not None:
        return run.loss_fn(out, targets)
    return cross_entropy(logits_of(out), targets)


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


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's softened-logit KL, scaled by T^2 so its gradients match cross-entropy's."""
    t = temperature
    return F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1),
                    log_target=True, reduction="batchmean") * t * t


def token_weights(mask: Any, output: torch.Tensor) -> torch.Tensor | None:
    """A token `mask` ([batch, tokens], a tokenizer's attention_mask) as weights that broadcast over
    `output` ([batch, tokens, ...]), so that only the real tokens count; None where it does not fit."""
    if not isinstance(mask, torch.Tensor) or output.dim() < 3 or tuple(mask.shape) != tuple(output.shape[:2]):
        return None
    return mask.to(output.dtype).unsqueeze(-1)


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error relative to the teacher's mean square; with a token `mask` ([batch, tokens],
    a tokenizer's attention_mask), only the real tokens count, not the padding."""
    w = token_weights(mask, teacher)
    if w is None:
        return F.mse_loss(student, teacher) / teacher.pow(2).mean().clamp_min(1e-12)
    return ((student - teacher).pow(2) * w).sum() / (teacher.pow(2) * w).sum().clamp_min(1e-12)


def block_names(model: nn.Module) -> list[str]:
    """Children of the root and of every ModuleList: the natural hand-off points between blocks."""
    names = [n for n, _ in model.named_children()]
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            names += [f"{name}.{c}" for c, _ in m.named_children()]
    return names


@contextlib.contextmanager
def capture(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the (first tensor) output of each named module during the forward passes inside."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(module, args, output):
            t = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(t, torch.Tensor):
                seen[name] = t
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in names]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _has_logits(output: Any) -> bool:
    return isinstance(output, torch.Tensor) or hasattr(output, "logits") or \
        (isinstance(output, dict) and "logits" in output)


def distill_batch_loss(model: nn.Module, inputs: Any, teacher: nn.Module | None, objective: Objective = Objective()
                       ) -> torch.Tensor:
    """The distillation loss of one batch of inputs against `teacher`."""
    if teacher is None:
        raise ModelpressError("distillation needs the teacher model; none was given")
    pairs = _matched_blocks(model, teacher, dict(objective.renamed)) if objective.hidden else {}
    with capture(model, list(pairs)) as s_blocks:
        out = call_model(model, inputs)
    with torch.no_grad(), capture(teacher, list(pairs.values())) as t_blocks:
        t_out = call_model(teacher, inputs)
    s, t = logits_of(out), logits_of(t_out)
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    loss = distill_loss(s, t, objective.temperature) if _has_logits(t_out) else relative_mse(s, t, mask)
    outs = [(s_blocks[n], t_blocks[m]) for n, m in pairs.items() if n in s_blocks and m in t_blocks
            and s_blocks[n].shape == t_blocks[m].shape and s_blocks[n].is_floating_point()]
    if outs:
        loss = loss + sum(relative_mse(a, b, mask) for a, b in outs) / len(outs)
    return loss


def _matched_blocks(model: nn.Module, teacher: nn.Module, renamed: dict[str, str]) -> dict[str, str]:
    """Student block -> teacher block: the same name, or the original name of a block that moved when
    layers were removed (a moved name never pairs with the teacher's block of its new name)."""
    theirs = set(block_names(teacher))
    pairs = {n: renamed.get(n, n) for n in block_names(model)}
    return {n: m for n, m in pairs.items() if m in theirs}
