"""Tests for modelpress.format.entropy: exact round trips, efficiency against the empirical
entropy, mask model gains on structured masks, speed, and safety on damaged input."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from modelpress.errors import CorruptStream
from modelpress.format import entropy as E
from modelpress.format.entropy import (decode_mask, decode_symbols, encode_mask, encode_symbols,
                                       entropy_bits, mask_entropy_bits)


def _zipf(k: int, s: float = 1.2) -> np.ndarray:
    p = 1.0 / np.arange(1, k + 1) ** s
    return p / p.sum()


def _bell(k: int, width: float, laplace: bool = False) -> np.ndarray:
    x = np.abs(np.arange(k) - (k - 1) / 2) / width
    p = np.exp(-x) if laplace else np.exp(-0.5 * x * x)
    return p / p.sum()


DISTS = {
    "binary p=.35": np.array([0.35, 0.65]),
    "binary p=.1": np.array([0.9, 0.1]),
    "geometric/4": 0.65 ** np.arange(4),
    "zipf/8": _zipf(8),
    "geometric/16": 0.7 ** np.arange(16),
    "zipf/32": _zipf(32),
    "gauss/64": _bell(64, 6.0),
    "laplace/64": _bell(64, 3.0, laplace=True),
    "zipf/64": _zipf(64),
}


def _draw(p: np.ndarray, n: int, seed: int) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    return np.random.default_rng(seed).choice(len(p), n, p=p / p.sum())


def _kt_bits(x: np.ndarray, alphabet: int) -> float:
    """Code length of the adaptive Krichevsky-Trofimov code: a universal-coding yardstick."""
    counts = np.bincount(x, minlength=alphabet)
    lg = math.lgamma
    nats = sum(lg(c + 0.5) - lg(0.5) for c in counts) + lg(alphabet / 2) - lg(len(x) + alphabet / 2)
    return -nats / math.log(2)


def _packed_len(x: np.ndarray) -> int:
    return 1 + -(-len(x) * max(1, int(x.max()).bit_length()) // 8)


# ----------------------------------------------------------------------- symbols

@pytest.mark.parametrize("n", [2_000, 20_000, 200_000])
@pytest.mark.parametrize("name", list(DISTS))
def test_symbols_near_entropy(name: str, n: int) -> None:
    x = _draw(DISTS[name], n, seed=n + len(name))
    data = encode_symbols(x)
    np.testing.assert_array_equal(decode_symbols(data, n), x)
    bits, h = 8 * len(data), entropy_bits(x)
    if n >= 20_000:
        assert bits <= 1.02 * h, (bits / h)
    else:
        # At 2k symbols ~40 fixed bits (method byte, ANS flush, alignment) plus the table can
        # exceed 2% of a small entropy; the adaptive KT code (near-optimal universal code,
        # alphabet known for free) pays about as much over the empirical entropy here.
        assert bits <= max(1.02 * h, _kt_bits(x, len(DISTS[name])) + 64), (bits / h)
        assert bits <= 1.035 * h + 48, (bits / h)


@pytest.mark.parametrize("n", [1, 2, 10, 100])
@pytest.mark.parametrize("alphabet", [2, 5, 64, 1000, 1 << 16])
def test_small_streams_round_trip_and_stay_small(n: int, alphabet: int) -> None:
    rng = np.random.default_rng(n * alphabet)
    for x in (rng.integers(0, alphabet, n), np.minimum(rng.geometric(0.3, n) - 1, alphabet - 1)):
        data = encode_symbols(x)
        np.testing.assert_array_equal(decode_symbols(data, n), x)
        assert len(data) <= _packed_len(x) + 2


def test_symbol_edge_cases() -> None:
    cases = [np.zeros(0, np.int64), np.array([7]), np.full(1000, 65535), np.array([0, 65535] * 50),
             np.arange(1 << 16), np.random.default_rng(0).integers(0, 1 << 16, 100_000),
             np.r_[np.zeros(5000, int), [40000]], np.array([3, 3, 3, 9], dtype=np.uint16)]
    for x in cases:
        data = encode_symbols(x)
        y = decode_symbols(data, len(x))
        assert y.dtype == np.int64
        np.testing.assert_array_equal(y, x)
    assert len(encode_symbols(np.array([7] * 9))) == 1 and len(encode_symbols(np.array([99]))) == 3
    for bad in (np.array([-1, 2]), np.array([1 << 16])):
        with pytest.raises(ValueError):
            encode_symbols(bad)


def test_entropy_helpers() -> None:
    assert entropy_bits(np.array([0, 1, 0, 1])) == pytest.approx(4.0)
    assert entropy_bits(np.array([5, 5, 5])) == 0.0
    assert entropy_bits(np.zeros(0, int)) == 0.0
    assert mask_entropy_bits(np.array([[1, 0], [0, 0]], bool)) == pytest.approx(4 * 0.8112781)
    assert mask_entropy_bits(np.ones((3, 3), bool)) == 0.0


# ----------------------------------------------------------------------- masks

def iid_mask(rows: int, cols: int, density: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, cols)) < density


def structured_mask(rows: int, cols: int, density: float, seed: int) -> np.ndarray:
    """Beta-distributed row and column densities, 30% dead columns, 10% dead rows."""
    rng = np.random.default_rng(seed)
    col = rng.beta(0.7, 2.0, cols) * (rng.random(cols) > 0.3)
    row = rng.beta(2.0, 2.0, rows) * (rng.random(rows) > 0.1)
    p = np.outer(row, col)
    return rng.random((rows, cols)) < np.clip(p * density / p.mean(), 0, 1)


def mnist_mask(rows: int, density: float, seed: int) -> np.ndarray:
    """First layer on MNIST: border pixels (columns) nearly always pruned, neuron rates vary."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    col = (np.clip(1 - np.hypot(yy - 13.5, xx - 13.5) / 14, 0, 1) ** 2).ravel() * rng.random(784)
    p = np.outer(rng.gamma(2.0, 1.0, rows), col)
    return rng.random((rows, 784)) < np.clip(p * density / p.mean(), 0, 1)


def _gap_bits(mask: np.ndarray) -> int:
    """The alternative design: gaps between nonzeros (row-major) with encode_symbols."""
    idx = np.flatnonzero(mask)
    gaps = np.diff(idx, prepend=-1) - 1
    assert gaps.max() < 1 << 16
    data = encode_symbols(gaps)
    np.testing.assert_array_equal(decode_symbols(data, len(gaps)), gaps)
    return 8 * len(data)


@pytest.mark.parametrize("shape,density", [((300, 784), 0.005), ((300, 784), 0.02),
                                           ((300, 784), 0.1), ((300, 784), 0.3),
                                           ((1000, 500), 0.05), ((512, 256), 0.01)])
def test_iid_mask_near_bound(shape: tuple[int, int], density: float) -> None:
    m = iid_mask(*shape, density, seed=shape[0] + int(1000 * density))
    data = encode_mask(m)
    np.testing.assert_array_equal(decode_mask(data, shape), m)
    assert 8 * len(data) <= 1.03 * mask_entropy_bits(m)
    assert 8 * len(data) <= _gap_bits(m)


@pytest.mark.parametrize("kind,density,ratio", [
    ("structured", 0.005, 0.97), ("structured", 0.02, 0.9), ("structured", 0.1, 0.75),
    ("structured", 0.3, 0.5), ("mnist", 0.01, 0.92), ("mnist", 0.05, 0.77), ("mnist", 0.2, 0.6)])
def test_structured_mask_beats_iid_bound(kind: str, density: float, ratio: float) -> None:
    seed = int(density * 1000)
    if kind == "structured":
        m = structured_mask(300, 784, density, seed)
    else:
        m = mnist_mask(300, density, seed)
    data = encode_mask(m)
    np.testing.assert_array_equal(decode_mask(data, m.shape), m)
    assert 8 * len(data) <= ratio * mask_entropy_bits(m)
    assert 8 * len(data) < 0.95 * _gap_bits(m)


def test_mask_transposed_and_conv_shapes() -> None:
    for shape in [(784, 300), (64, 27), (27, 64), (2000, 9), (3, 4000)]:
        m = structured_mask(*shape, 0.1, seed=shape[0])
        data = encode_mask(m)
        np.testing.assert_array_equal(decode_mask(data, shape), m)
        assert 8 * len(data) <= 1.03 * mask_entropy_bits(m) + 64


def test_mask_edge_cases() -> None:
    rng = np.random.default_rng(5)
    cases = [np.zeros((0, 0), bool), np.zeros((0, 7), bool), np.zeros((7, 0), bool),
             np.zeros((30, 40), bool), np.ones((30, 40), bool), np.ones((1, 1), bool),
             np.zeros((1, 1), bool), rng.random((1, 5000)) < 0.05, rng.random((5000, 1)) < 0.05,
             np.eye(50, dtype=bool), np.array([[True, False]]), np.array([[False], [True]])]
    for m in cases:
        data = encode_mask(m)
        out = decode_mask(data, m.shape)
        assert out.dtype == bool and out.shape == m.shape
        np.testing.assert_array_equal(out, m)
    assert len(encode_mask(np.zeros((300, 784), bool))) == 1
    assert len(encode_mask(np.ones((300, 784), bool))) == 1
    with pytest.raises(ValueError):
        encode_mask(np.zeros(5, bool))


def test_every_model_config_round_trips() -> None:
    """Encoder (vectorised) and decoder (row loop) must compute identical probabilities."""
    m = structured_mask(40, 300, 0.1, seed=3)
    for config in range(len(E._CONFIGS)):
        data = E._encode_adaptive(m, config)
        np.testing.assert_array_equal(decode_mask(data, m.shape), m)


# ----------------------------------------------------------------------- speed

def test_speed() -> None:
    m = structured_mask(300, 784, 0.05, seed=1)
    x = _draw(_zipf(16), 20_000, seed=1)
    encode_mask(m), encode_symbols(x)                        # warm-up
    t = time.perf_counter()
    decode_mask(encode_mask(m), m.shape)
    t_mask = time.perf_counter() - t
    t = time.perf_counter()
    decode_symbols(encode_symbols(x), len(x))
    t_sym = time.perf_counter() - t
    assert t_mask < 0.5 and t_sym < 0.5, (t_mask, t_sym)


# ----------------------------------------------------------------------- safety

def _random_bytes(rng: np.random.Generator, max_len: int) -> bytes:
    return rng.integers(0, 256, rng.integers(1, max_len)).astype(np.uint8).tobytes()


def _decodes_or_raises(fn: Callable[..., Any], *args: Any) -> None:
    """Damaged input must raise CorruptStream quickly; an undetectable change may decode."""
    t = time.perf_counter()
    try:
        fn(*args)
    except CorruptStream:
        pass
    assert time.perf_counter() - t < 1.0


def _valid_symbol_streams() -> list[tuple[bytes, int]]:
    xs = [_draw(_zipf(16), 5000, 1), _draw([0.9, 0.1], 3000, 2), np.array([4] * 10),
          np.random.default_rng(3).integers(0, 1 << 16, 300), _draw(_zipf(64), 2000, 4)]
    return [(encode_symbols(x), len(x)) for x in xs]


def test_symbols_truncated_raise() -> None:
    for data, n in _valid_symbol_streams():
        cuts = {c for c in [*range(40), *range(len(data) - 40, len(data))] if 0 <= c < len(data)}
        for cut in sorted(cuts):
            with pytest.raises(CorruptStream):
                decode_symbols(data[:cut], n)


def test_symbols_random_and_flipped_bytes() -> None:
    rng = np.random.default_rng(11)
    for _ in range(300):
        data = _random_bytes(rng, 64)
        for n in (1, 100, 1_000_000):
            _decodes_or_raises(decode_symbols, data, n)
    for data, n in _valid_symbol_streams():
        for _ in range(40):
            b = bytearray(data)
            b[rng.integers(len(b))] ^= 1 << rng.integers(8)
            _decodes_or_raises(decode_symbols, bytes(b), n)


def _ans_stream(m_bits: np.ndarray, tail: bytes = b"\x01\x02\x03\x04", head: int = 0x40) -> bytes:
    return bytes([head]) + np.packbits(m_bits).tobytes() + tail


def test_symbols_crafted_tables_raise() -> None:
    eg = E._eg_write
    # method 5..7 does not exist
    for head in (0xA0, 0xC0, 0xE0):
        with pytest.raises(CorruptStream):
            decode_symbols(bytes([head, 1, 2, 3]), 10)
    # declared alphabet of 2**32 (also with room for its bits), and more symbols than the count
    for m in (1 << 32, 1 << 20, 50):
        for tail in (b"\x01\x02\x03\x04", b"\x00" * 12 + b"\x01"):
            with pytest.raises(CorruptStream):
                decode_symbols(_ans_stream(eg(np.array([m - 2]), 0), tail), 40)
    # gaps that push a symbol past 2**16
    bits = np.concatenate([eg(np.array([0]), 0), eg(np.array([70000, 0]), 0),
                           eg(np.array([0, 0]), 0)])
    with pytest.raises(CorruptStream):
        decode_symbols(_ans_stream(bits, head=0x40), 40)
    # delta-coded table whose frequencies go to zero / negative
    bits = np.concatenate([eg(np.array([0]), 0), eg(np.array([0, 3]), 0)])
    with pytest.raises(CorruptStream):
        decode_symbols(_ans_stream(bits, head=0x78), 40)
    # valid table, payload far too short for the declared count
    bits = np.concatenate([eg(np.array([0]), 0), eg(np.array([30, 0]), 0)])
    with pytest.raises(CorruptStream):
        decode_symbols(_ans_stream(bits, head=0x58), 10_000_000)
    # payload ending in a zero word, and a bit-packed stream of the wrong length
    with pytest.raises(CorruptStream, match="zero word"):
        decode_symbols(_ans_stream(bits, tail=b"\x01\x00\x00\x00\x00", head=0x58), 10)
    with pytest.raises(CorruptStream):
        decode_symbols(bytes([0x24]) + b"\xff" * 3, 10)


def test_symbols_every_bit_flip() -> None:
    """Flipping any single bit (header, table or payload) is almost always detected: the ANS
    state must come back exactly to its start after `count` symbols."""
    x = _draw(_zipf(8), 1000, seed=9)
    data = encode_symbols(x)
    undetected = 0
    for i in range(8 * len(data)):
        b = bytearray(data)
        b[i // 8] ^= 1 << (i % 8)
        try:
            undetected += not np.array_equal(decode_symbols(bytes(b), len(x)), x)
        except CorruptStream:
            pass
    assert undetected <= 0.01 * 8 * len(data)


def test_mask_damaged_raise() -> None:
    rng = np.random.default_rng(12)
    shape = (30, 100)
    data = encode_mask(structured_mask(*shape, 0.1, seed=1))
    for cut in sorted({*range(8), *rng.integers(0, len(data), 30).tolist(), len(data) - 1}):
        with pytest.raises(CorruptStream):
            decode_mask(data[:cut], shape)
    bad_config = bytes([2 + len(E._CONFIGS)]) + data[1:]
    for bad in (b"\xff", b"\x02", bad_config, b"\x02\x00\x00", data + b"\x01", data[:1] + data):
        with pytest.raises(CorruptStream):
            decode_mask(bad, shape)
    for _ in range(100):
        junk = _random_bytes(rng, 200)
        with pytest.raises(CorruptStream):
            decode_mask(bytes([2 + rng.integers(len(E._CONFIGS))]) + junk, shape)
        _decodes_or_raises(decode_mask, junk, shape)
    for _ in range(30):
        b = bytearray(data)
        b[rng.integers(1, len(b))] ^= 1 << rng.integers(8)
        _decodes_or_raises(decode_mask, bytes(b), shape)
