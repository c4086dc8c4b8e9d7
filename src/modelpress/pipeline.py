"""Runs a recipe's stages in order and measures the model after each one.

A stage plugs in through one handler registered for its config type. After every stage the
model is put in canonical form (encoded and decoded exactly as the file will hold it), so each
row of the report describes what would be saved at that point, byte for byte.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import numbers
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .errors import ModelpressError
from .format.container import container_overhead
from .format.mpz import decode_state_dict, encode_model
from .measure import weights
from .recipe import (ClusterConfig, DistillConfig, FactorizeConfig, FinetuneConfig, PruneConfig, QuantizeConfig,
                     Recipe, StageConfig)
from .report import Report, StageRow
from .state import CompressionState
from .techniques.cluster import cluster
from .techniques.common import linearize
from .techniques.finetune import TrainContext, train
from .techniques.lowrank import factorize
from .techniques.prune import prune
from .techniques.structured import prune_channels
from .techniques.quantize import quantize

log = logging.getLogger(__name__)
Handler = Callable[[nn.Module, CompressionState, Any, "Run"], None]
HANDLERS: dict[type, Handler] = {}


def handles(config_type: type[StageConfig]) -> Callable[[Handler], Handler]:
    """Register the function that applies stages of `config_type`."""
    def deco(fn: Handler) -> Handler:
        HANDLERS[config_type] = fn
        return fn
    return deco


class Run:
    """What handlers share during one compress() call."""

    def __init__(self, recipe: Recipe, ctx: TrainContext):
        self.recipe, self.ctx = recipe, ctx

    def exclude(self, cfg: StageConfig) -> tuple[str, ...]:
        return tuple(self.recipe.exclude) + tuple(cfg.exclude)


@handles(PruneConfig)
def _prune(model: nn.Module, state: CompressionState, cfg: PruneConfig, run: Run) -> None:
    if cfg.granularity != "element":  # channel: filters, neurons and whole heads; filter/neuron; head
        criterion = "l1" if cfg.criterion == "magnitude" else cfg.criterion
        units = {"channel": "all", "head": "heads"}.get(cfg.granularity, "channels")
        prune_channels(model, state, sparsity=cfg.sparsity, criterion=criterion, scope=cfg.scope,
                       exclude=run.exclude(cfg), ctx=run.ctx, units=units, refit=cfg.refit)
        return
    prune(model, state, sparsity=cfg.sparsity, criterion=cfg.criterion, scope=cfg.scope,
          schedule=cfg.schedule, steps=cfg.steps, epochs=cfg.epochs, lr=cfg.lr,
          max_sparsity=cfg.max_sparsity, tolerance=cfg.tolerance, exclude=run.exclude(cfg), ctx=run.ctx)


@handles(ClusterConfig)
def _cluster(model: nn.Module, state: CompressionState, cfg: ClusterConfig, run: Run) -> None:
    cluster(model, state, bits=cfg.bits, include_bias=cfg.include_bias, exclude=run.exclude(cfg))


@handles(QuantizeConfig)
def _quantize(model: nn.Module, state: CompressionState, cfg: QuantizeConfig, run: Run) -> None:
    quantize(model, state, bits=cfg.bits, per_channel=cfg.per_channel, group_size=cfg.group_size,
             method=cfg.method, activations=cfg.activations, embeddings=cfg.embeddings,
             avg_bits=cfg.avg_bits, budget_mb=cfg.budget_mb,
             include_bias=cfg.include_bias, exclude=run.exclude(cfg), calib_data=run.ctx.calib_data,
             progress=run.ctx.progress)


@handles(FactorizeConfig)
def _factorize(model: nn.Module, state: CompressionState, cfg: FactorizeConfig, run: Run) -> None:
    factorize(model, state, rank=cfg.rank, rank_ratio=cfg.rank_ratio, energy=cfg.energy, min_rank=cfg.min_rank,
              exclude=run.exclude(cfg))


@handles(DistillConfig)
def _distill(model: nn.Module, state: CompressionState, cfg: DistillConfig, run: Run) -> None:
    ctx = dataclasses.replace(run.ctx, distill=True, hidden=cfg.hidden, temperature=cfg.temperature)
    train(model, state, ctx, epochs=cfg.epochs, lr=cfg.lr, label="distill")


@handles(FinetuneConfig)
def _finetune(model: nn.Module, state: CompressionState, cfg: FinetuneConfig, run: Run) -> None:
    train(model, state, run.ctx, epochs=cfg.epochs, lr=cfg.lr, label="finetune")


def canonicalize(model: nn.Module, state: CompressionState, meta: dict | None = None
                 ) -> tuple[dict, dict[str, bytes]]:
    """Snap the model to exactly what its file holds; returns the manifest and streams."""
    for st in state.params.values():
        if st.codebook is not None:
            st.codebook = st.codebook.half().float()
    manifest, streams = encode_model(model, state, meta)
    decoded = decode_state_dict(manifest, streams)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(decoded[name])
    return manifest, streams


def measure(model: nn.Module, stage: str, manifest: dict, streams: dict[str, bytes], fp32_bytes: int,
            seconds: float, eval_fn: Callable | None) -> StageRow:
    nbytes = sum(map(len, streams.values())) + container_overhead(manifest, streams)
    ws = weights(model)
    n = sum(p.numel() for p in ws)
    zeros = sum(int((p == 0).sum()) for p in ws)
    return StageRow(stage=stage, bytes=nbytes, ratio=fp32_bytes / nbytes, params=n,
                    sparsity=zeros / max(1, n), bits_per_param=8 * nbytes / max(1, n), seconds=seconds,
                    metrics=evaluate(model, eval_fn))



def evaluate(model: nn.Module, eval_fn: Callable | None) -> dict[str, float]:
    """`eval_fn(model)` as a dict of metrics; a clear error when it returns anything but a real number
    or a dict of name -> real number (NaN is reported as is)."""
    if eval_fn is None:
        return {}
    model.eval()
    with torch.no_grad():
        value = eval_fn(model)
    out = {}
    for k, v in (value.items() if isinstance(value, dict) else [("metric", value)]):
        out[str(k)] = x = _number(v)
        if x is None:
            what = f"a dict whose {k!r} is a" if isinstance(value, dict) else "a"
            raise ModelpressError(f"eval_fn returned {what} {type(v).__name__} ({str(v)[:40]!r}); it must return a "
                                  "real number (float, int, a one-element tensor) or a dict of name -> number, e.g. "
                                  "{'accuracy': 0.93}")
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1 or isinstance(v, np.ndarray) and v.size == 1:
        v = v.item()
    return float(v) if isinstance(v, numbers.Real) else None


def check_weights(model: nn.Module) -> None:
    """A clear error, before anything runs, for weights on the meta device or holding NaN/Inf."""
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ModelpressError(f"the model's weights are on the meta device (not loaded): {_first(meta)}; load real "
                              "weights first (e.g. load_state_dict(..., assign=True), or from_pretrained without a "
                              "meta device_map)")
    bad = nonfinite(model)
    if bad:
        raise ModelpressError(f"the model has non-finite values in {len(bad)} tensor(s): {_first(bad)}; every "
                              "technique would spread them (k-means, quantization grids, GPTQ): fix or reload the "
                              "weights first")


def nonfinite(model: nn.Module) -> list[str]:
    """"name (n NaN, m Inf)" of each parameter holding NaN or Inf, and each floating buffer holding NaN
    (-inf is a legitimate attention-mask value in a buffer)."""
    bad = []
    for name, t, is_param in [*((n, p, True) for n, p in model.named_parameters()),
                              *((n, b, False) for n, b in model.named_buffers())]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or is_param:
                bad.append(f"{name} ({', '.join(f'{c} {k}' for c, k in ((nan, 'NaN'), (inf, 'Inf')) if c)})")
    return bad


def _first(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


def run_pipeline(model: nn.Module, recipe: Recipe, ctx: TrainContext, eval_fn: Callable | None = None,
                 on_stage: Callable[[StageRow], None] | None = None, meta: dict | None = None
                 ) -> tuple[nn.Module, CompressionState, Report]:
    """Apply every stage to a copy of `model`; the original is left untouched. `meta` goes into the
    file, so each row's bytes are the exact size of the file saved at that point."""
    student = copy.deepcopy(model).float().cpu().eval()
    converted = linearize(student)
    for p in student.parameters():
        p.requires_grad_(True)
    state = CompressionState()
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    report = Report(fp32_bytes=fp32_bytes)
    if fp32_bytes == 0:
        raise ModelpressError("the model has no parameters to compress")
    t0 = time.perf_counter()
    row = StageRow("fp32", fp32_bytes, 1.0, fp32_bytes // 4, _sparsity(student), 32.0, 0.0,
                   evaluate(student, eval_fn))
    report.rows.append(row)
    if on_stage:
        on_stage(row)
    run = Run(recipe, ctx)
    for i, cfg in enumerate(recipe.stages, 1):
        handler = HANDLERS.get(type(cfg))
        if handler is None:
            raise ModelpressError(f"stage {i} ({cfg.key}) has no registered handler; register one with "
                                  f"@modelpress.pipeline.handles({type(cfg).__name__})")
        t = time.perf_counter()
        log.info("stage %d/%d: %s", i, len(recipe.stages), cfg.key)
        handler(student, state, cfg, run)
        bad = nonfinite(student)
        if bad:
            raise ModelpressError(f"stage {i} ({cfg.key}) produced non-finite values in {len(bad)} tensor(s): "
                                  f"{_first(bad)}")
        manifest, streams = canonicalize(student, state, meta)
        row = measure(student, f"{i}. {cfg.key}", manifest, streams, fp32_bytes, time.perf_counter() - t, eval_fn)
        report.rows.append(row)
        if on_stage:
            on_stage(row)
    if converted:
        report.notes.append(f"{converted} transformers Conv1D layers became equivalent nn.Linear layers")
    report.notes.append(f"total {time.perf_counter() - t0:.1f} s")
    return student, state, report


def _sparsity(model: nn.Module) -> float:
    ws = weights(model)
    return sum(int((p == 0).sum()) for p in ws) / max(1, sum(p.numel() for p in ws))
