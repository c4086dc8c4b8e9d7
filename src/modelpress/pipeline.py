"""Runs a recipe's stages in order and measures the model after each one.

A stage plugs in through one handler registered for its config type (`stage.py`); the pipeline
knows no technique by name. After every stage the
model is put in canonical form (encoded and decoded exactly as the file will hold it), so each
row of the report describes what would be saved at that point, byte for byte.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import numbers
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .context import RunContext
from .errors import ModelpressError
from .format.container import container_overhead
from .format.mpz import decode_state_dict, encode_model
from .measure import weights
from .recipe import Recipe
from .report import Report, StageRow
from .stage import handler_for
from .state import CompressionState
from .techniques.calibrate import all_finite
from .techniques.common import linearize

log = logging.getLogger(__name__)


def canonicalize(model: nn.Module, state: CompressionState, meta: dict | None = None
                 ) -> tuple[dict, dict[str, bytes]]:
    """Snap the model to exactly what its file holds; returns the manifest and streams."""
    for st in state.params.values():
        if st.codebook is not None:
            st.codebook = st.codebook.half().float()
    manifest, streams = encode_model(model, state, meta)
    decoded = decode_state_dict(manifest, streams)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(decoded[name])
    return manifest, streams


def measure(model: nn.Module, stage: str, manifest: dict, streams: dict[str, bytes], fp32_bytes: int,
            seconds: float, eval_fn: Callable | None) -> StageRow:
    nbytes = sum(map(len, streams.values())) + container_overhead(manifest, streams)
    ws = weights(model)
    n = sum(p.numel() for p in ws)
    zeros = sum(int((p == 0).sum()) for p in ws)
    return StageRow(stage=stage, bytes=nbytes, ratio=fp32_bytes / nbytes, params=n,
                    sparsity=zeros / max(1, n), bits_per_param=8 * nbytes / max(1, n), seconds=seconds,
                    metrics=evaluate(model, eval_fn))



def evaluate(model: nn.Module, eval_fn: Callable | None) -> dict[str, float]:
    """`eval_fn(model)` as a dict of metrics; a clear error when it returns anything but a real number
    or a dict of name -> real number (NaN is reported as is)."""
    if eval_fn is None:
        return {}
    model.eval()
    with torch.no_grad():
        value = eval_fn(model)
    out = {}
    for k, v in (value.items() if isinstance(value, dict) else [("metric", value)]):
        out[str(k)] = x = _number(v)
        if x is None:
            what = f"a dict whose {k!r} is a" if isinstance(value, dict) else "a"
            raise ModelpressError(f"eval_fn returned {what} {type(v).__name__} ({str(v)[:40]!r}); it must return a "
                                  "real number (float, int, a one-element tensor) or a dict of name -> number, e.g. "
                                  "{'accuracy': 0.93}")
    return out


def _number(v: Any) -> float | None:
    if isinstance(v, torch.Tensor) and v.numel() == 1 or isinstance(v, np.ndarray) and v.size == 1:
        v = v.item()
    return float(v) if isinstance(v, numbers.Real) else None


def check_weights(model: nn.Module) -> None:
    """A clear error, before anything runs, for a TorchScript model and for weights on the meta device or
    holding NaN/Inf."""
    if isinstance(model, torch.jit.ScriptModule):
        raise ModelpressError(
            f"the model is a TorchScript module ({type(model).__name__}); its layers are compiled code that "
            "modelpress cannot replace or train. Pass the nn.Module it was made from, with the same weights: "
            "model = MyNet(); model.load_state_dict(scripted.state_dict()); modelpress.compress(model, ...)")
    method = _quantizer(model)
    if getattr(model, "is_quantized", False) and method != "gguf":
        raise ModelpressError(f"the model was loaded quantized by transformers ({method}); "
                              "modelpress compresses float weights: load it without quantization_config / "
                              "load_in_8bit / load_in_4bit")
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise ModelpressError(f"the model's weights are on the meta device (not loaded): {_first(meta)}; load real "
                              "weights first (e.g. load_state_dict(..., assign=True), or from_pretrained without a "
                              "meta device_map)")
    bad = nonfinite(model)
    if bad:
        raise ModelpressError(f"the model has non-finite values in {len(bad)} tensor(s): {_first(bad)}; every "
                              "technique would spread them (k-means, quantization grids, GPTQ): fix or reload the "
                              "weights first")


def _quantizer(model: nn.Module) -> str | None:
    """The quantization method transformers' from_pretrained marked the model with ('gguf', ...), if any."""
    method = getattr(model, "quantization_method", None)
    return None if method is None else str(getattr(method, "value", method))


def float_copy(model: nn.Module) -> nn.Module:
    """A float32 CPU copy of `model` in eval mode. nn.Module's own conversion: transformers refuses
    `.float()` on any model it loaded through a quantizer, even a GGUF file's, whose weights it has
    already dequantized into plain float tensors (check_weights refuses the other quantizers). The copy
    of a GGUF-loaded model forgets the file: its config would name it, and a file that names another
    file to load is refused (format/guard.py)."""
    out = nn.Module.float(nn.Module.cpu(copy.deepcopy(model))).eval()
    if getattr(out, "is_quantized", False) and _quantizer(out) == "gguf":
        out.is_quantized, out.quantization_method, out.hf_quantizer = False, None, None
        if getattr(getattr(out, "config", None), "quantization_config", None) is not None:
            del out.config.quantization_config
    return out


def nonfinite(model: nn.Module) -> list[str]:
    """"name (n NaN, m Inf)" of each parameter holding NaN or Inf, and each floating buffer holding NaN
    (-inf is a legitimate attention-mask value in a buffer)."""
    bad = []
    for name, t, is_param in [*((n, p, True) for n, p in model.named_parameters()),
                              *((n, b, False) for n, b in model.named_buffers())]:
        if t.is_floating_point() and not all_finite(t):
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if nan or is_param:
                bad.append(f"{name} ({', '.join(f'{c} {k}' for c, k in ((nan, 'NaN'), (inf, 'Inf')) if c)})")
    return bad


def _first(names: list[str], k: int = 5) -> str:
    return ", ".join(names[:k]) + (f" and {len(names) - k} more" if len(names) > k else "")


@dataclasses.dataclass
class Outcome:
    """The compressed model, its state, the report, and the file as the last row measured it."""

    model: nn.Module
    state: CompressionState
    report: Report
    manifest: dict
    streams: dict[str, bytes]


def run_pipeline(model: nn.Module, recipe: Recipe, run: RunContext, eval_fn: Callable | None = None,
                 on_stage: Callable[[StageRow], None] | None = None, meta: dict | None = None) -> Outcome:
    """Apply every stage to a copy of `model`; the original is left untouched. `meta` goes into the
    file, so each row's bytes are the exact size of the file saved at that point."""
    student = float_copy(model)
    converted = linearize(student)
    for p in student.parameters():
        p.requires_grad_(True)
    state = CompressionState()
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    report = Report(fp32_bytes=fp32_bytes)
    if fp32_bytes == 0:
        raise ModelpressError("the model has no parameters to compress")
    t0 = time.perf_counter()
    row = StageRow("fp32", fp32_bytes, 1.0, fp32_bytes // 4, _sparsity(student), 32.0, 0.0,
                   evaluate(student, eval_fn))
    report.rows.append(row)
    if on_stage:
        on_stage(row)
    run = dataclasses.replace(run, exclude=tuple(recipe.exclude))
    for i, cfg in enumerate(recipe.stages, 1):
        handler = handler_for(cfg)
        t = time.perf_counter()
        log.info("stage %d/%d: %s", i, len(recipe.stages), cfg.key)
        handler(student, state, cfg, run)
        bad = nonfinite(student)
        if bad:
            raise ModelpressError(f"stage {i} ({cfg.key}) produced non-finite values in {len(bad)} tensor(s): "
                                  f"{_first(bad)}")
        manifest, streams = canonicalize(student, state, meta)
        row = measure(student, f"{i}. {cfg.key}", manifest, streams, fp32_bytes, time.perf_counter() - t, eval_fn)
        report.rows.append(row)
        if on_stage:
            on_stage(row)
    if converted:
        report.notes.append(f"{converted} transformers Conv1D layers became equivalent nn.Linear layers")
    report.notes.append(f"total {time.perf_counter() - t0:.1f} s")
    return Outcome(student, state, report, manifest, streams)


def _sparsity(model: nn.Module) -> float:
    ws = weights(model)
    return sum(int((p == 0).sum()) for p in ws) / max(1, sum(p.numel() for p in ws))
