"""Unit tests of the streaming blob readers: multi-member gzip, multi-frame zstd, truncation."""

from __future__ import annotations

import gzip
import io
import os
import tracemalloc

import pytest
import zstandard

from layerstore.blobs import DecompressingReader, HashingReader, PeekReader, sniff
from layerstore.errors import LayerError

DATA = os.urandom(3000) + b"\0" * 300_000 + os.urandom(70_000)


def _read_all(blob: bytes, kind: str, n: int = 4096) -> bytes:
    r = DecompressingReader(io.BytesIO(blob), kind, "L")
    out = bytearray()
    while chunk := r.read(n):
        assert len(chunk) <= n
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("n", [1, 511, 65536, 1 << 20])
def test_gzip_members_and_zstd_frames_concatenate(n: int) -> None:
    half = len(DATA) // 2
    gz = gzip.compress(DATA[:half]) + gzip.compress(DATA[half:])
    zs = zstandard.ZstdCompressor().compress(DATA[:half]) + zstandard.ZstdCompressor().compress(
        DATA[half:]
    )
    if n > 1:  # one-byte reads are slow; checking gzip once is enough
        assert _read_all(zs, "zstd", n) == DATA
    assert _read_all(gz, "gzip", n) == DATA


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncation_and_trailing_garbage_are_refused(kind: str) -> None:
    blob = gzip.compress(DATA) if kind == "gzip" else zstandard.ZstdCompressor().compress(DATA)
    assert sniff(blob) == kind
    with pytest.raises(LayerError, match=f"truncated {kind}"):
        _read_all(blob[:-10], kind)
    with pytest.raises(LayerError, match=f"corrupt {kind}"):
        _read_all(blob + b"garbage!", kind)


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_decompression_bomb_is_read_in_bounded_pieces(kind: str) -> None:
    zeros = b"\0" * (64 << 20)
    bomb = gzip.compress(zeros) if kind == "gzip" else zstandard.ZstdCompressor().compress(zeros)
    del zeros
    r = DecompressingReader(io.BytesIO(bomb), kind, "L")
    tracemalloc.start()
    try:
        total = 0
        while chunk := r.read(1 << 20):
            total += len(chunk)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 64 << 20
    assert peak < 8 << 20  # never the whole 64 MiB at once


def test_peek_and_hashing_readers() -> None:
    h = HashingReader(io.BytesIO(b"abcdef"))
    p = PeekReader(h)
    assert p.peek(4) == b"abcd"
    assert p.read(2) == b"ab" and p.read(10) == b"cdef" and p.read(1) == b""
    assert h.count == 6
    assert h.digest() == "sha256:bef57ec7f53a6d40beb640a780a639c83bc29ac8a9816f1fc6c5c6dcd93c4721"


def test_zstd_frame_variants() -> None:
    with_sum = zstandard.ZstdCompressor(write_checksum=True).compress(DATA)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(DATA)
    skippable = (0x184D2A53).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    blob = skippable + with_sum + no_size
    assert _read_all(blob, "zstd", 1 << 16) == DATA + DATA
    with pytest.raises(LayerError, match="truncated zstd"):
        _read_all(with_sum[:-2], "zstd")  # only the checksum is missing
