"""A compressed Hugging Face model as a folder `transformers` loads with `from_pretrained`, in
compressed-tensors' "pack-quantized" layout (the layout llm-compressor writes and vLLM serves).

Each quantized Linear is written from the file's own codes and scales, nothing re-quantized: its signed
codes are offset to unsigned (+2^(bits-1)) and packed densely into int32 words, element i at bit
i*bits (`weight_packed`), beside `weight_scale` (one float32 scale per group of inputs, or per row) and
`weight_shape`. The config's `quantization_config` lists each Linear under the group of its bit width and
group size, so per-layer bits survive. Everything else (norms, embeddings, a float LM head) is written
as float32; a quantized embedding is written dequantized, since the layout has no quantized embedding.
Loading needs the `compressed-tensors` package beside transformers.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .errors import ModelpressError
from .runtime import PackedEmbedding, quantized_weight

FORMAT = "pack-quantized"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed `bits`-bit codes (rows, cols) as dense int32 words per row: unsigned value i of a row at bits
    [i*bits, (i+1)*bits) of the row's bit string, words low bit first (compressed-tensors' packing)."""
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    out = torch.empty(rows, words, dtype=torch.int32)
    step = max(1, (1 << 22) // (cols * bits))  # rows at a time: the bit stream below is 8 bytes a bit
    bit, place = torch.arange(bits, dtype=torch.int64), torch.arange(32, dtype=torch.int64)
    for r in range(0, rows, step):
        u = (codes[r:r + step].to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
        stream = ((u.unsqueeze(-1) >> bit) & 1).reshape(len(u), cols * bits)  # each value's bits, low first
        stream = nn.functional.pad(stream, (0, words * 32 - cols * bits)).reshape(len(u), words, 32)
        packed = (stream << place).sum(-1)  # < 2^32
        out[r:r + step] = (packed - (packed >= 1 << 31).long() * (1 << 32)).to(torch.int32)  # two's complement
    return out


def _quantized(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    """(signed codes, scale (rows, groups), bits, group size or 0 for per row) of a quantized Linear."""
    q = quantized_weight(m)
    if q is None:
        return None
    codes, scale, bits, group = q
    if group and codes.shape[1] % group:
        raise ModelpressError(f"a Linear of {codes.shape[1]} inputs has groups of {group}, and the last is short: "
                              "compressed-tensors' layout needs equal groups; use a group_size that divides it")
    return codes, scale, bits, group


def _scheme(bits: int, group: int, targets: list[str]) -> dict:
    weights = {"num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
               "strategy": "group" if group else "channel", "group_size": group or None}
    return {"targets": [f"re:^{re.escape(t)}$" for t in targets], "weights": weights,
            "input_activations": None, "output_activations": None}


def hf_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[tuple[int, int], list[str]]]:
    """The tensors of the folder, and the quantized Linears by (bits, group size)."""
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[tuple[int, int], list[str]] = {}
    seen: set[tuple] = set()
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        q = _quantized(m)
        if q is not None:
            codes, scale, bits, group = q
            tensors[prefix + "weight_packed"] = pack_int32(codes, bits)
            tensors[prefix + "weight_scale"] = scale.contiguous()
            tensors[prefix + "weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
            if m.bias is not None:
                tensors[prefix + "bias"] = m.bias.detach().float().contiguous()
            groups.setdefault((bits, group), []).append(name)
            continue
        if isinstance(m, PackedEmbedding):
            tensors[prefix + "weight"] = m.dequantized().contiguous()
            continue
        persistent = [(k, t) for k, t in m._buffers.items() if t is not None and k not in m._non_persistent_buffers_set]
        for k, t in [*((k, p) for k, p in m._parameters.items() if p is not None), *persistent]:
            where = (t.data_ptr(), tuple(t.shape), t.stride())
            if where in seen:  # a tied tensor is written once; transformers ties it again on load
                continue
            seen.add(where)
            tensors[prefix + k] = t.detach().float().contiguous() if t.is_floating_point() else t.detach().contiguous()
    return tensors, groups


def to_hf(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Write a loaded compressed Hugging Face model (`modelpress.load(...)`) to `folder` as config.json and
    model.safetensors in compressed-tensors' pack-quantized layout; returns the folder. Other files there
    (a tokenizer) are kept, so the folder can then serve as the model's whole folder."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ModelpressError("HF export needs a Hugging Face model (one with a transformers config); export other "
                              "models to ONNX")
    tensors, groups = hf_state(model)
    if not groups:
        raise ModelpressError("the model has no quantized Linear layer to write in a quantized layout; "
                              "compress it with a weight-quantizing recipe (e.g. w4), or save it with "
                              "save_pretrained as a float model")
    cfg = config.to_dict()
    cfg["dtype"] = "float32"
    cfg.pop("torch_dtype", None)
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": {f"group_{i}": _scheme(bits, group, names)
                          for i, ((bits, group), names) in enumerate(sorted(groups.items()))},
        "ignore": [], "kv_cache_scheme": None}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clash = sorted(p.name for p in folder.iterdir() if p.name != "model.safetensors" and (
        p.suffix in (".safetensors", ".bin", ".gguf") or p.name.endswith(".index.json")))
    if clash:
        raise ModelpressError(f"{folder} already holds other weights ({', '.join(clash[:3])}), which "
                              "from_pretrained would read instead; export to an empty folder")
    files = {"config.json": lambda f: f.write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8"),
             "model.safetensors": lambda f: save_file(tensors, f, metadata={"format": "pt"})}
    temps = {}
    try:  # each file written beside its place first: a failed export leaves the folder's files as they were
        for name, write in files.items():
            temps[name] = folder / f".{name}.tmp"
            write(temps[name])
        for name, tmp in temps.items():
            os.replace(tmp, folder / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    return folder
