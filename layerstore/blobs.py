"""Streaming readers for layer blobs: digest counting, gzip/zstd/plain decompression."""

from __future__ import annotations

import hashlib
import zlib
from typing import BinaryIO, Protocol

import zstandard

from .errors import LayerError

CHUNK = 1 << 20
GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class Readable(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class HashingReader:
    """Reads through `src`, feeding a SHA-256 and counting bytes. Only forward reads."""

    def __init__(self, src: Readable) -> None:
        self._src = src
        self.sha = hashlib.sha256()
        self.count = 0

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n if n >= 0 else CHUNK)
        self.sha.update(data)
        self.count += len(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class _Decompressor(Protocol):
    @property
    def eof(self) -> bool: ...
    @property
    def unused_data(self) -> bytes: ...

    def decompress(self, data: bytes, /) -> bytes: ...


class DecompressingReader:
    """A file-like reader decompressing gzip or zstd (several members/frames allowed).

    Raises LayerError on corrupt data and on a stream that ends inside a member/frame, so a
    truncated blob is refused even before its digest is checked. Memory stays bounded: input is
    fed in small pieces (zstd can expand a small input enormously).
    """

    def __init__(self, src: Readable, kind: str, label: str) -> None:
        self._src = src
        self._kind = kind
        self._label = label
        self._dec: _Decompressor | None = None
        self._pending = b""  # compressed bytes not yet fed
        self._out = bytearray()
        self._eof = False
        self._feed = 1 << 16 if kind == "gzip" else 1 << 12

    def _new(self) -> _Decompressor:
        if self._kind == "gzip":
            return zlib.decompressobj(wbits=31)
        dec: _Decompressor = zstandard.ZstdDecompressor().decompressobj()
        return dec

    def _fill(self, want: int) -> None:
        while len(self._out) < want and not self._eof:
            if not self._pending:
                self._pending = self._src.read(CHUNK)
                if not self._pending:
                    if self._dec is not None and not self._dec.eof:
                        raise LayerError(
                            f"layer {self._label}: truncated {self._kind} stream "
                            "(blob ends inside compressed data)"
                        )
                    self._eof = True
                    return
            if self._dec is None or self._dec.eof:
                self._dec = self._new()
            piece, self._pending = self._pending[: self._feed], self._pending[self._feed :]
            try:
                out = self._dec.decompress(piece)
            except (zlib.error, zstandard.ZstdError) as exc:
                raise LayerError(f"layer {self._label}: corrupt {self._kind} data: {exc}") from None
            self._out += out
            if self._dec.eof and self._dec.unused_data:
                self._pending = self._dec.unused_data + self._pending

    def read(self, n: int = -1, /) -> bytes:
        want = n if n >= 0 else CHUNK
        self._fill(want)
        data = bytes(self._out[:want])
        del self._out[:want]
        return data


def sniff(head: bytes) -> str:
    """Compression of a blob from its first bytes: 'gzip', 'zstd' or 'none'."""
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    return "none"


class PeekReader:
    """A reader that lets the first bytes be looked at before the stream is consumed."""

    def __init__(self, src: Readable | BinaryIO) -> None:
        self._src = src
        self._head = b""

    def peek(self, n: int) -> bytes:
        while len(self._head) < n:
            more = self._src.read(n - len(self._head))
            if not more:
                break
            self._head += more
        return self._head[:n]

    def read(self, n: int = -1, /) -> bytes:
        if self._head:
            if n < 0 or n >= len(self._head):
                data, self._head = self._head, b""
                if n < 0 or n == len(data):
                    return data
                return data + self._src.read(n - len(data))
            data, self._head = self._head[:n], self._head[n:]
            return data
        return self._src.read(n)
