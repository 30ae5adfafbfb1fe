"""Read a layer tar as a stream and turn each member into an Entry, whiteouts converted here."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from . import tarreader as tr
from .blobs import Readable
from .errors import LayerError
from .model import Entry, EntryKind
from .paths import normalize, show, split

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
WH_META = b".wh..wh."

_TYPES = {
    tr.REG: EntryKind.FILE,
    tr.CONT: EntryKind.FILE,
    tr.GNU_SPARSE: EntryKind.FILE,
    tr.DIR: EntryKind.DIR,
    tr.SYMLINK: EntryKind.SYMLINK,
    tr.LINK: EntryKind.HARDLINK,
    tr.CHAR: EntryKind.CHAR,
    tr.BLOCKDEV: EntryKind.BLOCK,
    tr.FIFO: EntryKind.FIFO,
}


Item = tuple[Entry, Readable | None]

ID_LIMIT = 1 << 32  # uid/gid/device numbers are 32-bit on Linux (-1 means "unchanged")

# A sparse member declares its expanded size; the store keeps contents expanded, so a few bytes
# of tar could otherwise make it hash and write a terabyte of zeros: bound it.
MAX_SPARSE = 1 << 30


def read_layer(
    stream: Readable,
    warn: Callable[[str], None] = lambda _m: None,
    on_data: Callable[[int, int], None] | None = None,
) -> Iterator[Item]:
    """Yield (entry, content) for each member of a tar stream, in archive order, as Go's
    archive/tar reads the stream (see tarreader.py: how an archive may end, PAX, sparse).

    Entries carry canonical paths (see paths.normalize). `content` is a reader for FILE entries
    (read it fully before advancing; sparse files read expanded). Whiteouts come out as kind
    WHITEOUT; an opaque marker comes out as a DIR entry of its directory with `opaque=True,
    implicit=True` (metadata is not the directory's own: the caller merges it). HARDLINK
    entries carry the canonical target path in `link`; their own header metadata is
    meaningless and left at defaults. PAX global headers are skipped, as docker and
    containerd skip them. `on_data(offset, size)` is called before a FILE entry whose data are
    its content bytes stored as-is in the stream (not sparse, size > 0), when nothing after
    `offset` has been read yet: the tar-split recorder cuts them out.
    """
    reader = tr.TarReader(stream)
    while (m := reader.next()) is not None:
        if m.type == tr.XGLOBAL:
            continue
        yield from _convert(reader, m, warn, on_data)


def _convert(
    reader: tr.TarReader,
    m: tr.Member,
    warn: Callable[[str], None],
    on_data: Callable[[int, int], None] | None,
) -> Iterator[Item]:
    raw = m.name
    path = normalize(raw)
    parent, name = split(path)
    kind = _TYPES.get(m.type)
    if kind is None:
        warn(f"entry {show(raw)}: unsupported tar type {m.type!r}, skipped")
        return
    mtime = m.mtime_ns
    if name.startswith(WH_PREFIX):
        if name == WH_OPAQUE:
            yield (
                Entry(*split(parent), EntryKind.DIR, 0o755, 0, 0, 0, 0, opaque=True, implicit=True),
                None,
            )
            return
        if name.startswith(WH_META):
            warn(f"entry {show(raw)}: AUFS internal whiteout name, skipped")
            return
        hidden = name[len(WH_PREFIX) :]
        if hidden in (b"", b".", b"..") or b"/" in hidden:
            raise LayerError(f"entry {show(raw)}: invalid whiteout name")
        yield Entry(parent, hidden, EntryKind.WHITEOUT, 0, 0, 0, 0, mtime), None
        return
    for what, value in (("uid", m.uid), ("gid", m.gid)):
        if not 0 <= value < ID_LIMIT:
            raise LayerError(f"entry {show(raw)}: {what} {value} out of range")
    if kind in (EntryKind.CHAR, EntryKind.BLOCK) and not (
        0 <= m.devmajor < ID_LIMIT and 0 <= m.devminor < ID_LIMIT
    ):
        raise LayerError(f"entry {show(raw)}: device number out of range")
    if path == b"/" and kind != EntryKind.DIR:
        raise LayerError(f"entry {show(raw)}: the layer root must be a directory")
    mode = m.mode & 0o7777
    xattrs = m.xattrs
    if not -(1 << 63) <= mtime < 1 << 63:
        raise LayerError(f"entry {show(raw)}: modification time out of range")
    for key, _ in xattrs:
        if not key or b"\0" in key:
            raise LayerError(f"entry {show(raw)}: invalid xattr name {show(key)}")
    if kind == EntryKind.HARDLINK:
        target = normalize(m.linkname, f"hard link {show(raw)} ->")
        if target == path:
            raise LayerError(f"entry {show(raw)}: hard link to itself")
        yield Entry(parent, name, kind, mode, m.uid, m.gid, 0, mtime, link=target), None
        return
    if kind == EntryKind.FILE:
        if m.sparse and m.size > MAX_SPARSE:
            raise LayerError(
                f"entry {show(raw)}: sparse file of {m.size} bytes (the limit is {MAX_SPARSE})"
            )
        if on_data is not None and m.size > 0 and not m.sparse:
            on_data(m.offset, m.size)
        yield Entry(parent, name, kind, mode, m.uid, m.gid, m.size, mtime, xattrs=xattrs), reader
        return
    if kind == EntryKind.SYMLINK:
        target = m.linkname
        if b"\0" in target or not target:
            raise LayerError(f"entry {show(raw)}: invalid symlink target")
        yield (
            Entry(
                parent,
                name,
                kind,
                0o777,  # whatever the header says: a Linux symlink has no mode of its own
                m.uid,
                m.gid,
                len(target),
                mtime,
                link=target,
                xattrs=xattrs,
            ),
            None,
        )
        return
    rdev = (m.devmajor, m.devminor) if kind in (EntryKind.CHAR, EntryKind.BLOCK) else None
    yield Entry(parent, name, kind, mode, m.uid, m.gid, 0, mtime, rdev=rdev, xattrs=xattrs), None
