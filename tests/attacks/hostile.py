"""Hostile .mpz files with valid checksums (rebuilt with the writer), and a harness that runs a
loader on one in a child process with the network blocked, prompts refused, and time and peak memory
measured. Shared by the attack tests and benchmarks/fuzz.py."""
from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
from torch import nn

from modelpress.format.container import _encode
from modelpress.format.entropy import encode_symbols
from modelpress.format.mpz import encode_model
from modelpress.state import CompressionState


def file_bytes(manifest: dict, streams: dict[str, bytes]) -> bytes:
    """A container with every checksum valid: what an attacker writes with our own writer."""
    prefix, views = _encode(manifest, streams)
    return prefix + b"".join(bytes(v) for v in views)


def linear_file(**arg_overrides) -> tuple[dict, dict]:
    """(manifest, streams) of a Linear(4, 3), with constructor arguments in its description overridden."""
    manifest, streams = encode_model(nn.Linear(4, 3), CompressionState())
    manifest["arch"]["a"].update(arg_overrides)
    return manifest, streams


def huge_tensor(kind: str, shape: list[int]) -> tuple[dict, dict]:
    """A one-tensor file that declares `shape` with streams of a few bytes that decode to any length."""
    rows = shape[0]
    arch = {"t": "Linear", "a": {"in_features": shape[1], "out_features": rows, "bias": False}}
    entry: dict = {"shape": shape, "dtype": "f32", "kind": kind}
    if kind == "cb":        # a one-value codebook and constant codes
        entry.update(k=1, masked=False)
        streams = {"0/codes": encode_symbols(np.zeros(1, np.int64)), "0/table": b"\x00\x3c"}
    elif kind == "sp":      # an all-zero mask: no values to store
        streams = {"0/mask": bytes([0]), "0/values": b""}
    elif kind == "ans":     # ANS with a table skewed to one symbol: ~0 bits a symbol
        entry.update(kind="cb", k=2, masked=False)
        codes = encode_symbols(np.r_[np.zeros(200_000, np.int64), 1])
        assert codes[0] >> 5 >= 2, "expected an ANS stream"
        streams = {"0/codes": codes, "0/table": b"\x00\x3c\x00\x00"}
    elif kind == "ent":     # int8 symbols, constant
        arch = {"t": "Int8Linear", "a": {"in_features": shape[1], "out_features": rows, "bias": False}}
        entry.update(dtype="i8", kind="ent", min=0)
        streams = {"0/codes": encode_symbols(np.zeros(1, np.int64))}
        return ({"format": "modelpress", "arch": arch, "meta": {},
                 "tensors": {"weight": entry, "weight_scale": {"shape": [rows], "dtype": "f32", "kind": "raw"}}},
                {**streams, "1/data": b"\x00" * 4 * rows})
    else:
        raise ValueError(kind)
    return {"format": "modelpress", "arch": arch, "meta": {}, "tensors": {"weight": entry}}, streams


def tiny_bert_config(**overrides) -> dict:
    import transformers

    cfg = transformers.BertConfig(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=8, max_position_embeddings=16)
    return {**json.loads(cfg.to_json_string()), **overrides}


def hf_file(cls: str, config: dict, swaps: dict | None = None) -> tuple[dict, dict]:
    """A file whose architecture is a transformers class and config; its tensors are a tiny BERT's."""
    import transformers

    model = transformers.BertModel(transformers.BertConfig(**tiny_bert_config()))
    manifest, streams = encode_model(model, CompressionState())
    manifest["arch"] = {"hf": {"class": cls, "config": config}, "swaps": swaps or {}}
    return manifest, streams


def remote_code_llava_config() -> dict:
    """A Llava config whose vision sub-config (a type with no AutoModel entry) names remote code:
    transformers asks "Do you wish to run the custom code?" when it builds it."""
    import transformers

    vision = transformers.BlipVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=28, patch_size=14).to_dict()
    vision["auto_map"] = {"AutoModel": "attacker/evil--modeling_evil.EvilModel"}
    text = transformers.LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    num_key_value_heads=2, vocab_size=50).to_dict()
    return json.loads(json.dumps({"model_type": "llava", "vision_config": vision, "text_config": text}))


def cap_address_space(headroom: int = 1 << 30) -> None:
    """Limit this process's address space to its current size plus `headroom`: an escape then fails
    this process, never the machine running it."""
    soft = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE") + headroom
    resource.setrlimit(resource.RLIMIT_AS, (soft, soft))


def reset_peak() -> int:
    """Reset the peak resident size to the current one (Linux clear_refs); return the current one, in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_mb_since(base: int) -> float:
    """MB of peak resident size above `base` (from `reset_peak`)."""
    kib = int(next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM")).split()[1])
    return (kib * 1024 - base) / 2 ** 20


WORKER = r'''
import builtins, json, socket, sys, time, traceback
events = []
def refuse_network(*a, **k):
    events.append("network")
    raise OSError("network blocked by the test")
socket.socket.connect = refuse_network
socket.create_connection = refuse_network
socket.getaddrinfo = refuse_network
def refuse_prompt(*a, **k):
    events.append("prompt")
    raise EOFError("no prompts in the test")
builtins.input = refuse_prompt
import torch, modelpress, modelpress.format.mpz as mpz
sys.path.insert(0, sys.argv[1])
from hostile import cap_address_space, peak_mb_since, reset_peak
try:
    import transformers
except ImportError:
    pass

def measure(fn):
    base = reset_peak()
    t = time.perf_counter()
    try:
        fn()
        out = {"error": None}
    except BaseException as e:
        out = {"error": type(e).__name__, "module": type(e).__module__, "message": str(e)[:2000],
               "modelpress": isinstance(e, modelpress.errors.ModelpressError),
               "trace": traceback.format_exc()[-1500:]}
    out["seconds"] = time.perf_counter() - t
    out["peak_mb"] = peak_mb_since(base)
    out["events"] = list(events)
    events.clear()
    return out

cap_address_space()
results = {}
cases = json.loads(sys.stdin.read())
for case in cases + cases:  # the first round pays one-time imports (transformers' model modules)
    path, op = case["path"], case["op"]
    if op == "load":
        fn = lambda: mpz.load(path)
    elif op == "inspect":
        fn = lambda: mpz.describe_file(path)
    elif op == "skeleton":
        fn = lambda: mpz.load(path, model=torch.nn.Linear(4, 3))
    results[case["name"]] = measure(fn)
print("RESULTS" + json.dumps(results))
'''


def run_cases(cases: list[dict], timeout: float = 300) -> dict[str, dict]:
    """Run each {name, path, op} in one child process (stdin closed to prompts, network blocked);
    returns name -> {error, module, message, modelpress, seconds, peak_mb, events}."""
    proc = subprocess.run([sys.executable, "-c", WORKER, str(Path(__file__).parent)], input=json.dumps(cases), capture_output=True,
                          text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS")), None)
    if line is None:
        raise AssertionError(f"the worker died (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULTS"):])


def write_cases(folder: Path, files: dict[str, tuple[dict, dict]], ops=("load", "inspect")) -> list[dict]:
    """Write each named (manifest, streams) as a checksum-valid file; one case per op."""
    cases = []
    for name, (manifest, streams) in files.items():
        path = folder / f"{name}.mpz"
        path.write_bytes(file_bytes(copy.deepcopy(manifest), streams))
        cases += [{"name": f"{name}/{op}", "path": str(path), "op": op} for op in ops]
    return cases
