"""Each tensor in its cheapest exact encoding, as manifest entries plus byte streams: the dispatch to
the stored forms (`modelpress/forms/`, one per kind of state) and what they share: checked reads,
the mask coders, code and scale streams.

file kinds:  raw  - the tensor's bytes as they are (any dtype)                       forms/dense.py
             ent  - an integer tensor (int8 weights of a runtime layer) as entropy-coded symbols
             sp   - sparse float32: mask + the kept values                             forms/masked.py
             cb   - codebook: float16 centroids + entropy-coded indices (+ a mask)     forms/codebook.py
             q    - uniform grid: float16 scales + entropy-coded integer codes (+ mask) forms/grid.py
A mask is stored only where it makes the tensor smaller, by the cheapest registered mask coder
(`register_mask_coder`: the adaptive bit coder is the default; a technique whose masks have a
structure, such as N:M, registers a coder that stores them at that structure's entropy).
Decoding checks every declared size against the manifest before allocating, and recomputes weights
with the same float32 operations the pipeline used, so a loaded model is bitwise identical to the
one compressed.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import CorruptStream
from ..state import FORMS, ParamState, form_of
from .entropy import decode_mask, decode_symbols, encode_mask, encode_symbols

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16, "f64": torch.float64,
          "i64": torch.int64, "i32": torch.int32, "i8": torch.int8, "u8": torch.uint8, "bool": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_ELEMENTS = 2 ** 34  # a declared tensor larger than this is refused before anything is allocated


@dataclass(frozen=True)
class MaskCoder:
    """A way to store a 2-D bool mask (output channels, rest): `encode` returns None where the mask
    lacks the coder's structure; `decode` rebuilds it for a (rows, cols) shape or raises."""

    encode: Callable[[np.ndarray], bytes | None]
    decode: Callable[[bytes, tuple[int, int]], np.ndarray]


DEFAULT_MASK_CODER = "bits"
MASK_CODERS: dict[str, MaskCoder] = {DEFAULT_MASK_CODER: MaskCoder(encode_mask, decode_mask)}


def register_mask_coder(name: str, coder: MaskCoder) -> None:
    """Make `coder` a candidate for every mask; files name it in the tensor's entry (`mask_coder`)."""
    MASK_CODERS[name] = coder


def encode_mask_cheapest(mask: torch.Tensor, shape: tuple[int, ...]) -> tuple[str, bytes]:
    """(coder name, bytes) of the cheapest coder for `mask`; the default wins ties."""
    m = mask.reshape(mask_2d(shape)).numpy()
    best = (DEFAULT_MASK_CODER, MASK_CODERS[DEFAULT_MASK_CODER].encode(m))
    for name, coder in MASK_CODERS.items():
        data = coder.encode(m) if name != DEFAULT_MASK_CODER else None
        if data is not None and len(data) < len(best[1]):
            best = (name, data)
    return best


def decode_mask_of(name: str, entry: dict, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    coder_name = entry.get("mask_coder", DEFAULT_MASK_CODER)
    coder = MASK_CODERS.get(coder_name) if isinstance(coder_name, str) else None
    if coder is None:
        raise CorruptStream(f"tensor {name!r}: unknown mask coder {str(coder_name)[:40]!r}")
    rows_cols = mask_2d(shape)
    with decoding(name, "mask does not decode"):
        m = coder.decode(data, rows_cols)
    if not isinstance(m, np.ndarray) or m.dtype != np.bool_ or m.shape != rows_cols:
        raise CorruptStream(f"tensor {name!r}: the mask decodes to the wrong shape")
    return torch.from_numpy(m.copy()).reshape(shape)


def mask_2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """Masks are coded as (output channels, rest): columns then share an input position."""
    if len(shape) <= 1:
        return (1, int(math.prod(shape)))
    return (shape[0], int(math.prod(shape[1:])))


def encode_tensor(name: str, t: torch.Tensor, st: ParamState | None, key: str | None = None
                  ) -> tuple[dict, dict[str, bytes]]:
    """(entry, streams) for one tensor, by the stored form of its state; stream keys are prefixed with
    `key/` (default: the name)."""
    entry: dict = {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
    form = form_of(st) if st is not None else FORMS["dense"]
    return form.encode(key if key is not None else name, t, st, entry)


def cheapest_split(key: str, shape: tuple[int, ...], mask: torch.Tensor | None, whole: dict, split: dict,
                   side_key: str) -> tuple[bool, dict[str, bytes], int, str]:
    """Codes plus a side table (`side_key`) stored whole (pruned positions coded like any other), or
    split by a mask (codes only where kept): whichever takes fewer bytes. Returns (masked, streams,
    side entries, mask coder)."""
    candidates = [(False, whole)] + ([(True, split)] if mask is not None else [])
    best, coder = None, DEFAULT_MASK_CODER
    for masked, parts in candidates:
        streams = {f"{key}/codes": encode_symbols(parts["codes"].flatten().numpy()),
                   f"{key}/{side_key}": parts[side_key].numpy().tobytes()}
        if masked:
            coder, streams[f"{key}/mask"] = encode_mask_cheapest(mask, shape)
        if best is None or sum(map(len, streams.values())) < sum(map(len, best[1].values())):
            best = (masked, streams, len(parts[side_key]))
    masked, streams, n_side = best
    return masked, streams, n_side, coder


def decode_codes(name: str, entry: dict, streams: dict[str, bytes], key: str, shape: tuple[int, ...],
                 dtype: torch.dtype, numel: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The mask (None where not `masked`) and the entropy-coded codes of a float32 `cb` or `q` entry."""
    if dtype != torch.float32:
        raise CorruptStream(f"tensor {name!r}: kind {entry.get('kind')!r} needs dtype f32")
    mask = decode_mask_of(name, entry, stream(streams, f"{key}/mask"), shape) if entry.get("masked") else None
    n = int(mask.sum()) if mask is not None else numel
    with decoding(name, "codes do not decode"):
        codes = torch.from_numpy(decode_symbols(stream(streams, f"{key}/codes"), n).astype(np.int64))
    return mask, codes


@contextlib.contextmanager
def decoding(name: str, what: str) -> Iterator[None]:
    """Any failure inside a stream decoder becomes CorruptStream naming the tensor."""
    try:
        yield
    except CorruptStream:
        raise
    except Exception as e:
        raise CorruptStream(f"tensor {name!r}: {what}: {e}") from None


def stream(streams: dict[str, bytes], key: str) -> bytes:
    if key not in streams:
        raise CorruptStream(f"stream {key!r} is missing")
    return streams[key]


def check_entry(name: str, entry: dict) -> tuple[tuple[int, ...], torch.dtype, int]:
    """(shape, dtype, element count) declared by a manifest entry, checked before anything is decoded."""
    shape = entry.get("shape")
    if not isinstance(shape, list) or len(shape) > 8 or \
            not all(type(d) is int and 0 <= d <= MAX_ELEMENTS for d in shape):
        raise CorruptStream(f"tensor {name!r}: bad shape {str(shape)[:100]}")
    numel = math.prod(shape)
    if numel > MAX_ELEMENTS:
        raise CorruptStream(f"tensor {name!r}: declares {numel} elements, more than the cap {MAX_ELEMENTS}")
    dtype = DTYPES.get(entry.get("dtype")) if isinstance(entry.get("dtype"), str) else None
    if dtype is None:
        raise CorruptStream(f"tensor {name!r}: unknown dtype {str(entry.get('dtype'))[:40]!r}")
    return tuple(shape), dtype, numel


def from_bytes(name: str, data: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    itemsize = dtype.itemsize
    if len(data) != count * itemsize:
        raise CorruptStream(f"tensor {name!r}: {len(data)} bytes where {count} x {itemsize} were declared")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def int_field(name: str, entry: dict, key: str, lo: int, hi: int) -> int:
    v = entry.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptStream(f"tensor {name!r}: field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def decode_tensor(name: str, entry: dict, streams: dict[str, bytes], key: str | None = None) -> torch.Tensor:
    """Rebuild one tensor exactly from the streams under `key/` (default: the name); raises CorruptStream."""
    key = key if key is not None else name
    shape, dtype, numel = check_entry(name, entry)
    kind = entry.get("kind")
    forms = {k: f for f in FORMS.values() for k in f.file_kinds}
    if not isinstance(kind, str) or kind not in forms:
        raise CorruptStream(f"tensor {name!r}: unknown kind {str(kind)[:40]!r}")
    return forms[kind].decode(name, entry, streams, key, shape, dtype, numel)


ENT_DTYPES = (torch.int8, torch.uint8, torch.int16)
PLANE_MIN = 256  # fewer float16 scales than this are stored raw: two more streams would cost more


def encode_planes(half: torch.Tensor) -> tuple[bytes, bytes]:
    """float16 values as entropy-coded high bytes (sign, exponent) and low bytes (mantissa)."""
    bits = half.view(torch.int16).numpy().view(np.uint16).astype(np.int64)
    return encode_symbols(bits >> 8), encode_symbols(bits & 0xFF)


def decode_planes(name: str, streams: dict[str, bytes], key: str, count: int) -> torch.Tensor:
    with decoding(name, "scales do not decode"):
        hi = decode_symbols(stream(streams, f"{key}/scale_hi"), count)
        lo = decode_symbols(stream(streams, f"{key}/scale_lo"), count)
    if (hi > 255).any() or (lo > 255).any():
        raise CorruptStream(f"tensor {name!r}: a scale byte is out of range")
    return torch.from_numpy(((hi << 8) | lo).astype(np.uint16).view(np.int16).copy()).view(torch.float16)


def scatter(codes: torch.Tensor, mask: torch.Tensor | None, shape, fill: int = 0) -> torch.Tensor:
    if mask is None:
        return codes.reshape(shape)
    full = torch.full(shape, fill, dtype=torch.int64)
    full[mask] = codes
    return full


def ones_or(mask: torch.Tensor | None, shape) -> torch.Tensor | float:
    return 1 if mask is None else mask
