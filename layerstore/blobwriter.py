"""Write a layer blob: tar -> SHA-256 (DiffID) -> gzip/zstd/none -> SHA-256 (digest) -> file."""

from __future__ import annotations

import hashlib
import zlib
from typing import IO

import zstandard

OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
LAYER_TYPES = {
    "none": OCI_LAYER,
    "gzip": OCI_LAYER + "+gzip",
    "zstd": OCI_LAYER + "+zstd",
}
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_GZIP = DOCKER_LAYER + ".gzip"
# Docker media types -> their OCI equivalents (a docker manifest rewritten as an OCI one).
TO_OCI = {
    DOCKER_LAYER: LAYER_TYPES["none"],
    DOCKER_GZIP: LAYER_TYPES["gzip"],
    "application/vnd.docker.image.rootfs.diff.tar.zstd": LAYER_TYPES["zstd"],
    "application/vnd.docker.container.image.v1+json": "application/vnd.oci.image.config.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json": (
        "application/vnd.oci.image.manifest.v1+json"
    ),
}


def compression_of(media_type: str) -> str:
    """'gzip', 'zstd' or 'none' for a layer media type (OCI or Docker spelling)."""
    if media_type.endswith(("gzip", "+gzip")):
        return "gzip"
    if media_type.endswith("zstd"):
        return "zstd"
    return "none"


class BlobWriter:
    """A write-only stream of uncompressed tar bytes; `close()` flushes the compressor.

    `diff_id` / `digest` / `size` are valid after close. Deterministic output: gzip with no
    file name and mtime 0 (level 6), zstd level 3 with the content size unknown.
    """

    def __init__(self, out: IO[bytes], compression: str) -> None:
        self._out = out
        self.compression = compression
        self._tar = hashlib.sha256()
        self._blob = hashlib.sha256()
        self.tar_size = 0
        self.size = 0
        self._gz: zlib._Compress | None = None
        self._zs: zstandard.ZstdCompressionObj | None = None
        if compression == "gzip":
            self._gz = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
            self._crc = 0
            # RFC 1952 header: magic, deflate, no flags, mtime 0, xfl 0, OS 255 (unknown)
            self._emit(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
        elif compression == "zstd":
            self._zs = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj()
        elif compression != "none":
            raise ValueError(f"unknown compression {compression!r}")
        self.closed = False

    def _emit(self, data: bytes) -> None:
        if data:
            self._blob.update(data)
            self.size += len(data)
            self._out.write(data)

    def write(self, data: bytes) -> int:
        self._tar.update(data)
        self.tar_size += len(data)
        if self._gz is not None:
            self._crc = zlib.crc32(data, self._crc)
            self._emit(self._gz.compress(data))
        elif self._zs is not None:
            self._emit(self._zs.compress(data))
        else:
            self._emit(data)
        return len(data)

    def tell(self) -> int:
        return self.tar_size

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._gz is not None:
            self._emit(self._gz.flush())
            self._emit(
                (self._crc & 0xFFFFFFFF).to_bytes(4, "little")
                + (self.tar_size & 0xFFFFFFFF).to_bytes(4, "little")
            )
        elif self._zs is not None:
            self._emit(self._zs.flush())

    @property
    def diff_id(self) -> str:
        return "sha256:" + self._tar.hexdigest()

    @property
    def digest(self) -> str:
        return "sha256:" + self._blob.hexdigest()

    @property
    def media_type(self) -> str:
        return LAYER_TYPES[self.compression]
