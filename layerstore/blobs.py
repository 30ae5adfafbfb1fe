"""Streaming readers for layer blobs: digest counting, gzip/zstd/plain decompression."""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Callable
from typing import BinaryIO, Protocol

import zstandard

from .errors import LayerError

CHUNK = 1 << 20
GZIP_PIECE = 1 << 16
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


class ZstdFrameWalker:
    """Follows zstd frame and block headers in the compressed bytes (data is skipped, not
    decoded) so that the end of input can be checked to fall on a frame boundary: the
    decompressor itself reports a truncated stream as a silent early end."""

    MAGIC = 0xFD2FB528

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0
        self._need = 4
        self._state = "magic"
        self._checksum = False
        self.frames = 0
        self.error: str | None = None

    def feed(self, data: bytes) -> None:
        i = 0
        while i < len(data) and self.error is None:
            if self._skip:
                k = min(self._skip, len(data) - i)
                self._skip -= k
                i += k
                continue
            k = min(self._need - len(self._buf), len(data) - i)
            self._buf += data[i : i + k]
            i += k
            if len(self._buf) == self._need:
                head = bytes(self._buf)
                self._buf.clear()
                self._step(head)

    def _step(self, head: bytes) -> None:
        st = self._state
        if st == "magic":
            magic = int.from_bytes(head, "little")
            if magic == self.MAGIC:
                self._state, self._need = "fhd", 1
            elif magic & 0xFFFFFFF0 == 0x184D2A50:
                self._state, self._need = "skipsize", 4
            else:
                self.error = "not a zstd frame"
        elif st == "skipsize":
            self._skip = int.from_bytes(head, "little")
            self._state, self._need = "magic", 4
        elif st == "fhd":
            fhd = head[0]
            single = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            fcs = (1 if single else 0, 2, 4, 8)[fhd >> 6]
            did = (0, 1, 2, 4)[fhd & 3]
            rest = (0 if single else 1) + did + fcs
            self._state, self._need = "block", 3
            self._skip = rest
        elif st == "block":
            hdr = int.from_bytes(head, "little")
            last, btype, size = hdr & 1, (hdr >> 1) & 3, hdr >> 3
            if btype == 3:
                self.error = "reserved zstd block type"
                return
            self._skip = 1 if btype == 1 else size
            if last:
                if self._checksum:
                    self._skip += 4
                self.frames += 1
                self._state, self._need = "magic", 4
        else:  # pragma: no cover - states are exhaustive
            raise AssertionError(st)

    def at_boundary(self) -> bool:
        return self.error is None and self._state == "magic" and not self._buf and not self._skip


class _Tee:
    def __init__(self, src: Readable, sink: Callable[[bytes], None]) -> None:
        self._src = src
        self._sink = sink

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n if n >= 0 else CHUNK)
        self._sink(data)
        return data


class DecompressingReader:
    """A file-like reader decompressing gzip or zstd (several members/frames allowed).

    Raises LayerError on corrupt data and on a stream that ends inside a member/frame, so a
    truncated blob is refused even before its digest is checked. Memory stays bounded whatever
    the compression ratio: each read returns at most what was asked (a decompression bomb is
    just a long stream).
    """

    def __init__(self, src: Readable, kind: str, label: str) -> None:
        self._src = src
        self._kind = kind
        self._label = label
        self._gz: zlib._Decompress | None = None
        self._pending = b""  # gzip: compressed bytes read, fed up to self._off
        self._off = 0
        self._eof = False
        if kind == "zstd":
            self._walker = ZstdFrameWalker()
            self._tee = _Tee(src, self._walker.feed)
            self._zr = zstandard.ZstdDecompressor().stream_reader(
                self._tee,  # type: ignore[arg-type]  # any object with read() will do
                read_size=1 << 16,
                read_across_frames=True,
            )

    def _truncated(self) -> LayerError:
        return LayerError(
            f"layer {self._label}: truncated {self._kind} stream (blob ends inside compressed data)"
        )

    def _corrupt(self, exc: object) -> LayerError:
        return LayerError(f"layer {self._label}: corrupt {self._kind} data: {exc}")

    def read(self, n: int = -1, /) -> bytes:
        want = n if n >= 0 else CHUNK
        if want == 0 or self._eof:
            return b""
        if self._kind == "zstd":
            return self._read_zstd(want)
        return self._read_gzip(want)

    def _read_zstd(self, want: int) -> bytes:
        try:
            data: bytes = self._zr.read(want)
        except zstandard.ZstdError as exc:
            raise self._corrupt(exc) from None
        if data:
            return data
        while self._tee.read(CHUNK):  # whatever the decompressor did not need
            pass
        if self._walker.error is not None:
            raise self._corrupt(self._walker.error)
        if not self._walker.at_boundary() or self._walker.frames == 0:
            raise self._truncated()
        self._eof = True
        return b""

    def _read_gzip(self, want: int) -> bytes:
        while True:
            if self._off >= len(self._pending):
                self._pending, self._off = self._src.read(CHUNK), 0
                if not self._pending:
                    if self._gz is None or not self._gz.eof:
                        raise self._truncated()
                    self._eof = True
                    return b""
            if self._gz is None or self._gz.eof:
                self._gz = zlib.decompressobj(wbits=31)
            # Feed a bounded piece: zlib copies what it leaves unconsumed on every call.
            piece = self._pending[self._off : self._off + GZIP_PIECE]
            try:
                out = self._gz.decompress(piece, want)
            except zlib.error as exc:
                raise self._corrupt(exc) from None
            left = self._gz.unused_data if self._gz.eof else self._gz.unconsumed_tail
            self._off += len(piece) - len(left)
            if out:
                return out


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
