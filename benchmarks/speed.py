"""Speed that is measured: parameters, multiply-accumulates and CPU latency before and after.

LeNet-5 on MNIST-5k (batch 256) and a small residual CNN on scikit-learn's digits (batch 256) with the
`fast` preset (structured channel pruning + distillation); LeNet-300-100 on MNIST-5k factorized
(`factorize: {rank_ratio: 0.1}` + 8 epochs of fine-tuning); all-MiniLM-L6-v2 (batch 64 pydoc paragraphs)
with the `int8` preset, `fast` (its transformer form: attention heads and FFN neurons pruned, then
distilled on the pydoc paragraphs not held out) and `int8` applied to the `fast` model. MiniLM's
metric is the mean cosine of its sentence embeddings to the original's on 256 held-out paragraphs.
Latencies are medians of round-by-round timings in this one run (2 threads).

Run: python benchmarks/speed.py [--skip-minilm] [--repeats 30]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import minilm  # benchmarks/common.py
import modelpress as mp
from modelpress import data
import functools

from modelpress.measure import latencies, machine_line, macs, weights


def row(name: str, model, *inputs, **kw) -> dict:
    return {"name": name, "model": model, "params": sum(w.numel() for w in weights(model)),
            "macs": macs(model.eval(), *inputs, **kw)}


def classifier_case(title: str, make, split, recipe: str, epochs: int, repeats: int, label: str = "") -> list[dict]:
    torch.manual_seed(0)
    model = data.train_classifier(make(), split, epochs=epochs)
    acc = lambda m: data.accuracy(m, split.x_test, split.y_test)  # noqa: E731
    t = time.perf_counter()
    result = mp.compress(model, recipe, train_data=split.loader(64))
    seconds = time.perf_counter() - t
    x = split.x_test[:256]
    rows = [row(f"{title} fp32", model, x), row(f"{title} {label or recipe}", result.model, x)]
    rows[0]["metric"], rows[1]["metric"] = f"acc {acc(model):.2f}", f"acc {acc(result.model):.2f}"
    rows[1]["seconds"] = seconds
    _time(rows, repeats, x)
    return rows


def minilm_case(repeats: int) -> list[dict]:
    m = minilm()
    model, calib, train, fidelity = m["model"], m["calib"], m["train"], m["fidelity"]
    batch = m["evals"][0]  # latency: 64 paragraphs, padded to 128 tokens
    rows = [row("MiniLM fp32", model, **batch)]
    rows[0]["metric"] = "cos 1.0000"
    results: dict = {}
    for name, base, preset, kw in (("int8", None, "int8", {}), ("fast", None, "fast", {"train_data": train}),
                                   ("fast+int8", "fast", "int8", {})):  # int8 on top of the fast model
        t = time.perf_counter()
        try:
            start = results[base].model if base else model
            results[name] = mp.compress(start, preset, calib_data=calib, **kw)
        except (mp.ModelpressError, KeyError) as e:
            rows.append({"name": f"MiniLM {name}", "error": str(e).splitlines()[0][:110]})
            continue
        r = row(f"MiniLM {name}", results[name].model, **batch)
        r["metric"] = f"cos {fidelity(results[name].model)['cos']:.4f}"
        r["seconds"] = time.perf_counter() - t + (rows[-1].get("seconds", 0) if base else 0)
        rows.append(r)
    _time(rows, repeats, **batch)
    return rows


def _time(rows: list[dict], repeats: int, *inputs, **kw) -> None:
    live = {r["name"]: functools.partial(r["model"].eval(), *inputs, **kw) for r in rows if "model" in r}
    times = latencies(live, repeats=repeats)
    for r in rows:
        if r["name"] in times:
            r["ms"] = statistics.median(times[r["name"]])


def show(rows: list[dict]) -> None:
    base = rows[0]
    print(f"{'model':<22} {'params':>10} {'MACs':>13} {'latency ms':>11} {'speed-up':>9} {'MACs /':>7} "
          f"{'metric':>11} {'compress s':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<22} not run: {r['error']}")
            continue
        print(f"{r['name']:<22} {r['params']:>10,} {r['macs']:>13,} {r['ms']:>11.2f} {base['ms'] / r['ms']:>8.2f}x "
              f"{base['macs'] / r['macs']:>6.2f}x {r['metric']:>11} {r.get('seconds', 0):>10.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(machine_line())
    show(classifier_case("LeNet-5", data.lenet5, data.mnist5k(image=True), "fast", 20, args.repeats))
    show(classifier_case("TinyResNet", data.TinyResNet, data.digits(image=True), "fast", 40, args.repeats))
    factorize = "{stages: [{factorize: {rank_ratio: 0.1}}, {finetune: {epochs: 8, lr: 1.0e-3}}]}"
    show(classifier_case("LeNet-300-100", data.lenet_300_100, data.mnist5k(image=False), factorize, 30,
                         args.repeats, label="svd 0.1"))
    if not args.skip_minilm:
        show(minilm_case(max(5, args.repeats // 4)))


if __name__ == "__main__":
    main()
