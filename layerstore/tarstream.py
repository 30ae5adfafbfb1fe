"""Read a layer tar as a stream and turn each member into an Entry, whiteouts converted here."""

from __future__ import annotations

import base64
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from typing import Protocol

from .blobs import Readable
from .errors import LayerError
from .model import Entry, EntryKind
from .paths import normalize, show, split

WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"
WH_META = b".wh..wh."

_TYPES = {
    tarfile.REGTYPE: EntryKind.FILE,
    tarfile.AREGTYPE: EntryKind.FILE,
    tarfile.CONTTYPE: EntryKind.FILE,
    tarfile.GNUTYPE_SPARSE: EntryKind.FILE,
    tarfile.DIRTYPE: EntryKind.DIR,
    tarfile.SYMTYPE: EntryKind.SYMLINK,
    tarfile.LNKTYPE: EntryKind.HARDLINK,
    tarfile.CHRTYPE: EntryKind.CHAR,
    tarfile.BLKTYPE: EntryKind.BLOCK,
    tarfile.FIFOTYPE: EntryKind.FIFO,
}


def _b(s: str) -> bytes:
    # tarfile decoded with utf-8 + surrogateescape: this gives the original bytes back.
    return s.encode("utf-8", "surrogateescape")


def _mtime_ns(ti: tarfile.TarInfo) -> int:
    raw = ti.pax_headers.get("mtime")
    if raw is not None:
        try:
            return int(Decimal(raw) * 1_000_000_000)
        except (InvalidOperation, ValueError):
            pass
    return int(ti.mtime) * 1_000_000_000


def _xattrs(ti: tarfile.TarInfo) -> tuple[tuple[bytes, bytes], ...]:
    out: dict[bytes, bytes] = {}
    for key, value in ti.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            out[_b(key[len("SCHILY.xattr.") :])] = _b(value)
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            try:
                out[name] = base64.b64decode(value + "=" * (-len(value) % 4))
            except ValueError:
                continue
    return tuple(sorted(out.items()))


Item = tuple[Entry, Readable | None]


class _Stream(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _MemberData:
    """The data of one member, read straight from the archive stream: at most `size` bytes,
    fewer only if the stream ends. (tarfile's extractfile() adds two buffered layers and an
    object per member; the stream position after the header is the data's, and tarfile
    skips whatever is not read when it moves to the next header.)"""

    def __init__(self, stream: _Stream, size: int) -> None:
        self._stream = stream
        self._left = size

    def read(self, n: int = -1, /) -> bytes:
        if n < 0 or n > self._left:
            n = self._left
        if n == 0:
            return b""
        data = self._stream.read(n)
        self._left -= len(data)
        return data


ID_LIMIT = 1 << 32  # uid/gid/device numbers are 32-bit on Linux (-1 means "unchanged")

# tarfile reads a PAX or GNU long-name header's whole body into memory: bound it.
MAX_META = 16 << 20
# A sparse member declares its expanded size; the store keeps contents expanded, so a few bytes
# of tar could otherwise make it hash and write a terabyte of zeros: bound it.
MAX_SPARSE = 1 << 30
_META_TYPES = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


class _BoundedTarInfo(tarfile.TarInfo):
    """TarInfo refusing metadata headers (PAX, GNU long names) larger than MAX_META."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        # tarfile's private hook, called once per header read (stable in 3.11-3.13).
        if self.type in _META_TYPES and self.size > MAX_META:
            raise LayerError(
                f"a {self.size}-byte metadata header (PAX or GNU long name; the limit is "
                f"{MAX_META})"
            )
        proc = getattr(super(), "_proc_member")  # noqa: B009 - private, absent from the stubs
        result: tarfile.TarInfo = proc(tf)
        return result


def read_layer(
    stream: Readable,
    warn: Callable[[str], None] = lambda _m: None,
    on_data: Callable[[int, int], None] | None = None,
) -> Iterator[Item]:
    """Yield (entry, content) for each member of a tar stream, in archive order.

    Entries carry canonical paths (see paths.normalize). `content` is a reader for FILE entries
    (read it fully before advancing). Whiteouts come out as kind WHITEOUT; an opaque marker
    comes out as a DIR entry of its directory with `opaque=True, implicit=True` (metadata is
    not the directory's own: the caller merges it). HARDLINK entries carry the canonical
    target path in `link`; their own header metadata is meaningless and left at defaults.
    A missing end-of-archive marker is accepted; truncation inside a member is a LayerError.
    `on_data(offset, size)` is called before a FILE entry whose data are its content bytes
    stored as-is in the stream (not sparse, size > 0): the tar-split recorder cuts them out.
    """
    try:
        tf = tarfile.open(  # noqa: SIM115 - closed by the `with` below
            fileobj=stream,  # type: ignore[call-overload]
            mode="r|",
            tarinfo=_BoundedTarInfo,
            encoding="utf-8",
            errors="surrogateescape",
        )
    except tarfile.ReadError as exc:
        if str(exc) == "empty file":
            return
        raise LayerError(f"not a tar archive: {exc}") from None
    with tf:
        while True:
            try:
                ti = tf.next()
            except tarfile.TarError as exc:
                raise LayerError(f"corrupt tar: {exc}") from None
            if ti is None:
                break
            tf.members.clear()  # stream mode: never keep all headers in memory
            yield from _convert(tf, ti, warn, on_data)


def _convert(
    tf: tarfile.TarFile,
    ti: tarfile.TarInfo,
    warn: Callable[[str], None],
    on_data: Callable[[int, int], None] | None,
) -> Iterator[Item]:
    raw = _b(ti.name)
    path = normalize(raw)
    parent, name = split(path)
    kind = _TYPES.get(ti.type)
    if kind is None:
        warn(f"entry {show(raw)}: unsupported tar type {ti.type!r}, skipped")
        return
    mtime = _mtime_ns(ti)
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
    for what, value in (("uid", ti.uid), ("gid", ti.gid)):
        if not 0 <= value < ID_LIMIT:
            raise LayerError(f"entry {show(raw)}: {what} {value} out of range")
    if kind in (EntryKind.CHAR, EntryKind.BLOCK) and not (
        0 <= ti.devmajor < ID_LIMIT and 0 <= ti.devminor < ID_LIMIT
    ):
        raise LayerError(f"entry {show(raw)}: device number out of range")
    if path == b"/" and kind != EntryKind.DIR:
        raise LayerError(f"entry {show(raw)}: the layer root must be a directory")
    mode = ti.mode & 0o7777
    xattrs = _xattrs(ti)
    if not -(1 << 63) <= mtime < 1 << 63:
        raise LayerError(f"entry {show(raw)}: modification time out of range")
    for key, _ in xattrs:
        if not key or b"\0" in key:
            raise LayerError(f"entry {show(raw)}: invalid xattr name {show(key)}")
    if kind == EntryKind.HARDLINK:
        target = normalize(_b(ti.linkname), f"hard link {show(raw)} ->")
        if target == path:
            raise LayerError(f"entry {show(raw)}: hard link to itself")
        yield Entry(parent, name, kind, mode, ti.uid, ti.gid, 0, mtime, link=target), None
        return
    if kind == EntryKind.FILE:
        if ti.sparse is not None and ti.size > MAX_SPARSE:
            raise LayerError(
                f"entry {show(raw)}: sparse file of {ti.size} bytes (the limit is {MAX_SPARSE})"
            )
        stream = tf.fileobj
        fobj: Readable | None
        if ti.sparse is None and stream is not None and stream.tell() == ti.offset_data:
            fobj = _MemberData(stream, ti.size)
        else:
            fobj = tf.extractfile(ti)
        if on_data is not None and ti.size > 0 and ti.sparse is None:
            on_data(ti.offset_data, ti.size)
        yield Entry(parent, name, kind, mode, ti.uid, ti.gid, ti.size, mtime, xattrs=xattrs), fobj
        return
    if kind == EntryKind.SYMLINK:
        target = _b(ti.linkname)
        if b"\0" in target or not target:
            raise LayerError(f"entry {show(raw)}: invalid symlink target")
        yield (
            Entry(
                parent,
                name,
                kind,
                mode,
                ti.uid,
                ti.gid,
                len(target),
                mtime,
                link=target,
                xattrs=xattrs,
            ),
            None,
        )
        return
    rdev = (ti.devmajor, ti.devminor) if kind in (EntryKind.CHAR, EntryKind.BLOCK) else None
    yield Entry(parent, name, kind, mode, ti.uid, ti.gid, 0, mtime, rdev=rdev, xattrs=xattrs), None
