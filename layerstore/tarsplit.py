"""Tar-split: a layer's tar bytes minus file data, so the exact tar (its DiffID) can be rebuilt.

A split file is a zstd stream of records, in tar order:
  b"R" <u64 n> <n raw bytes>                  headers, padding, end-of-archive, any other bytes
  b"F" <u64 size> <u16 k> <k bytes of key>    `size` bytes of file data = content `key`
Rebuilding writes the raw bytes and each content in turn; the SHA-256 of the result is the
layer's DiffID (fsck --full checks it).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import BinaryIO

import zstandard

from .blobs import CHUNK, Readable
from .errors import IntegrityError

OUT = 1 << 20


class SplitRecorder:
    """Passes a tar stream through, writing everything but declared file data to `out`.

    `cut(offset, size)` declares that stream bytes [offset, offset+size) are the data of the
    file whose key `file(key, size)` gives next; the reader declares a cut before it reads past
    `offset` (tarreader never reads ahead), so everything read before is recorded as it comes:
    memory stays bounded whatever the stream holds (big headers, bytes after the end).
    """

    def __init__(self, src: Readable, out: BinaryIO) -> None:
        self._src = src
        self._z = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
        self._pending = bytearray()  # stream bytes [flushed, pos)
        self._flushed = 0
        self._pos = 0
        self._skip = 0  # data bytes still to drop as they arrive
        self._out = bytearray()  # records not yet handed to the compressor (one call per OUT)

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n if n >= 0 else CHUNK)
        self._pos += len(data)
        if self._skip:
            k = min(self._skip, len(data))
            self._skip -= k
            self._flushed += k
            self._pending += data[k:]
        else:
            self._pending += data
        if len(self._pending) >= OUT:
            self._raw(self._pos)
        return data

    def _raw(self, upto: int) -> None:
        n = upto - self._flushed
        if n > 0:
            self._out += b"R" + struct.pack("<Q", n)
            self._out += self._pending[:n]
            del self._pending[:n]
            if len(self._out) >= OUT:
                self._z.write(self._out)
                self._out.clear()
            self._flushed = upto

    def cut(self, offset: int, size: int) -> None:
        if offset < self._flushed:
            raise AssertionError(f"tar-split: cut at {offset}, already recorded to {self._flushed}")
        self._raw(offset)
        k = min(size, len(self._pending))
        del self._pending[:k]
        self._flushed += k
        self._skip = size - k

    def file(self, key: str, size: int) -> None:
        kb = key.encode()
        self._out += b"F" + struct.pack("<QH", size, len(kb)) + kb

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def finish(self) -> None:
        self._raw(self._pos)
        self._z.write(self._out)
        self._out.clear()
        self._z.flush(zstandard.FLUSH_FRAME)
        self._z.close()  # type: ignore[no-untyped-call]  # zstandard leaves close untyped


def _exact(r: BinaryIO, n: int, what: str) -> bytes:
    data = r.read(n)
    if len(data) != n:
        raise IntegrityError(f"tar-split {what}: truncated")
    return data


def rebuild(split: BinaryIO, open_content: Callable[[str], BinaryIO]) -> Iterator[bytes]:
    """Yield the layer's original tar bytes, chunk by chunk (IntegrityError if damaged)."""
    try:
        yield from _rebuild(split, open_content)
    except zstandard.ZstdError as exc:
        raise IntegrityError(f"tar-split: corrupt: {exc}") from None


def _rebuild(split: BinaryIO, open_content: Callable[[str], BinaryIO]) -> Iterator[bytes]:
    r = zstandard.ZstdDecompressor().stream_reader(split, read_across_frames=True)
    while tag := r.read(1):
        if tag == b"R":
            (n,) = struct.unpack("<Q", _exact(r, 8, "record"))
            while n:
                got = r.read(min(n, CHUNK))
                if not got:
                    raise IntegrityError("tar-split: truncated raw record")
                n -= len(got)
                yield got
        elif tag == b"F":
            size, k = struct.unpack("<QH", _exact(r, 10, "record"))
            key = _exact(r, k, "key").decode()
            with open_content(key) as fh:
                left = size
                while left:
                    got = fh.read(min(left, CHUNK))
                    if not got:
                        raise IntegrityError(f"content {key}: shorter than {size} bytes")
                    left -= len(got)
                    yield got
        else:
            raise IntegrityError(f"tar-split: bad record tag {tag!r}")
