"""Low-precision compute on all-MiniLM-L6-v2, beside torch's own bf16, in one run on the same data.

fp32; `precision: {dtype: bf16}` (Linear weights in bf16, products in bf16 where the CPU has AMX or
AVX512_BF16, in fp32 elsewhere); torch's `model.to(torch.bfloat16)` (every op in bf16: the peer);
and the `int8` preset. File bytes (torch bf16: its parameters' bytes), mean and min cosine of the
sentence embeddings to fp32's on 256 held-out paragraphs, and the latency of one batch of 64 paragraphs
padded to 128 tokens (median of round-by-round timings, 2 threads), as a ratio to fp32.

Run: python benchmarks/precision.py [--repeats 15]
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import tempfile

import torch

from common import minilm  # benchmarks/common.py
import modelpress as mp
from modelpress.measure import latencies, machine_line
from modelpress.capabilities import native


class _Bf16(torch.nn.Module):
    """torch's bf16: the whole model in bf16, embeddings pooled back in fp32."""

    def __init__(self, model):
        super().__init__()
        self.model = copy.deepcopy(model).to(torch.bfloat16)

    def forward(self, **batch):
        out = self.model(**batch)
        out.last_hidden_state = out.last_hidden_state.float()
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(2)
    m = minilm()
    model, evals, fidelity = m["model"], m["evals"], m["fidelity"]
    print(machine_line(), f"; native bf16 products: {native('bf16')}")
    rows = {"fp32": (model, 4 * sum(p.numel() for p in model.parameters()))}
    peer = _Bf16(model).eval()
    rows["torch bf16 (peer)"] = (peer, 2 * sum(p.numel() for p in peer.parameters()))
    with tempfile.TemporaryDirectory() as d:
        for name, recipe in {"precision bf16": {"stages": [{"precision": {"dtype": "bf16"}}]},
                             "int8": "int8"}.items():
            result = mp.compress(model, recipe, calib_data=m["calib"])
            path = os.path.join(d, "m.mpz")
            size = result.save(path)
            rows[name] = (mp.load(path), size)
    batch = evals[0]
    with torch.no_grad():
        times = latencies({n: functools.partial(r[0].eval(), **batch) for n, r in rows.items()}, repeats=args.repeats)
    base = statistics.median(times["fp32"])
    print(f"\n{'method':<20} {'bytes':>11} {'mean cos':>9} {'min cos':>8} {'batch-64 ms':>11} {'x fp32':>7}")
    for name, (net, size) in rows.items():
        with torch.no_grad():
            f = fidelity(net)
        ms = statistics.median(times[name])
        print(f"{name:<20} {size:>11,} {f['cos']:>9.5f} {f['min_cos']:>8.5f} {ms:>11.1f} {base / ms:>6.2f}x")


if __name__ == "__main__":
    main()
