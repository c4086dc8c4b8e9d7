"""Compare and choose: recipes side by side on LeNet-5 (MNIST-5k) and all-MiniLM-L6-v2 (pydoc
paragraphs), each measured alike in one run, with the HTML report and a screenshot of it; then
`auto` under a budget on LeNet-5 (and MiniLM), beside the best hand-written preset of the same run.

Run: python benchmarks/compare.py [--skip-minilm] [--skip-auto] [--out benchmarks/compare-out]
Writes the reports under --out and the screenshot benchmarks/compare-lenet5.png.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from common import minilm as minilm_data  # benchmarks/common.py
import modelpress as mp
from modelpress import data
from modelpress.compare import compare
from modelpress.measure import machine_line

HERE = Path(__file__).parent
FACTORIZE = "{stages: [{factorize: {rank_ratio: 0.25}}, {finetune: {epochs: 8, lr: 1.0e-3}}]}"


def show(title: str, comparison) -> None:
    print(f"\n## {title}\n")
    print(comparison)
    print(f"Pareto front (bytes): {comparison.front('bytes')}; (latency): {comparison.front('latency_ms')}")


def best_preset(c, fits) -> str:
    """The hand-written preset with the best metric among those that meet the budget."""
    ok = [r for r in c.rows[1:] if r.error is None and fits(r)]
    if not ok:
        return "no hand-written preset in this run meets the budget"
    r = max(ok, key=lambda r: r.metrics[c.metric])
    return f"best preset that fits: {r.name}, {r.bytes:,} bytes ({r.ratio:.1f}x), {c.metric} {r.metrics[c.metric]:.4f}"


def run_auto(title: str, model, budget: dict, **kw) -> None:
    t = time.perf_counter()
    result = mp.auto(model, **budget, **kw)
    seconds = time.perf_counter() - t
    print(f"\n## auto on {title} ({', '.join(f'{k}={v}' for k, v in budget.items())}), {seconds:.0f} s\n")
    print("screened (untrained forms):")
    for r in result.proxies:
        m = next(iter(r.metrics.values()), float("nan"))
        print(f"  {r.name:<42} {r.error or f'{r.bytes:>10,} bytes {r.ratio:7.1f}x  metric {m:.4f}'}")
    print(result.tried)
    print(result.message)


def lenet5(out: Path, repeats: int, with_auto: bool) -> None:
    torch.manual_seed(0)
    split = data.mnist5k(image=True)
    model = data.train_classifier(data.lenet5(), split, epochs=20)
    acc = lambda m: {"acc": data.accuracy(m, split.x_test, split.y_test)}  # noqa: E731
    t = time.perf_counter()
    c = compare(model, ["deep-compression", "int8", "w4", "fast", FACTORIZE], train_data=split.loader(64),
                eval_fn=acc, example=split.x_test[:256], out_dir=out / "lenet5", repeats=repeats)
    show(f"LeNet-5 on MNIST-5k, 5 recipes, {time.perf_counter() - t:.0f} s in all", c)
    base = c.rows[0].metrics["acc"]
    print(best_preset(c, lambda r: r.ratio >= 50 and base - r.metrics["acc"] <= 0.5) + " (min ratio 50, max drop 0.5)")
    if with_auto:
        run_auto("LeNet-5", model, {"min_ratio": 50, "max_drop": 0.5}, train_data=split.loader(64), eval_fn=acc,
                 example=split.x_test[:256], repeats=repeats)
    browser = shutil.which("chromium")
    if browser:
        from screenshot import screenshot  # benchmarks/screenshot.py, beside this script

        errors = screenshot(out / "lenet5" / "report.html", HERE / "compare-lenet5.png", browser=browser)
        print(f"screenshot: {HERE / 'compare-lenet5.png'}; console errors: {errors or 'none'}")


def minilm(out: Path, repeats: int, with_auto: bool) -> None:
    t = time.perf_counter()
    m = minilm_data()
    model, evals = m["model"], m["evals"]
    c = compare(model, ["int8", "w4", "w3", "fast"], calib_data=m["calib"], train_data=m["train"],
                eval_fn=m["fidelity"], metric="cos", example=evals[0], out_dir=out / "minilm", repeats=repeats)
    show(f"all-MiniLM-L6-v2, 4 presets, {time.perf_counter() - t:.0f} s in all", c)
    print(best_preset(c, lambda r: r.bytes <= 12e6) + " (max 12 MB)")
    if with_auto:
        run_auto("all-MiniLM-L6-v2", model, {"max_mb": 12}, calib_data=m["calib"], eval_fn=m["fidelity"], metric="cos",
                 example=evals[0], keep=2, repeats=repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--skip-auto", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "compare-out")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(machine_line())
    lenet5(args.out, args.repeats, not args.skip_auto)
    if not args.skip_minilm:
        minilm(args.out, max(5, args.repeats // 4), not args.skip_auto)


if __name__ == "__main__":
    main()
