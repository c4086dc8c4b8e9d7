"""Each tensor in its cheapest exact encoding, as manifest entries plus byte streams.

kinds:  raw  - the tensor's bytes as they are (any dtype)
        cb   - codebook: float16 centroids + entropy-coded indices (+ a sparsity mask)
        q    - uniform grid: float16 per-channel scales + entropy-coded integer codes (+ mask)
        sp   - sparse float32: mask + the kept values
        ent  - an integer tensor (int8 weights of a runtime layer) as entropy-coded symbols
A mask is stored only where it makes the tensor smaller, by the cheapest registered mask coder
(`register_mask_coder`: the adaptive bit coder is the default; a technique whose masks have a
structure, such as N:M, registers a coder that stores them at that structure's entropy). Decoding checks every declared size
against the manifest before allocating, and recomputes weights with the same float32 operations
the pipeline used, so a loaded model is bitwise identical to the one compressed.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import CorruptStream
from ..state import ParamState, broadcast_scale
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


def _encode_mask(mask: torch.Tensor, shape: tuple[int, ...]) -> tuple[str, bytes]:
    """(coder name, bytes) of the cheapest coder for `mask`; the default wins ties."""
    m = mask.reshape(mask_2d(shape)).numpy()
    best = (DEFAULT_MASK_CODER, MASK_CODERS[DEFAULT_MASK_CODER].encode(m))
    for name, coder in MASK_CODERS.items():
        data = coder.encode(m) if name != DEFAULT_MASK_CODER else None
        if data is not None and len(data) < len(best[1]):
            best = (name, data)
    return best


def _decode_mask(name: str, entry: dict, data: bytes, shape: tuple[int, ...]) -> torch.Tensor:
    coder_name = entry.get("mask_coder", DEFAULT_MASK_CODER)
    coder = MASK_CODERS.get(coder_name) if isinstance(coder_name, str) else None
    if coder is None:
        raise CorruptStream(f"tensor {name!r}: unknown mask coder {str(coder_name)[:40]!r}")
    rows_cols = mask_2d(shape)
    with _decoding(name, "mask does not decode"):
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
    """(entry, streams) for one tensor; stream keys are prefixed with `key/` (default: the name)."""
    name = key if key is not None else name
    entry: dict = {"shape": list(t.shape), "dtype": DTYPE_NAMES[t.dtype]}
    kind = st.kind if st is not None else "dense"
    if kind == "dense":
        raw = t.contiguous().numpy().tobytes()
        if t.dtype in _ENT_DTYPES and t.numel() >= 64:
            lo = int(t.min())
            coded = encode_symbols((t.to(torch.int64) - lo).flatten().numpy())
            if len(coded) < len(raw):
                return {**entry, "kind": "ent", "min": lo}, {f"{name}/codes": coded}
        return {**entry, "kind": "raw"}, {f"{name}/data": raw}
    if kind == "masked":
        entry["kind"], values = "sp", t[st.mask].contiguous().numpy().tobytes()
        coder, data = _encode_mask(st.mask, tuple(t.shape))
        if coder != DEFAULT_MASK_CODER:
            entry["mask_coder"] = coder
        return entry, {f"{name}/mask": data, f"{name}/values": values}
    mask = st.mask if st.mask is not None and not bool(st.mask.all()) else None
    if kind == "codebook":
        # without a mask, pruned positions take an extra code whose table value is 0
        table, codes = st.codebook.half(), st.codes.to(torch.int64)
        whole_table = torch.cat([table, table.new_zeros(1)]) if mask is not None else table
        whole_codes = codes.masked_fill(~mask, len(table)) if mask is not None else codes
        split = {"table": table, "codes": codes[mask] if mask is not None else None}
        whole = {"table": whole_table, "codes": whole_codes}
        entry["kind"], side_key = "cb", "table"
    else:
        qmax = 2 ** (st.bits - 1) - 1
        codes = st.codes.to(torch.int64) + qmax  # non-negative symbols; qmax means 0
        entry.update(kind="q", bits=int(st.bits), nscale=int(st.scale.numel()))
        if st.group is not None and st.scale.dim() == 2:
            entry["group"] = int(st.group)
        split = {"scale": st.scale.half().flatten(), "codes": codes[mask] if mask is not None else None}
        whole = {"scale": st.scale.half().flatten(), "codes": codes}
        side_key = "scale"
    candidates = [(False, whole)] + ([(True, split)] if mask is not None else [])
    best, coder = None, DEFAULT_MASK_CODER
    for masked, parts in candidates:
        streams = {f"{name}/codes": encode_symbols(parts["codes"].flatten().numpy()),
                   f"{name}/{side_key}": parts[side_key].numpy().tobytes()}
        if masked:
            coder, streams[f"{name}/mask"] = _encode_mask(mask, tuple(t.shape))
        if best is None or sum(map(len, streams.values())) < sum(map(len, best[1].values())):
            best = (masked, streams, len(parts[side_key]))
    masked, streams, n_side = best
    entry["masked"] = masked
    if masked and coder != DEFAULT_MASK_CODER:
        entry["mask_coder"] = coder
    if entry["kind"] == "q" and n_side >= _PLANE_MIN:  # many scales: code their two byte planes
        raw = streams[f"{name}/scale"]
        planes = _encode_planes(st.scale.half().flatten())
        if sum(map(len, planes)) < len(raw):
            del streams[f"{name}/scale"]
            streams[f"{name}/scale_hi"], streams[f"{name}/scale_lo"] = planes
            entry["scale_planes"] = True
    if entry["kind"] == "cb":
        entry["k"] = n_side
    return entry, streams


@contextlib.contextmanager
def _decoding(name: str, what: str) -> Iterator[None]:
    """Any failure inside a stream decoder becomes CorruptStream naming the tensor."""
    try:
        yield
    except CorruptStream:
        raise
    except Exception as e:
        raise CorruptStream(f"tensor {name!r}: {what}: {e}") from None


def _stream(streams: dict[str, bytes], key: str) -> bytes:
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


def _from_bytes(name: str, data: bytes, dtype: torch.dtype, count: int) -> torch.Tensor:
    itemsize = dtype.itemsize
    if len(data) != count * itemsize:
        raise CorruptStream(f"tensor {name!r}: {len(data)} bytes where {count} x {itemsize} were declared")
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _int_field(name: str, entry: dict, key: str, lo: int, hi: int) -> int:
    v = entry.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptStream(f"tensor {name!r}: field {key!r} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def decode_tensor(name: str, entry: dict, streams: dict[str, bytes], key: str | None = None) -> torch.Tensor:
    """Rebuild one tensor exactly from the streams under `key/` (default: the name); raises CorruptStream."""
    key = key if key is not None else name
    shape, dtype, numel = check_entry(name, entry)
    kind = entry.get("kind")
    if not isinstance(kind, str) or kind not in ("raw", "sp", "cb", "q", "ent"):
        raise CorruptStream(f"tensor {name!r}: unknown kind {str(kind)[:40]!r}")
    if kind == "raw":
        return _from_bytes(name, _stream(streams, f"{key}/data"), dtype, numel).reshape(shape)
    if kind == "ent":
        return _decode_ent(name, entry, streams, key, shape, dtype, numel)
    if dtype != torch.float32:
        raise CorruptStream(f"tensor {name!r}: kind {kind!r} needs dtype f32")
    masked = entry.get("masked", kind == "sp")
    mask = None
    if masked:
        mask = _decode_mask(name, entry, _stream(streams, f"{key}/mask"), shape)
    n = int(mask.sum()) if mask is not None else numel
    if kind == "sp":
        w = torch.zeros(shape, dtype=torch.float32)
        w[mask] = _from_bytes(name, _stream(streams, f"{key}/values"), torch.float32, n)
        return w
    codes = torch.from_numpy(decode_symbols(_stream(streams, f"{key}/codes"), n).astype(np.int64))
    if kind == "cb":
        k = _int_field(name, entry, "k", 1, 2 ** 16)
        table = _from_bytes(name, _stream(streams, f"{key}/table"), torch.float16, k).float()
        if codes.numel() and int(codes.max()) >= k:
            raise CorruptStream(f"tensor {name!r}: a code is outside its codebook of {k}")
        full = _scatter(codes, mask, shape)
        return table[full] * _ones_or(mask, shape)
    bits = _int_field(name, entry, "bits", 1, 16)
    rows = shape[0] if shape else 1
    group = None
    allowed = {1, rows}
    if "group" in entry:
        group = _int_field(name, entry, "group", 1, 2 ** 31)
        cols = numel // rows if rows else 0
        allowed = {rows * -(-cols // group)}
    nscale = _int_field(name, entry, "nscale", 1, max(1, numel))
    if nscale not in allowed:
        raise CorruptStream(f"tensor {name!r}: {nscale} scales for shape {list(shape)}")
    if entry.get("scale_planes"):
        scale = _decode_planes(name, streams, key, nscale).float()
    else:
        scale = _from_bytes(name, _stream(streams, f"{key}/scale"), torch.float16, nscale).float()
    if group is not None:
        scale = scale.reshape(rows, -1)
    qmax = 2 ** (bits - 1) - 1
    if codes.numel() and int(codes.max()) > 2 * qmax:
        raise CorruptStream(f"tensor {name!r}: a code is outside the {bits}-bit range")
    q = (_scatter(codes, mask, shape, fill=qmax) - qmax).to(torch.int32)
    w = q.float() * broadcast_scale(scale, q, group)
    return w if mask is None else w * mask


_ENT_DTYPES = (torch.int8, torch.uint8, torch.int16)
_PLANE_MIN = 256  # fewer float16 scales than this are stored raw: two more streams would cost more


def _encode_planes(half: torch.Tensor) -> tuple[bytes, bytes]:
    """float16 values as entropy-coded high bytes (sign, exponent) and low bytes (mantissa)."""
    bits = half.view(torch.int16).numpy().view(np.uint16).astype(np.int64)
    return encode_symbols(bits >> 8), encode_symbols(bits & 0xFF)


def _decode_planes(name: str, streams: dict[str, bytes], key: str, count: int) -> torch.Tensor:
    with _decoding(name, "scales do not decode"):
        hi = decode_symbols(_stream(streams, f"{key}/scale_hi"), count)
        lo = decode_symbols(_stream(streams, f"{key}/scale_lo"), count)
    if (hi > 255).any() or (lo > 255).any():
        raise CorruptStream(f"tensor {name!r}: a scale byte is out of range")
    return torch.from_numpy(((hi << 8) | lo).astype(np.uint16).view(np.int16).copy()).view(torch.float16)


def _decode_ent(name: str, entry: dict, streams: dict[str, bytes], key: str, shape, dtype, numel: int) -> torch.Tensor:
    info = torch.iinfo(dtype) if dtype in _ENT_DTYPES else None
    if info is None:
        raise CorruptStream(f"tensor {name!r}: kind 'ent' needs an integer dtype of at most 16 bits")
    lo = _int_field(name, entry, "min", info.min, info.max)
    with _decoding(name, "codes do not decode"):
        symbols = decode_symbols(_stream(streams, f"{key}/codes"), numel).astype(np.int64)
    values = torch.from_numpy(symbols) + lo
    if numel and int(values.max()) > info.max:
        raise CorruptStream(f"tensor {name!r}: a value is outside the range of {entry.get('dtype')}")
    return values.to(dtype).reshape(shape)


def _scatter(codes: torch.Tensor, mask: torch.Tensor | None, shape, fill: int = 0) -> torch.Tensor:
    if mask is None:
        return codes.reshape(shape)
    full = torch.full(shape, fill, dtype=torch.int64)
    full[mask] = codes
    return full


def _ones_or(mask: torch.Tensor | None, shape) -> torch.Tensor | float:
    return 1 if mask is None else mask
