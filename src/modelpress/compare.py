"""Side-by-side runs: several recipes from the same starting model, every result measured the same way
in one run (file bytes, parameters, multiply-accumulates, latency, the task metric, time to compress),
with the Pareto front of size and latency against the metric.

A recipe that fails (an unknown preset, a recipe file with errors, a stage that raises, a metric that
can't run on its result) becomes a row with its error; the others still run."""
from __future__ import annotations

import copy
import functools
import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from . import sweep
from .api import CompressionResult, as_recipe, compress, load
from .batches import call_model, generators_kept, hold_out, logits_of, reusable, split_batch
from .errors import ModelpressError
from .format import mpz
from .html import render
from .keras_model import torch_form
from .measure import latencies, macs, machine_line, weights
from .pipeline import evaluate
from .recipe import Recipe
from .report import fmt_metric

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One recipe's result (or the original model's, or the error that stopped the recipe)."""

    name: str
    recipe: dict | None = None
    error: str | None = None
    bytes: int | None = None
    ratio: float | None = None
    params: int | None = None
    macs: int | None = None
    latency_ms: float | None = None
    latency_spread: tuple[float, float] | None = None   # fastest and slowest of the repeats
    metrics: dict[str, float] = field(default_factory=dict)
    compress_s: float | None = None
    artifact: str | None = None                          # the .mpz file's path, when compare had an out_dir
    layers: list[dict] = field(default_factory=list)    # per tensor: kind, shape, bytes, sparsity, bits


@dataclass
class Comparison:
    rows: list[Row]
    metric: str | None           # the metric the Pareto fronts use (higher is better)
    machine: str
    latency_input: str           # what one timed call processes, e.g. "one batch of shape [256, 1, 28, 28]"
    results: dict = field(default_factory=dict, repr=False)   # name -> CompressionResult, if kept
    measured_on: str = "the eval_fn given"  # or, for the default metric, the batches it measures on

    def front(self, x: str) -> list[str]:
        """Names on the Pareto front of `x` ("bytes" or "latency_ms", lower is better) against the metric."""
        pts = [(getattr(r, x), r.metrics[self.metric], r.name) for r in self.rows
               if r.error is None and getattr(r, x) is not None and self.metric in r.metrics]
        return [n for xv, yv, n in pts
                if not any(x2 <= xv and y2 >= yv and (x2 < xv or y2 > yv) for x2, y2, _ in pts)]

    def metric_names(self) -> list[str]:
        names: list[str] = []
        for r in self.rows:
            names += [k for k in r.metrics if k not in names]
        return names

    def table(self) -> tuple[list[str], list[list[str]]]:
        """Column names and formatted cells, shared by the terminal and HTML tables."""
        metrics = self.metric_names()
        header = ["recipe", "bytes", "ratio", "params", "MACs", "latency ms", "spread", *metrics, "compress s", "error"]
        cells = []
        for r in self.rows:
            spread = f"{r.latency_spread[0]:.2f}-{r.latency_spread[1]:.2f}" if r.latency_spread else ""
            cells.append([r.name, _n(r.bytes), "" if r.ratio is None else f"{r.ratio:.1f}x", _n(r.params),
                          _n(r.macs), "" if r.latency_ms is None else f"{r.latency_ms:.2f}", spread,
                          *[fmt_metric(r.metrics.get(m)) for m in metrics],
                          "" if r.compress_s is None else f"{r.compress_s:.1f}", " ".join((r.error or "").split())])
        return header, cells

    def to_rich(self, title: str | None = None):
        from rich.table import Table

        header, cells = self.table()
        table = Table(title=title, caption=f"{self.machine}; latency: {self.latency_input}; "
                                           f"metric measured on {self.measured_on}")
        for i, h in enumerate(header):
            table.add_column(h, justify="left" if i in (0, len(header) - 1) else "right",
                             overflow="fold", max_width=60 if h == "error" else None)
        for row in cells:
            table.add_row(*row)
        return table

    def __str__(self) -> str:
        header, cells = self.table()
        widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
        line = lambda cs: "  ".join(c.ljust(w) if i in (0, len(cs) - 1) else c.rjust(w)  # noqa: E731
                                    for i, (c, w) in enumerate(zip(cs, widths))).rstrip()
        return "\n".join([line(header), *map(line, cells)])

    def to_dict(self) -> dict:
        return {"machine": self.machine, "latency_input": self.latency_input, "metric": self.metric,
                "measured_on": self.measured_on,
                "pareto": {"bytes": self.front("bytes"), "latency_ms": self.front("latency_ms")},
                "rows": [asdict(r) for r in self.rows]}

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """results.json and report.html (self-contained) in `out_dir`; returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "results.json", "html": out / "report.html"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=1))
        paths["html"].write_text(render(self), encoding="utf-8")
        return paths


def _n(v: int | None) -> str:
    return "" if v is None else f"{v:,}"


def recipe_label(spec: Any, i: int) -> str:
    """A short name: the preset's, the file's stem, or the stages' keys ("prune+distill")."""
    if isinstance(spec, (str, Path)) and (Path(spec).suffix in (".yaml", ".yml", ".json")):
        return Path(spec).stem
    if isinstance(spec, str) and spec.strip() and not any(c in spec for c in ":\n{["):
        return spec
    try:
        recipe = as_recipe(spec)
    except ModelpressError:  # an invalid recipe: its row reports the error, under a plain name
        return f"recipe {i + 1}"
    return "+".join(s.key for s in recipe.stages)


def output_fidelity(reference: nn.Module, batches: list) -> Callable[[nn.Module], dict[str, float]]:
    """The default metric when none is given: agreement (%) of the top-1 class with the original's for
    a classifier; for any other output, the mean cosine of each sample's output to the original's."""
    inputs = [split_batch(b)[0] for b in batches]
    with torch.no_grad():
        refs = [logits_of(call_model(reference.eval(), x)).float() for x in inputs]
    classes = refs[0].dim() == 2 and refs[0].shape[-1] >= 2

    @torch.no_grad()
    def fn(model: nn.Module) -> dict[str, float]:
        outs = [logits_of(call_model(model.eval(), x)).float() for x in inputs]
        if classes:
            same = sum(int((o.argmax(-1) == r.argmax(-1)).sum()) for o, r in zip(outs, refs))
            return {"agreement": 100.0 * same / sum(r.shape[0] for r in refs)}
        cos = torch.cat([torch.nn.functional.cosine_similarity(o.flatten(1), r.flatten(1)) for o, r in zip(outs, refs)])
        return {"cos": float(cos.mean())}
    return fn


def held_out_metric(model: nn.Module, train_data: Iterable | None, calib_data: Iterable | None
                    ) -> tuple[Callable[[nn.Module], dict[str, float]], Iterable | None, Iterable | None, str]:
    """The default metric (`output_fidelity`) on batches no candidate trains or calibrates on: a tenth of
    train_data held out (`batches.hold_out`), else of calib_data. Returns (metric, train_data, calib_data
    less what was held out, what it measures on); where neither can be split, it measures on up to 8
    batches of the data itself, and says so."""
    for which, data in (("train_data", train_data), ("calib_data", calib_data)):
        if data is None:
            continue
        fit, held = hold_out(data)
        if held is not None:
            train_data = fit if train_data is data else train_data
            calib_data = fit if calib_data is data else calib_data
            held = [b for _, b in zip(range(16), held)]
            return output_fidelity(model, held), train_data, calib_data, \
                f"{sum(map(_samples, held))} samples held out of {which}"
    data = calib_data if calib_data is not None else train_data
    log.warning("the default metric is measured on batches the candidates also calibrate or train on (too few to "
                "hold a tenth out: 10 or more batches, or a DataLoader over 20 or more samples, can be split); "
                "pass eval_fn=... to measure on data of your own")
    return output_fidelity(model, [b for _, b in zip(range(8), data)]), train_data, calib_data, \
        "calibration/training batches (none could be held out)"


def _samples(batch: Any) -> int:
    x = split_batch(batch)[0]
    x = next((v for v in x.values() if isinstance(v, torch.Tensor)), None) if isinstance(x, dict) else x
    return len(x) if isinstance(x, torch.Tensor) and x.dim() > 0 else 1


def compare(model: nn.Module, recipes: Iterable[Any], *, train_data: Iterable | None = None,
            calib_data: Iterable | None = None, eval_fn: Callable[[nn.Module], float | dict] | None = None,
            example: Any = None, out_dir: str | os.PathLike | None = None, metric: str | None = None,
            repeats: int = 20, progress: Callable[[str, float], None] | None = None, seed: int | None = 0,
            names: list[str] | None = None, keep_results: bool = False, executor: str = "local",
            ray_address: str | None = None) -> Comparison:
    """Run each recipe (a preset name, YAML file or text, mapping or Recipe) on a copy of `model` and
    measure every result alike; with `out_dir`, write the artifacts, results.json and report.html
    (without it, the artifacts are measured in a temporary folder that is removed before returning).

    example: the inputs one timed call processes (default: the first batch of calib_data or train_data).
    eval_fn: `eval_fn(model) -> float | dict` (higher is better for the Pareto front's metric, `metric`,
        default its first key); without it, `output_fidelity` on up to 8 batches of the data.
    progress: called as `progress("[2/5] int8: calibrate", fraction)` while recipes run.
    seed: torch's seed before each recipe, so that a rerun gives the same results (None: left alone).
    names: the rows' names (default: preset names, file stems, or the stages' keys).
    keep_results: keep each recipe's `CompressionResult` in `Comparison.results`.
    executor: "local" runs the recipes one after the other in this process; "ray" runs each recipe's
        compression, file and metric as one Ray task (`pip install "modelpress[ray]"`), in parallel, on one
        CPU and torch thread each: the same files and metrics as a local run for the same seed on as many
        threads (`torch.set_num_threads(1)`; with more threads here, training sums in another order and a
        trained recipe can differ in the last bits). A task that fails or whose worker dies becomes its
        row's error. The latencies are timed here either way, round by round, each result loaded from its file.
    ray_address: with executor="ray", the cluster to connect to, e.g. "ray://head:10001" (where this process
        is already connected to a Ray, that one is used; without either, a local Ray on this machine's CPUs,
        started for the run and shut down after it). On a cluster, modelpress, the model's classes and
        eval_fn must be importable on every node.
    """
    sweep.check_executor(executor)
    recipes = list(recipes)
    if not recipes:
        raise ModelpressError("compare needs at least one recipe (a preset name, a YAML file or a mapping)")
    model = torch_form(model)  # a Keras model converted once
    train_data, calib_data = reusable(train_data, "train_data"), reusable(calib_data, "calib_data")
    data = calib_data if calib_data is not None else train_data
    with generators_kept(train_data, calib_data):  # the draws here change no result (nor a second compare's)
        if example is None:
            if data is None:
                raise ModelpressError("compare needs example inputs to time: pass example=..., calib_data or "
                                      "train_data")
            example = split_batch(next(iter(data)))[0]
        measured_on = "the eval_fn given"
        if eval_fn is None:
            if data is None:
                raise ModelpressError("compare needs eval_fn, or calib_data/train_data to measure fidelity on")
            eval_fn, train_data, calib_data, measured_on = held_out_metric(model, train_data, calib_data)
    model = copy.deepcopy(model).eval()
    tmp = tempfile.TemporaryDirectory(prefix="modelpress-compare-") if out_dir is None else None
    workdir = Path(out_dir) if out_dir is not None else Path(tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = 4 * sum(p.numel() for p in model.parameters())
    base = Row("original (fp32)", bytes=fp32, ratio=1.0)
    rows, models, kept = [base], {base.name: model}, {}
    _measure(base, model, example, eval_fn)
    names = list(names) if names is not None else [recipe_label(spec, i) for i, spec in enumerate(recipes)]
    names = [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]
    shared = dict(train_data=train_data, calib_data=calib_data, eval_fn=eval_fn, example=example, seed=seed,
                  fp32=fp32)
    jobs = list(zip(recipes, names))
    if executor == "local":
        outcomes = _here(model, jobs, workdir=workdir, keep_files=out_dir is not None, progress=progress, **shared)
    else:
        with sweep.ray_session(ray_address):
            outcomes = on_ray(model, jobs, details=True, keep=keep_results, progress=progress,
                              out_dir=None if out_dir is None else workdir, **shared)
    for row, result in outcomes:
        rows.append(row)
        if row.error is None:
            models[row.name] = result.model
            if keep_results:
                kept[row.name] = result
    if tmp is not None:
        tmp.cleanup()  # the files were only measured (an exception leaves it to tmp's finalizer)
    if progress:
        progress("timing every result, round by round", 0.0)
    runs = {n: functools.partial(call_model, m, example) for n, m in models.items()}
    times = latencies(runs, repeats=repeats)
    for r in rows:
        if r.name in times:
            r.latency_ms, r.latency_spread = statistics.median(times[r.name]), (min(times[r.name]), max(times[r.name]))
    if metric is None:
        metric = next(iter(base.metrics), None)
    comparison = Comparison(rows, metric, machine_line(), _describe_input(example), kept, measured_on)
    if out_dir is not None:
        comparison.write(out_dir)
    return comparison


def run_recipe(model: nn.Module, spec: Any, name: str, *, train_data: Iterable | None, calib_data: Iterable | None,
               eval_fn: Callable, example: Any, seed: int | None, fp32: int, path: Path, details: bool = True,
               progress: Callable[[str, float], None] | None = None) -> tuple[Row, CompressionResult | None]:
    """One recipe's work, the same in this process and in a Ray task (so that the two cannot drift):
    compress a copy of `model` (torch seeded with `seed` first; torch's random state and the generators of
    shuffling DataLoaders put back after, so that no recipe depends on those before it), write the file to
    `path`, and measure the result: the metric, and with `details` its parameters, MACs and per-layer
    bytes. Returns the row (with the error that stopped it, if any) and the result (None where the recipe
    or a measurement failed)."""
    row = Row(name)
    try:
        recipe = as_recipe(spec, model)
        row.recipe = recipe.to_dict()
        t = time.perf_counter()
        # the caller's random state, and the data's shuffling generators, are left as they were: each recipe
        # sees the same batches whatever ran before it (in this process or not)
        with torch.random.fork_rng(devices=[]), generators_kept(train_data, calib_data):
            if seed is not None:
                torch.manual_seed(seed)
            result = compress(model, recipe, train_data=train_data, calib_data=calib_data, progress=progress)
        row.compress_s = time.perf_counter() - t
        row.bytes = result.save(path)
        row.ratio = fp32 / row.bytes
        if details:
            row.layers = result.layers()
    except Exception as e:  # reported in the row; the other recipes still run
        row.error = _why(e)
        return row, None
    try:
        if details:
            _measure(row, result.model, example, eval_fn)
        else:
            row.metrics = evaluate(result.model, eval_fn)
    except Exception as e:
        row.error = f"the metric or a measurement could not run on the result: {_why(e)}"
        return row, None
    return row, result


def _here(model: nn.Module, jobs: list[tuple[Any, str]], *, workdir: Path, keep_files: bool,
          progress: Callable[[str, float], None] | None, **shared: Any
          ) -> Iterator[tuple[Row, CompressionResult | None]]:
    """`run_recipe` of each (spec, name) of `jobs` in turn, in this process, each file written to `workdir`."""
    for i, (spec, name) in enumerate(jobs):
        tell = (lambda label, f, _i=i, _n=name: progress(f"[{_i + 1}/{len(jobs)}] {_n}: {label}", f)) \
            if progress else None
        path = workdir / f"{_slug(name)}.mpz"
        row, result = run_recipe(model, spec, name, path=path, progress=tell, **shared)
        row.artifact = str(path) if keep_files and row.bytes is not None else None
        yield row, result


def _in_task(model: nn.Module, spec: Any, name: str, *, keep: bool, **kw: Any
             ) -> tuple[Row, bytes | None, tuple | None]:
    """`run_recipe` in a Ray task: the row, the file's bytes (None if compression failed) and, with
    `keep`, the result's report and state (what the file does not hold)."""
    with tempfile.TemporaryDirectory(prefix="modelpress-task-") as tmp:
        path = Path(tmp) / "result.mpz"
        row, result = run_recipe(model, spec, name, path=path, **kw)
        blob = path.read_bytes() if row.bytes is not None else None
    return row, blob, (result.report, result.state) if keep and result is not None else None


def on_ray(model: nn.Module, jobs: list[tuple[Any, str]], *, details: bool, keep: bool,
           progress: Callable[[str, float], None] | None, out_dir: Path | None, **shared: Any
           ) -> list[tuple[Row, CompressionResult | None]]:
    """`run_recipe` for each (spec, name) of `jobs` as Ray tasks (`sweep.on_ray`), in a connected Ray. A
    recipe that does not parse fails here, as it would locally (files are read here, not on the workers).
    Each file comes back as bytes, is written to `out_dir` when given, and is loaded here (`load`, in the
    unpacked form compress returns, into a copy of `model`) for timing; with `keep`, as a full result."""
    rows: list[Row | None] = [None] * len(jobs)
    tasks, where = [], []
    for i, (spec, name) in enumerate(jobs):
        try:
            recipe = as_recipe(spec, model)
        except Exception as e:
            rows[i] = Row(name, error=_why(e))
            continue
        tasks.append(dict(spec=recipe, name=name))
        where.append(i)
    done = (lambda k, n: progress(f"[{n}/{len(tasks)}] {tasks[k]['name']}: done on Ray", n / len(tasks))) \
        if progress else None
    returned = sweep.on_ray(_in_task, tasks, dict(model=model, details=details, keep=keep, **shared), done=done)
    results: list[CompressionResult | None] = [None] * len(jobs)
    for i, task, value in zip(where, tasks, returned):
        if isinstance(value, sweep.Failed):
            rows[i] = Row(task["name"], recipe=task["spec"].to_dict(), error=value.error)
            continue
        rows[i], blob, extras = value
        if blob is not None and out_dir is not None:
            path = out_dir / f"{_slug(task['name'])}.mpz"
            path.write_bytes(blob)
            rows[i].artifact = str(path)
        if rows[i].error is None:
            try:
                results[i] = _rebuilt(blob, model, task["spec"], extras)
            except Exception as e:  # the row keeps what the task measured; only the timing is lost
                rows[i].error = f"the file the Ray task wrote could not be loaded here, to time it: {_why(e)}"
    return list(zip(rows, results))


def _rebuilt(blob: bytes, model: nn.Module, recipe: Recipe, extras: tuple | None) -> CompressionResult:
    """A task's result from its file: the model loaded into a copy of `model` (the classes compress
    returns, weights unpacked as compress leaves them), and, where the task sent them, report and state."""
    net = load(blob, copy.deepcopy(model), packed=False)
    manifest, streams, _ = mpz.read(blob)
    report, state = extras or (None, None)
    return CompressionResult(model=net, report=report, state=state, recipe=recipe, manifest=manifest, streams=streams)


def _measure(row: Row, model: nn.Module, example: Any, eval_fn: Callable) -> None:
    row.params = sum(w.numel() for w in weights(model))
    if isinstance(example, dict):
        row.macs = macs(model, **example)
    else:
        row.macs = macs(model, *(example if isinstance(example, (tuple, list)) else (example,)))
    row.metrics = evaluate(model, eval_fn)


def _why(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text if isinstance(e, ModelpressError) else f"{type(e).__name__}: {text}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "recipe"


def _describe_input(example: Any) -> str:
    if isinstance(example, torch.Tensor):
        return f"one batch of shape {list(example.shape)}"
    if isinstance(example, dict):
        return "one batch of " + ", ".join(f"{k} {list(v.shape)}" for k, v in example.items()
                                           if isinstance(v, torch.Tensor))
    return "one batch of the given example inputs"
