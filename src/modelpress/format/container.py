"""The .mpz container: a checksummed, zstd-compressed JSON header followed by raw byte streams.

The byte layout, the checks done on read (in order) and the limits are specified in docs/format.md.
Nothing read from a file is executed, and no size read from a file is allocated before it has been
checked against the cap and against the real size of the file.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import stat
import tempfile
import time
import zlib
from typing import BinaryIO, Iterable, Iterator

import zstandard

try:
    import fcntl
except ImportError:  # Windows: stale temp files are told by age alone
    fcntl = None

from modelpress.errors import (ChecksumMismatch, FormatError, HeaderTooLarge, InvalidHeader,
                               InvalidOffset, NotAModelpressFile, TruncatedFile, UnsupportedVersion)

__all__ = ["MAGIC", "VERSION", "MAX_HEADER_BYTES", "MAX_HEADER_NESTS", "write_container",
           "read_container", "container_overhead", "StreamSpool"]

MAGIC = b"\x89MPZ"
VERSION = 1
MAX_HEADER_BYTES = 4 * 1024 * 1024  # cap on the header, compressed and decompressed
MAX_HEADER_NESTS = 2**16  # cap on the '[' and '{' bytes in the header JSON: containers cost most
_LEN_MAX_BYTES = 4  # the header length is a LEB128 varint of at most 4 bytes
_HEAD = len(MAGIC) + 1 + _LEN_MAX_BYTES  # bytes read before anything else is trusted
_ZSTD_FORMAT = zstandard.FORMAT_ZSTD1_MAGICLESS
_ZSTD_LEVEL = 19

Buffer = bytes | bytearray | memoryview
_STARTED = time.time()  # temp files older than this process can't be its own saves in progress


class StreamSpool:
    """Streams parked in an unnamed temporary file as they are made, so that a file larger than the memory
    at hand is assembled without holding its streams: `write_container(path, manifest, spool)` writes
    them in the order of `order` (default: as added)."""

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)
        self._at: dict[str, tuple[int, int, int]] = {}  # name -> (offset, length, crc32)
        self.order: list[str] = []

    def add(self, name: str, data: bytes | bytearray | memoryview) -> None:
        if not isinstance(name, str) or name in self._at:
            raise ValueError(f"stream name {name!r} is not a new str")
        view = memoryview(data).cast("B")
        self._at[name] = (self._file.seek(0, os.SEEK_END), view.nbytes, zlib.crc32(view))
        self._file.write(view)
        self.order.append(name)

    def table(self) -> list[list]:
        if sorted(self.order) != sorted(self._at):
            raise ValueError("the spool's order must name each stream it holds once")
        return [[name, self._at[name][1], self._at[name][2]] for name in self.order]

    def chunks(self, size: int = 1 << 22) -> Iterator[bytes]:
        for name in self.order:
            offset, left, _ = self._at[name]
            self._file.seek(offset)
            while left:
                chunk = self._file.read(min(size, left))
                if not chunk:
                    raise OSError(f"stream {name!r} is cut short in the spool file")
                left -= len(chunk)
                yield chunk

    def close(self) -> None:
        self._file.close()


def write_container(path: str | os.PathLike, manifest: dict, streams: dict[str, bytes] | StreamSpool) -> int:
    """Atomically write `manifest` and `streams` to `path`; return the number of bytes written."""
    if isinstance(streams, StreamSpool):
        table = streams.table()
        prefix, views = _prefix(manifest, table), streams.chunks()
    else:
        prefix, views = _encode(manifest, streams)
    target = os.fsdecode(os.fspath(path))
    directory = os.path.dirname(target) or "."
    _remove_stale_temps(target)
    tmp, fd = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as f:
            _lock(f.fileno())  # held until closed: tells other writers this temp file is alive
            f.write(prefix)
            written = len(prefix)
            for view in views:
                written += f.write(view)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return written


def read_container(source: str | os.PathLike | Buffer) -> tuple[dict, dict[str, bytes]]:
    """Read and fully verify a container from a path or from bytes; return (manifest, streams)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = memoryview(source).cast("B")
        return _read(io.BytesIO(data), data.nbytes)
    name = os.fsdecode(os.fspath(source))
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotAModelpressFile("not a regular file")
        return _read(os.fdopen(fd, "rb", closefd=False), info.st_size)
    except FormatError as exc:
        raise type(exc)(f"{name}: {exc}") from None
    finally:
        os.close(fd)


def container_overhead(manifest: dict, streams: dict[str, bytes]) -> int:
    """Bytes the file costs beyond the stream payloads (magic, version, header, checksum)."""
    return len(_encode(manifest, streams)[0])


def _encode(manifest: dict, streams: dict[str, bytes]) -> tuple[bytes, list[memoryview]]:
    """Build everything before the streams, and byte views of the streams in table order."""
    if not isinstance(manifest, dict) or not isinstance(streams, dict):
        raise TypeError(f"The manifest and the streams must be dicts. Got "
                        f"{type(manifest).__name__} and {type(streams).__name__} instead.")
    views, table = [], []
    for name, data in streams.items():
        if not isinstance(name, str) or not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Streams must map str names to bytes. Got {name!r}: "
                            f"{type(data).__name__} instead.")
        view = memoryview(data).cast("B")
        views.append(view)
        table.append([name, view.nbytes, zlib.crc32(view)])
    return _prefix(manifest, table), views


def _prefix(manifest: dict, table: Iterable[list]) -> bytes:
    """Everything before the streams: magic, version, header length, header, header checksum."""
    table = list(table)
    try:
        raw = json.dumps([manifest, table], sort_keys=True, separators=(",", ":"),
                         allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"The manifest must hold only JSON types (dict with str keys, list, str, "
                         f"int, finite float, bool, None): {exc}") from exc
    if json.loads(raw)[0] != manifest:
        raise ValueError("The manifest does not round-trip through JSON exactly: use only dicts "
                         "with str keys, lists (not tuples), str, int, float, bool and None.")
    params = zstandard.ZstdCompressionParameters.from_level(
        _ZSTD_LEVEL, source_size=len(raw), format=_ZSTD_FORMAT,
        write_content_size=True, write_checksum=False, write_dict_id=False)
    header = zstandard.ZstdCompressor(compression_params=params).compress(raw)
    if max(len(raw), len(header)) > MAX_HEADER_BYTES or _nests(raw) > MAX_HEADER_NESTS:
        raise ValueError(f"The header is {len(raw)} bytes ({len(header)} compressed) with "
                         f"{_nests(raw)} '[' or '{{', over the caps ({MAX_HEADER_BYTES} bytes, "
                         f"{MAX_HEADER_NESTS} brackets): move bulky data into streams.")
    body = MAGIC + bytes([VERSION]) + _varint(len(header)) + header
    return body + zlib.crc32(body).to_bytes(4, "little")


def _nests(raw: bytes) -> int:
    """Upper bound on the number of JSON arrays and objects in `raw`."""
    return raw.count(b"[") + raw.count(b"{")


def _varint(n: int) -> bytes:
    """LEB128-encode a non-negative int."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _create_temp(target: str) -> tuple[str, int]:
    """Create a fresh temp file next to `target` (mode 0o666 less the umask)."""
    directory, base = os.path.split(target)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(directory, f".{base}.{secrets.token_hex(4)}.tmp")
        try:
            return tmp, os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue


def _lock(fd: int) -> bool:
    """Take an exclusive advisory lock without waiting; False if another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _remove_stale_temps(target: str) -> None:
    """Delete temp files an interrupted save to `target` left behind: only names of `_create_temp`'s
    pattern, last written before this process started, and not locked by a live writer."""
    directory, base = os.path.split(target)
    pattern = re.compile(re.escape(f".{base}.") + r"[0-9a-f]{8}\.tmp")
    try:
        names = [n for n in os.listdir(directory or ".") if pattern.fullmatch(n)]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                info = os.fstat(fd)
                if stat.S_ISREG(info.st_mode) and info.st_mtime < _STARTED and _lock(fd):
                    os.unlink(path)
            finally:
                os.close(fd)


def _fsync_dir(directory: str) -> None:
    """Make the rename durable where the platform allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read(f: BinaryIO, size: int) -> tuple[dict, dict[str, bytes]]:
    """Check a container of `size` bytes read sequentially from `f`, in the order of the spec."""
    head = f.read(min(size, _HEAD))
    if not head:
        raise NotAModelpressFile("the file is empty, not a modelpress .mpz file")
    if head[:len(MAGIC)] != MAGIC:
        if len(head) < len(MAGIC) and MAGIC.startswith(head):
            raise TruncatedFile(f"the file is truncated: only {len(head)} bytes")
        raise NotAModelpressFile(f"not a modelpress .mpz file: it starts with {head[:8]!r}, "
                                 f"expected {MAGIC!r}")
    if len(head) == len(MAGIC):
        raise TruncatedFile("the file is truncated after the magic bytes")
    if head[len(MAGIC)] != VERSION:
        raise UnsupportedVersion(f"format version {head[len(MAGIC)]} is not supported: this "
                                 f"modelpress reads version {VERSION} (written by a newer one?)")
    hlen, start = _parse_varint(head, len(MAGIC) + 1)
    if hlen > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"the header declares {hlen} bytes, over the "
                             f"{MAX_HEADER_BYTES}-byte cap")
    end = start + hlen + 4
    if end > size:
        raise TruncatedFile(f"the header needs bytes 0..{end} but the file is only {size} bytes: "
                            "the file is truncated")
    blob = head + _take(f, end - len(head))
    if zlib.crc32(blob[:-4]) != int.from_bytes(blob[-4:], "little"):
        raise ChecksumMismatch(f"header checksum mismatch (bytes 0..{end}): the file is damaged")
    manifest, table = _parse_header(blob[start:-4])
    offset = end
    for name, length, _ in table:
        if length > size:
            raise InvalidOffset(f"stream {name!r} declares {length} bytes, more than the whole "
                                f"file ({size} bytes)")
        if offset + length > size:
            raise TruncatedFile(f"stream {name!r} needs bytes {offset}..{offset + length} but the "
                                f"file ends at {size}: the file is truncated")
        offset += length
    if offset != size:
        raise TruncatedFile(f"{size - offset} unexpected bytes after the last stream (at offset "
                            f"{offset}): the file has trailing data or is damaged")
    streams, offset = {}, end
    for name, length, crc in table:
        data = _take(f, length)
        if zlib.crc32(data) != crc:
            raise ChecksumMismatch(f"stream {name!r} checksum mismatch (bytes {offset}.."
                                   f"{offset + length}): the file is damaged")
        streams[name] = data
        offset += length
    return manifest, streams


def _take(f: BinaryIO, n: int) -> bytes:
    """Read exactly `n` bytes (already checked against the file size)."""
    data = f.read(n)
    if len(data) != n:
        raise TruncatedFile("the file got shorter while it was being read")
    return data


def _parse_varint(head: bytes, pos: int) -> tuple[int, int]:
    """Decode the minimal LEB128 header length at `pos`; return (value, position after it)."""
    value = 0
    for i in range(_LEN_MAX_BYTES):
        if pos + i >= len(head):
            raise TruncatedFile("the file is truncated inside the header length")
        byte = head[pos + i]
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            if byte == 0 and i > 0:
                raise InvalidHeader("the header length is not minimally encoded")
            return value, pos + i + 1
    raise HeaderTooLarge(f"the header length field is longer than {_LEN_MAX_BYTES} bytes")


def _parse_header(compressed: bytes) -> tuple[dict, list[tuple[str, int, int]]]:
    """Decompress (within the cap) and validate the header; return (manifest, stream table)."""
    try:
        declared = zstandard.get_frame_parameters(compressed, format=_ZSTD_FORMAT).content_size
    except zstandard.ZstdError as exc:
        raise InvalidHeader(f"the header is not a zstd frame: {exc}") from None
    if declared in (zstandard.CONTENTSIZE_UNKNOWN, zstandard.CONTENTSIZE_ERROR):
        raise InvalidHeader("the compressed header does not declare its decompressed size")
    if declared > MAX_HEADER_BYTES:
        raise HeaderTooLarge(f"the header decompresses to {declared} bytes, over the "
                             f"{MAX_HEADER_BYTES}-byte cap")
    try:
        raw = zstandard.ZstdDecompressor(format=_ZSTD_FORMAT).decompress(
            compressed, max_output_size=MAX_HEADER_BYTES, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise InvalidHeader(f"the header does not decompress: {exc}") from None
    if _nests(raw) > MAX_HEADER_NESTS:
        raise HeaderTooLarge(f"the header has {_nests(raw)} '[' or '{{', over the cap of "
                             f"{MAX_HEADER_NESTS} arrays and objects")
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys,
                         parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # includes UnicodeDecodeError, JSONDecodeError
        raise InvalidHeader(f"the header is not valid JSON: {exc}") from None
    if not (isinstance(doc, list) and len(doc) == 2 and isinstance(doc[0], dict)
            and isinstance(doc[1], list)):
        raise InvalidHeader("the header must be a JSON array [manifest object, stream table]")
    table, seen = [], set()
    for i, entry in enumerate(doc[1]):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
            raise InvalidHeader(f"stream table entry {i} must be [name, length, crc32]")
        name, length, crc = entry
        if name in seen:
            raise InvalidHeader(f"stream {name!r} appears twice in the stream table")
        if type(length) is not int or length < 0:
            raise InvalidOffset(f"stream {name!r} has length {length!r}: must be an int >= 0")
        if type(crc) is not int or not 0 <= crc < 2**32:
            raise InvalidHeader(f"stream {name!r} has crc32 {crc!r}: must be an int in [0, 2**32)")
        seen.add(name)
        table.append((name, length, crc))
    return doc[0], table


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON object hook that refuses duplicate keys."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise InvalidHeader("the header has a JSON object with a duplicate key")
    return out


def _reject_constant(token: str) -> None:
    """Refuse NaN and Infinity, which are not JSON."""
    raise InvalidHeader(f"the header contains {token}, which is not valid JSON")
