"""2:4 semi-structured sparsity on MNIST-5k: LeNet-5 (the model the recipe was chosen on) and
LeNet-300-100 (not tuned on), each trained from scratch as in deep_compression.py, pruned to 2:4 with
fine-tuning under the mask, saved, loaded back and evaluated. Also reports the mask's stored bits per
weight against the 2:4 entropy log2(6)/4. Run: python benchmarks/nm.py [--epochs E] [--seed S]"""
from __future__ import annotations

import argparse
import logging
import math
import os

import torch

from common import compress_and_reload, trained_lenet  # benchmarks/common.py
import modelpress as mp
from modelpress import data
from modelpress.measure import cpu_name

ENTROPY_2_4 = math.log2(6) / 4  # bits per weight of a uniformly random 2:4 mask: 0.646


def recipe(epochs: float) -> str:
    return f"stages: [{{prune: {{pattern: '2:4', epochs: {epochs}}}}}]"


def mask_bits(result: mp.CompressionResult) -> tuple[float, int, int]:
    """(stored mask bits per masked weight, masked weights, tensors whose mask is N:M-coded)."""
    names = sorted(result.manifest["tensors"])
    nbytes = numel = nm = 0
    for i, name in enumerate(names):
        stream = result.streams.get(f"{i}/mask")
        if stream is not None:
            nbytes += len(stream)
            numel += math.prod(result.manifest["tensors"][name]["shape"])
            nm += result.manifest["tensors"][name].get("mask_coder") == "nm"
    return 8 * nbytes / max(1, numel), numel, nm


def run(name: str, epochs: float, seed: int) -> dict:
    model, split, train_s = trained_lenet(name, seed)
    untuned = mp.compress(model, recipe(0), train_data=split.loader(64, seed=seed))  # the mask alone
    acc_mask_only = data.accuracy(untuned.model, split.x_test, split.y_test)
    out = compress_and_reload(model, recipe(epochs), split, seed)
    result, compress_s, size, same, acc = out["result"], out["seconds"], out["bytes"], out["same"], out["acc"]
    fp32 = result.report.rows[0]
    bits, masked, nm = mask_bits(result)
    print(f"\n## {name} ({fp32.params:,} parameters); fp32 training {train_s:.1f} s, compression {compress_s:.1f} s; "
          f"{nm} layers 2:4 ({masked:,} weights); outputs bitwise equal after load: {same}")
    print(result.report)
    return {"name": name, "fp32_acc": fp32.metrics["acc"], "acc": acc, "acc_mask_only": acc_mask_only, "sparsity": result.report.rows[-1].sparsity,
            "bytes": size, "fp32_bytes": fp32.bytes, "mask_bits": bits, "seconds": compress_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=float, default=5.0, help="fine-tuning epochs under the 2:4 mask")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"modelpress {mp.__version__}, torch {torch.__version__}, {cpu_name()}, {torch.get_num_threads()} threads; "
          f"MNIST-5k (4,000 train / 1,000 test); recipe {recipe(args.epochs)}")
    rows = [run(name, args.epochs, args.seed) for name in ("lenet5", "lenet-300-100")]
    print("\n## summary (accuracy of the model loaded back from the file; sparsity over all parameters)")
    print(f"{'model':<14} {'fp32 acc':>8} {'no ft':>7} {'2:4 acc':>8} {'drop':>6} {'sparsity':>8} {'file bytes':>10} "
          f"{'fp32 bytes':>10} {'ratio':>6} {'mask bits/w':>11} {'entropy':>7}")
    for r in rows:
        print(f"{r['name']:<14} {r['fp32_acc']:>7.2f}% {r['acc_mask_only']:>6.2f}% {r['acc']:>7.2f}% "
              f"{r['fp32_acc'] - r['acc']:>+6.2f} "
              f"{100 * r['sparsity']:>7.1f}% {r['bytes']:>10,} {r['fp32_bytes']:>10,} "
              f"{r['fp32_bytes'] / r['bytes']:>5.2f}x {r['mask_bits']:>11.3f} {ENTROPY_2_4:>7.3f}")
    print("no ft: 2:4 mask without fine-tuning. lenet5 is the model the fine-tuning epochs were chosen on; "
          "lenet-300-100 was not tuned on")


if __name__ == "__main__":
    main()
