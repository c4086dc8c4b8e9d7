"""Tests for the .mpz container: round trips, atomic writes, and damaged or malicious files."""
from __future__ import annotations

import gzip
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import pytest
import zstandard

import modelpress.errors as errors
from modelpress.errors import (
    ChecksumMismatch,
    FormatError,
    HeaderTooLarge,
    InvalidHeader,
    InvalidOffset,
    NotAModelpressFile,
    TruncatedFile,
    UnsupportedVersion,
)
from modelpress.format.container import (
    MAGIC,
    MAX_HEADER_BYTES,
    MAX_HEADER_NESTS,
    VERSION,
    container_overhead,
    read_container,
    write_container,
)

MANIFEST = {
    "model": "lenet-300-100",
    "layers": [{"name": f"fc{i}", "shape": [300, 784], "bits": 4, "scale": 0.0123} for i in (1, 2)],
    "floats": [0.1, -0.0, 1e308, 5e-324, 1.0], "big": 2**70, "flags": [True, False, None],
    "unicode": "é ✓ \u2028", "empty": {},
}


def _streams(seed: int = 0, size: int = 800) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {"fc1.weight/codes": rng.randbytes(size), "fc1.weight/scales": rng.randbytes(size // 4),
            "fc2.bias": b"", "fc2.weight/mask": bytes(size)}


def _frame(raw: bytes, *, content_size: bool = True) -> bytes:
    """A magicless zstd frame, as the container stores its header."""
    params = zstandard.ZstdCompressionParameters.from_level(
        3, format=zstandard.FORMAT_ZSTD1_MAGICLESS, write_content_size=content_size)
    return zstandard.ZstdCompressor(compression_params=params).compress(raw)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _craft(zheader: bytes, payload: bytes = b"", *, length: bytes | None = None) -> bytes:
    """A file with a valid header checksum around an arbitrary (possibly malicious) header."""
    body = MAGIC + bytes([VERSION]) + (_varint(len(zheader)) if length is None else length) + zheader
    return body + zlib.crc32(body).to_bytes(4, "little") + payload


def _doc(doc, payload: bytes = b"") -> bytes:
    return _craft(_frame(json.dumps(doc, separators=(",", ":")).encode()), payload)


def _entry(name: str, data: bytes) -> list:
    return [name, len(data), zlib.crc32(data)]


# -- round trips -----------------------------------------------------------------------------------

def test_round_trip_path_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "model.mpz"
    streams = _streams()
    written = write_container(path, MANIFEST, streams)
    assert written == path.stat().st_size
    assert written == container_overhead(MANIFEST, streams) + sum(map(len, streams.values()))
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes())):
        manifest, got = read_container(source)
        assert manifest == MANIFEST and got == streams
        assert list(got) == list(streams)  # table order is kept
        assert json.dumps(manifest, sort_keys=True) == json.dumps(MANIFEST, sort_keys=True)  # -0.0
    assert os.listdir(tmp_path) == ["model.mpz"]


def test_round_trip_empty_and_buffer_types(tmp_path: Path) -> None:
    path = tmp_path / "e.mpz"
    assert write_container(path, {}, {}) == container_overhead({}, {})
    assert read_container(path) == ({}, {})
    write_container(path, {"a": 1}, {"x": bytearray(b"ab"), "y": memoryview(b"cd")})
    assert read_container(path) == ({"a": 1}, {"x": b"ab", "y": b"cd"})


def test_overhead_is_small() -> None:
    assert container_overhead({}, {}) == 22  # docs/format.md: 4+1+1+5+7+4
    assert container_overhead({}, {f"s{i}": b"" for i in range(10)}) <= 80
    names = {f"layer{i}.weight/codes": os.urandom(100) for i in range(10)}
    assert container_overhead({}, names) <= 10 * 20


@pytest.mark.parametrize("manifest, exc", [
    ({"x": float("nan")}, ValueError), ({"x": float("inf")}, ValueError),
    ({"x": (1, 2)}, ValueError), ({1: "a"}, ValueError), ({"x": object()}, ValueError),
    ({"x": "\ud800"}, ValueError), ([1], TypeError), ({"x": b"bytes"}, ValueError),
])
def test_write_rejects_non_json_manifest(tmp_path: Path, manifest, exc) -> None:
    with pytest.raises(exc):
        write_container(tmp_path / "m.mpz", manifest, {})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("streams", [{1: b"x"}, {"a": "text"}, {"a": [1, 2]}, [("a", b"")]])
def test_write_rejects_bad_streams(tmp_path: Path, streams) -> None:
    with pytest.raises(TypeError):
        write_container(tmp_path / "m.mpz", {}, streams)


@pytest.mark.parametrize("manifest", [{"pad": " " * MAX_HEADER_BYTES},
                                      {"x": [[]] * MAX_HEADER_NESTS}])
def test_write_rejects_header_over_cap(tmp_path: Path, manifest: dict) -> None:
    with pytest.raises(ValueError, match="caps"):
        write_container(tmp_path / "m.mpz", manifest, {})
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("unit", [b"[],", b"{},", b"1.5,", b'"ab",', b"123456789012,"])
def test_worst_headers_within_caps_read_fast(unit: bytes) -> None:
    """A tiny crafted file whose header decompresses to the most costly JSON the caps allow."""
    n = min((MAX_HEADER_BYTES - 20) // len(unit), MAX_HEADER_NESTS - 4)
    data = _craft(_frame(b'[{"x":[' + unit * n + b"0]},[]]"))
    assert len(data) < 100_000
    start = time.perf_counter()
    manifest, streams = read_container(data)
    assert time.perf_counter() - start < 0.5
    assert len(manifest["x"]) == n + 1 and streams == {}


# -- atomic writes ---------------------------------------------------------------------------------

def test_failed_write_keeps_old_file_and_removes_temp(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "m.mpz"
    write_container(path, {"v": 1}, {"a": b"old"})

    def broken_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_container(path, {"v": 2}, {"a": b"new"})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["m.mpz"]
    assert read_container(path) == ({"v": 1}, {"a": b"old"})


@pytest.mark.skipif(os.name != "posix", reason="umask is POSIX")
def test_written_file_respects_umask(tmp_path: Path) -> None:
    umask = os.umask(0o027)
    try:
        write_container(tmp_path / "m.mpz", {}, {})
    finally:
        os.umask(umask)
    assert (tmp_path / "m.mpz").stat().st_mode & 0o777 == 0o640


MAKE = """
def make(gen):
    return ({"gen": gen, "note": "x" * (gen % 7)},
            {"a": gen.to_bytes(4, "little") * 750_000, "b": bytes([gen % 251]) * 2_000_000, "c": b""})
"""
CHILD = MAKE + """
import os, sys, types
path, package, gen = sys.argv[1], sys.argv[2], 1
for name, folder in (("modelpress", package), ("modelpress.format", os.path.join(package, "format"))):
    sys.modules[name] = types.ModuleType(name)  # skip the package __init__s: they import torch
    sys.modules[name].__path__ = [folder]
from modelpress.format.container import write_container
write_container(path, *make(gen))
print("ready", flush=True)
while True:
    gen += 1
    write_container(path, *make(gen))
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_during_save_leaves_a_loadable_file(tmp_path: Path) -> None:
    namespace: dict = {}
    exec(MAKE, namespace)
    make = namespace["make"]
    target = tmp_path / "model.mpz"
    write_container(target, *make(0))
    package = str(Path(errors.__file__).resolve().parent)
    rng, seen, leftovers = random.Random(1234), set(), 0
    for _ in range(10):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(target), package],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready = child.stdout.readline()
        if ready != b"ready\n":
            child.kill()
            pytest.fail(f"child did not start: {child.communicate()[1].decode()[-2000:]}")
        time.sleep(rng.uniform(0.0, 0.25))
        child.send_signal(signal.SIGKILL)
        child.communicate()
        assert child.returncode == -signal.SIGKILL
        manifest, streams = read_container(target)
        assert (manifest, streams) == make(manifest["gen"])
        seen.add(manifest["gen"])
        leftovers = max(leftovers, len(os.listdir(tmp_path)) - 1)
    assert len(seen) > 1  # saves did complete between kills
    assert leftovers > 0  # and some kills landed mid-save, leaving only a stray temp file
    # the next save by a later process removes the strays
    saver = CHILD.replace('print("ready", flush=True)\nwhile True:', "while False:")
    subprocess.run([sys.executable, "-c", saver, str(target), package], check=True, timeout=60)
    assert os.listdir(tmp_path) == ["model.mpz"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs POSIX locks")
def test_a_save_removes_only_stale_temp_files_of_its_target(tmp_path: Path) -> None:
    target = tmp_path / "model.mpz"
    names = {"stale": ".model.mpz.deadbeef.tmp", "fresh": ".model.mpz.cafebabe.tmp",
             "locked": ".model.mpz.0badf00d.tmp", "other_target": ".other.mpz.deadbeef.tmp",
             "other_pattern": ".model.mpz.xyz.tmp", "user_file": "model.mpz.deadbeef.tmp"}
    for key, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if key != "fresh":  # written before this process started
            os.utime(tmp_path / name, (time.time() - 3600, time.time() - 3600))
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'rb'); fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True)\n"
                               "time.sleep(60)", str(tmp_path / names["locked"])], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        write_container(target, {"x": 1}, {"s": b"abc"})
    finally:
        holder.kill()
        holder.wait()
    left = set(os.listdir(tmp_path))
    assert names["stale"] not in left
    assert left == {"model.mpz"} | {n for k, n in names.items() if k != "stale"}


# -- damaged and foreign files ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_file(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("small") / "small.mpz"
    write_container(path, MANIFEST, _streams(size=900))
    data = path.read_bytes()
    assert 2000 <= len(data) <= 5000
    return data


def test_every_single_bit_flip_is_refused(small_file: bytes) -> None:
    data, missed = bytearray(small_file), []
    for i in range(len(data)):
        for bit in range(8):
            data[i] ^= 1 << bit
            try:
                read_container(data)
                missed.append((i, bit))
            except FormatError:
                pass
            data[i] ^= 1 << bit
    assert missed == []
    assert read_container(bytes(data)) == (MANIFEST, _streams(size=900))


def test_every_truncation_is_refused(small_file: bytes, tmp_path: Path) -> None:
    for n in range(len(small_file)):
        with pytest.raises(FormatError):
            read_container(small_file[:n])
    path = tmp_path / "cut.mpz"
    for n in (0, 3, 5, 20, len(small_file) // 2, len(small_file) - 1):
        path.write_bytes(small_file[:n])
        with pytest.raises(FormatError, match="cut.mpz"):
            read_container(path)


def _safetensors() -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    return len(header).to_bytes(8, "little") + header + bytes(8)


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("archive/data.pkl", b"\x80\x04K\x01.")
    return buf.getvalue()


@pytest.mark.parametrize("name, data", [
    ("empty", b""), ("png", b"\x89PNG\r\n\x1a\n" + bytes(64)), ("zip", _zip()),
    ("text", b"hello, this is a text file\n"), ("safetensors", _safetensors()),
    ("gzip", gzip.compress(b"data")), ("zstd", zstandard.compress(b"data")),
    ("pickle", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01."), ("one byte", b"M"),
])
def test_foreign_files_are_not_modelpress(tmp_path: Path, name: str, data: bytes) -> None:
    path = tmp_path / "foreign.bin"
    path.write_bytes(data)
    with pytest.raises(NotAModelpressFile, match="foreign.bin"):
        read_container(path)


@pytest.mark.skipif(os.name != "posix", reason="FIFOs are POSIX")
def test_non_regular_files_are_refused_without_hanging(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    for path in (tmp_path / "fifo", tmp_path):
        with pytest.raises(NotAModelpressFile, match="regular"):
            read_container(path)


def _damaged(valid: bytes) -> dict[str, tuple[bytes, type[FormatError], str]]:
    """name -> (file bytes, expected error class, message fragment)."""
    a, b = b"a" * 10, b"b" * 5
    ok = [_entry("a", a), _entry("b", b)]
    start = len(MAGIC) + 1 + len(_varint(len(valid)))
    size_frame = bytes([0xE0]) + (2**40).to_bytes(8, "little") + bytes([0x11, 0, 0]) + b"[]"
    bad_data = bytearray(_frame(b"[{},[]]" * 50))
    bad_data[-3] ^= 0xFF
    return {
        "truncated": (valid[:-7], TruncatedFile, "fc2.weight/mask' needs bytes"),
        "bit flip in stream": (valid[:-1] + bytes([valid[-1] ^ 4]), ChecksumMismatch,
                               "stream 'fc2.weight/mask' checksum mismatch"),
        "bit flip in header": (valid[:start + 3] + bytes([valid[start + 3] ^ 1]) + valid[start + 4:],
                               ChecksumMismatch, "header checksum mismatch"),
        "huge declared header": (MAGIC + b"\x01\xff\xff\xff\x7f" + bytes(20), HeaderTooLarge, "cap"),
        "header length field too long": (MAGIC + b"\x01" + b"\xff" * 8, HeaderTooLarge, "longer"),
        "header past end of file": (MAGIC + b"\x01\xff\x7f" + bytes(20), TruncatedFile, "truncated"),
        "non-minimal header length": (_craft(_frame(b"[{},[]]"), length=b"\x8e\x00"), InvalidHeader,
                                      "minimally"),
        "huge declared content size": (_craft(size_frame), HeaderTooLarge, "decompresses to 1099511627776"),
        "zstd bomb": (_craft(_frame(b"[{},[]" + b" " * MAX_HEADER_BYTES + b"]")), HeaderTooLarge, "cap"),
        "unknown content size": (_craft(_frame(b"[{},[]]", content_size=False)), InvalidHeader,
                                 "declare its decompressed size"),
        "not a zstd frame": (_craft(b""), InvalidHeader, "not a zstd frame"),
        "corrupt zstd data": (_craft(bytes(bad_data)), InvalidHeader, "decompress"),
        "data after zstd frame": (_craft(_frame(b"[{},[]]") + b"xx"), InvalidHeader, "decompress"),
        "non-JSON header": (_craft(_frame(b"\x00\x01 not json")), InvalidHeader, "not valid JSON"),
        "non-UTF-8 header": (_craft(_frame(b'[{"\xff":1},[]]')), InvalidHeader, "not valid JSON"),
        "NaN in header": (_craft(_frame(b'[{"x":NaN},[]]')), InvalidHeader, "NaN"),
        "duplicate JSON key": (_craft(_frame(b'[{"x":1,"x":2},[]]')), InvalidHeader, "duplicate key"),
        "too many arrays": (_craft(_frame(b'[{"x":[' + b"[]," * MAX_HEADER_NESTS + b"0]},[]]")),
                            HeaderTooLarge, "arrays and objects"),
        "deep nesting": (_craft(_frame(b"[" * 60_000)), InvalidHeader, "not valid JSON"),
        "huge integer": (_craft(_frame(b"[{},[[\"a\"," + b"9" * 10_000 + b",0]]]")), InvalidHeader,
                         "not valid JSON"),
        "top level object": (_doc({"manifest": {}, "streams": []}), InvalidHeader, "JSON array"),
        "manifest not an object": (_doc([[], []]), InvalidHeader, "JSON array"),
        "table not a list": (_doc([{}, {}]), InvalidHeader, "JSON array"),
        "entry wrong arity": (_doc([{}, [["a", 10]]], a), InvalidHeader, "entry 0"),
        "entry name not str": (_doc([{}, [[1, 10, 0]]], a), InvalidHeader, "entry 0"),
        "negative length": (_doc([{}, [["a", -1, 0]]]), InvalidOffset, "stream 'a' has length -1"),
        "length as string": (_doc([{}, [["a", "10", 0]]], a), InvalidOffset, "stream 'a' has length"),
        "length as bool": (_doc([{}, [["a", True, 0]]], b"a"), InvalidOffset, "stream 'a' has length"),
        "length as float": (_doc([{}, [["a", 10.0, 0]]], a), InvalidOffset, "stream 'a' has length"),
        "crc out of range": (_doc([{}, [["a", 10, 2**32]]], a), InvalidHeader, "crc32"),
        "duplicate stream name": (_doc([{}, [ok[0], ok[0]]], a + a), InvalidHeader, "appears twice"),
        "huge declared stream length": (_doc([{}, [["a", 10**18, 0]]], a), InvalidOffset,
                                        "more than the whole file"),
        "stream past end": (_doc([{}, ok], a + b[:-1]), TruncatedFile, "stream 'b' needs bytes"),
        "trailing garbage": (valid + b"\x00", TruncatedFile, "1 unexpected bytes"),
        "wrong magic": (b"MPZ2" + valid[4:], NotAModelpressFile, "not a modelpress"),
        "future version": (MAGIC + b"\x02" + valid[5:], UnsupportedVersion, "version 2"),
        "version zero": (MAGIC + b"\x00" + valid[5:], UnsupportedVersion, "version 0"),
        "crafted wrong crc": (_doc([{}, [ok[0], ["b", 5, 123]]], a + b), ChecksumMismatch,
                              "stream 'b' checksum mismatch"),
    }


def test_crafting_helpers_make_valid_files() -> None:
    """The damaged files below differ from a valid crafted file only by what they name."""
    a, b = b"a" * 10, b"b" * 5
    data = _doc([{"k": "v"}, [_entry("a", a), _entry("b", b)]], a + b)
    assert read_container(data) == ({"k": "v"}, {"a": a, "b": b})


def test_damaged_files(small_file: bytes, tmp_path: Path) -> None:
    folder = tmp_path / "damaged"
    folder.mkdir()
    for name, (data, exc, fragment) in _damaged(small_file).items():
        path = folder / (name.replace(" ", "_") + ".mpz")
        path.write_bytes(data)
        tracemalloc.start()
        start = time.perf_counter()
        try:
            with pytest.raises(exc) as info:
                read_container(path)
            elapsed = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert type(info.value) is exc, (name, info.value)
        assert fragment in str(info.value), (name, str(info.value))
        assert path.name in str(info.value), name
        assert elapsed < 0.5, (name, elapsed)
        assert peak < 2**20 + len(data), (name, peak)
