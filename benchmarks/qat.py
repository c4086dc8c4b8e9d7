"""Activation quantization-aware training against post-training int8, side by side on the same models
and data: LeNet-5 on MNIST-5k, the residual CNN `data.TinyResNet` on scikit-learn's digits, and
LeNet-300-100 (whose QAT settings were not tuned).

Per model: fp32 test accuracy; the `int8` preset (post-training: GPTQ int8 weights, Linear inputs
quantized per token at run time, conv inputs left in float); `qat` (int8 weights and int8 inputs at a
static per-tensor scale for every Linear and Conv2d, distilled from the fp32 model with the quantization
in the loop) with calibrated and with learned input ranges. Accuracies are of the models loaded back from their files.

Run: python benchmarks/qat.py [--epochs 3] [--lr 3e-5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch

import modelpress as mp
from modelpress import data
from modelpress.measure import latencies, machine_line

CASES = {"lenet5": (data.lenet5, lambda: data.mnist5k(image=True), 20),
         "tinyresnet": (data.TinyResNet, lambda: data.digits(image=True), 40),
         "lenet-300-100": (data.lenet_300_100, lambda: data.mnist5k(), 30)}


def run(name: str, epochs: float, lr: float, repeats: int) -> list[dict]:
    make, load_split, train_epochs = CASES[name]
    split = load_split()
    torch.manual_seed(0)
    model = data.train_classifier(make(), split, epochs=train_epochs)
    recipes = {"int8 (post-training)": "int8",
               "qat, calibrated ranges": {"stages": [{"qat": {"epochs": epochs, "lr": lr, "ranges": "calibrated"}}]},
               "qat, learned ranges": {"stages": [{"qat": {"epochs": epochs, "lr": lr}}]}}
    rows = [{"name": "fp32", "model": model, "bytes": 4 * sum(p.numel() for p in model.parameters()), "s": 0.0}]
    with tempfile.TemporaryDirectory() as d:
        for label, recipe in recipes.items():
            torch.manual_seed(0)
            t = time.perf_counter()
            result = mp.compress(model, recipe, train_data=split.loader(64))
            seconds = time.perf_counter() - t
            path = os.path.join(d, "m.mpz")
            size = result.save(path)
            rows.append({"name": label, "model": mp.load(path, model=make()), "bytes": size, "s": seconds})
    batch = split.x_test[:256]
    with torch.no_grad():
        times = latencies({r["name"]: (lambda m=r["model"]: m(batch)) for r in rows}, repeats=repeats)
    for r in rows:
        r["acc"] = data.accuracy(r["model"], split.x_test, split.y_test)
        r["ms"] = statistics.median(times[r["name"]])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--models", nargs="*", default=list(CASES))
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(machine_line())
    print(f"qat: epochs {args.epochs}, lr {args.lr}; accuracy of each model loaded back from its file; latency: "
          "one batch of 256 test images, median")
    print(f"\n{'model':<14} {'method':<24} {'bytes':>10} {'acc %':>7} {'vs fp32':>8} {'ms':>8} {'compress s':>10}")
    for name in args.models:
        rows = run(name, args.epochs, args.lr, args.repeats)
        for r in rows:
            print(f"{name:<14} {r['name']:<24} {r['bytes']:>10,} {r['acc']:>7.2f} {r['acc'] - rows[0]['acc']:>+8.2f} "
                  f"{r['ms']:>8.2f} {r['s']:>10.1f}")


if __name__ == "__main__":
    main()
