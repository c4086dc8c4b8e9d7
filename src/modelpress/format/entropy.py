"""Entropy coders for the streams of a compressed model file.

Symbol streams (cluster / quantisation codes) are coded with the cheapest of: a constant,
fixed-width bit packing, or rANS (constriction, 24-bit precision) with the stream's own
frequency table stored as square-root-quantised counts in split exp-Golomb codes.
Sparsity masks are coded row by row with an adaptive Bernoulli model (column counts x row
factor, learned while decoding; only a one-byte parameter choice is sent), see `_probs`.
Decoders raise `CorruptStream` on any malformed input; their work is bounded by the
caller-supplied count/shape.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import constriction
import numpy as np

from modelpress.errors import CorruptStream

__all__ = ["encode_symbols", "decode_symbols", "encode_mask", "decode_mask",
           "entropy_bits", "mask_entropy_bits"]

_MAX_ALPHABET = 1 << 16
_CONST, _PACK, _ANS = 0, 1, 2              # symbol methods (top 3 bits of byte 0); 3 = ANS with
                                           # a delta-coded table
_ZEROS, _ONES, _ADAPTIVE = 0, 1, 2         # mask methods (byte 0; _ADAPTIVE + model config)
_MAX_Z = 28                                # longest exp-Golomb prefix the reader accepts
# Mask model grid: column prior strength tau and row-factor prior strength beta (inf = off).
_TAUS = (0.25, 1.0, 4.0, 16.0, 64.0, np.inf)
_BETAS = (0.5, 2.0, 8.0, np.inf)
_CONFIGS = [(t, b) for t in _TAUS for b in _BETAS]
_P_LO, _P_HI = 2.0 ** -18, 1.0 - 2.0 ** -18
_SEARCH_ELEMENTS = 1 << 17                 # the encoder picks the config on about this many bits
_FIRST_CHUNK, _CHUNK_GROWTH = 16, 4
_BERNOULLI = constriction.stream.model.Bernoulli(perfect=False)


def entropy_bits(symbols: np.ndarray) -> float:
    """n times the order-0 empirical entropy of `symbols`, in bits (the target for ANS)."""
    counts = np.unique(np.asarray(symbols).ravel(), return_counts=True)[1].astype(np.float64)
    return float(np.sum(counts * np.log2(counts.sum() / counts)))


def mask_entropy_bits(mask: np.ndarray) -> float:
    """n * H(density) in bits: the cost of an ideal iid Bernoulli code for `mask`."""
    n, k = np.asarray(mask).size, int(np.count_nonzero(mask))
    return float(k * np.log2(n / k) + (n - k) * np.log2(n / (n - k))) if 0 < k < n else 0.0


# ---------------------------------------------------------------- bit-level helpers

def _bitlen(u: np.ndarray) -> np.ndarray:
    """Exact bit length of positive integers < 2**53."""
    return np.frexp(u.astype(np.float64))[1].astype(np.int64)


def _eg_len(vals: np.ndarray, k: int) -> int:
    """Total length in bits of the order-k exp-Golomb codes of non-negative values."""
    return int(np.sum(2 * _bitlen(np.asarray(vals) + (1 << k)) - 1 - k))


def _eg_write(vals: np.ndarray, k: int) -> np.ndarray:
    """Order-k exp-Golomb codes, split in two runs (all unary prefixes, then all mantissas)
    so that the reader can decode them without a per-value loop. Returns a bit array."""
    u = np.asarray(vals, dtype=np.int64) + (1 << k)
    nb = _bitlen(u)
    prefix = np.zeros(int(np.sum(nb - k)), dtype=np.uint8)
    prefix[np.cumsum(nb - k) - 1] = 1
    lens = nb - 1
    idx = np.repeat(np.arange(len(u)), lens)
    t = np.arange(len(idx)) - np.repeat(np.cumsum(lens) - lens, lens)
    mant = ((u[idx] >> (lens[idx] - 1 - t)) & 1).astype(np.uint8)
    return np.concatenate([prefix, mant])


def _eg_read(bits: np.ndarray, pos: int, m: int, k: int) -> tuple[np.ndarray, int]:
    """Inverse of `_eg_write` for `m` values starting at bit `pos`; returns (values, new pos)."""
    if m == 0:
        return np.zeros(0, dtype=np.int64), pos
    ones = np.flatnonzero(bits[pos:pos + m * (_MAX_Z + 1)])[:m]
    if len(ones) < m:
        raise CorruptStream("truncated exp-Golomb codes")
    z = np.diff(ones, prepend=-1) - 1
    if z.max() > _MAX_Z:
        raise CorruptStream("exp-Golomb value out of range")
    pos += int(ones[-1]) + 1
    lens = z + k
    total = int(lens.sum())
    if pos + total > len(bits):
        raise CorruptStream("truncated exp-Golomb mantissas")
    idx = np.repeat(np.arange(m), lens)
    t = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
    w = bits[pos:pos + total] * np.ldexp(1.0, lens[idx] - 1 - t)
    u = (np.int64(1) << lens) + np.bincount(idx, weights=w, minlength=m).astype(np.int64)
    return u - (1 << k), pos + total


def _ans_bytes(coder: constriction.stream.stack.AnsCoder) -> bytes:
    """Compressed words as little-endian bytes, trailing zero bytes stripped."""
    return coder.get_compressed().astype("<u4").tobytes().rstrip(b"\0")


def _ans_coder(payload: bytes) -> constriction.stream.stack.AnsCoder:
    """Rebuild an ANS decoder from `_ans_bytes` output."""
    payload += b"\0" * (-len(payload) % 4)
    words = np.frombuffer(payload, dtype="<u4").astype(np.uint32)
    return constriction.stream.stack.AnsCoder(words)


def _guard(fn: Callable[..., Any], *args: Any) -> Any:
    """Call into constriction, turning its errors (Rust panics included) into CorruptStream."""
    try:
        return fn(*args)
    except (CorruptStream, KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as exc:  # pyo3 PanicException derives from BaseException
        raise CorruptStream(f"entropy decoder failed: {exc}") from exc


# ---------------------------------------------------------------- symbol streams

def _zigzag(v: np.ndarray) -> np.ndarray:
    """Deltas of consecutive table entries as non-negative ints: smooth tables code cheaply."""
    d = np.diff(v, prepend=1)
    return np.where(d >= 0, 2 * d, -2 * d - 1)


def _table_code(v: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Cheapest way to code the table values: (delta flag, exp-Golomb order, values to code)."""
    options = [(dl, k, vals) for dl, vals in ((0, v - 1), (1, _zigzag(v))) for k in range(8)]
    return min(options, key=lambda o: _eg_len(o[2], o[1]))


def _sqrt_table(counts: np.ndarray) -> np.ndarray:
    """Quantised sqrt-counts v >= 1 (model p ~ v**2) at the scale minimising table + coded bits;
    sqrt companding equalises the cost of count errors across frequent and rare symbols."""
    root = np.sqrt(counts.astype(np.float64))
    best = None
    for j in range(32):
        v = np.maximum(1, np.rint(root * 2.0 ** (j / 2 - 4))).astype(np.int64)
        if v.max() >= 1 << 24:
            break
        p = v.astype(np.float64) ** 2
        _, k, vals = _table_code(v)
        cost = float(np.sum(counts * np.log2(p.sum() / p))) + _eg_len(vals, k)
        if best is None or cost < best[0]:
            best = (cost, v)
    return best[1]


_SLICE = 1 << 22  # symbols counted at once


def _encode_ans(x: np.ndarray) -> bytes:
    """Method byte (+ table codes' orders), split exp-Golomb table, rANS words."""
    # x holds ints in [0, 2**16): count them in a table, not by sorting (np.unique took ~80 bytes a symbol), a
    # slice at a time (bincount widens its input to int64)
    size = int(x.max()) + 1
    counts = sum(np.bincount(x[i:i + _SLICE], minlength=size) for i in range(0, len(x), _SLICE))
    present = np.flatnonzero(counts)
    counts, m = counts[present], len(present)
    if m == present[-1] + 1:  # every symbol up to the largest occurs: the symbols are their own indices
        inverse = x
    else:
        lut = np.zeros(present[-1] + 1, np.int32)
        lut[present] = np.arange(m, dtype=np.int32)
        inverse = lut[x]
    gaps = np.diff(present, prepend=-1) - 1
    kg = 3 if present[-1] == m - 1 else min(range(3), key=lambda k: _eg_len(gaps, k))
    v = _sqrt_table(counts)
    delta, kv, vals = _table_code(v)
    bits = np.concatenate([_eg_write(np.array([m - 2]), 0),
                           _eg_write(gaps, kg) if kg < 3 else np.zeros(0, np.uint8),
                           _eg_write(vals, kv)])
    model = constriction.stream.model.Categorical(v.astype(np.float64) ** 2, perfect=False)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(np.ascontiguousarray(inverse, dtype=np.int32), model)
    head = (_ANS + delta) << 5 | kg << 3 | kv
    return bytes([head]) + np.packbits(bits).tobytes() + _ans_bytes(coder)


def encode_symbols(symbols: np.ndarray) -> bytes:
    """Code a 1-D array of ints in [0, 2**16) with the cheapest of constant / bit packing /
    ANS with the empirical table. The first byte tags the method; the count is not stored."""
    x = np.asarray(symbols).ravel()
    if len(x) and (x.min() < 0 or x.max() >= _MAX_ALPHABET):
        raise ValueError("symbols must lie in [0, 2**16)")
    if len(x) == 0 or x.min() == x.max():                # symbol < 31 fits in the method byte
        sym = int(x[0]) if len(x) else 0
        return bytes([_CONST << 5 | min(sym, 31)]) + (sym.to_bytes(2, "little") if sym >= 31 else b"")
    x = x.astype(np.int32, copy=False)  # 4 bytes a symbol: a large tensor's codes are coded in one stream
    w = int(x.max()).bit_length()
    coded = _encode_ans(x)
    if len(coded) < 1 + -(-len(x) * w // 8):  # shorter than bit packing would be
        return coded
    bits = np.unpackbits(x.astype(">u2").view(np.uint8)).reshape(-1, 16)[:, 16 - w:]
    return bytes([_PACK << 5 | w]) + np.packbits(bits).tobytes()


def decode_symbols(data: bytes, count: int) -> np.ndarray:
    """Inverse of `encode_symbols`; `count` is the number of symbols. Returns int64."""
    if count < 0:
        raise ValueError("negative count")
    if not data:
        raise CorruptStream("empty symbol stream")
    method, param, body = data[0] >> 5, data[0] & 31, bytes(data[1:])
    if method == _CONST:
        if len(body) != (2 if param == 31 else 0) or param == 31 and body[1] == 0 and body[0] < 31:
            raise CorruptStream("bad constant stream")
        return np.full(count, int.from_bytes(body, "little") if param == 31 else param, np.int64)
    if method == _PACK:
        if not 1 <= param <= 16 or len(body) != -(-count * param // 8):
            raise CorruptStream("bad bit-packed stream")
        bits = np.zeros((count, 16), dtype=np.uint8)
        bits[:, 16 - param:] = np.unpackbits(np.frombuffer(body, np.uint8))[:count * param].reshape(
            count, param)
        return np.packbits(bits, axis=1).view(">u2").ravel().astype(np.int64)
    if method not in (_ANS, _ANS + 1) or count < 2:
        raise CorruptStream("unknown symbol coding method")
    kg, kv = param >> 3, param & 7
    table_cap = 8 * (1 + 2 * min(count, _MAX_ALPHABET))   # an exp-Golomb code is <= 64 bits
    bits = np.unpackbits(np.frombuffer(body[:table_cap], dtype=np.uint8))
    m, pos = _eg_read(bits, 0, 1, 0)
    m = int(m[0]) + 2
    if m > min(count, _MAX_ALPHABET):
        raise CorruptStream("bad alphabet size")
    if kg == 3:
        present = np.arange(m)
    else:
        gaps, pos = _eg_read(bits, pos, m, kg)
        present = np.cumsum(gaps + 1) - 1
    vals, pos = _eg_read(bits, pos, m, kv)
    if method > _ANS:                                    # undo `_zigzag`
        vals = np.cumsum(np.where(vals & 1, -(vals + 1) // 2, vals // 2))
    v = vals + 1
    if present[-1] >= _MAX_ALPHABET or v.min() < 1 or v.max() > 1 << 30:
        raise CorruptStream("bad frequency table")
    p = v.astype(np.float64) ** 2
    payload = body[(pos + 7) // 8:]
    if 8 * len(payload) + 64 < count * np.log2(p.sum() / p.max()):
        raise CorruptStream("symbol stream too short for its count")
    coder = _guard(_ans_coder, payload)
    model = _guard(lambda: constriction.stream.model.Categorical(p, perfect=False))
    idx = _guard(coder.decode, model, count)
    if not coder.is_empty():
        raise CorruptStream("symbol stream has trailing or inconsistent data")
    return present[idx.astype(np.int64)]


# ---------------------------------------------------------------- sparsity masks

def _chunk_starts(cols: int) -> np.ndarray:
    """Start column of each column's chunk. Chunks grow geometrically (16, 64, 256, ... bits) so
    the row factor adapts early while a row costs the decoder only ~log(cols) calls."""
    starts = [0]
    while starts[-1] * _CHUNK_GROWTH + _FIRST_CHUNK < cols:
        starts.append(starts[-1] * _CHUNK_GROWTH + _FIRST_CHUNK)
    starts = np.array(starts)
    return starts[np.searchsorted(starts, np.arange(cols), side="right") - 1]


def _probs(i: Any, above: Any, ones: Any, seen: Any, prefix: Any, row_ones: Any, start: Any,
           tau: float, inv_beta: float) -> np.ndarray:
    """P(bit = 1) = column estimate x row factor. Column: its ones in the `i` rows above,
    shrunk towards the running density with prior strength tau. Row factor: ones so far in the
    row / ones expected there, prior strength beta. Called with arrays by the encoder and per
    chunk by the decoder: integer inputs and the same IEEE operations make both agree exactly."""
    dens = (ones + 0.5) / (seen + 1.0)
    a_col = 1.0 / (i + tau)
    b_glob = 1.0 - i * a_col
    q = above * a_col + dens * b_glob
    expected = prefix * a_col + (start * dens) * b_glob
    return np.clip(q * ((row_ones * inv_beta + 1.0) / (expected * inv_beta + 1.0)), _P_LO, _P_HI)


def _mask_probs(m: np.ndarray, configs: list[tuple[float, float]],
                every: int = 1) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """For every `every`-th row block of ~2**15 bits: (block, [P(bit = 1) per config]), from the
    counts the decoder has before each bit (vectorised form of the loop in `decode_mask`)."""
    rows, cols = m.shape
    starts = _chunk_starts(cols)
    step = max(1, (1 << 15) // cols)
    above0, ones0 = np.zeros(cols, dtype=np.int64), 0
    for i0 in range(0, rows, step):
        mi = m[i0:i0 + step].astype(np.int64)
        if (i0 // step) % every == 0:
            above = above0 + np.cumsum(mi, axis=0) - mi
            zero = np.zeros((len(mi), 1), dtype=np.int64)
            left = np.concatenate([zero, np.cumsum(mi, axis=1)], axis=1)
            ones = (ones0 + np.cumsum(left[:, -1]) - left[:, -1])[:, None] + left[:, starts]
            i = np.arange(i0, i0 + len(mi))[:, None]
            prefix = np.concatenate([zero, np.cumsum(above, axis=1)], axis=1)[:, starts]
            yield m[i0:i0 + step], [_probs(i, above, ones, i * cols + starts, prefix, left[:, starts], starts,
                              tau, 1.0 / beta) for tau, beta in configs]
        above0 = above0 + mi.sum(axis=0)
        ones0 += int(mi.sum())


def encode_mask(mask: np.ndarray) -> bytes:
    """Code a 2-D bool mask with the adaptive model of `_probs` and rANS; masks taller than
    wide are transposed so the decoder makes few, long calls. The encoder picks (tau, beta)
    from a small grid (on ~2**17 bits) and stores it in the method byte; nothing else is sent."""
    m = np.asarray(mask, dtype=bool)
    if m.ndim != 2:
        raise ValueError("mask must be 2-D")
    k = int(np.count_nonzero(m))
    if k == 0 or k == m.size:
        return bytes([_ZEROS if k == 0 else _ONES])
    m = np.ascontiguousarray(m.T if m.shape[0] > m.shape[1] else m)
    every = -(-m.size // _SEARCH_ELEMENTS)
    cost = np.zeros(len(_CONFIGS))
    for blk, probs in _mask_probs(m, _CONFIGS, every):
        cost -= [np.log2(np.where(blk, p, 1.0 - p)).sum() for p in probs]
    return _encode_adaptive(m, int(np.argmin(cost)))


def _encode_adaptive(m: np.ndarray, config: int) -> bytes:
    """Code an (already oriented) mask with model `config` of `_CONFIGS`."""
    blocks = list(_mask_probs(m, _CONFIGS[config:config + 1]))
    coder = constriction.stream.stack.AnsCoder()
    for blk, (p,) in reversed(blocks):                    # ANS is a stack: last block first
        coder.encode_reverse(blk.ravel().astype(np.int32), _BERNOULLI, p.ravel())
    return bytes([_ADAPTIVE + config]) + _ans_bytes(coder)


def decode_mask(data: bytes, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of `encode_mask` for a mask of the given (rows, cols): one constriction call per
    chunk of a row, updating the counts the model needs as it goes."""
    rows, cols = (int(s) for s in shape)
    if rows < 0 or cols < 0:
        raise ValueError("negative mask shape")
    if len(data) == 1 and data[0] in (_ZEROS, _ONES):
        return np.full((rows, cols), data[0] == _ONES, dtype=bool)
    if len(data) < 2 or not 0 <= data[0] - _ADAPTIVE < len(_CONFIGS) or rows * cols == 0:
        raise CorruptStream("bad mask stream header")
    transpose = rows > cols
    rows, cols = (cols, rows) if transpose else (rows, cols)
    tau, beta = _CONFIGS[data[0] - _ADAPTIVE]
    coder = _guard(_ans_coder, bytes(data[1:]))
    bounds = np.r_[np.unique(_chunk_starts(cols)), cols]
    out = np.zeros((rows, cols), dtype=bool)
    above = np.zeros(cols, dtype=np.int64)
    ones = 0
    for i in range(rows):
        prefix = np.concatenate([[0], np.cumsum(above)])
        row_ones = 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            p = _probs(i, above[a:b], ones, i * cols + a, prefix[a], row_ones, a, tau, 1.0 / beta)
            x = _guard(coder.decode, _BERNOULLI, p).astype(bool)
            out[i, a:b] = x
            k = int(np.count_nonzero(x))
            row_ones += k
            ones += k
        above += out[i]
    if not coder.is_empty():
        raise CorruptStream("mask stream has trailing or inconsistent data")
    return out.T if transpose else out
