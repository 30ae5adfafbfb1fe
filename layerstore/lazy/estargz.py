"""eStargz: find the TOC from the footer, verify it against the layer's annotation, parse it.

The blob is a concatenation of gzip members: every regular file's data (or each chunk of a
large file) starts a member; the last tar entry, `stargz.index.json` (the TOC), is in a
member of its own; a 51-byte empty gzip member ends the blob, its extra field giving the TOC
member's offset as `%016xSTARGZ`. The TOC JSON's SHA-256 is the layer descriptor's
`containerd.io/snapshot/stargz/toc.digest` annotation. Prioritized files come first, ended
by the `.prefetch.landmark` file (or the blob starts with `.no.prefetch.landmark`).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from ..blobs import DecompressingReader
from ..errors import LayerError
from ..model import Entry, EntryKind
from ..paths import normalize
from ..tarstream import read_layer
from .model import DIGEST_RE, ESTARGZ, MAX_TOC, LazyLayer, build_layer, toc_json

TOC_DIGEST = "containerd.io/snapshot/stargz/toc.digest"
UNCOMPRESSED_SIZE = "io.containers.estargz.uncompressed-size"
TOC_NAME = "stargz.index.json"
PREFETCH_LANDMARK = ".prefetch.landmark"
NO_PREFETCH_LANDMARK = ".no.prefetch.landmark"
LANDMARK_DATA = b"\x0f"
FOOTER_SIZE = 51

ReadAt = Callable[[int, int], bytes]


def is_estargz(annotations: Mapping[str, Any]) -> bool:
    return isinstance(annotations.get(TOC_DIGEST), str)


def footer(toc_offset: int) -> bytes:
    """The 51-byte footer: an empty gzip member whose extra field locates the TOC."""
    sub = f"{toc_offset:016x}STARGZ".encode()
    extra = b"SG" + len(sub).to_bytes(2, "little") + sub
    head = b"\x1f\x8b\x08\x04\x00\x00\x00\x00\x00\xff" + len(extra).to_bytes(2, "little")
    return head + extra + b"\x01\x00\x00\xff\xff" + bytes(8)


def parse_footer(data: bytes, what: str) -> int:
    """The TOC offset from the footer's gzip extra field (layout checked byte by byte)."""
    if (
        len(data) != FOOTER_SIZE
        or data[:4] != b"\x1f\x8b\x08\x04"
        or data[10:16] != b"\x1a\x00SG\x16\x00"
        or data[32:38] != b"STARGZ"
        or data[38:] != b"\x01\x00\x00\xff\xff" + bytes(8)
    ):
        raise LayerError(f"{what}: no eStargz footer at the end of the blob")
    try:
        return int(data[16:32].decode("ascii"), 16)
    except (UnicodeDecodeError, ValueError):
        raise LayerError(f"{what}: eStargz footer has a malformed TOC offset") from None


def read_toc(
    annotations: Mapping[str, Any], blob_digest: str, blob_size: int, read_at: ReadAt
) -> LazyLayer:
    """Fetch (with `read_at(offset, length)`), verify and parse the TOC of an eStargz blob.
    LayerError, one line, when the footer or TOC is malformed or the TOC's digest differs
    from the annotation."""
    what = f"layer {blob_digest}"
    want = annotations.get(TOC_DIGEST)
    if not isinstance(want, str) or not DIGEST_RE.fullmatch(want):
        raise LayerError(f"{what}: missing or malformed {TOC_DIGEST} annotation")
    if blob_size <= FOOTER_SIZE:
        raise LayerError(f"{what}: too small for eStargz")
    toc_off = parse_footer(read_at(blob_size - FOOTER_SIZE, FOOTER_SIZE), what)
    toc_len = blob_size - FOOTER_SIZE - toc_off
    if not 0 <= toc_off < blob_size - FOOTER_SIZE:
        raise LayerError(f"{what}: eStargz TOC offset {toc_off} outside the blob")
    if toc_len > MAX_TOC:
        raise LayerError(f"{what}: TOC of {toc_len} bytes (the limit is {MAX_TOC})")
    toc_entry, raw_toc = _toc_json(read_at(toc_off, toc_len), what)
    got = "sha256:" + hashlib.sha256(raw_toc).hexdigest()
    if got != want:
        raise LayerError(f"{what}: TOC digest {got} does not match its annotation {want}")
    toc = toc_json(raw_toc, what)
    try:
        layer = build_layer(
            toc,
            fmt=ESTARGZ,
            compression="gzip",
            blob_digest=blob_digest,
            blob_size=blob_size,
            toc_digest=want,
            payload_end=toc_off,
            prefetch=_prefetch(toc),
        )
    except LayerError as exc:
        raise LayerError(f"{what}: {exc}") from None
    # The TOC is the tar's last entry: a full pull has it, so the lazy tree has it too.
    return replace(layer, entries=(*layer.entries, toc_entry), inline={toc_entry.path: raw_toc})


def _toc_json(member: bytes, what: str) -> tuple[Entry, bytes]:
    """The TOC's tar entry (as a full pull reads it) and JSON, from its gzip member."""
    src = DecompressingReader(io.BytesIO(member), "gzip", what)
    for e, fobj in read_layer(src):
        if e.path != b"/" + TOC_NAME.encode() or e.kind != EntryKind.FILE or fobj is None:
            break
        if e.size > MAX_TOC:
            raise LayerError(f"{what}: TOC of {e.size} bytes (the limit is {MAX_TOC})")
        data = fobj.read(e.size)
        if len(data) != e.size:
            raise LayerError(f"{what}: eStargz TOC is truncated")
        return e, data
    raise LayerError(f"{what}: the eStargz TOC member does not start with {TOC_NAME}")


def _prefetch(toc: Mapping[str, Any]) -> list[bytes]:
    """Regular files before `.prefetch.landmark`, in TOC order ([] without that landmark)."""
    ents = toc.get("entries")
    if not isinstance(ents, list):
        return []
    names: list[bytes] = []
    for e in ents:
        if not isinstance(e, dict) or not isinstance(e.get("name"), str):
            return []
        path = normalize(e["name"].encode("utf-8", "surrogateescape"), "TOC entry")
        if path == b"/" + PREFETCH_LANDMARK.encode():
            return names
        if e.get("type") == "reg" and path not in names:
            names.append(path)
    return []
