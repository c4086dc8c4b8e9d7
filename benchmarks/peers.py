"""The peer runtimes modelpress is compared against, built for a Hugging Face encoder (all-MiniLM-L6-v2, a
BertModel) on CPU at 2 threads, each set up the way its documentation recommends, and no further:

- torch bf16: a copy of the model in bf16, eager.
- torch.compile bf16: the same through inductor with weight freezing (constant folding, prepacked oneDNN
  weights). Freezing is read from the global `torch._inductor.config.freezing` when dynamo traces
  (`options={"freezing": True}` alone does not take), so it is set around the compiling calls only.
- onnxruntime fp32 / int8: ONNX export (opset 17, dynamic batch and sequence), int8 by `quantize_dynamic`
  (int8 weights per channel, activations quantized per call); sessions with 2 intra-op threads and
  all graph optimizations.
- OpenVINO fp32 / int8 / int4: `convert_model` (on CPUs with AMX or AVX512-BF16 OpenVINO infers in bf16
  by default: the name says the precision it infers in); int8 by NNCF post-training quantization with
  the transformer preset on the calibration batches; int4 by NNCF weight compression (symmetric, groups
  of 64, all layers, GPTQ on the calibration batches). Compiled with 2 threads, latency hint.
- CTranslate2 int8: its transformers converter with int8 weights, `compute_type="int8"`, 2 threads.

Each builder returns a `Peer`: `run(batch) -> last_hidden_state` (fp32 torch tensor, batch x seq x 384;
call it under torch.no_grad()), the bytes of the artifact it runs and, for file-based peers, code that
loads that artifact in a fresh process (`load`, for resident-memory figures). Artifacts go in `workdir`.
The packages are the optional `peers` extra (`pip install -e ".[peers]"`); a builder whose package is
missing raises ImportError naming it. Builders print nothing (the tools' own output is logged).

Self-test: python benchmarks/peers.py
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import io
import logging
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

log = logging.getLogger(__name__)
NAMES = ("input_ids", "attention_mask", "token_type_ids")
THREADS = 2


@dataclass
class Peer:
    name: str
    run: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    bytes: int
    load: tuple[str, str] | None = None  # (imports, load) code run in a fresh process


def _need(package: str):
    try:
        return importlib.import_module(package)
    except ImportError as e:
        raise ImportError(f"this peer needs {package!r}, part of the optional extra: "
                          f"pip install -e '.[peers]' ({e})") from e


@contextlib.contextmanager
def _quiet():
    """What a tool prints (progress bars, notices) goes to the log instead of the screen."""
    out = io.StringIO()  # nncf's and transformers' log handlers write to the screen: only warnings / errors
    loggers = {logging.getLogger("nncf"): logging.WARNING, logging.getLogger("transformers"): logging.ERROR}
    levels = {lg: lg.level for lg in loggers}
    for lg, level in loggers.items():
        lg.setLevel(max(level, lg.getEffectiveLevel()))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            yield
    finally:
        for lg, level in levels.items():
            lg.setLevel(level)
    if out.getvalue().strip():
        log.debug(out.getvalue())


def _size(*paths: str) -> int:
    """Bytes of the files and directories given (those that exist)."""
    files = [os.path.join(d, f) for p in paths for d, _, fs in os.walk(p) for f in fs] + \
        [p for p in paths if os.path.isfile(p)]
    return sum(os.path.getsize(f) for f in files)


def _plain(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` that returns tuples (output[0] is last_hidden_state), for the exporters."""
    m = copy.deepcopy(model).eval()
    m.config.return_dict = False
    return m


def _example(tokenizer) -> dict:
    return dict(tokenizer(["An example sentence to trace the model with."] * 2, return_tensors="pt"))


def torch_bf16(model: torch.nn.Module) -> Peer:
    """The model in bf16, eager."""
    m = copy.deepcopy(model).to(torch.bfloat16).eval()

    def run(b: dict) -> torch.Tensor:
        with torch.no_grad():
            return m(**b).last_hidden_state.float()
    return Peer("torch bf16", run, 2 * sum(p.numel() for p in m.parameters()))


def torch_compile_bf16(model: torch.nn.Module, example: dict | None = None) -> Peer:
    """The model in bf16 through torch.compile (inductor, freezing), compiled on `example` if given, else
    on its first call. Freezing is switched on globally while dynamo traces, then put back; a call that
    has to recompile (a new shape) switches it on again."""
    import torch._inductor.config as inductor

    m = copy.deepcopy(model).to(torch.bfloat16).eval()
    compiled = torch.compile(m, backend="inductor")

    def run(b: dict) -> torch.Tensor:
        old, inductor.freezing = inductor.freezing, True
        try:
            with torch.no_grad():
                return compiled(**b).last_hidden_state.float()
        finally:
            inductor.freezing = old
    if example is not None:
        run(example)
    return Peer("torch.compile bf16 (inductor, freezing)", run, 2 * sum(p.numel() for p in m.parameters()))


class _Positional(torch.nn.Module):
    """The encoder with positional inputs and one output, for torch.onnx.export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = _plain(model)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)[0]


def _onnx_export(model: torch.nn.Module, tokenizer, workdir: str) -> str:
    _need("onnx")
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "minilm.onnx")
    example = tokenizer if isinstance(tokenizer, dict) else _example(tokenizer)
    with _quiet():
        torch.onnx.export(_Positional(model), tuple(example[n] for n in NAMES), path, dynamo=False,
                          input_names=list(NAMES), output_names=["last_hidden_state"], opset_version=17,
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES + ("last_hidden_state",)})
    return path


def _ort_peer(path: str, name: str) -> Peer:
    ort = _need("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    run = lambda b: torch.from_numpy(sess.run(None, {n: b[n].numpy() for n in NAMES})[0])  # noqa: E731
    data = [os.path.join(os.path.dirname(path), f) for f in os.listdir(os.path.dirname(path))
            if f.startswith(os.path.basename(path)) and f.endswith(".data")]  # external data, if any
    load = ("import onnxruntime as ort",
            f"s = ort.InferenceSession({path!r}, providers=['CPUExecutionProvider'])")
    return Peer(name, run, _size(path, *data), load)


def onnxruntime_fp32(model: torch.nn.Module, tokenizer, workdir: str) -> Peer:
    """The ONNX export (opset 17) in onnxruntime. `tokenizer` makes the tracing input (a batch dict will
    do as well)."""
    return _ort_peer(_onnx_export(model, tokenizer, workdir), "onnxruntime fp32")


def onnxruntime_int8(model: torch.nn.Module, tokenizer, workdir: str) -> Peer:
    """The ONNX export through `quantize_dynamic` (int8 weights per channel) in onnxruntime."""
    _need("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, path = _onnx_export(model, tokenizer, workdir), os.path.join(workdir, "minilm-int8.onnx")
    with _quiet():
        quantize_dynamic(src, path, weight_type=QuantType.QInt8, per_channel=True)
    return _ort_peer(path, "onnxruntime int8 (dynamic, per channel)")


def _ov_convert(model: torch.nn.Module, calib: list[dict]):
    ov = _need("openvino")
    with _quiet():
        return ov.convert_model(_plain(model), example_input={n: calib[0][n] for n in NAMES})


def _ov_dataset(calib: list[dict]):
    return _need("nncf").Dataset(calib, lambda b: {n: b[n].numpy() for n in NAMES})


def _ov_peer(ov_model, file: str, name: str, workdir: str) -> Peer:
    ov = _need("openvino")
    os.makedirs(workdir, exist_ok=True)
    xml = os.path.join(workdir, file + ".xml")
    ov.save_model(ov_model, xml, compress_to_fp16=False)
    config = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY"}
    compiled = ov.Core().compile_model(xml, "CPU", config)
    precision = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
    out = compiled.output(0)
    run = lambda b: torch.from_numpy(np.array(compiled({n: b[n].numpy() for n in NAMES})[out]))  # noqa: E731
    load = ("import openvino as ov", f"c = ov.Core().compile_model({xml!r}, 'CPU', {config!r})")
    return Peer(f"OpenVINO {name} ({precision} inference)", run, _size(xml, xml[:-4] + ".bin"), load)


def openvino_fp32(model: torch.nn.Module, calib: list[dict], workdir: str) -> Peer:
    """The converted model, unquantized (`calib[0]` traces it)."""
    return _ov_peer(_ov_convert(model, calib), "minilm-ov", "fp32 model", workdir)


def openvino_int8(model: torch.nn.Module, calib: list[dict], workdir: str) -> Peer:
    """The converted model through NNCF post-training int8 quantization (transformer preset) on `calib`."""
    nncf = _need("nncf")
    with _quiet():
        q = nncf.quantize(_ov_convert(model, calib), _ov_dataset(calib), model_type=nncf.ModelType.TRANSFORMER,
                          subset_size=len(calib))
    return _ov_peer(q, "minilm-ov-int8", "NNCF int8 PTQ", workdir)


def openvino_int4(model: torch.nn.Module, calib: list[dict], workdir: str) -> Peer:
    """The converted model with NNCF int4 symmetric weights, groups of 64, GPTQ on `calib` (without GPTQ,
    said in the name, where GPTQ fails on this model)."""
    nncf = _need("nncf")
    args = dict(mode=nncf.CompressWeightsMode.INT4_SYM, group_size=64, ratio=1.0, dataset=_ov_dataset(calib),
                subset_size=len(calib))
    try:
        with _quiet():
            q, name = nncf.compress_weights(_ov_convert(model, calib), gptq=True, **args), "NNCF int4 g64 GPTQ"
    except Exception as e:  # noqa: BLE001 - GPTQ is not supported on every graph: the plain method instead
        log.warning("NNCF GPTQ failed (%s: %s); int4 weights without it", type(e).__name__, e)
        with _quiet():
            q, name = nncf.compress_weights(_ov_convert(model, calib), **args), "NNCF int4 g64 (GPTQ failed)"
    return _ov_peer(q, "minilm-ov-int4", name, workdir)


def ctranslate2_int8(model: torch.nn.Module, tokenizer, workdir: str) -> Peer:
    """CTranslate2's conversion of the model (saved with its tokenizer to `workdir`) with int8 weights,
    run with compute_type int8. Padding is stripped by the attention mask and put back as zeros."""
    ct2 = _need("ctranslate2")
    src, path = os.path.join(workdir, "minilm-hf"), os.path.join(workdir, "minilm-ct2-int8")
    with _quiet():
        model.save_pretrained(src)
        tokenizer.save_pretrained(src)
        ct2.converters.TransformersConverter(src).convert(path, quantization="int8", force=True)
    enc = ct2.Encoder(path, device="cpu", compute_type="int8", intra_threads=THREADS)

    def run(b: dict) -> torch.Tensor:
        lengths = b["attention_mask"].sum(1).tolist()
        ids, types = ([row[:n] for row, n in zip(b[k].tolist(), lengths)] for k in ("input_ids", "token_type_ids"))
        hidden = torch.as_tensor(np.array(enc.forward_batch(ids, token_type_ids=types).last_hidden_state))
        out = torch.zeros(*b["input_ids"].shape, hidden.shape[-1])
        out[:, :hidden.shape[1]] = hidden.float()
        return out
    load = ("import ctranslate2",
            f"e = ctranslate2.Encoder({path!r}, device='cpu', compute_type='int8', intra_threads={THREADS})")
    return Peer("CTranslate2 int8", run, _size(path), load)


if __name__ == "__main__":
    import tempfile
    import time

    from common import minilm
    from modelpress.data import pool

    torch.set_num_threads(THREADS)
    m = minilm()
    model, tok, calib = m["model"], m["tokenizer"], m["calib"]
    batch = {k: v[:8] for k, v in m["evals"][0].items()}
    with torch.no_grad():
        ref = pool(model(**batch).last_hidden_state, batch["attention_mask"])
    with tempfile.TemporaryDirectory() as work:
        builders = {"torch bf16": lambda: torch_bf16(model),
                    "torch.compile bf16": lambda: torch_compile_bf16(model, batch),
                    "onnxruntime fp32": lambda: onnxruntime_fp32(model, tok, work),
                    "onnxruntime int8": lambda: onnxruntime_int8(model, tok, work),
                    "OpenVINO fp32": lambda: openvino_fp32(model, calib, work),
                    "OpenVINO int8": lambda: openvino_int8(model, calib, work),
                    "OpenVINO int4": lambda: openvino_int4(model, calib, work),
                    "CTranslate2 int8": lambda: ctranslate2_int8(model, tok, work)}
        print(f"batch {tuple(batch['input_ids'].shape)}, {THREADS} threads")
        print(f"{'peer':48s} {'MB':>7s} {'cos mean':>9s} {'cos min':>9s} {'build s':>8s} {'ms/call':>8s}")
        for label, build in builders.items():
            t = time.perf_counter()
            try:
                peer = build()
            except Exception as e:  # noqa: BLE001
                print(f"{label:48s} FAILED: {type(e).__name__}: {str(e)[:200]}")
                continue
            built = time.perf_counter() - t
            with torch.no_grad():
                peer.run(batch)
                t = time.perf_counter()
                out = peer.run(batch)
                ms = (time.perf_counter() - t) * 1e3
            assert out.dtype == torch.float32 and out.shape == (*batch["input_ids"].shape, 384), out.shape
            cos = (pool(out, batch["attention_mask"]) * ref).sum(-1)
            print(f"{peer.name:48s} {peer.bytes / 1e6:7.2f} {cos.mean():9.5f} {cos.min():9.5f} {built:8.1f} {ms:8.1f}")
