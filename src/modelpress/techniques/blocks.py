"""Block removal ("remove redundant layers"): `prune: {granularity: block}` drops the whole residual blocks
or transformer layers whose removal changes the model's output least on calibration data; a later
`distill` stage recovers what was lost.

Candidates are the members of the ModuleList a transformers config counts (`num_hidden_layers`) and,
in any model, the composite children of an nn.Sequential that map their input to an output of the
same shape (a ResNet stage's blocks). A candidate's cost is the relative squared error of the model's
output to the original's with the block skipped (its output replaced by its input; with a tokenizer's
attention_mask, over the real tokens only: on all-MiniLM-L6-v2 the padding made layer 1 look cheaper
than layer 2, whose removal keeps the sentence embeddings better on every domain measured); blocks go
one at a time, the cheapest first, with the costs measured again after each. A dropped transformers layer is
deleted (the layers renumber, the config and the attention modules' `layer_idx` follow, so the file
rebuilds the model from its config); a dropped block elsewhere becomes nn.Identity.

With `epochs`, the stage distills from the original after the removal (hidden states matched, dropout
off); with `min_fidelity` too, it then measures the mean cosine of the model's outputs to the original's
on held-out data (`val_data`, else every 10th batch of train_data, kept out of that training) and undoes
the removal where it falls short: a layer's removal that distillation cannot repair on text it never
saw is not worth the time it saves (all-MiniLM-L6-v2 without its layer 2, distilled on Python's docs:
0.94 on the King James Bible, against 0.997 for int8 alone).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
from typing import Any, ClassVar, Iterable, Iterator, Literal, Optional

import torch
from pydantic import Field, model_validator
from torch import nn

from ..batches import call_model, logits_of, split_batch
from ..context import RunContext
from ..errors import ModelpressError
from ..runtime import register_runtime_module
from ..stage import StageConfig, handles, register_stage
from ..state import CompressionState
from .common import excluded
from .finetune import output_cosine, train
from .losses import Objective, token_weights
from .stopping import measured_on

log = logging.getLogger(__name__)
register_runtime_module(nn.Identity)  # a dropped block of a user's class: a skeleton rebuilds it as Identity


@register_stage
class BlockPruneConfig(StageConfig):
    """Drop `blocks` whole blocks (or the `sparsity` share of the candidates), the least costly first,
    measured on up to `batches` calibration batches; then `epochs` of distillation from the original,
    and with `min_fidelity` the removal is kept only where the outputs' mean cosine to the original's on
    held-out data reaches it."""

    key: ClassVar[str] = "prune"
    route: ClassVar[dict] = {"granularity": ("block",)}
    granularity: Literal["block"]
    blocks: Optional[int] = Field(default=None, ge=1, le=100_000)
    sparsity: Optional[float] = Field(default=None, gt=0.0, lt=1.0)
    batches: int = Field(default=8, ge=1, le=1000)
    epochs: float = Field(default=0.0, ge=0.0, le=1000)
    lr: float = Field(default=1.5e-4, gt=0.0, lt=1.0)
    min_fidelity: Optional[float] = Field(default=None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_amount(self) -> "BlockPruneConfig":
        if (self.blocks is None) == (self.sparsity is None):
            raise ValueError("give exactly one of blocks (how many to drop) or sparsity (the share of blocks)")
        return self

    def without_training(self) -> "BlockPruneConfig":  # the removal alone: nothing to check it on without training
        return self.model_copy(update={"epochs": 0.0, "min_fidelity": None})


@handles(BlockPruneConfig)
def _apply(model: nn.Module, state: CompressionState, cfg: BlockPruneConfig, run: RunContext) -> None:
    if cfg.min_fidelity is not None:
        run, held, where = measured_on(run, "block removal", "min_fidelity")
    before = (copy.deepcopy(model), copy.deepcopy(state)) if cfg.min_fidelity is not None else None
    dropped = drop_blocks(model, state, blocks=cfg.blocks, sparsity=cfg.sparsity, batches=cfg.batches,
                          exclude=run.excluded(cfg), run=run)
    if cfg.epochs > 0:
        train(model, state, run, epochs=cfg.epochs, lr=cfg.lr, label="prune blocks: distill",
              objective=Objective(distill=True, hidden=True, renamed=tuple(state.renamed.items())))
    if before is None:
        return
    fidelity = output_cosine(model, run.teacher, held)
    names = ", ".join(name for name, _ in dropped)
    if fidelity >= cfg.min_fidelity:
        log.info("block removal kept (%s): output cosine %.4f to the original on %s (min_fidelity %.4g)",
                 names, fidelity, where, cfg.min_fidelity)
        return
    log.warning("block removal undone (%s): after distillation the outputs' mean cosine to the original's on %s "
                "was %.4f, under min_fidelity %.4g; every block kept", names, where, fidelity, cfg.min_fidelity)
    _restore(model, state, *before)


def candidates(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the blocks that may be dropped (see the module docstring), excluded names left out."""
    exclude = list(exclude)
    names: list[str] = []
    counted = counted_list(model)
    if counted is not None:
        names += [f"{counted}.{i}" for i in range(len(model.get_submodule(counted)))]
    for name, m in model.named_modules():
        if isinstance(m, nn.Sequential) and not isinstance(m, nn.ModuleList):
            names += [f"{name}.{c}" if name else c for c, child in m.named_children()
                      if len(list(child.children())) > 0]  # composite children only: blocks, not single layers
    return [n for n in names if not excluded(n, exclude)]


def drop_blocks(model: nn.Module, state: CompressionState, *, blocks: int | None = None,
                sparsity: float | None = None, batches: int = 8, exclude: Iterable[str] = (),
                run: RunContext) -> list[tuple[str, float]]:
    """Drop the cheapest blocks, one at a time; returns (name, cost) in the order they went."""
    data = run.calib_data if run.calib_data is not None else run.train_data
    if data is None:
        raise ModelpressError("block removal needs calib_data or train_data (a few batches of inputs) to measure "
                              "what each block's removal costs")
    inputs = [split_batch(b)[0] for _, b in zip(range(batches), data)]
    if not inputs:
        raise ModelpressError("block removal: calib_data / train_data gave no batch")
    names = _shape_preserving(model, candidates(model, exclude), inputs[0])
    if not names:
        raise ModelpressError("block removal found no block to drop: it drops the layers of a transformers model "
                              "and the composite, shape-preserving children of an nn.Sequential (residual "
                              "blocks); check 'exclude'")
    n = blocks if blocks is not None else int(round(sparsity * len(names)))
    if n < 1 or n >= len(names):
        raise ModelpressError(f"block removal: asked to drop {n} of the {len(names)} candidate blocks; drop at "
                              f"least 1 and fewer than all ({', '.join(names[:8])})")
    reference = _outputs(model, inputs)
    dropped: list[tuple[str, float]] = []
    for step in range(n):
        live = [c for c in names if c not in dict(dropped) and not _last_of_list(model, c, dict(dropped))]
        if not live:
            raise ModelpressError(f"block removal: only {step} block(s) could go without emptying a layer stack")
        costs = {}
        for c in live:
            with _skipped(model, [d for d, _ in dropped] + [c]):
                costs[c] = _relative_error(_outputs(model, inputs), reference, inputs)
        best = min(live, key=lambda c: costs[c])
        dropped.append((best, costs[best]))
        log.info("block removal %d/%d: %s (output error %.4g; next cheapest %s)", step + 1, n, best, costs[best],
                 ", ".join(f"{c} {costs[c]:.3g}" for c in sorted(costs, key=costs.get)[1:4]))
        run.report("prune blocks", (step + 1) / n)
    _remove(model, state, [d for d, _ in dropped])
    return dropped


def counted_list(model: nn.Module) -> str | None:
    """The ModuleList whose length a transformers config counts as `num_hidden_layers`, if exactly one."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int):
        return None
    found = [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count
             and len({type(c) for c in m}) == 1]
    return found[0] if len(found) == 1 else None


@torch.no_grad()
def _shape_preserving(model: nn.Module, names: list[str], example: Any) -> list[str]:
    """The candidates whose first output tensor has their first input's shape on `example`."""
    seen: dict[str, bool] = {}

    def hook(name: str):
        def fn(m, args, kwargs, out):
            x, y = _first_input(args, kwargs), _first_tensor(out)
            seen[name] = x is not None and y is not None and x.shape == y.shape
        return fn

    handles = [model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
    try:
        model.eval()
        call_model(model, example)
    finally:
        for h in handles:
            h.remove()
    return [n for n in names if seen.get(n)]


@contextlib.contextmanager
def _skipped(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Run the model with each named block's output replaced by its input."""
    def fn(m, args, kwargs, out):
        x = _first_input(args, kwargs)
        if isinstance(out, tuple):
            return (x, *out[1:])
        return x

    handles = [model.get_submodule(n).register_forward_hook(fn, with_kwargs=True) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("hidden_states")
    return x if isinstance(x, torch.Tensor) else None


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    return out if isinstance(out, torch.Tensor) else None


@torch.no_grad()
def _outputs(model: nn.Module, inputs: list) -> list[torch.Tensor]:
    model.eval()
    return [logits_of(call_model(model, x)).float() for x in inputs]


def _relative_error(outs: list[torch.Tensor], refs: list[torch.Tensor], inputs: list) -> float:
    """Squared error over the reference's square, summed over the batches; with a tokenizer's
    attention_mask only the real tokens count (what padding positions hold is never used)."""
    err = power = 0.0
    for o, r, x in zip(outs, refs, inputs):
        w = token_weights(x.get("attention_mask") if isinstance(x, dict) else None, r)
        w = 1.0 if w is None else w
        err += float(((o - r).pow(2) * w).sum())
        power += float((r.pow(2) * w).sum())
    return err / max(power, 1e-30)


def _last_of_list(model: nn.Module, name: str, dropped: dict) -> bool:
    """True if dropping `name` would empty its ModuleList."""
    parent = name.rpartition(".")[0]
    owner = model.get_submodule(parent)
    if not isinstance(owner, nn.ModuleList):
        return False
    gone = sum(1 for d in dropped if d.rpartition(".")[0] == parent)
    return len(owner) - gone <= 1


def _remove(model: nn.Module, state: CompressionState, names: list[str]) -> None:
    """Delete dropped layers from their ModuleList (renumbering the rest, with the config and `layer_idx`
    following), replace other dropped blocks by nn.Identity, and forget their compression state."""
    for name in names:
        prefix = name + "."
        for key in [k for k in state.params if k.startswith(prefix)]:
            del state.params[key]
    counted = counted_list(model)
    by_list: dict[str, set[int]] = {}
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(owner, nn.ModuleList):
            by_list.setdefault(parent, set()).add(int(child))
        else:
            setattr(owner, child, nn.Identity())
    for parent, gone in by_list.items():
        old = model.get_submodule(parent)
        kept = nn.ModuleList([m for i, m in enumerate(old) if i not in gone])
        # distillation pairs each layer with its original in the teacher (through earlier removals too)
        before = {n: m for n, m in state.renamed.items() if not n.startswith(parent + ".")}
        survivors = [i for i in range(len(old)) if i not in gone]
        for new, i in enumerate(survivors):
            was = f"{parent}.{i}"
            before[f"{parent}.{new}"] = state.renamed.get(was, was)
        state.renamed = before
        grand, _, attr = parent.rpartition(".")
        setattr(model.get_submodule(grand) if grand else model, attr, kept)
        for i, layer in enumerate(kept):
            for m in layer.modules():
                if isinstance(getattr(m, "layer_idx", None), int):
                    m.layer_idx = i
        if parent == counted:
            config = model.config
            config.num_hidden_layers = len(kept)
            types = getattr(config, "layer_types", None)
            if isinstance(types, list) and len(types) == len(old):
                config.layer_types = [t for i, t in enumerate(types) if i not in gone]


def _restore(model: nn.Module, state: CompressionState, saved: nn.Module, saved_state: CompressionState) -> None:
    """Put a snapshot taken before the removal back into `model` and `state`, in place (the pipeline holds
    these objects): modules, parameters, buffers and the config of a transformers model."""
    model.__dict__.update(saved.__dict__)
    for f in dataclasses.fields(state):
        setattr(state, f.name, getattr(saved_state, f.name))
