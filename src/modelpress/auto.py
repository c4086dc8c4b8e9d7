"""Automatic choice under a budget: search a space of recipes for the most accurate one whose file
size (`max_mb`, `min_ratio`) and latency (`max_latency_ms`) meet the budget.

Cheap first: every candidate is run once without its training (one-shot pruning, round-to-nearest
instead of GPTQ, no fine-tuning or distillation), which gives its exact file size and latency, and
a metric that ranks candidates by how little they damage the model. Only the best-ranked candidates
that fit are then run in full, side by side (`compare`), and the best of those that fits and stays
within `max_drop` of the original's metric wins. Where nothing fits, the result says so and is the
closest candidate. Seeded, so a given seed and inputs give the same choice."""
from __future__ import annotations

import contextlib
import functools
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from torch import nn

from . import sweep
from .api import CompressionResult
from .batches import call_model, generators_kept, reusable, split_batch
from .compare import Comparison, Row, compare, held_out_metric, on_ray, run_recipe
from .errors import ModelpressError
from .keras_model import torch_form
from .measure import latencies
from .pipeline import evaluate
from .presets import has_attention
from .recipe import (ChannelPruneConfig, ClusterConfig, DistillConfig, FactorizeConfig, FinetuneConfig, PruneConfig,
                     QuantizeConfig, Recipe)
from .stage import StageConfig


@dataclass
class Budget:
    max_mb: float | None = None
    max_latency_ms: float | None = None
    min_ratio: float | None = None

    def misses(self, row: Row, fp32_bytes: int, slack: float = 0.0) -> float:
        """How far `row` is over the budget (0 when it fits), as the worst relative excess."""
        over = []
        if self.max_mb is not None and row.bytes is not None:
            over.append(row.bytes / (1 - slack) / (self.max_mb * 1e6) - 1)
        if self.min_ratio is not None and row.bytes is not None:
            over.append(self.min_ratio / (fp32_bytes / row.bytes * (1 - slack)) - 1)
        if self.max_latency_ms is not None and row.latency_ms is not None:
            over.append(row.latency_ms / self.max_latency_ms - 1)
        return max([0.0, *over])

    def __str__(self) -> str:
        parts = [f"max {self.max_mb} MB" if self.max_mb is not None else "",
                 f"at least {self.min_ratio}x smaller" if self.min_ratio is not None else "",
                 f"max {self.max_latency_ms} ms" if self.max_latency_ms is not None else ""]
        return ", ".join(p for p in parts if p)


@dataclass
class AutoResult(CompressionResult):
    """`compress()`'s result for the chosen recipe, with whether it met the budget (and max_drop), a
    sentence saying so, every candidate's cheap measurement, and the full side-by-side runs."""

    met: bool = False
    message: str = ""
    proxies: list[Row] = field(default_factory=list)
    tried: Comparison | None = None


@dataclass(frozen=True)
class Candidate:
    """One recipe of the search space; `budget_mb` is set where the recipe is a quantization sized to a
    file budget (the refill round scales it), and `family` names it without that budget."""

    name: str
    recipe: Recipe
    budget_mb: float | None = None
    family: str = ""


PRESET = "preset"  # the family of candidates that are presets as they stand
SIZE_PRESETS = ("int8", "w4", "w3")


def search_space(model: nn.Module, budget: Budget, fp32_bytes: int, trainable: bool) -> list[Candidate]:
    """Candidate recipes, named. Size budgets: the quantization presets, mixed-precision weight
    quantization sized to the budget, and (with training data) pruning + weight sharing at several
    sparsities and widths. Latency budgets: channel pruning at several fractions, factorization, int8
    activations, and (with training data) the `fast` preset."""
    out: list[Candidate] = []

    def add(name: str, *stages: StageConfig, budget_mb: float | None = None, family: str = "") -> None:
        out.append(Candidate(name, Recipe(stages=stages), budget_mb, family))

    size_targets = [b for b in (budget.max_mb * 1e6 if budget.max_mb else None,
                                fp32_bytes / budget.min_ratio if budget.min_ratio else None) if b]
    if size_targets:
        for preset in SIZE_PRESETS:  # so that auto is never worse than a preset that fits
            add(f"preset {preset}", *Recipe.preset(preset, model).stages, family=PRESET)
        mb = 0.97 * min(size_targets) / 1e6  # headroom for the header, which the allocation does not model
        for bits in (8, 4, 3, 2):  # uniform widths: the fallback, and the closest where a budget is out of reach
            add(f"quantize {bits}-bit", QuantizeConfig(bits=bits, method="gptq"))
            for group in (None, 64):
                family = f"quantize {bits}-bit{' g' + str(group) if group else ''}"
                add(f"{family}, more bits where sensitive, to fit",
                    _sized(QuantizeConfig(bits=bits, method="gptq", group_size=group), mb), budget_mb=mb, family=family)
        if trainable and not has_attention(model):
            for sparsity in (0.8, 0.9, 0.93, 0.95, 0.97):
                for bits in (5, 4, 3):
                    add(f"prune {sparsity:.0%} + cluster {bits}-bit",
                        PruneConfig(sparsity=sparsity, criterion="taylor", scope="global", schedule="agp", steps=8,
                                    epochs=8, lr=1e-3),
                        ClusterConfig(bits=bits), FinetuneConfig(epochs=4, lr=3e-4))
    if budget.max_latency_ms is not None:
        recovery = [DistillConfig(epochs=3, lr=1.5e-4, hidden=True) if has_attention(model)
                    else DistillConfig(epochs=10, lr=1e-3)] if trainable else []
        for sparsity in (0.2, 0.4, 0.6, 0.75):
            prune = ChannelPruneConfig(granularity="channel", sparsity=sparsity, criterion="activation")
            add(f"channels -{sparsity:.0%}", prune, *recovery)
            add(f"channels -{sparsity:.0%} + int8", prune, *recovery, QuantizeConfig(bits=8, activations="int8"))
        for ratio in (0.5, 0.25):
            tune = [FinetuneConfig(epochs=4, lr=1e-3)] if trainable else []
            add(f"factorize {ratio}", FactorizeConfig(rank_ratio=ratio), *tune)
        add("int8", QuantizeConfig(bits=8, activations="int8", method="gptq"))
        if trainable:
            add("preset fast", *Recipe.preset("fast", model).stages, family=PRESET)
    return out


def _sized(cfg: QuantizeConfig, mb: float) -> QuantizeConfig:
    return cfg.model_copy(update={"budget_mb": round(mb, 6)})


def without_training(recipe: Recipe) -> Recipe:
    """The recipe's cheap form: every stage's `without_training()` (no fine-tuning or distillation,
    one-shot magnitude pruning, round-to-nearest)."""
    stages = tuple(c for c in (cfg.without_training() for cfg in recipe.stages) if c is not None)
    return Recipe(stages=stages, exclude=recipe.exclude)


def auto(model: nn.Module, *, max_mb: float | None = None, max_latency_ms: float | None = None,
         min_ratio: float | None = None, max_drop: float | None = None, train_data: Iterable | None = None,
         calib_data: Iterable | None = None, eval_fn: Callable[[nn.Module], float | dict] | None = None,
         example: Any = None, metric: str | None = None, seed: int = 0, keep: int = 3, repeats: int = 10,
         out_dir: str | None = None, progress: Callable[[str, float], None] | None = None, executor: str = "local",
         ray_address: str | None = None) -> AutoResult:
    """The most accurate recipe found that meets the budget (see the module docstring).

    max_drop: the largest loss of the metric (in its own units: accuracy points, cosine) accepted.
    keep: how many of the best-ranked candidates that fit are run in full; the best-ranked preset that
    fits is run in full too, so the choice is never worse than it on `eval_fn`.
    executor, ray_address: where the candidates run, screened and in full, as for `compare`: "local" (one
    after the other, in this process) or "ray" (one Ray task each, on one torch thread: the same choice
    as a local run on one thread for the same seed). Latencies are timed here either way.
    """
    sweep.check_executor(executor)
    budget = Budget(max_mb, max_latency_ms, min_ratio)
    if not str(budget):
        raise ModelpressError("auto needs a budget: max_mb, max_latency_ms or min_ratio")
    model = torch_form(model)  # a Keras model converted once
    train_data, calib_data = reusable(train_data, "train_data"), reusable(calib_data, "calib_data")
    data = calib_data if calib_data is not None else train_data
    if data is None and (example is None or eval_fn is None):
        raise ModelpressError("auto needs calib_data or train_data (to calibrate, measure and time the candidates)")
    with generators_kept(train_data, calib_data):  # the draws here change no result (nor a second auto's)
        if example is None:
            example = split_batch(next(iter(data)))[0]
        measured_on = "the eval_fn given"
        if eval_fn is None:
            eval_fn, train_data, calib_data, measured_on = held_out_metric(model, train_data, calib_data)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    base = evaluate(model, eval_fn)
    metric = metric or next(iter(base), None)
    if metric is None or metric not in base:
        raise ModelpressError(f"auto needs a metric among eval_fn's results ({sorted(base)}); got {metric!r}")
    space = search_space(model, budget, fp32, trainable=train_data is not None)
    with contextlib.ExitStack() as stack:  # one Ray for the screening and the full runs
        if executor == "ray":
            stack.enter_context(sweep.ray_session(ray_address))
        screen = functools.partial(_screen, model, train_data=train_data, calib_data=calib_data, eval_fn=eval_fn,
                                   example=example, budget=budget, fp32=fp32, seed=seed, repeats=repeats,
                                   executor=executor, progress=progress)
        proxies = screen(space, "screening")
        # the bit allocation's size model leaves out entropy coding, so its files come out smaller than
        # asked: ask again, scaled by what the first round measured, to use the whole budget
        refill = _refill(space, proxies)
        proxies += screen(refill, "screening, sized to the budget")
        space += refill
        return _choose(model, space, proxies, budget, fp32, base, metric, max_drop, measured_on, keep=keep,
                       train_data=train_data, calib_data=calib_data, eval_fn=eval_fn, example=example,
                       repeats=repeats, out_dir=out_dir, progress=progress, seed=seed, executor=executor)


def _choose(model: nn.Module, space: list[Candidate], proxies: list[Row], budget: Budget, fp32: int, base: dict,
            metric: str, max_drop: float | None, measured_on: str, *, keep: int, **run: Any) -> AutoResult:
    """The full runs (`compare`) of the best-ranked screened candidates that fit, and the choice among them."""
    screened = [r for r in proxies if r.error is None and metric in r.metrics]
    if not screened:
        raise ModelpressError("auto could not run any candidate: " + "; ".join(
            f"{r.name}: {r.error}" for r in proxies[:3]))
    fits = sorted(_distinct(r for r in screened if budget.misses(r, fp32, slack=0.01) == 0),
                  key=lambda r: -r.metrics[metric])
    chosen = fits[:keep] if fits else sorted(screened, key=lambda r: budget.misses(r, fp32))[:1]
    presets = {c.name for c in space if c.family == PRESET}
    if not any(r.name in presets for r in chosen):  # the best preset that fits runs in full too
        chosen += [r for r in fits if r.name in presets][:1]
    recipes = {c.name: c.recipe for c in space}
    tried = compare(model, [recipes[r.name] for r in chosen], metric=metric, names=[r.name for r in chosen],
                    keep_results=True, **run)
    done = [r for r in tried.rows[1:] if r.error is None and metric in r.metrics]
    if not done:
        raise ModelpressError("auto: every full run failed: " + "; ".join(f"{r.name}: {r.error}"
                                                                          for r in tried.rows[1:]))
    ref = base[metric]
    ok = [r for r in done if budget.misses(r, fp32) == 0]
    within = [r for r in ok if max_drop is None or ref - r.metrics[metric] <= max_drop]
    if within:
        best, met = max(within, key=lambda r: r.metrics[metric]), True
    elif ok:
        best, met = max(ok, key=lambda r: r.metrics[metric]), False
    else:
        best, met = min(done, key=lambda r: budget.misses(r, fp32)), False
    drop = ref - best.metrics[metric]
    summary = (f"{best.name}: {best.bytes:,} bytes ({fp32 / best.bytes:.1f}x), {best.latency_ms:.2f} ms, "
               f"{metric} {best.metrics[metric]:.4g} (original {ref:.4g}, drop {drop:.4g})")
    if met:
        message = f"met the budget ({budget}" + (f", drop <= {max_drop}" if max_drop is not None else "") + \
            f") with {summary}"
    elif ok:
        message = (f"the budget ({budget}) is met, but no candidate kept the drop within {max_drop}; "
                   f"the closest: {summary}")
    else:
        message = f"no candidate met the budget ({budget}); the closest: {summary}"
    message += f"; {metric} measured on {measured_on}"
    tried.measured_on = measured_on
    result = tried.results[best.name]
    return AutoResult(model=result.model, report=result.report, state=result.state, recipe=result.recipe,
                      manifest=result.manifest, streams=result.streams, met=met, message=message, proxies=proxies,
                      tried=tried)


def _distinct(rows: Iterable[Row]) -> list[Row]:
    """The rows, less any with an earlier one's metrics and a file within 1% of its size: candidates
    that came out the same (e.g. 3-bit and 2-bit bases that the budget raised to the same widths) are
    run in full once."""
    out: list[Row] = []
    for r in rows:
        if not any(r.metrics == o.metrics and abs(r.bytes - o.bytes) <= 0.01 * o.bytes for o in out):
            out.append(r)
    return out


def _refill(space: list[Candidate], proxies: list[Row]) -> list[Candidate]:
    """The budget-sized quantization candidates again, their budgets scaled by the median ratio of
    asked to measured size in the first round (none if the files already came out at the budget)."""
    asked = {c.name: c.budget_mb for c in space if c.budget_mb is not None}
    ratios = [asked[p.name] * 1e6 / p.bytes for p in proxies if p.name in asked and p.bytes]
    if not ratios or statistics.median(ratios) < 1.03:
        return []
    scale = 0.99 * statistics.median(ratios)  # aim just under
    out = []
    for c in space:
        if c.budget_mb is not None:
            mb = c.budget_mb * scale
            stages = tuple(_sized(s, mb) if isinstance(s, QuantizeConfig) else s for s in c.recipe.stages)
            out.append(Candidate(f"{c.name}, re-aimed", Recipe(stages=stages), mb, c.family))
    return out


def _screen(model: nn.Module, candidates: list[Candidate], stage: str, *, train_data: Iterable | None,
            calib_data: Iterable | None, eval_fn: Callable, example: Any, budget: Budget, fp32: int, seed: int,
            repeats: int, executor: str, progress: Callable[[str, float], None] | None) -> list[Row]:
    """The candidates' cheap measurements: each one's untrained form's exact size, metric and, if the
    budget has one, latency (timed here, one candidate at a time, as each result comes back)."""
    jobs = [(without_training(c.recipe), c.name) for c in candidates]
    if not jobs:
        return []
    shared = dict(train_data=train_data, calib_data=calib_data, eval_fn=eval_fn, example=example, seed=seed,
                  fp32=fp32, details=False)
    rows = []
    with tempfile.TemporaryDirectory(prefix="modelpress-screen-") as tmp:
        if executor == "ray":
            tell = (lambda label, f: progress(f"{stage} {label}", f)) if progress else None
            outcomes = on_ray(model, jobs, keep=False, progress=tell, out_dir=None, **shared)
        else:
            outcomes = _one_by_one(jobs, stage, progress, functools.partial(
                run_recipe, model, path=Path(tmp) / "c.mpz", **shared))
        for c, (row, result) in zip(candidates, outcomes):
            row.recipe = c.recipe.to_dict()  # the candidate's, not its untrained form's
            if row.error is None and budget.max_latency_ms is not None:
                try:
                    times = latencies({row.name: functools.partial(call_model, result.model, example)}, repeats)
                    row.latency_ms = statistics.median(times[row.name])
                except Exception as e:
                    row.error = f"{type(e).__name__}: {e}"
            if row.error is not None:  # a candidate this model can't take (nothing to factorize, untraceable...)
                row.error = (row.error.strip().splitlines() or ["failed"])[0][:200]
            rows.append(row)
    return rows


def _one_by_one(jobs: list[tuple[Recipe, str]], stage: str, progress: Callable[[str, float], None] | None,
                run: Callable[..., tuple[Row, CompressionResult | None]]
                ) -> Iterator[tuple[Row, CompressionResult | None]]:
    """`run(spec, name)` of each job in turn, here, saying which as each starts."""
    for i, (spec, name) in enumerate(jobs):
        if progress:
            progress(f"{stage} {i + 1}/{len(jobs)}: {name}", i / len(jobs))
        yield run(spec, name)
