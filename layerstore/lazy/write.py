"""Convert a layer tar into an eStargz (gzip) or zstd:chunked (zstd) blob with its TOC.

Both outputs are ordinary compressed tars that any runtime unpacks: each regular file's data
(each chunk of a large file) is a gzip member or zstd frame of its own, which is what makes a
byte range of the blob decodable alone. Headers and padding are copied byte for byte from the
source tar, so without a prefetch list a zstd:chunked blob decompresses to the very same tar
(same DiffID). eStargz adds its landmark file and `stargz.index.json` as the last tar entries
(as every eStargz producer does; they appear in an unpacked tree).

Prioritized files (`prefetch`) are moved to the front, each after its parent directories and
a hard link after its target, so that one Range request fetches them all. eStargz marks their
end with `.prefetch.landmark`; zstd:chunked has no landmark file, so their list goes into the
TOC under `layerfs.prefetch` (verified with the TOC, ignored by containers/storage).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import zstandard

from .. import tarreader as tr
from ..blobwriter import LAYER_TYPES
from ..errors import LayerError
from ..paths import ancestors, normalize, show
from . import estargz, zstdchunked
from .model import ESTARGZ, ZSTD_CHUNKED, format_time

CHUNK_SIZE = 4 << 20  # bytes of file data per chunk (files up to this size are one chunk)
COPY = 1 << 20
_TYPES = {
    tr.REG: "reg",
    tr.CONT: "reg",
    tr.LINK: "hardlink",
    tr.SYMLINK: "symlink",
    tr.CHAR: "char",
    tr.BLOCKDEV: "block",
    tr.DIR: "dir",
    tr.FIFO: "fifo",
}


@dataclass(frozen=True, slots=True)
class Member:
    """One tar member of the source: its header bytes (extension headers included) start at
    `start`, its data at `data`; `end` is past its padding."""

    start: int
    data: int
    size: int
    end: int
    path: bytes
    info: tr.Member


@dataclass(frozen=True)
class Written:
    """The blob just written: what its descriptor in a manifest needs, and its DiffID."""

    media_type: str
    digest: str
    size: int
    diff_id: str
    toc_digest: str
    annotations: dict[str, str]


def walk(src: BinaryIO) -> tuple[list[Member], int]:
    """The members of a seekable tar as the import reads them (tarreader: Go's rules), and
    where its end-of-archive bytes begin."""
    src.seek(0)
    members: list[Member] = []
    reader = tr.TarReader(src)
    tail = 0
    start = -1  # a global header's bytes go with the next member
    while (m := reader.next()) is not None:
        if start < 0:
            start = m.start
        size = m.physical if m.type in (tr.REG, tr.CONT) else 0
        end = m.offset + m.physical + (-m.physical % tarfile.BLOCKSIZE)
        tail = end
        if m.type == tr.XGLOBAL:
            continue
        if m.type not in _TYPES or m.sparse:
            what = "sparse files" if m.sparse else f"tar type {m.type!r}"
            raise LayerError(f"entry {show(m.name)}: {what} cannot be converted")
        try:
            m.name.decode("utf-8")
            m.linkname.decode("utf-8")
        except UnicodeDecodeError:
            raise LayerError(
                f"entry {show(m.name)}: a name that is not UTF-8 has no TOC form"
            ) from None
        members.append(Member(start, m.offset, size, end, normalize(m.name), m))
        start = -1
    return members, tail


def order(members: Sequence[Member], prefetch: Sequence[bytes]) -> tuple[list[int], int]:
    """Member indices in output order and how many lead as prioritized. A prioritized path
    comes after its parent directories, a hard link after its target; a path the tar holds
    more than once stays where it is (moving one copy would change which one wins)."""
    where: dict[bytes, list[int]] = {}
    for i, m in enumerate(members):
        where.setdefault(m.path, []).append(i)
    first: list[int] = []
    taken: set[int] = set()

    def take(path: bytes) -> None:
        idx = where.get(path)
        if not idx or len(idx) != 1 or idx[0] in taken:
            return
        for anc in ancestors(path):
            take(anc)
        m = members[idx[0]]
        if m.info.type == tr.LINK:
            take(normalize(m.info.linkname))
        if idx[0] not in taken:
            taken.add(idx[0])
            first.append(idx[0])

    for p in prefetch:
        take(p)
    rest = [i for i in range(len(members)) if i not in taken]
    return first + rest, len(first)


class _Out:
    """The blob being written: counts and hashes its bytes, and the uncompressed tar's."""

    def __init__(self, out: BinaryIO, fmt: str) -> None:
        self.out = out
        self.fmt = fmt
        self.size = 0
        self.blob = hashlib.sha256()
        self.tar = hashlib.sha256()
        self.tar_size = 0
        self._z: Any = None

    def raw(self, data: bytes) -> None:
        if data:
            self.out.write(data)
            self.blob.update(data)
            self.size += len(data)

    def open(self) -> None:
        if self._z is None:
            if self.fmt == ESTARGZ:
                self._z = zlib.compressobj(6, zlib.DEFLATED, 31)
            else:
                self._z = zstandard.ZstdCompressor(level=3, write_checksum=True).compressobj()

    def write(self, data: bytes) -> None:
        if data:
            self.open()
            self.tar.update(data)
            self.tar_size += len(data)
            self.raw(self._z.compress(data))

    def close(self) -> None:
        """End the current gzip member or zstd frame (a new one starts with the next write)."""
        if self._z is not None:
            self.raw(self._z.flush())
            self._z = None


def _read(src: BinaryIO, off: int, n: int) -> bytes:
    src.seek(off)
    data = src.read(n)
    if len(data) != n:
        raise LayerError(f"tar ends early at {off + len(data)}")
    return data


def _toc_entry(m: Member) -> dict[str, Any]:
    ti = m.info
    e: dict[str, Any] = {"name": ti.name.decode(), "type": _TYPES[ti.type]}
    if ti.type == tr.DIR and not e["name"].endswith("/"):
        e["name"] += "/"
    if ti.linkname and ti.type in (tr.LINK, tr.SYMLINK):
        e["linkName"] = ti.linkname.decode()
    for key, val in (("mode", ti.mode), ("size", m.size), ("uid", ti.uid), ("gid", ti.gid)):
        if val:
            e[key] = val
    e["modtime"] = format_time(ti.mtime_ns)
    if ti.type in (tr.CHAR, tr.BLOCKDEV):
        e["devMajor"], e["devMinor"] = ti.devmajor, ti.devminor
    if ti.xattrs:
        e["xattrs"] = {
            k.decode("utf-8", "surrogateescape"): base64.b64encode(v).decode() for k, v in ti.xattrs
        }
    return e


def _copy_data(
    src: BinaryIO, m: Member, out: _Out, fmt: str, chunk_size: int
) -> list[dict[str, Any]]:
    """Write a regular file's data, one stream per chunk; return its TOC chunk records."""
    whole = hashlib.sha256()
    recs: list[dict[str, Any]] = []
    pos = 0
    src.seek(m.data)
    while pos < m.size:
        n = min(chunk_size, m.size - pos)
        out.close()
        start = out.size
        h = hashlib.sha256()
        left = n
        while left:
            piece = src.read(min(COPY, left))
            if not piece:
                raise LayerError(f"entry {show(m.path)}: tar ends inside its data")
            h.update(piece)
            whole.update(piece)
            out.write(piece)
            left -= len(piece)
        out.close()
        recs.append(
            {"offset": start, "end": out.size, "chunkOffset": pos, "chunkSize": n,
             "chunkDigest": "sha256:" + h.hexdigest()}
        )  # fmt: skip
        pos += n
    recs[0]["digest"] = "sha256:" + whole.hexdigest()
    return recs


def _file_entries(
    base: dict[str, Any], recs: list[dict[str, Any]], fmt: str
) -> list[dict[str, Any]]:
    """TOC entries of a regular file with data: the `reg` entry, then one `chunk` entry per
    further chunk, as each format spells them."""
    first = dict(base, digest=recs[0]["digest"], offset=recs[0]["offset"])
    if fmt == ZSTD_CHUNKED:
        first["endOffset"] = recs[-1]["end"]
        if len(recs) == 1:
            return [first]
    out = [first]
    for i, r in enumerate(recs):
        e = first if i == 0 else {"name": base["name"], "type": "chunk", "offset": r["offset"]}
        if r["chunkOffset"]:
            e["chunkOffset"] = r["chunkOffset"]
        last = i == len(recs) - 1
        if fmt == ZSTD_CHUNKED or not last:  # eStargz: 0 (absent) means "to the end"
            e["chunkSize"] = r["chunkSize"]
        e["chunkDigest"] = r["chunkDigest"]
        if i:
            out.append(e)
    return out


def _landmark(name: str) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = len(estargz.LANDMARK_DATA)
    ti.mode = 0o644
    ti.mtime = 0
    return ti.tobuf(tarfile.USTAR_FORMAT) + estargz.LANDMARK_DATA + bytes(tarfile.BLOCKSIZE - 1)


def convert(
    src: BinaryIO,
    out: BinaryIO,
    fmt: str,
    prefetch: Sequence[bytes] = (),
    chunk_size: int = CHUNK_SIZE,
) -> Written:
    """Write the layer tar `src` (seekable) to `out` as `fmt` (ESTARGZ or ZSTD_CHUNKED), with
    the files of `prefetch` (absolute paths) first. LayerError on a tar it cannot convert."""
    if fmt not in (ESTARGZ, ZSTD_CHUNKED):
        raise ValueError(f"unknown lazy format {fmt!r}")
    members, tail = walk(src)
    if fmt == ESTARGZ:
        taken = {m.path for m in members} & {
            b"/" + n.encode()
            for n in (estargz.TOC_NAME, estargz.PREFETCH_LANDMARK, estargz.NO_PREFETCH_LANDMARK)
        }
        if taken:
            raise LayerError(f"entry {show(min(taken))}: name reserved by eStargz")
    idx, nfirst = order(members, prefetch)
    w = _Out(out, fmt)
    toc: list[dict[str, Any]] = []
    first_paths: list[str] = []

    def landmark(name: str) -> None:
        data = _landmark(name)  # header, one byte of data, padding
        w.write(data[: tarfile.BLOCKSIZE])
        w.close()
        start = w.size
        w.write(estargz.LANDMARK_DATA)
        w.close()
        dg = "sha256:" + hashlib.sha256(estargz.LANDMARK_DATA).hexdigest()
        recs = [{"offset": start, "end": w.size, "chunkOffset": 0, "chunkSize": 1,
                 "chunkDigest": dg, "digest": dg}]  # fmt: skip
        w.write(data[tarfile.BLOCKSIZE + 1 :])
        base = {"name": name, "type": "reg", "mode": 0o644, "size": 1, "modtime": format_time(0)}
        toc.extend(_file_entries(base, recs, fmt))

    if fmt == ESTARGZ and nfirst == 0:
        landmark(estargz.NO_PREFETCH_LANDMARK)
    for n, i in enumerate(idx):
        if fmt == ESTARGZ and n == nfirst and nfirst:
            landmark(estargz.PREFETCH_LANDMARK)
        m = members[i]
        w.write(_read(src, m.start, m.data - m.start))
        base = _toc_entry(m)
        if m.size:
            toc.extend(_file_entries(base, _copy_data(src, m, w, fmt, chunk_size), fmt))
            if n < nfirst:
                first_paths.append(m.info.name.decode())
        else:
            toc.append(base)
        w.write(_read(src, m.data + m.size, m.end - m.data - m.size))
    if fmt == ESTARGZ and nfirst and nfirst == len(idx):
        landmark(estargz.PREFETCH_LANDMARK)
    if fmt == ZSTD_CHUNKED:
        src.seek(0, io.SEEK_END)
        w.write(_read(src, tail, src.tell() - tail))  # end-of-archive bytes, as they were
        return _finish_zstd(w, toc, first_paths)
    return _finish_estargz(w, toc)


def _finish_zstd(w: _Out, entries: list[dict[str, Any]], first: list[str]) -> Written:
    w.close()
    toc: dict[str, Any] = {"version": 1, "entries": entries}
    if first:
        toc[zstdchunked.PREFETCH_FIELD] = first
    plain = json.dumps(toc, separators=(",", ":")).encode()
    packed = zstandard.ZstdCompressor(level=3).compress(plain)
    toc_off = w.size + 8
    w.raw(zstdchunked.skippable(packed))
    w.raw(zstdchunked.footer(toc_off, len(packed), len(plain)))
    checksum = "sha256:" + hashlib.sha256(packed).hexdigest()
    ann = {}
    for p in zstdchunked.PREFIXES:
        ann[p + zstdchunked.CHECKSUM] = checksum
        ann[p + zstdchunked.POSITION] = f"{toc_off}:{len(packed)}:{len(plain)}:1"
    return Written(
        LAYER_TYPES["zstd"], "sha256:" + w.blob.hexdigest(), w.size,
        "sha256:" + w.tar.hexdigest(), checksum, ann,
    )  # fmt: skip


def _finish_estargz(w: _Out, entries: list[dict[str, Any]]) -> Written:
    w.close()
    plain = json.dumps({"version": 1, "entries": entries}, indent="\t").encode()
    ti = tarfile.TarInfo(estargz.TOC_NAME)
    ti.size = len(plain)
    ti.mode = 0o644
    ti.mtime = 0
    toc_off = w.size
    w.write(ti.tobuf(tarfile.USTAR_FORMAT) + plain + bytes(-len(plain) % tarfile.BLOCKSIZE))
    w.write(bytes(2 * tarfile.BLOCKSIZE))
    w.close()
    w.raw(estargz.footer(toc_off))
    toc_digest = "sha256:" + hashlib.sha256(plain).hexdigest()
    ann = {estargz.TOC_DIGEST: toc_digest, estargz.UNCOMPRESSED_SIZE: str(w.tar_size)}
    return Written(
        LAYER_TYPES["gzip"], "sha256:" + w.blob.hexdigest(), w.size,
        "sha256:" + w.tar.hexdigest(), toc_digest, ann,
    )  # fmt: skip
