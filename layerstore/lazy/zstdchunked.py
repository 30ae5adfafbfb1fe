"""zstd:chunked (containers/storage): find the TOC from the layer's annotations, verify, parse.

The blob is a zstd stream in which every regular file's data starts a new frame; after the
data come skippable frames: the zstd-compressed TOC JSON, optionally the tar-split, and a
footer. The layer descriptor's annotations say where the TOC is
(`<offset>:<length>:<uncompressed length>:<type>`) and give the SHA-256 of its compressed
bytes; the descriptor is trusted because the manifest was verified, so the TOC is trusted only
once it matches. containers/storage spelled the keys `io.containers.zstd-chunked.*` (skopeo
1.9) and later `io.github.containers.zstd-chunked.*`: both are read, both are written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import zstandard

from ..errors import LayerError
from .model import DIGEST_RE, MAX_TOC, ZSTD_CHUNKED, LazyLayer, build_layer, toc_json

PREFIXES = ("io.github.containers.zstd-chunked.", "io.containers.zstd-chunked.")
POSITION = "manifest-position"
CHECKSUM = "manifest-checksum"
TARSPLIT = "tarsplit-position"
SKIPPABLE_MAGIC = b"\x50\x2a\x4d\x18"
FOOTER_MAGIC = b"GNUlInUx"
MANIFEST_TYPE_CRFS = 1
# Our own TOC field: the prioritized files (zstd:chunked has no landmark file).
PREFETCH_FIELD = "layerfs.prefetch"

ReadAt = Callable[[int, int], bytes]

_POS_RE = re.compile(r"(\d{1,19}):(\d{1,19}):(\d{1,19})(?::(\d{1,19}))?", re.ASCII)


def annotation(annotations: Mapping[str, Any], key: str) -> str | None:
    """The value of a zstd:chunked annotation under either spelling."""
    for p in PREFIXES:
        v = annotations.get(p + key)
        if isinstance(v, str):
            return v
    return None


def is_zstd_chunked(annotations: Mapping[str, Any]) -> bool:
    return annotation(annotations, POSITION) is not None


def _position(text: str, fields: int, what: str) -> tuple[int, ...]:
    m = _POS_RE.fullmatch(text)
    if m is None or (m.group(4) is None) != (fields == 3):
        raise LayerError(f"{what}: malformed position annotation {text!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def _decompress(data: bytes, size: int, what: str) -> bytes:
    try:
        out: bytes = zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise LayerError(f"{what}: corrupt zstd data: {exc}") from None
    if len(out) != size:
        raise LayerError(f"{what}: {len(out)} bytes decompressed, the annotation says {size}")
    return out


def read_toc(
    annotations: Mapping[str, Any], blob_digest: str, blob_size: int, read_at: ReadAt
) -> LazyLayer:
    """Fetch (with `read_at(offset, length)`), verify and parse the TOC of a zstd:chunked blob.
    LayerError, one line, when the annotations are malformed, the TOC's digest differs from
    the checksum annotation, or the TOC is not a valid one."""
    what = f"layer {blob_digest}"
    pos_text = annotation(annotations, POSITION)
    checksum = annotation(annotations, CHECKSUM)
    if pos_text is None or checksum is None:
        raise LayerError(f"{what}: not zstd:chunked (no TOC position and checksum annotations)")
    if not DIGEST_RE.fullmatch(checksum):
        raise LayerError(f"{what}: malformed TOC checksum annotation {checksum!r}")
    off, length, ulen, mtype = _position(pos_text, 4, what)
    if mtype != MANIFEST_TYPE_CRFS:
        raise LayerError(f"{what}: TOC type {mtype} (only {MANIFEST_TYPE_CRFS} is known)")
    if length > MAX_TOC or ulen > MAX_TOC:
        raise LayerError(f"{what}: TOC of {max(length, ulen)} bytes (the limit is {MAX_TOC})")
    if off < 8 or off + length > blob_size:
        raise LayerError(f"{what}: TOC position {off}+{length} outside the {blob_size}-byte blob")
    raw = read_at(off, length)
    got = "sha256:" + hashlib.sha256(raw).hexdigest()
    if got != checksum:
        raise LayerError(f"{what}: TOC digest {got} does not match its annotation {checksum}")
    toc = toc_json(_decompress(raw, ulen, f"{what}: TOC"), what)
    tar_split = _tar_split(annotations, toc, blob_size, read_at, what)
    prefetch = toc.get(PREFETCH_FIELD, [])
    if not isinstance(prefetch, list) or not all(isinstance(p, str) for p in prefetch):
        raise LayerError(f"{what}: TOC field {PREFETCH_FIELD!r} is not a list of paths")
    try:
        return build_layer(
            toc,
            fmt=ZSTD_CHUNKED,
            compression="zstd",
            blob_digest=blob_digest,
            blob_size=blob_size,
            toc_digest=checksum,
            payload_end=off - 8,
            prefetch=[("/" + p.strip("/")).encode() for p in prefetch],
            tar_split=tar_split,
        )
    except LayerError as exc:
        raise LayerError(f"{what}: {exc}") from None


def _tar_split(
    annotations: Mapping[str, Any],
    toc: Mapping[str, Any],
    blob_size: int,
    read_at: ReadAt,
    what: str,
) -> bytes | None:
    """The tar-split the TOC vouches for (by `tarSplitDigest`), decompressed; None when the
    TOC names none (one an annotation points to without that digest cannot be trusted)."""
    dg = toc.get("tarSplitDigest")
    if not dg:
        return None
    if not isinstance(dg, str) or not DIGEST_RE.fullmatch(dg):
        raise LayerError(f"{what}: malformed tarSplitDigest {dg!r}")
    text = annotation(annotations, TARSPLIT)
    if text is None:
        raise LayerError(f"{what}: the TOC names a tar-split but no annotation locates it")
    off, length, ulen = _position(text, 3, what)
    if length > MAX_TOC or ulen > MAX_TOC:
        raise LayerError(f"{what}: tar-split of {max(length, ulen)} bytes (the limit is {MAX_TOC})")
    if off + length > blob_size:
        raise LayerError(f"{what}: tar-split position outside the blob")
    raw = read_at(off, length)
    if "sha256:" + hashlib.sha256(raw).hexdigest() != dg:
        raise LayerError(f"{what}: tar-split digest does not match the TOC's tarSplitDigest")
    return _decompress(raw, ulen, f"{what}: tar-split")


def skippable(data: bytes) -> bytes:
    """A zstd skippable frame holding `data` (decompressors pass over it)."""
    return SKIPPABLE_MAGIC + len(data).to_bytes(4, "little") + data


def footer(toc_offset: int, toc_length: int, toc_ulen: int) -> bytes:
    """The 64-byte footer frame of current containers/storage (no tar-split written)."""
    fields = (toc_offset, toc_length, toc_ulen, MANIFEST_TYPE_CRFS, 0, 0, 0)
    return skippable(b"".join(x.to_bytes(8, "little") for x in fields) + FOOTER_MAGIC)


@dataclass(frozen=True, slots=True)
class SplitRecord:
    """One tar-split record: raw tar bytes (`data`, kind SEGMENT) or a file's data
    (`name`, `size`; kind FILE; `data` is tar-split's CRC-64 of it, not verified here)."""

    kind: int
    name: bytes
    size: int
    data: bytes


SPLIT_FILE = 1
SPLIT_SEGMENT = 2


def split_records(data: bytes, what: str = "tar-split") -> list[SplitRecord]:
    """The records of a (verified, decompressed) tar-split: JSON lines in tar order, as
    github.com/vbatts/tar-split writes them. LayerError on anything else."""
    out: list[SplitRecord] = []
    for n, line in enumerate(data.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise LayerError(f"{what}: line {n + 1} is not JSON") from None
        if not isinstance(obj, dict):
            raise LayerError(f"{what}: line {n + 1} is not an object")
        kind, pos, size = obj.get("type"), obj.get("position"), obj.get("size", 0)
        if kind not in (SPLIT_FILE, SPLIT_SEGMENT) or pos != len(out):
            raise LayerError(f"{what}: line {n + 1}: bad type or position")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise LayerError(f"{what}: line {n + 1}: bad size")
        try:
            payload = base64.b64decode(obj.get("payload") or "", validate=True)
            raw_name = obj.get("name_raw")
            name = (
                base64.b64decode(raw_name, validate=True)
                if raw_name
                else str(obj.get("name") or "").encode()
            )
        except (binascii.Error, ValueError, TypeError):
            raise LayerError(f"{what}: line {n + 1}: bad base64") from None
        out.append(SplitRecord(kind, name, size, payload))
    return out
