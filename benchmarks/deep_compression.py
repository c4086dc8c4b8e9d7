"""Deep Compression on MNIST-5k: fp32 baseline, every stage and the final artifact for LeNet-300-100
and LeNet-5, beside the paper's ratios. Run: python benchmarks/deep_compression.py [--recipe R] [--grid]"""
from __future__ import annotations

import argparse
import os

import torch

from common import compress_and_reload, default_epochs, trained_lenet  # benchmarks/common.py
import modelpress as mp
from modelpress.measure import cpu_name

PAPER = {"lenet-300-100": (40, "1.64% -> 1.58% error"), "lenet5": (39, "0.80% -> 0.74% error")}


def run(name: str, recipe: str, seed: int, epochs: int | None = None) -> dict:
    model, split, train_s = trained_lenet(name, seed, epochs)
    out = compress_and_reload(model, recipe, split, seed)
    result, compress_s, size, same, acc_loaded = out["result"], out["seconds"], out["bytes"], out["same"], out["acc"]
    fp32 = result.report.rows[0]
    print(f"\n## {name} ({fp32.params:,} parameters, fp32 {fp32.bytes:,} bytes); "
          f"fp32 training {train_s:.1f} s, compression {compress_s:.1f} s")
    print(result.report)
    paper_ratio, paper_acc = PAPER[name]
    print(f"artifact: {size:,} bytes = {fp32.bytes / size:.1f}x smaller than fp32 parameters (whole file); "
          f"loaded accuracy {acc_loaded:.2f}% (fp32 {fp32.metrics['acc']:.2f}%, "
          f"drop {fp32.metrics['acc'] - acc_loaded:+.2f} points); outputs bitwise equal after load: {same}")
    print(f"Deep Compression paper: {paper_ratio}x ({paper_acc}, full MNIST)")
    return {"name": name, "bytes": size, "ratio": fp32.bytes / size, "fp32_acc": fp32.metrics["acc"],
            "acc": acc_loaded, "paper": paper_ratio, "seconds": compress_s, "seed": seed,
            "epochs": epochs or default_epochs(name)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--recipe", default="deep-compression")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=["lenet-300-100", "lenet5"])
    ap.add_argument("--grid", action="store_true", help="each model from seeds 0-2, trained for its usual "
                    "epochs and for a third of them (12 models): models no preset was tuned on")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"modelpress {mp.__version__}, torch {torch.__version__}, {cpu_name()}, "
          f"{torch.get_num_threads()} threads; recipe {args.recipe}; MNIST-5k (4,000 train / 1,000 test)")
    if args.grid:
        rows = [run(name, args.recipe, seed, epochs) for name in args.models for seed in (0, 1, 2)
                for epochs in ((20, 7) if name == "lenet5" else (30, 10))]
    else:
        rows = [run(name, args.recipe, args.seed) for name in args.models]
    print("\n## summary")
    print(f"{'model':<14} {'seed':>4} {'epochs':>6} {'file bytes':>10} {'ratio':>7} {'paper':>6} {'fp32 acc':>9} "
          f"{'acc':>7} {'drop':>6} {'seconds':>8}")
    for r in rows:
        print(f"{r['name']:<14} {r['seed']:>4} {r['epochs']:>6} {r['bytes']:>10,} {r['ratio']:>6.1f}x {r['paper']:>5}x "
              f"{r['fp32_acc']:>8.2f}% {r['acc']:>6.2f}% {r['fp32_acc'] - r['acc']:>+6.2f} {r['seconds']:>8.1f}")
    if args.grid:
        ok = [r for r in rows if r["ratio"] >= 50 and r["fp32_acc"] - r["acc"] <= 0.5]
        print(f"\n{len(ok)} of {len(rows)} models at >= 50x within 0.5 points")


if __name__ == "__main__":
    main()
