"""Bounds on what a file can make the loader do: memory, module count, configs, network.

A .mpz may come from a stranger. Its declared sizes are tied to the bytes of its streams (at most
`EXPANSION` times more, or `FLOOR_BYTES`, unless the caller raises the limit; the header, up to 4 MiB
of JSON, earns nothing), the model it
describes is first built on the meta device with every registered module and tensor counted,
and a transformers config is refused anything that reaches for code or the network.
See the Security section of docs/format.md.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
from torch.nn.modules import module as _module

from ..errors import LimitExceeded, UnsafeArchitecture

EXPANSION = 1024          # decoded bytes per file byte; Deep Compression's best ratios are ~50-120x
FLOOR_BYTES = 16 << 20    # any file may decode to this much
MODULES_PER_TENSOR = 8    # a layer rarely has more parameter-free submodules (dropout, activations)
MODULES_SLACK = 256
MAX_INT = 2 ** 40         # no constructor or config integer is larger than this
MAX_STR = 256

# config keys that make transformers fetch code, weights or kernels; refused when "on"
_REMOTE_KEYS = ("auto_map", "trust_remote_code", "use_pretrained_backbone", "quantization_config", "custom_pipelines")
_ATTENTION = {None, "eager", "sdpa"}


def decoded_bytes(numel: int, itemsize: int) -> int:
    """What a tensor costs to decode: its elements at no less than 4 bytes each (the decoders
    hold 32-bit codes and float32 values on the way)."""
    return numel * max(4, itemsize)


def max_bytes_for(stream_bytes: int, max_bytes: int | None = None) -> int:
    """The decode limit for a file whose streams hold `stream_bytes` bytes, or the caller's own."""
    if max_bytes is not None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive int. Got {max_bytes!r} instead.")
        return max_bytes
    return max(FLOOR_BYTES, EXPANSION * stream_bytes)


def over_limit(what: str, need: int, limit: int) -> LimitExceeded:
    """The error for a file that asks for more than the limit, saying how to raise it."""
    return LimitExceeded(
        f"{what} needs {need:,} bytes, over the limit of {limit:,} for this file ({EXPANSION}x the bytes of its streams, at least "
        f"{FLOOR_BYTES:,}). A file that honestly expands this much must come from a trusted source: pass "
        "load(path, max_bytes=...) or --max-bytes to raise the limit")


@contextlib.contextmanager
def bounded_construction(max_modules: int | None, max_bytes: int | None) -> Iterator[None]:
    """Count every module, parameter and buffer registered while the block runs (it should build a
    model on the meta device) and stop at the first one past the bounds, before it grows further."""
    if max_modules is None and max_bytes is None:
        yield
        return
    count = {"modules": 0, "bytes": 0}

    def on_module(_owner: Any, _name: str, sub: Any) -> None:
        count["modules"] += sub is not None
        if max_modules is not None and count["modules"] > max_modules:
            raise LimitExceeded(f"architecture: the model has more than {max_modules:,} layers, more than the "
                                "file's tensors can fill")

    def on_tensor(_owner: Any, _name: str, t: Any) -> None:
        if isinstance(t, torch.Tensor):
            count["bytes"] += decoded_bytes(t.numel(), t.element_size())
            if max_bytes is not None and count["bytes"] > max_bytes:
                raise over_limit("architecture: building the model", count["bytes"], max_bytes)

    handles = [_module.register_module_module_registration_hook(on_module),
               _module.register_module_parameter_registration_hook(on_tensor),
               _module.register_module_buffer_registration_hook(on_tensor)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# bounds on constructor arguments by name (elementwise for tuples); names not here pass `check_value` only
_COUNTS = ("in_features", "out_features", "in_channels", "out_channels", "num_features", "num_embeddings",
           "embedding_dim", "rank", "rank_in", "rank_out", "input_size", "hidden_size")
_POSITIVE = ("groups", "num_groups", "num_channels")
_GEOMETRY = ("kernel_size", "stride", "dilation")  # and padding, output_padding (>= 0): no CNN goes near 4096
_DIMS = ("dim", "start_dim", "end_dim")
_ARG_RANGES = {**dict.fromkeys(_COUNTS, (0, MAX_INT)), **dict.fromkeys(_POSITIVE, (1, MAX_INT)),
               **dict.fromkeys(_GEOMETRY, (1, 4096)), **dict.fromkeys(("padding", "output_padding"), (0, 4096)),
               **dict.fromkeys(_DIMS, (-8, 8)), **dict.fromkeys(("p", "momentum"), (0, 1)),
               "eps": (1e-30, 1.0), "alpha": (0, 1e6)}
_INT_ARGS = set(_COUNTS + _POSITIVE + _GEOMETRY + _DIMS + ("padding", "output_padding"))


def check_arg(cls_name: str, name: str, v: Any, default: Any = None) -> None:
    """A constructor argument from a file: bounded JSON values of the type its default (or its name)
    implies, in the range its name allows (a channel count is never negative, a stride never zero, a
    dropout probability in [0, 1])."""
    where = f"{cls_name}.{name}"
    check_value(where, list(v) if isinstance(v, tuple) else v)
    items = v if isinstance(v, tuple) else (v,)
    if isinstance(default, bool):
        ok = isinstance(v, bool)
    elif name in _INT_ARGS or type(default) is int:
        ok = all(type(x) is int for x in items) or name == "padding" and v in ("same", "valid")
    elif isinstance(default, float):
        ok = type(v) in (int, float)
    elif isinstance(default, str):
        ok = isinstance(v, str)
    else:
        ok = True
    if not ok:
        raise UnsafeArchitecture(f"architecture: {where} is {_short(v)}, not of the type it takes")
    lo, hi = _ARG_RANGES.get(name, (None, None))
    for x in items:
        if lo is not None and type(x) in (int, float) and not lo <= x <= hi:
            raise UnsafeArchitecture(f"architecture: {where} is {_short(v)}, outside [{lo}, {hi}]")


def check_geometry(cls_name: str, kwargs: dict) -> None:
    """Padding no wider than the kernel's reach (dilation x (kernel_size - 1)): wider padding only adds
    outputs that see zeros, and a crafted one would make the loaded model's activations huge."""
    pad, kernel = kwargs.get("padding"), kwargs.get("kernel_size")
    if kernel is None or pad is None or isinstance(pad, str):
        return
    n = max(len(x) if isinstance(x, tuple) else 1 for x in (pad, kernel, kwargs.get("dilation", 1)))
    spread = lambda x: x if isinstance(x, tuple) else (x,) * n  # noqa: E731
    for p, k, d in zip(spread(pad), spread(kernel), spread(kwargs.get("dilation", 1))):
        if p > d * (k - 1):
            raise UnsafeArchitecture(f"architecture: {cls_name}.padding is {_short(pad)}, wider than its kernel's "
                                     f"reach ({_short(kernel)}, dilation {_short(kwargs.get('dilation', 1))})")


def max_modules_for(n_tensors: int) -> int:
    """How many modules a model whose file holds `n_tensors` tensors may build."""
    return MODULES_PER_TENSOR * n_tensors + MODULES_SLACK


def check_value(where: str, v: Any, depth: int = 0) -> None:
    """A constructor argument or config value: JSON scalars of bounded size, bounded lists/dicts."""
    if v is None or isinstance(v, bool):
        return
    if isinstance(v, int):
        if abs(v) > MAX_INT:
            raise UnsafeArchitecture(f"architecture: {where} is {_short(v)}, beyond the bound {MAX_INT}")
    elif isinstance(v, float):
        if not math.isfinite(v):
            raise UnsafeArchitecture(f"architecture: {where} is {v}, not a finite number")
    elif isinstance(v, str):
        if len(v) > MAX_STR:
            raise UnsafeArchitecture(f"architecture: {where} is a string of {len(v)} characters (at most {MAX_STR})")
    elif depth >= 32:
        raise UnsafeArchitecture(f"architecture: {where} is nested too deeply")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            check_value(f"{where}[{i}]", x, depth + 1)
    elif isinstance(v, dict):
        for k, x in v.items():
            check_value(f"{where}.{k}", x, depth + 1)
    else:
        raise UnsafeArchitecture(f"architecture: {where} has type {type(v).__name__}")


def check_hf_config(config: dict, where: str = "config", depth: int = 0) -> None:
    """Refuse a transformers config (and every sub-config in it) that asks for remote code, a Hub
    backbone, pretrained backbone weights, a quantizer or hub attention kernels; values must pass
    `check_value`. A timm backbone built without pretrained weights is local and allowed."""
    if depth > 16:
        raise UnsafeArchitecture(f"architecture: {where} nests sub-configs too deeply")
    for key, v in config.items():
        at = f"{where}.{key}"
        if key in _REMOTE_KEYS and v not in (None, False, "", {}, []):
            raise UnsafeArchitecture(
                f"architecture: {at} = {_short(v)} would make transformers fetch or run code from outside the "
                "file; modelpress never loads remote code or reaches the network, so the file is refused")
        if key == "backbone" and isinstance(v, str) and v and not (
                config.get("use_timm_backbone") is True or config.get("model_type") == "timm_backbone"):
            raise UnsafeArchitecture(f"architecture: {at} = {_short(v)} names a Hugging Face Hub model whose config "
                                     "transformers would download; modelpress never reaches the network")
        if key in ("attn_implementation", "_attn_implementation") and v not in _ATTENTION:
            raise UnsafeArchitecture(f"architecture: {at} = {_short(v)}: only 'eager' and 'sdpa' are allowed")
        if isinstance(v, dict):
            check_hf_config(v, at, depth + 1)
        else:
            check_value(at, v, depth)


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hugging Face Hub calls fail at once instead of reaching the network while the block runs."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
