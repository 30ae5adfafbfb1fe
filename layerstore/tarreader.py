"""Read tar members from a stream exactly as Go's archive/tar reads them.

docker, containerd, podman, buildah, skopeo and umoci all read layers with Go's archive/tar, so
this reader follows its rules rather than Python's tarfile: every header format (v7, ustar,
pax, GNU, star), base-256 numbers, PAX records (an empty value keeps the header's value and
sets no xattr; global headers are returned, not applied), GNU long names, every sparse format
(old GNU, PAX 0.0, 0.1 and 1.0, expanded on read), and the ways an archive may end: no data
at all, EOF where the last member's padding or the end-of-archive marker would be, or two zero
blocks followed by anything. It refuses what Go refuses (a bad checksum, an unparsable number
or record, a zero block followed by a header, truncated data) with a LayerError naming the
entry. It never reads ahead of what it returns: `pos` is the stream offset it has consumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

from .blobs import CHUNK, Readable
from .errors import LayerError
from .paths import show

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)
# Largest PAX header or GNU long name/link body, as in Go (and libarchive): each is held in memory.
MAX_SPECIAL = 1 << 20
# Sparse maps are held in memory too; Go trusts them once read, we also bound their length.
MAX_SPARSE_ENTRIES = 1 << 18

# Type flags (Go's TypeReg etc.).
REG, REGA, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO, CONT = (
    b"0",
    b"\0",
    b"1",
    b"2",
    b"3",
    b"4",
    b"5",
    b"6",
    b"7",
)
XHEADER, XGLOBAL, GNU_SPARSE, GNU_LONGNAME, GNU_LONGLINK = b"x", b"g", b"S", b"L", b"K"
HEADER_ONLY = frozenset((LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO))  # no data, whatever the size

_OCTAL = re.compile(rb"[0-7]+")
_DECIMAL = re.compile(rb"[+-]?[0-9]+")
_DIGITS = re.compile(rb"[0-9]*")
_INT64 = 1 << 63
_HIGH = bytes(range(128, 256))


class _Bad(Exception):
    """A header Go's reader calls invalid (ErrHeader); the caller names the entry."""


@dataclass(frozen=True, slots=True)
class Member:
    """One member as Go's tar.Reader.Next returns it (after PAX, long-name and sparse headers).

    `size` is the logical size (a sparse file's expanded size); `offset` and `physical` are
    where its data section lies in the stream and how long it is (0 for header-only types;
    a sparse member's map, in the data with PAX 1.0, is not part of it). `start` is where its
    first header (extension headers included) begins.
    `xattrs` are the non-empty SCHILY.xattr records, sorted. `pax` holds every PAX record that
    applied to the member (global headers: their own records).
    """

    type: bytes
    name: bytes
    linkname: bytes
    size: int
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    devmajor: int
    devminor: int
    xattrs: tuple[tuple[bytes, bytes], ...]
    pax: dict[bytes, bytes]
    sparse: bool
    offset: int
    physical: int
    start: int


def parse_int(s: bytes) -> int:
    """strconv.ParseInt(s, 10, 64): optional sign, decimal digits, within int64."""
    if not _DECIMAL.fullmatch(s):
        raise _Bad(f"invalid number {s[:40]!r}")
    v = int(s)
    if not -_INT64 <= v < _INT64:
        raise _Bad(f"number out of range {s[:40]!r}")
    return v


def _cstr(b: bytes) -> bytes:
    i = b.find(b"\0")
    return b if i < 0 else b[:i]


def parse_octal(b: bytes) -> int:
    b = _cstr(b.strip(b" \0"))
    if not b:
        return 0
    if not _OCTAL.fullmatch(b):
        raise _Bad(f"invalid octal number {b!r}")
    return int(b, 8)


def parse_numeric(b: bytes) -> int:
    """A header number field: base-256 (two's complement) if the high bit is set, else octal."""
    if b and b[0] & 0x80:
        inv = 0xFF if b[0] & 0x40 else 0
        x = 0
        for i, c in enumerate(b):
            c ^= inv
            if i == 0:
                c &= 0x7F
            if x >> 56:
                raise _Bad("base-256 number overflows")
            x = x << 8 | c
        if x >> 63:
            raise _Bad("base-256 number overflows")
        return ~x if inv else x
    return parse_octal(b)


def parse_pax_time(s: bytes) -> int:
    """A PAX time (`%d.%d`, sign allowed) in nanoseconds, as Go's parsePAXTime reads it."""
    secs_s, dot, frac = s.partition(b".")
    secs = parse_int(secs_s)
    if not dot or not frac:
        return secs * 1_000_000_000
    if not _DIGITS.fullmatch(frac):
        raise _Bad(f"invalid time {s[:40]!r}")
    nsecs = int(frac[:9].ljust(9, b"0"))
    return secs * 1_000_000_000 + (-nsecs if secs_s.startswith(b"-") else nsecs)


def parse_pax(buf: bytes) -> dict[bytes, bytes]:
    """The records of a PAX header body (GNU sparse 0.0 offset/numbytes pairs gathered into
    GNU.sparse.map, as Go does)."""
    records: dict[bytes, bytes] = {}
    sparse: list[bytes] = []
    while buf:
        n_s, sp, rest = buf.partition(b" ")
        if not sp:
            raise _Bad("malformed PAX record")
        n = parse_int(n_s)
        if n < 5 or n > len(buf):
            raise _Bad("malformed PAX record length")
        n -= len(n_s) + 1
        if n <= 0 or rest[n - 1 : n] != b"\n":
            raise _Bad("malformed PAX record")
        key, eq, value = rest[: n - 1].partition(b"=")
        buf = rest[n:]
        if not eq or not key:
            raise _Bad("malformed PAX record")
        if key in (b"path", b"linkpath", b"uname", b"gname"):
            if b"\0" in value:
                raise _Bad(f"NUL in PAX {key.decode()}")
        elif b"\0" in key:
            raise _Bad("NUL in a PAX key")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            want = b"GNU.sparse.offset" if len(sparse) % 2 == 0 else b"GNU.sparse.numbytes"
            if key != want or b"," in value:
                raise _Bad("malformed GNU sparse 0.0 records")
            sparse.append(value)
        else:
            records[key] = value
    if sparse:
        records[b"GNU.sparse.map"] = b",".join(sparse)
    return records


def _xattr_record(key: bytes, value: bytes) -> bool:
    """A record Go's Header.Xattrs holds (the one xattr spelling the runtimes read)."""
    return bool(value) and key.startswith(b"SCHILY.xattr.")


def _checksum_ok(blk: bytes) -> bool:
    """Go accepts the stored sum of the bytes as unsigned or as signed chars (the checksum
    field itself counted as spaces)."""
    try:
        value = parse_octal(blk[148:156])
    except _Bad:
        return False
    field = blk[148:156]
    unsigned = sum(blk) - sum(field) + 8 * 32
    high = (BLOCK - len(blk.translate(None, _HIGH))) - (8 - len(field.translate(None, _HIGH)))
    return value in (unsigned, unsigned - 256 * high)


def _format(blk: bytes) -> str | None:
    """Go's block.getFormat: None for a bad checksum, else v7/ustar/gnu/star."""
    if not _checksum_ok(blk):
        return None
    magic = blk[257:263]
    if magic == b"ustar\0":
        return "star" if blk[508:512] == b"tar\0" else "ustar"
    if magic == b"ustar " and blk[263:265] == b" \0":
        return "gnu"
    return "v7"


def _sparse_entries_valid(spd: list[tuple[int, int]], size: int) -> bool:
    if size < 0:
        return False
    pre_end = 0
    for off, length in spd:
        if off < 0 or length < 0 or off > _INT64 - 1 - length:
            return False
        if off + length > size or pre_end > off:
            return False
        pre_end = off + length
    return True


def _holes(spd: list[tuple[int, int]], size: int) -> list[tuple[int, int]]:
    """Go's invertSparseEntries: the holes (offset, end) of a data map; the last always ends at
    `size` (possibly empty)."""
    out: list[tuple[int, int]] = []
    pre = 0
    for off, length in spd:
        if length == 0:
            continue
        if off - pre > 0:
            out.append((pre, off))
        pre = off + length
    out.append((pre, size))
    return out


class TarReader:
    """Members of a tar stream, in order: `next()` gives a Member (None at the end), `read(n)`
    the current member's logical data (zeros in sparse holes). Unread data is skipped."""

    def __init__(self, stream: Readable) -> None:
        self._s = stream
        self.pos = 0  # stream bytes consumed
        self._left = 0  # physical data bytes of the current member not yet read
        self._pad = 0
        self._done = False
        self._name = b""  # the current member's name, for messages
        self._prev = b""  # the last member returned, for messages about the next header
        self._holes: list[tuple[int, int]] | None = None
        self._hi = 0  # index of the current hole
        self._lpos = 0  # logical position in a sparse member
        self._lsize = 0

    # ---- raw stream --------------------------------------------------------------------

    def _read_up_to(self, n: int) -> bytes:
        data = self._s.read(n)
        if len(data) < n and data:
            parts = [data]
            got = len(data)
            while got < n:
                more = self._s.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.pos += len(data)
        return data

    def _must(self, n: int, what: str) -> bytes:
        data = self._read_up_to(n)
        if len(data) != n:
            raise self._error(f"unexpected end of data in {what}")
        return data

    def _error(self, why: str, name: bytes | None = None) -> LayerError:
        name = self._name if name is None else name
        if name:
            return LayerError(f"entry {show(name)}: {why}")
        where = f"after entry {show(self._prev)}" if self._prev else "at the start"
        return LayerError(f"{why} (tar header at byte {self.pos}, {where})")

    # ---- data of the current member ----------------------------------------------------

    def _phys(self, n: int) -> bytes:
        """Up to n bytes of the current member's physical data (fewer only at its end)."""
        n = min(n, self._left)
        if n <= 0:
            return b""
        data = self._read_up_to(n)
        self._left -= len(data)
        if len(data) != n:
            raise self._error(f"unexpected end of data ({self._left} bytes missing)")
        return data

    def read(self, n: int = -1, /) -> bytes:
        if self._holes is None:
            return self._phys(CHUNK if n < 0 else n)
        return self._sparse_read(CHUNK if n < 0 else n)

    def _sparse_read(self, n: int) -> bytes:
        holes = self._holes
        assert holes is not None
        n = min(n, self._lsize - self._lpos)
        parts: list[bytes] = []
        while n > 0:
            start, end = holes[self._hi]
            if self._lpos < start:  # in a data fragment
                want = min(n, start - self._lpos)
                data = self._phys(want)
                if len(data) != want:
                    raise self._error("sparse file references non-existent data")
            else:
                want = min(n, end - self._lpos)
                data = bytes(want)
            parts.append(data)
            self._lpos += want
            n -= want
            if self._lpos >= end and self._hi < len(holes) - 1:
                self._hi += 1
        if self._lpos >= self._lsize and self._left > 0:
            raise self._error("sparse file contains unreferenced data")
        return b"".join(parts)

    def _skip_rest(self) -> None:
        while self._left > 0:
            self._phys(CHUNK)

    # ---- headers -----------------------------------------------------------------------

    def next(self) -> Member | None:
        if self._done:
            return None
        pax: dict[bytes, bytes] = {}
        long_name = long_link = b""
        first = -1  # where this member's first header begins
        while True:
            self._skip_rest()
            self._holes = None
            if self._pad:
                pad, self._pad = self._pad, 0
                if len(self._read_up_to(pad)) != pad:
                    self._done = True  # EOF where padding would be: Go ends cleanly
                    return None
            self._name = b""
            start = self.pos
            if first < 0:
                first = start
            blk = self._read_up_to(BLOCK)
            if not blk:
                self._done = True
                return None
            if len(blk) != BLOCK:
                raise self._error("unexpected end of data in a header")
            if blk == ZERO_BLOCK:
                blk2 = self._read_up_to(BLOCK)
                if not blk2 or blk2 == ZERO_BLOCK:
                    self._done = True
                    return None
                if len(blk2) != BLOCK:
                    raise self._error("unexpected end of data after a zero block")
                raise self._error("a zero block followed by a header (not an end-of-archive)")
            try:
                m = self._header(blk, start, first)
            except _Bad as exc:
                raise self._error(f"invalid tar header: {exc}") from None
            typ = m.type
            if typ in (XHEADER, XGLOBAL):
                try:
                    records = parse_pax(self._special(m))
                except _Bad as exc:
                    raise self._error(f"invalid PAX header {show(m.name)}: {exc}") from None
                if typ == XGLOBAL:  # returned as it is, its records applied to nothing else
                    xattrs = {k[13:]: v for k, v in records.items() if _xattr_record(k, v)}
                    name = records.get(b"path") or m.name
                    return replace(m, name=name, xattrs=tuple(sorted(xattrs.items())), pax=records)
                pax = records
                continue
            if typ in (GNU_LONGNAME, GNU_LONGLINK):
                value = _cstr(self._special(m))
                if typ == GNU_LONGNAME:
                    long_name = value
                else:
                    long_link = value
                continue
            try:
                return self._finish(m, blk, pax, long_name, long_link)
            except _Bad as exc:
                raise self._error(f"invalid tar header: {exc}") from None

    def _special(self, m: Member) -> bytes:
        """The body of a PAX or GNU long-name header (at most MAX_SPECIAL bytes, as in Go)."""
        if m.physical > MAX_SPECIAL:
            raise self._error(
                f"a {m.physical}-byte metadata header (PAX or GNU long name; the limit is "
                f"{MAX_SPECIAL}, as in Go's archive/tar)"
            )
        data = self._phys(m.physical)
        return data

    def _header(self, blk: bytes, start: int, first: int) -> Member:
        """Go's readHeader + handleRegularFile for one header block."""
        fmt = _format(blk)
        if fmt is None:
            raise _Bad("bad checksum")
        typ = blk[156:157]
        name = _cstr(blk[0:100])
        size = parse_numeric(blk[124:136])
        mode = parse_numeric(blk[100:108])
        uid = parse_numeric(blk[108:116])
        gid = parse_numeric(blk[116:124])
        mtime = parse_numeric(blk[136:148])
        devmajor = devminor = 0
        if fmt != "v7":
            devmajor = parse_numeric(blk[329:337])
            devminor = parse_numeric(blk[337:345])
            prefix = b""
            if fmt == "ustar":
                prefix = _cstr(blk[345:500])
            elif fmt == "star":
                prefix = _cstr(blk[345:476])
                parse_numeric(blk[476:488])
                parse_numeric(blk[488:500])
            else:
                try:  # Go reads atime/ctime to spot a pre-Go1.8 writer's prefix there
                    if blk[345]:
                        parse_numeric(blk[345:357])
                    if blk[357]:
                        parse_numeric(blk[357:369])
                except _Bad:
                    s = _cstr(blk[345:500])
                    if all(c < 0x80 for c in s):
                        prefix = s
            if prefix:
                name = prefix + b"/" + name
        physical = 0 if typ in HEADER_ONLY else size
        if physical < 0:
            raise _Bad("negative size")
        self._left = physical
        self._pad = -physical % BLOCK
        return Member(
            typ, name, _cstr(blk[157:257]), size, mode, uid, gid, mtime * 1_000_000_000,
            devmajor, devminor, (), {}, False, start + BLOCK, physical, first,
        )  # fmt: skip

    def _finish(
        self,
        m: Member,
        blk: bytes,
        pax: dict[bytes, bytes],
        long_name: bytes,
        long_link: bytes,
    ) -> Member:
        """Go's mergePAX, long names, TypeRegA, handleRegularFile again and handleSparseFile."""
        self._name = m.name
        name, link, size, uid, gid, mtime = m.name, m.linkname, m.size, m.uid, m.gid, m.mtime_ns
        xattrs: dict[bytes, bytes] = {}
        for k, v in pax.items():
            if not v:
                continue  # an empty value keeps the header's value (and sets no xattr)
            if k == b"path":
                name = v
            elif k == b"linkpath":
                link = v
            elif k == b"uid":
                uid = parse_int(v)
            elif k == b"gid":
                gid = parse_int(v)
            elif k == b"mtime":
                mtime = parse_pax_time(v)
            elif k in (b"atime", b"ctime"):
                parse_pax_time(v)
            elif k == b"size":
                size = parse_int(v)
            elif _xattr_record(k, v):
                xattrs[k[13:]] = v
        if long_name:
            name = long_name
        if long_link:
            link = long_link
        typ = m.type
        if typ == REGA:
            typ = DIR if name.endswith(b"/") else REG
        self._name = name
        physical = 0 if typ in HEADER_ONLY else size
        if physical < 0:
            raise _Bad("negative size")
        self._left = physical
        self._pad = -physical % BLOCK
        spd: list[tuple[int, int]] | None = None
        if typ == GNU_SPARSE:
            spd, size = self._old_gnu_sparse(blk)
        else:
            got = self._pax_sparse(pax)
            if got is not None:
                spd, name, size = got[0], got[1] or name, got[2] if got[2] is not None else size
                self._name = name
        if spd is not None:
            if typ in HEADER_ONLY or not _sparse_entries_valid(spd, size):
                raise _Bad("invalid sparse map")
            self._holes = _holes(spd, size)
            self._hi = 0
            self._lpos = 0
            self._lsize = size
        m = Member(
            typ, name, link, size, m.mode, uid, gid, mtime, m.devmajor, m.devminor,
            tuple(sorted(xattrs.items())), pax, spd is not None, self.pos, self._left, m.start,
        )  # fmt: skip
        self._prev = name
        return m

    def _old_gnu_sparse(self, blk: bytes) -> tuple[list[tuple[int, int]], int]:
        if _format(blk) != "gnu":
            raise _Bad("old GNU sparse header in a non-GNU header")
        size = parse_numeric(blk[483:495])
        spd: list[tuple[int, int]] = []
        area, entries, ext = blk[386:482], 4, blk[482]
        while True:
            for i in range(entries):
                e = area[i * 24 : i * 24 + 24]
                if e[0] == 0:
                    break
                spd.append((parse_numeric(e[0:12]), parse_numeric(e[12:24])))
            if len(spd) > MAX_SPARSE_ENTRIES:
                raise _Bad(f"sparse map of more than {MAX_SPARSE_ENTRIES} entries")
            if not ext:
                return spd, size
            # Extension blocks sit between the header and the data, outside the data's size.
            ext_blk = self._must(BLOCK, "a sparse header")
            area, entries, ext = ext_blk[0:504], 21, ext_blk[504]

    def _pax_sparse(
        self, pax: dict[bytes, bytes]
    ) -> tuple[list[tuple[int, int]], bytes, int | None] | None:
        """Go's readGNUSparsePAXHeaders: (map, name or b"", size or None), or None."""
        major, minor = pax.get(b"GNU.sparse.major", b""), pax.get(b"GNU.sparse.minor", b"")
        if major == b"0" and minor in (b"0", b"1"):
            v1 = False
        elif major == b"1" and minor == b"0":
            v1 = True
        elif major or minor:
            return None  # an unknown version: not sparse
        elif pax.get(b"GNU.sparse.map"):
            v1 = False
        else:
            return None
        name = pax.get(b"GNU.sparse.name", b"")
        size_s = pax.get(b"GNU.sparse.size", b"") or pax.get(b"GNU.sparse.realsize", b"")
        size = parse_int(size_s) if size_s else None
        return (self._sparse_map_1x0() if v1 else _sparse_map_0x1(pax)), name, size

    def _sparse_map_1x0(self) -> list[tuple[int, int]]:
        """The map at the start of the data: decimal numbers, one a line, in whole blocks."""
        buf = bytearray()
        newlines = 0

        def feed(n: int) -> None:
            nonlocal newlines
            while newlines < n:
                if len(buf) >= MAX_SPECIAL:
                    raise _Bad(f"sparse map larger than {MAX_SPECIAL} bytes")
                blk = self._phys(BLOCK)
                if len(blk) != BLOCK:
                    raise self._error("unexpected end of data in a sparse map")
                buf.extend(blk)
                newlines += blk.count(b"\n")

        pos = 0

        def token() -> bytes:
            nonlocal pos, newlines
            end = buf.index(b"\n", pos)
            tok = bytes(buf[pos:end])
            pos = end + 1
            newlines -= 1
            return tok

        feed(1)
        count = parse_int(token())
        if count < 0 or count > MAX_SPARSE_ENTRIES:
            raise _Bad("invalid sparse map entry count")
        feed(2 * count)
        return [(parse_int(token()), parse_int(token())) for _ in range(count)]


def _sparse_map_0x1(pax: dict[bytes, bytes]) -> list[tuple[int, int]]:
    count = parse_int(pax.get(b"GNU.sparse.numblocks", b""))
    if count < 0 or count > MAX_SPARSE_ENTRIES:
        raise _Bad("invalid sparse map entry count")
    raw = pax.get(b"GNU.sparse.map", b"")
    fields = raw.split(b",") if raw else []
    if len(fields) != 2 * count:
        raise _Bad("sparse map does not match its entry count")
    return [(parse_int(fields[i]), parse_int(fields[i + 1])) for i in range(0, len(fields), 2)]
