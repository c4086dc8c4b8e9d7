"""Block removal on all-MiniLM-L6-v2, beside the `fast` preset, in one run on the same data.

fp32; `prune: {granularity: block, blocks: 2}` (the two layers whose removal changes the embeddings
least on 128 calibration paragraphs) followed by label-free distillation (each kept layer's output
matched to its original's); and the `fast` preset (40% of
heads and FFN neurons, then distillation). Both learn from the same pydoc paragraphs; 256 others are held
out for the metrics: mean and min cosine of each sentence embedding to fp32's, the share of each text's
10 nearest neighbours kept, and the latency of one batch of 64 paragraphs padded to 128 tokens (median
of round-by-round timings, 2 threads), as a ratio to fp32. Each model is the one loaded back from its file.

Run: python benchmarks/blocks.py [--blocks 2] [--epochs 6] [--lr 3e-4] [--repeats 15]
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time

import torch

from common import minilm  # benchmarks/common.py
import modelpress as mp
from modelpress.measure import latencies, machine_line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=6.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--skip-fast", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    m = minilm()
    model, calib, train, evals, fidelity = m["model"], m["calib"], m["train"], m["evals"], m["fidelity"]
    recipes = {f"drop {args.blocks} blocks + distill": {"stages": [
        {"prune": {"granularity": "block", "blocks": args.blocks}},
        {"distill": {"epochs": args.epochs, "lr": args.lr, "hidden": True}}]}}
    if not args.skip_fast:
        recipes["fast"] = "fast"
    print(machine_line())
    rows = {"fp32": {"model": model, "bytes": 4 * sum(p.numel() for p in model.parameters()), "seconds": 0.0}}
    with tempfile.TemporaryDirectory() as d:
        for name, recipe in recipes.items():
            torch.manual_seed(0)
            t = time.perf_counter()
            result = mp.compress(model, recipe, train_data=train, calib_data=calib)
            seconds = time.perf_counter() - t
            file = os.path.join(d, "m.mpz")
            size = result.save(file)
            loaded = mp.load(file)
            same = torch.equal(loaded(**evals[0]).last_hidden_state, result.model(**evals[0]).last_hidden_state)
            layers = getattr(loaded.config, "num_hidden_layers", "?")
            rows[name] = {"model": loaded, "bytes": size, "seconds": seconds, "layers": layers, "same": same}
    rows["fp32"]["layers"] = model.config.num_hidden_layers
    batch = evals[0]
    runs = {n: functools.partial(r["model"].eval(), **batch) for n, r in rows.items()}
    with torch.no_grad():
        times = latencies(runs, repeats=args.repeats)
    base = statistics.median(times["fp32"])
    print(f"\n{'model':<28} {'layers':>6} {'bytes':>11} {'mean cos':>9} {'min cos':>8} {'top-10':>7} "
          f"{'batch-64 ms':>11} {'x fp32':>7} {'compress s':>10}  reloaded == compressed")
    for name, r in rows.items():
        f = fidelity(r["model"])
        ms = statistics.median(times[name])
        print(f"{name:<28} {r['layers']:>6} {r['bytes']:>11,} {f['cos']:>9.5f} {f['min_cos']:>8.5f} {f['top10']:>7.3f} "
              f"{ms:>11.1f} {base / ms:>6.2f}x {r['seconds']:>10.1f}  {r.get('same', '-')}")


if __name__ == "__main__":
    main()
