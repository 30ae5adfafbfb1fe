"""One model for both lazy formats: a verified TOC as store Entries plus each file's chunks.

zstd:chunked and eStargz share the CRFS TOC vocabulary (`type`, `name`, `linkName`, `mode`,
`uid`, `gid`, `size`, `modtime`, `digest`, `offset`, `chunkOffset`, `chunkSize`,
`chunkDigest`, ...). `build_layer` turns the TOC's entry list into `Entry`s in archive order
(the contract of tarstream.read_layer: whiteouts converted here, duplicates left for the
indexer to merge) and, per regular file, the tiling of its bytes into chunks: where the
compressed bytes lie in the blob and the SHA-256 each decompressed chunk must have.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import datetime
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import LayerError
from ..model import Entry, EntryKind
from ..paths import normalize, show, split
from ..tarstream import ID_LIMIT, WH_META, WH_OPAQUE, WH_PREFIX

MAX_TOC = 64 << 20  # bytes of a TOC (compressed and decompressed): it is held in memory
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
ZSTD_CHUNKED = "zstd:chunked"
ESTARGZ = "estargz"

_KINDS = {
    "reg": EntryKind.FILE,
    "dir": EntryKind.DIR,
    "symlink": EntryKind.SYMLINK,
    "hardlink": EntryKind.HARDLINK,
    "char": EntryKind.CHAR,
    "block": EntryKind.BLOCK,
    "fifo": EntryKind.FIFO,
}
_TIME_RE = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(Z|[+-]\d\d:\d\d)", re.ASCII
)
_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of a regular file's content and where its compressed bytes are.

    Fetch blob bytes [offset, end), decompress (gzip members or zstd frames), skip `inner`
    bytes: the next `size` bytes are file bytes [file_offset, file_offset + size) and their
    SHA-256 is `digest`. `zeros` chunks are all zero bytes (zstd:chunked holes): nothing to
    fetch, the digest is still checked.
    """

    offset: int
    end: int
    inner: int
    file_offset: int
    size: int
    digest: str
    zeros: bool = False


@dataclass(frozen=True, slots=True)
class LazyFile:
    """The chunks of one regular file, tiling [0, size) in order. `digest` is the SHA-256 of
    the whole content when the TOC gives it."""

    path: bytes
    size: int
    digest: str | None
    chunks: tuple[Chunk, ...]

    def chunks_for(self, offset: int, length: int) -> tuple[Chunk, ...]:
        """The chunks holding file bytes [offset, offset + length)."""
        if length <= 0 or offset >= self.size:
            return ()
        starts = [c.file_offset for c in self.chunks]
        first = max(bisect.bisect_right(starts, offset) - 1, 0)
        last = bisect.bisect_left(starts, offset + length)
        return self.chunks[first:last]


@dataclass(frozen=True, slots=True)
class LazyLayer:
    """A layer blob whose TOC was verified against its descriptor's annotation.

    `entries` follow read_layer's contract (archive order; FILE entries have no content key
    yet). `files` maps a regular file's path to its chunks (the last entry of a path wins).
    `prefetch` lists the files the image marked to fetch first, in order. `compression` is
    that of each chunk's stream ('gzip' or 'zstd'). `tar_split` is the verified tar-split
    (zstd:chunked only, JSON lines as containers/storage writes them) or None. `inline` holds
    the content of files already read with the TOC (eStargz's `stargz.index.json`).
    """

    format: str
    compression: str
    blob_digest: str
    blob_size: int
    toc_digest: str
    entries: tuple[Entry, ...]
    files: Mapping[bytes, LazyFile]
    prefetch: tuple[bytes, ...] = ()
    tar_split: bytes | None = field(default=None, repr=False)
    inline: Mapping[bytes, bytes] = field(default_factory=dict, repr=False)

    @property
    def chunk_bytes(self) -> int:
        """Compressed bytes of all data chunks (what fetching every file would cost)."""
        spans = {(c.offset, c.end) for f in self.files.values() for c in f.chunks if not c.zeros}
        return sum(e - o for o, e in spans)


def _int(obj: Mapping[str, Any], key: str, what: str) -> int:
    v = obj.get(key, 0)
    if v is None:
        return 0
    if not isinstance(v, int) or isinstance(v, bool):
        raise LayerError(f"{what}: TOC field {key!r} is not an integer")
    return v


def _str(obj: Mapping[str, Any], key: str, what: str) -> str:
    v = obj.get(key, "")
    if v is None:
        return ""
    if not isinstance(v, str):
        raise LayerError(f"{what}: TOC field {key!r} is not a string")
    return v


def parse_time(text: str, what: str) -> int:
    """An RFC 3339 time (as Go writes it) -> nanoseconds since the epoch. Go's zero time
    (year 1, written for a missing time) is 0, as containers/storage treats it."""
    m = _TIME_RE.fullmatch(text)
    if m is None:
        raise LayerError(f"{what}: bad modtime {text!r}")
    y, mo, d, h, mi, s = (int(m.group(i)) for i in range(1, 7))
    frac, tz = m.group(7) or "", m.group(8)
    if y == 1 and mo == 1 and d == 1 and h == mi == s == 0 and not frac.strip("0"):
        return 0
    try:
        days = datetime.date(y, mo, d).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise LayerError(f"{what}: bad modtime {text!r}") from None
    if h > 23 or mi > 59 or s > 60:
        raise LayerError(f"{what}: bad modtime {text!r}")
    off = (
        0 if tz == "Z" else (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60) * (-1 if tz[0] == "-" else 1)
    )
    secs = days * 86400 + h * 3600 + mi * 60 + s - off
    ns = secs * 1_000_000_000 + int(frac.ljust(9, "0") or "0")
    if not -(1 << 63) <= ns < 1 << 63:
        raise LayerError(f"{what}: modification time out of range")
    return ns


def format_time(ns: int) -> str:
    """Nanoseconds since the epoch -> RFC 3339 in UTC with the fraction Go would print."""
    secs, frac = divmod(ns, 1_000_000_000)
    t = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=secs)
    tail = f".{frac:09d}".rstrip("0") if frac else ""
    return t.strftime("%Y-%m-%dT%H:%M:%S") + tail + "Z"


def _xattrs(raw: Any, what: str) -> tuple[tuple[bytes, bytes], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise LayerError(f"{what}: TOC field 'xattrs' is not an object")
    out: dict[bytes, bytes] = {}
    for k, v in raw.items():
        if not isinstance(v, str):
            raise LayerError(f"{what}: xattr {k!r} is not a base64 string")
        key = k.encode("utf-8", "surrogateescape")
        if not key or b"\0" in key:
            raise LayerError(f"{what}: invalid xattr name {show(key)}")
        try:
            out[key] = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise LayerError(f"{what}: xattr {k!r} is not valid base64") from None
    return tuple(sorted(out.items()))


def toc_entry(obj: Mapping[str, Any]) -> Entry | None:
    """One non-chunk TOC entry as an Entry (whiteouts converted, as tarstream does for tar
    headers); None for an AUFS-internal `.wh..wh.` name, which is skipped. FILE entries
    have no content key. LayerError (one line) on anything malformed or hostile."""
    raw_name = _str(obj, "name", "TOC entry")
    raw = raw_name.encode("utf-8", "surrogateescape")
    what = f"TOC entry {show(raw)}"
    typ = _str(obj, "type", what)
    kind = _KINDS.get(typ)
    if kind is None:
        raise LayerError(f"{what}: unknown type {typ!r}")
    path = normalize(raw, "TOC entry")
    parent, name = split(path)
    mtime = parse_time(_str(obj, "modtime", what), what) if obj.get("modtime") else 0
    if name.startswith(WH_PREFIX):
        if name == WH_OPAQUE:
            return Entry(
                *split(parent), EntryKind.DIR, 0o755, 0, 0, 0, 0, opaque=True, implicit=True
            )
        if name.startswith(WH_META):
            return None
        hidden = name[len(WH_PREFIX) :]
        if hidden in (b"", b".", b"..") or b"/" in hidden:
            raise LayerError(f"{what}: invalid whiteout name")
        return Entry(parent, hidden, EntryKind.WHITEOUT, 0, 0, 0, 0, mtime)
    uid, gid = _int(obj, "uid", what), _int(obj, "gid", what)
    for which, value in (("uid", uid), ("gid", gid)):
        if not 0 <= value < ID_LIMIT:
            raise LayerError(f"{what}: {which} {value} out of range")
    if path == b"/" and kind != EntryKind.DIR:
        raise LayerError(f"{what}: the layer root must be a directory")
    mode = _int(obj, "mode", what) & 0o7777
    if kind == EntryKind.HARDLINK:
        target = normalize(_str(obj, "linkName", what).encode(), f"hard link {show(raw)} ->")
        if target == path:
            raise LayerError(f"{what}: hard link to itself")
        return Entry(parent, name, kind, mode, uid, gid, 0, mtime, link=target)
    xattrs = _xattrs(obj.get("xattrs"), what)
    if kind == EntryKind.FILE:
        size = _int(obj, "size", what)
        if size < 0:
            raise LayerError(f"{what}: negative size")
        return Entry(parent, name, kind, mode, uid, gid, size, mtime, xattrs=xattrs)
    if kind == EntryKind.SYMLINK:
        target_b = _str(obj, "linkName", what).encode("utf-8", "surrogateescape")
        if not target_b or b"\0" in target_b:
            raise LayerError(f"{what}: invalid symlink target")
        return Entry(  # mode 0777, as tarstream reads a symlink (Linux gives it no mode)
            parent, name, kind, 0o777, uid, gid, len(target_b), mtime, link=target_b, xattrs=xattrs
        )
    rdev = None
    if kind in (EntryKind.CHAR, EntryKind.BLOCK):
        major, minor = _int(obj, "devMajor", what), _int(obj, "devMinor", what)
        if not (0 <= major < ID_LIMIT and 0 <= minor < ID_LIMIT):
            raise LayerError(f"{what}: device number out of range")
        rdev = (major, minor)
    return Entry(parent, name, kind, mode, uid, gid, 0, mtime, rdev=rdev, xattrs=xattrs)


@dataclass
class _Pending:
    """Chunk records of the file being read: (offset, end or None, inner, file_offset, size,
    digest, zeros)."""

    entry: Entry
    digest: str | None
    end: int
    recs: list[tuple[int, int, int, int, str, bool]] = field(default_factory=list)


def toc_json(data: bytes, what: str) -> dict[str, Any]:
    """The TOC JSON object (its bytes were verified against their digest already)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LayerError(f"{what}: TOC is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise LayerError(f"{what}: TOC is not a JSON object")
    return obj


def build_layer(
    toc: Mapping[str, Any],
    *,
    fmt: str,
    compression: str,
    blob_digest: str,
    blob_size: int,
    toc_digest: str,
    payload_end: int,
    prefetch: Sequence[bytes] = (),
    tar_split: bytes | None = None,
) -> LazyLayer:
    """A LazyLayer from a verified, decoded TOC. `payload_end` is where the blob's file data
    end (the TOC's own offset): no chunk may reach past it."""
    if toc.get("version") != 1:
        raise LayerError(f"TOC version {toc.get('version')!r} (only 1 is known)")
    raw_entries = toc.get("entries")
    if not isinstance(raw_entries, list):
        raise LayerError("TOC has no 'entries' list")
    entries: list[Entry] = []
    files: dict[bytes, LazyFile] = {}
    pending: _Pending | None = None
    offsets: list[int] = []  # eStargz: every data offset, to find where a stream ends

    def finish(p: _Pending | None) -> None:
        if p is not None:
            lf = _tile(p, fmt, offsets, payload_end)
            files[lf.path] = lf

    for obj in raw_entries:
        if not isinstance(obj, dict):
            raise LayerError("TOC entry is not an object")
        if obj.get("type") == "chunk":
            name = _str(obj, "name", "TOC chunk").encode("utf-8", "surrogateescape")
            if pending is None or normalize(name, "TOC chunk") != pending.entry.path:
                raise LayerError(f"TOC chunk {show(name)} does not follow its file")
            pending.recs.append(_rec(obj, f"TOC chunk {show(name)}", offsets))
            continue
        finish(pending)
        pending = None
        e = toc_entry(obj)
        if e is None:
            continue
        entries.append(e)
        if e.kind == EntryKind.FILE:
            what = f"TOC entry {show(e.path)}"
            dg = _str(obj, "digest", what) or None
            if dg is not None and not DIGEST_RE.fullmatch(dg):
                raise LayerError(f"{what}: bad digest {dg!r}")
            pending = _Pending(e, dg, _int(obj, "endOffset", what))
            if e.size > 0:
                pending.recs.append(_rec(obj, what, offsets))
    finish(pending)
    offsets.sort()
    if fmt == ESTARGZ:  # stream ends were not known before every offset was seen
        files = {p: _tile_estargz(lf, offsets, payload_end) for p, lf in files.items()}
    missing = [p for p in prefetch if p not in files]
    if missing:
        raise LayerError(f"prefetch list names {show(missing[0])}, not a regular file of the TOC")
    return LazyLayer(
        format=fmt,
        compression=compression,
        blob_digest=blob_digest,
        blob_size=blob_size,
        toc_digest=toc_digest,
        entries=tuple(entries),
        files=files,
        prefetch=tuple(prefetch),
        tar_split=tar_split,
    )


def _rec(
    obj: Mapping[str, Any], what: str, offsets: list[int]
) -> tuple[int, int, int, int, str, bool]:
    off = _int(obj, "offset", what)
    inner = _int(obj, "innerOffset", what)
    foff = _int(obj, "chunkOffset", what)
    size = _int(obj, "chunkSize", what)
    dg = _str(obj, "chunkDigest", what)
    ctype = _str(obj, "chunkType", what)
    if ctype not in ("", "zeros"):
        raise LayerError(f"{what}: unknown chunkType {ctype!r}")
    if off < 0 or inner < 0 or foff < 0 or size < 0:
        raise LayerError(f"{what}: negative chunk offset or size")
    if dg and not DIGEST_RE.fullmatch(dg):
        raise LayerError(f"{what}: bad chunkDigest {dg!r}")
    offsets.append(off)
    return (off, inner, foff, size, dg, ctype == "zeros")


def _tile(p: _Pending, fmt: str, offsets: list[int], payload_end: int) -> LazyFile:
    """Chunks of a file from its records; for eStargz the stream ends are filled in later."""
    e = p.entry
    what = f"TOC entry {show(e.path)}"
    chunks: list[Chunk] = []
    n = len(p.recs)
    for i, (off, inner, foff, size, dg, zeros) in enumerate(p.recs):
        if size == 0:  # "to the end of the file" (the last or only chunk)
            if i != n - 1:
                raise LayerError(f"{what}: a chunk without a size before the last one")
            size = e.size - foff
        digest = dg or (p.digest if n == 1 else None)
        if digest is None:
            raise LayerError(f"{what}: a chunk without a digest (cannot be verified)")
        end = off  # eStargz: set by _tile_estargz
        if fmt == ZSTD_CHUNKED:
            end = p.recs[i + 1][0] if i + 1 < n else p.end
        chunks.append(Chunk(off, end, inner, foff, size, digest, zeros))
    pos = 0
    for c in chunks:
        if c.file_offset != pos or c.size <= 0:
            raise LayerError(f"{what}: chunks do not tile the file")
        pos += c.size
        if fmt == ZSTD_CHUNKED and not 0 <= c.offset < c.end <= payload_end:
            raise LayerError(f"{what}: chunk range {c.offset}-{c.end} outside the blob's data")
    if pos != e.size:
        raise LayerError(f"{what}: chunks cover {pos} of {e.size} bytes")
    return LazyFile(e.path, e.size, p.digest, tuple(chunks))


def _tile_estargz(lf: LazyFile, offsets: list[int], payload_end: int) -> LazyFile:
    """eStargz gives only where a gzip stream starts: it ends where the next one starts (a
    chunk's range may thus hold the next entries' tar headers, skipped when decoding)."""
    out = []
    for c in lf.chunks:
        i = bisect.bisect_right(offsets, c.offset)
        end = offsets[i] if i < len(offsets) else payload_end
        if not 0 <= c.offset < end <= payload_end:
            raise LayerError(
                f"TOC entry {show(lf.path)}: chunk offset {c.offset} outside the blob's data"
            )
        out.append(Chunk(c.offset, end, c.inner, c.file_offset, c.size, c.digest, c.zeros))
    return LazyFile(lf.path, lf.size, lf.digest, tuple(out))
