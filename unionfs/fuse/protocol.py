"""The FUSE wire protocol of the kernel's uapi <linux/fuse.h>: codecs for every request and
reply, pure (no I/O)."""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

# Requests are decoded into NamedTuples, not dataclasses: one is made per request, and a
# frozen dataclass's __init__ costs several times a tuple's.

VERSION = 7
# The newest minor version whose layouts this module follows (7.40: passthrough). The
# session speaks min(this, the kernel's).
MINOR = 40
ROOT_ID = 1
MIN_READ_BUFFER = 8192


class Opcode(enum.IntEnum):
    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36  # no reply (unless EAGAIN)
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41  # no reply
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53
    CUSE_INIT = 4096


NO_REPLY = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.NOTIFY_REPLY, Opcode.INTERRUPT})


class Notify(enum.IntEnum):
    """Notification codes: the `error` field of a message with unique 0."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6
    RESEND = 7
    INC_EPOCH = 8
    PRUNE = 9


# INIT flags; bits 32..63 travel in flags2 (with INIT_EXT).
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
RELEASE_FLUSH = 1 << 0
WRITE_CACHE = 1 << 0
WRITE_KILL_SUIDGID = 1 << 2
EXPIRE_ONLY = 1 << 0  # notify_inval_entry flags
UNIQUE_RESEND = 1 << 63

# Device ioctls (_IOR/_IOW with magic 229).
_IOC_WRITE, _IOC_READ = 1, 2
DEV_IOC_CLONE = (_IOC_READ << 30) | (4 << 16) | (229 << 8) | 0
DEV_IOC_BACKING_OPEN = (_IOC_WRITE << 30) | (16 << 16) | (229 << 8) | 1
DEV_IOC_BACKING_CLOSE = (_IOC_WRITE << 30) | (4 << 16) | (229 << 8) | 2

# -- layouts --------------------------------------------------------------------------------
# Native byte order, the standard sizes and no implicit padding ("="): the kernel writes its
# structs in the machine's own order, with the explicit padding fields of the header.
IN_HEADER = struct.Struct("=IIQQIIIHH")  # len opcode unique nodeid uid gid pid total_extlen pad
OUT_HEADER = struct.Struct("=IiQ")  # len error unique
# struct fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode nlink
# uid gid rdev blksize flags. The times are u64 in the header, signed in the kernel's use
# (a time before 1970 travels as its two's complement).
_ATTR = "QQQqqqIIIIIIIIII"
ATTR = struct.Struct("=" + _ATTR)
# fuse_entry_out: nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec attr
ENTRY_OUT = struct.Struct("=QQQQII" + _ATTR)
ATTR_OUT = struct.Struct("=QII" + _ATTR)  # attr_valid attr_valid_nsec dummy attr
OPEN_OUT = struct.Struct("=QIi")  # fh open_flags backing_id
CREATE_OUT = struct.Struct("=QQQQII" + _ATTR + "QIi")  # entry_out then open_out
WRITE_OUT = struct.Struct("=II")  # size padding
GETXATTR_OUT = struct.Struct("=II")  # size padding
STATFS_OUT = struct.Struct("=QQQQQIII4x24x")  # blocks bfree bavail files ffree bsize namelen frsize
INIT_OUT = struct.Struct("=IIIIHHIIHHIIH22x")
LK_OUT = struct.Struct("=QQII")  # start end type pid
BMAP_OUT = struct.Struct("=Q")
IOCTL_OUT = struct.Struct("=iIII")  # result flags in_iovs out_iovs
POLL_OUT = struct.Struct("=II")  # revents padding
LSEEK_OUT = struct.Struct("=Q")
COPY_FILE_RANGE_OUT = struct.Struct("=Q")
DIRENT = struct.Struct("=QQII")  # ino off namelen type, then the name, padded to 8
SX_TIME = "qIi"
STATX = struct.Struct(
    "=IIQIIIHHQQQQ" + SX_TIME * 4 + "IIII112x"
)  # mask blksize attributes nlink uid gid mode spare ino size blocks attributes_mask
#    atime btime ctime mtime rdev_major rdev_minor dev_major dev_minor
STATX_OUT = struct.Struct("=QIIQQ")  # attr_valid attr_valid_nsec flags spare[2], then statx

FORGET_IN = struct.Struct("=Q")
FORGET_ONE = struct.Struct("=QQ")
BATCH_FORGET_IN = struct.Struct("=II")
GETATTR_IN = struct.Struct("=IIQ")
SETATTR_IN = struct.Struct("=IIQQQqqqIIIIIIII")
MKNOD_IN = struct.Struct("=IIII")
MKDIR_IN = struct.Struct("=II")
RENAME_IN = struct.Struct("=Q")
RENAME2_IN = struct.Struct("=QII")
LINK_IN = struct.Struct("=Q")
OPEN_IN = struct.Struct("=II")
CREATE_IN = struct.Struct("=IIII")
RELEASE_IN = struct.Struct("=QIIQ")
FLUSH_IN = struct.Struct("=QIIQ")
READ_IN = struct.Struct("=QQIIQII")
WRITE_IN = struct.Struct("=QQIIQII")
FSYNC_IN = struct.Struct("=QII")
SETXATTR_IN = struct.Struct("=IIII")  # with SETXATTR_EXT
SETXATTR_IN_COMPAT = struct.Struct("=II")
GETXATTR_IN = struct.Struct("=II")
LK_IN = struct.Struct("=QQQQIIII")  # fh owner start end type pid lk_flags padding
ACCESS_IN = struct.Struct("=II")
INIT_IN = struct.Struct("=IIII")  # major minor max_readahead flags (then flags2, unused)
INIT_IN_EXT = struct.Struct("=IIIII44x")
INTERRUPT_IN = struct.Struct("=Q")
BMAP_IN = struct.Struct("=QII")
IOCTL_IN = struct.Struct("=QIIQII")
POLL_IN = struct.Struct("=QQII")
FALLOCATE_IN = struct.Struct("=QQQII")
LSEEK_IN = struct.Struct("=QQII")
COPY_FILE_RANGE_IN = struct.Struct("=QQQQQQQ")
SETUPMAPPING_IN = struct.Struct("=QQQQQ")
REMOVEMAPPING_IN = struct.Struct("=I")
SYNCFS_IN = struct.Struct("=Q")
STATX_IN = struct.Struct("=IIQII")
NOTIFY_RETRIEVE_IN = struct.Struct("=QQIIQQ")  # dummy1 offset size dummy2 dummy3 dummy4

NOTIFY_INVAL_INODE_OUT = struct.Struct("=Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("=QII")
NOTIFY_DELETE_OUT = struct.Struct("=QQII")
NOTIFY_STORE_OUT = struct.Struct("=QQII")
NOTIFY_RETRIEVE_OUT = struct.Struct("=QQQII")
NOTIFY_POLL_OUT = struct.Struct("=Q")
NOTIFY_PRUNE_OUT = struct.Struct("=IIQ")
BACKING_MAP = struct.Struct("=iIQ")  # fd flags padding


class ProtocolError(Exception):
    """A request that does not match its layout (a kernel bug or a hostile writer)."""


# -- headers --------------------------------------------------------------------------------
class InHeader(NamedTuple):
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    total_extlen: int  # in 8-byte units, counted in len


def in_header(buf: bytes | bytearray | memoryview, n: int) -> InHeader:
    """The header of a request of `n` bytes as read; its length must be exactly `n`."""
    if n < IN_HEADER.size:
        raise ProtocolError(f"a request of {n} bytes is shorter than its header")
    h = InHeader._make(IN_HEADER.unpack_from(buf)[:8])
    if h.len != n:
        raise ProtocolError(f"header says {h.len} bytes, {n} were read")
    if h.total_extlen * 8 > n - IN_HEADER.size:
        raise ProtocolError("extensions longer than the request")
    return h


def out_header(length: int, error: int, unique: int) -> bytes:
    return OUT_HEADER.pack(length, error, unique)


def reply(unique: int, body: bytes = b"") -> bytes:
    """A successful reply with `body`."""
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), 0, unique) + body


def error_reply(unique: int, errno: int) -> bytes:
    """A failed reply: errno is positive here, negative on the wire."""
    return OUT_HEADER.pack(OUT_HEADER.size, -errno, unique)


# -- request bodies -------------------------------------------------------------------------
Body = bytes | bytearray | memoryview


def _need(body: Body, size: int, what: str) -> None:
    if len(body) < size:
        raise ProtocolError(f"{what}: {len(body)} bytes, at least {size} expected")


def name(body: Body, offset: int = 0) -> bytes:
    """The NUL-terminated name at `offset` (the kernel terminates every name it sends)."""
    raw = bytes(body[offset:])
    end = raw.find(b"\0")
    if end < 0:
        raise ProtocolError("a name without its NUL terminator")
    return raw[:end]


def two_names(body: Body, offset: int = 0) -> tuple[bytes, bytes]:
    raw = bytes(body[offset:])
    first = raw.find(b"\0")
    second = raw.find(b"\0", first + 1) if first >= 0 else -1
    if second < 0:
        raise ProtocolError("two names expected, NUL-terminated")
    return raw[:first], raw[first + 1 : second]


class ForgetIn(NamedTuple):
    nlookup: int


class GetattrIn(NamedTuple):
    getattr_flags: int
    fh: int


class SetattrIn(NamedTuple):
    valid: int
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    uid: int
    gid: int


class SymlinkIn(NamedTuple):
    name: bytes
    target: bytes


class MknodIn(NamedTuple):
    mode: int
    rdev: int
    umask: int
    name: bytes


class MkdirIn(NamedTuple):
    mode: int
    umask: int
    name: bytes


class RenameIn(NamedTuple):
    newdir: int
    flags: int
    old: bytes
    new: bytes


class LinkIn(NamedTuple):
    oldnodeid: int
    name: bytes


class OpenIn(NamedTuple):
    flags: int
    open_flags: int


class CreateIn(NamedTuple):
    flags: int
    mode: int
    umask: int
    open_flags: int
    name: bytes


class ReleaseIn(NamedTuple):
    fh: int
    flags: int
    release_flags: int
    lock_owner: int


class FlushIn(NamedTuple):
    fh: int
    lock_owner: int


class ReadIn(NamedTuple):
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int


class WriteIn(NamedTuple):
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    data: memoryview


class FsyncIn(NamedTuple):
    fh: int
    fsync_flags: int


class SetxattrIn(NamedTuple):
    size: int
    flags: int
    setxattr_flags: int
    name: bytes
    value: bytes


class GetxattrIn(NamedTuple):
    size: int
    name: bytes


class ListxattrIn(NamedTuple):
    size: int


class LkIn(NamedTuple):
    fh: int
    owner: int
    start: int
    end: int
    type: int
    pid: int
    lk_flags: int


class AccessIn(NamedTuple):
    mask: int


class InitIn(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # 64 bits: flags2 shifted in when INIT_EXT is set


class InterruptIn(NamedTuple):
    unique: int


class BmapIn(NamedTuple):
    block: int
    blocksize: int


class IoctlIn(NamedTuple):
    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    data: bytes


class PollIn(NamedTuple):
    fh: int
    kh: int
    flags: int
    events: int


class NotifyReplyIn(NamedTuple):
    offset: int
    size: int
    data: bytes


class FallocateIn(NamedTuple):
    fh: int
    offset: int
    length: int
    mode: int


class LseekIn(NamedTuple):
    fh: int
    offset: int
    whence: int


class CopyFileRangeIn(NamedTuple):
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    len: int
    flags: int


class SetupmappingIn(NamedTuple):
    fh: int
    foffset: int
    len: int
    flags: int
    moffset: int


class StatxIn(NamedTuple):
    getattr_flags: int
    fh: int
    sx_flags: int
    sx_mask: int


class Empty(NamedTuple):
    """A request with no body (READLINK, STATFS, DESTROY, ...)."""


def decode_forget(body: Body) -> ForgetIn:
    _need(body, FORGET_IN.size, "FORGET")
    return ForgetIn._make(FORGET_IN.unpack_from(body))


def _pairs(body: Body, count: struct.Struct, start: int, what: str) -> list[tuple[int, int]]:
    """An array of two u64s at `start`, its length in the u32 that begins the body."""
    _need(body, count.size, what)
    n = count.unpack_from(body)[0]
    _need(body, start + n * 16, what)
    return [FORGET_ONE.unpack_from(body, start + 16 * i) for i in range(n)]


def decode_batch_forget(body: Body) -> list[tuple[int, int]]:
    """(nodeid, nlookup) pairs."""
    return _pairs(body, BATCH_FORGET_IN, BATCH_FORGET_IN.size, "BATCH_FORGET")


def decode_getattr(body: Body) -> GetattrIn:
    _need(body, GETATTR_IN.size, "GETATTR")
    flags, _dummy, fh = GETATTR_IN.unpack_from(body)
    return GetattrIn(flags, fh)


def decode_setattr(body: Body) -> SetattrIn:
    _need(body, SETATTR_IN.size, "SETATTR")
    valid, _pad, fh, size, owner, at, mt, ct, ans, mns, cns, mode, _u4, uid, gid, _u5 = (
        SETATTR_IN.unpack_from(body)
    )
    return SetattrIn(valid, fh, size, owner, at, mt, ct, ans, mns, cns, mode, uid, gid)


def decode_empty(body: Body) -> Empty:
    return Empty()


def decode_name(body: Body) -> bytes:
    return name(body)


def decode_symlink(body: Body) -> SymlinkIn:
    return SymlinkIn(*two_names(body))


def decode_mknod(body: Body) -> MknodIn:
    _need(body, MKNOD_IN.size, "MKNOD")
    mode, rdev, umask, _pad = MKNOD_IN.unpack_from(body)
    return MknodIn(mode, rdev, umask, name(body, MKNOD_IN.size))


def decode_mkdir(body: Body) -> MkdirIn:
    _need(body, MKDIR_IN.size, "MKDIR")
    mode, umask = MKDIR_IN.unpack_from(body)
    return MkdirIn(mode, umask, name(body, MKDIR_IN.size))


def decode_rename(body: Body) -> RenameIn:
    _need(body, RENAME_IN.size, "RENAME")
    return RenameIn(RENAME_IN.unpack_from(body)[0], 0, *two_names(body, RENAME_IN.size))


def decode_rename2(body: Body) -> RenameIn:
    _need(body, RENAME2_IN.size, "RENAME2")
    newdir, flags, _pad = RENAME2_IN.unpack_from(body)
    return RenameIn(newdir, flags, *two_names(body, RENAME2_IN.size))


def decode_link(body: Body) -> LinkIn:
    _need(body, LINK_IN.size, "LINK")
    return LinkIn(LINK_IN.unpack_from(body)[0], name(body, LINK_IN.size))


def decode_open(body: Body) -> OpenIn:
    _need(body, OPEN_IN.size, "OPEN")
    return OpenIn._make(OPEN_IN.unpack_from(body))


def decode_create(body: Body) -> CreateIn:
    _need(body, CREATE_IN.size, "CREATE")
    flags, mode, umask, open_flags = CREATE_IN.unpack_from(body)
    return CreateIn(flags, mode, umask, open_flags, name(body, CREATE_IN.size))


def decode_release(body: Body) -> ReleaseIn:
    _need(body, RELEASE_IN.size, "RELEASE")
    return ReleaseIn._make(RELEASE_IN.unpack_from(body))


def decode_flush(body: Body) -> FlushIn:
    _need(body, FLUSH_IN.size, "FLUSH")
    fh, _unused, _pad, owner = FLUSH_IN.unpack_from(body)
    return FlushIn(fh, owner)


def decode_read(body: Body) -> ReadIn:
    _need(body, READ_IN.size, "READ")
    return ReadIn._make(READ_IN.unpack_from(body)[:6])


def decode_write(body: Body) -> WriteIn:
    _need(body, WRITE_IN.size, "WRITE")
    fh, off, size, wflags, owner, flags, _pad = WRITE_IN.unpack_from(body)
    _need(body, WRITE_IN.size + size, "WRITE data")
    view = memoryview(body)[WRITE_IN.size : WRITE_IN.size + size]
    return WriteIn(fh, off, size, wflags, owner, flags, view)


def decode_fsync(body: Body) -> FsyncIn:
    _need(body, FSYNC_IN.size, "FSYNC")
    fh, flags, _pad = FSYNC_IN.unpack_from(body)
    return FsyncIn(fh, flags)


def decode_setxattr(body: Body, ext: bool = False) -> SetxattrIn:
    """`ext`: the session negotiated SETXATTR_EXT (a 16-byte header instead of 8)."""
    head = SETXATTR_IN if ext else SETXATTR_IN_COMPAT
    _need(body, head.size, "SETXATTR")
    if ext:
        size, flags, sflags, _pad = SETXATTR_IN.unpack_from(body)
    else:
        (size, flags), sflags = SETXATTR_IN_COMPAT.unpack_from(body), 0
    key = name(body, head.size)
    start = head.size + len(key) + 1
    _need(body, start + size, "SETXATTR value")
    return SetxattrIn(size, flags, sflags, key, bytes(body[start : start + size]))


def decode_getxattr(body: Body) -> GetxattrIn:
    _need(body, GETXATTR_IN.size, "GETXATTR")
    return GetxattrIn(GETXATTR_IN.unpack_from(body)[0], name(body, GETXATTR_IN.size))


def decode_listxattr(body: Body) -> ListxattrIn:
    _need(body, GETXATTR_IN.size, "LISTXATTR")
    return ListxattrIn(GETXATTR_IN.unpack_from(body)[0])


def decode_lk(body: Body) -> LkIn:
    _need(body, LK_IN.size, "GETLK/SETLK")
    fh, owner, start, end, typ, pid, lk_flags, _pad = LK_IN.unpack_from(body)
    return LkIn(fh, owner, start, end, typ, pid, lk_flags)


def decode_access(body: Body) -> AccessIn:
    _need(body, ACCESS_IN.size, "ACCESS")
    return AccessIn(ACCESS_IN.unpack_from(body)[0])


def decode_init(body: Body) -> InitIn:
    # Kernels before 7.36 send the 16-byte form; newer ones 64 bytes with flags2.
    _need(body, INIT_IN.size, "INIT")
    major, minor, ra, flags = INIT_IN.unpack_from(body)
    if flags & INIT_EXT:
        _need(body, INIT_IN_EXT.size, "INIT with INIT_EXT")
        flags |= INIT_IN_EXT.unpack_from(body)[4] << 32
    return InitIn(major, minor, ra, flags)


def decode_interrupt(body: Body) -> InterruptIn:
    _need(body, INTERRUPT_IN.size, "INTERRUPT")
    return InterruptIn(INTERRUPT_IN.unpack_from(body)[0])


def decode_bmap(body: Body) -> BmapIn:
    _need(body, BMAP_IN.size, "BMAP")
    block, blocksize, _pad = BMAP_IN.unpack_from(body)
    return BmapIn(block, blocksize)


def decode_ioctl(body: Body) -> IoctlIn:
    _need(body, IOCTL_IN.size, "IOCTL")
    fh, flags, cmd, arg, in_size, out_size = IOCTL_IN.unpack_from(body)
    _need(body, IOCTL_IN.size + in_size, "IOCTL data")
    data = bytes(body[IOCTL_IN.size : IOCTL_IN.size + in_size])
    return IoctlIn(fh, flags, cmd, arg, in_size, out_size, data)


def decode_poll(body: Body) -> PollIn:
    _need(body, POLL_IN.size, "POLL")
    return PollIn._make(POLL_IN.unpack_from(body))


def decode_notify_reply(body: Body) -> NotifyReplyIn:
    """The data a NOTIFY_RETRIEVE asked for (the header's unique is the notification's)."""
    _need(body, NOTIFY_RETRIEVE_IN.size, "NOTIFY_REPLY")
    _d1, offset, size, _d2, _d3, _d4 = NOTIFY_RETRIEVE_IN.unpack_from(body)
    start = NOTIFY_RETRIEVE_IN.size
    _need(body, start + size, "NOTIFY_REPLY data")
    return NotifyReplyIn(offset, size, bytes(body[start : start + size]))


def decode_fallocate(body: Body) -> FallocateIn:
    _need(body, FALLOCATE_IN.size, "FALLOCATE")
    fh, offset, length, mode, _pad = FALLOCATE_IN.unpack_from(body)
    return FallocateIn(fh, offset, length, mode)


def decode_lseek(body: Body) -> LseekIn:
    _need(body, LSEEK_IN.size, "LSEEK")
    fh, offset, whence, _pad = LSEEK_IN.unpack_from(body)
    return LseekIn(fh, offset, whence)


def decode_copy_file_range(body: Body) -> CopyFileRangeIn:
    _need(body, COPY_FILE_RANGE_IN.size, "COPY_FILE_RANGE")
    return CopyFileRangeIn._make(COPY_FILE_RANGE_IN.unpack_from(body))


def decode_setupmapping(body: Body) -> SetupmappingIn:
    _need(body, SETUPMAPPING_IN.size, "SETUPMAPPING")
    return SetupmappingIn._make(SETUPMAPPING_IN.unpack_from(body))


def decode_removemapping(body: Body) -> list[tuple[int, int]]:
    """(moffset, len) pairs; they follow the 4-byte count directly (the kernel sends the
    two as separate arguments)."""
    return _pairs(body, REMOVEMAPPING_IN, REMOVEMAPPING_IN.size, "REMOVEMAPPING")


def decode_syncfs(body: Body) -> Empty:
    _need(body, SYNCFS_IN.size, "SYNCFS")
    return Empty()


def decode_statx(body: Body) -> StatxIn:
    _need(body, STATX_IN.size, "STATX")
    flags, _reserved, fh, sx_flags, sx_mask = STATX_IN.unpack_from(body)
    return StatxIn(flags, fh, sx_flags, sx_mask)


# Every opcode the kernel may send, with the decoder of its body.
DECODERS: dict[Opcode, Callable[[Body], Any]] = {
    Opcode.LOOKUP: decode_name,
    Opcode.FORGET: decode_forget,
    Opcode.GETATTR: decode_getattr,
    Opcode.SETATTR: decode_setattr,
    Opcode.READLINK: decode_empty,
    Opcode.SYMLINK: decode_symlink,
    Opcode.MKNOD: decode_mknod,
    Opcode.MKDIR: decode_mkdir,
    Opcode.UNLINK: decode_name,
    Opcode.RMDIR: decode_name,
    Opcode.RENAME: decode_rename,
    Opcode.LINK: decode_link,
    Opcode.OPEN: decode_open,
    Opcode.READ: decode_read,
    Opcode.WRITE: decode_write,
    Opcode.STATFS: decode_empty,
    Opcode.RELEASE: decode_release,
    Opcode.FSYNC: decode_fsync,
    Opcode.SETXATTR: decode_setxattr,
    Opcode.GETXATTR: decode_getxattr,
    Opcode.LISTXATTR: decode_listxattr,
    Opcode.REMOVEXATTR: decode_name,
    Opcode.FLUSH: decode_flush,
    Opcode.INIT: decode_init,
    Opcode.OPENDIR: decode_open,
    Opcode.READDIR: decode_read,
    Opcode.RELEASEDIR: decode_release,
    Opcode.FSYNCDIR: decode_fsync,
    Opcode.GETLK: decode_lk,
    Opcode.SETLK: decode_lk,
    Opcode.SETLKW: decode_lk,
    Opcode.ACCESS: decode_access,
    Opcode.CREATE: decode_create,
    Opcode.INTERRUPT: decode_interrupt,
    Opcode.BMAP: decode_bmap,
    Opcode.DESTROY: decode_empty,
    Opcode.IOCTL: decode_ioctl,
    Opcode.POLL: decode_poll,
    Opcode.NOTIFY_REPLY: decode_notify_reply,
    Opcode.BATCH_FORGET: decode_batch_forget,
    Opcode.FALLOCATE: decode_fallocate,
    Opcode.READDIRPLUS: decode_read,
    Opcode.RENAME2: decode_rename2,
    Opcode.LSEEK: decode_lseek,
    Opcode.COPY_FILE_RANGE: decode_copy_file_range,
    Opcode.SETUPMAPPING: decode_setupmapping,
    Opcode.REMOVEMAPPING: decode_removemapping,
    Opcode.SYNCFS: decode_syncfs,
    Opcode.TMPFILE: decode_create,
    Opcode.STATX: decode_statx,
    Opcode.COPY_FILE_RANGE_64: decode_copy_file_range,
    Opcode.CUSE_INIT: decode_init,
}


def body_of(buf: Body, header: InHeader) -> memoryview:
    """The request's own bytes: after the header, before any extensions."""
    return memoryview(buf)[IN_HEADER.size : header.len - 8 * header.total_extlen]


def decode(buf: Body, n: int) -> tuple[InHeader, Any]:
    """Header and decoded body of a request of `n` bytes; ProtocolError when malformed.
    An opcode we do not know decodes to its raw body (bytes)."""
    header = in_header(buf, n)
    body = body_of(buf, header)
    try:
        decoder = DECODERS[Opcode(header.opcode)]
    except ValueError:
        return header, bytes(body)
    return header, decoder(body)


# -- reply bodies ---------------------------------------------------------------------------
class Attr(NamedTuple):
    """struct fuse_attr."""

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


def entry_out(
    nodeid: int,
    entry_valid: tuple[int, int],
    attr_valid: tuple[int, int],
    attr: Sequence[int],
    generation: int = 0,
) -> bytes:
    """fuse_entry_out; the validities are (seconds, nanoseconds). nodeid 0 with an
    entry validity caches "no such name"."""
    return ENTRY_OUT.pack(
        nodeid, generation, entry_valid[0], attr_valid[0], entry_valid[1], attr_valid[1], *attr
    )


def attr_out(attr_valid: tuple[int, int], attr: Sequence[int]) -> bytes:
    return ATTR_OUT.pack(attr_valid[0], attr_valid[1], 0, *attr)


def open_out(fh: int, open_flags: int, backing_id: int = 0) -> bytes:
    return OPEN_OUT.pack(fh, open_flags, backing_id)


def write_out(size: int) -> bytes:
    return WRITE_OUT.pack(size, 0)


def getxattr_out(size: int) -> bytes:
    """The reply to a GETXATTR or LISTXATTR of size 0: how large the value is."""
    return GETXATTR_OUT.pack(size, 0)


def statfs_out(
    blocks: int,
    bfree: int,
    bavail: int,
    files: int,
    ffree: int,
    bsize: int,
    namelen: int,
    frsize: int,
) -> bytes:
    return STATFS_OUT.pack(blocks, bfree, bavail, files, ffree, bsize, namelen, frsize)


def lk_out(start: int, end: int, typ: int, pid: int) -> bytes:
    return LK_OUT.pack(start, end, typ, pid)


def bmap_out(block: int) -> bytes:
    return BMAP_OUT.pack(block)


def ioctl_out(result: int, flags: int = 0, in_iovs: int = 0, out_iovs: int = 0) -> bytes:
    return IOCTL_OUT.pack(result, flags, in_iovs, out_iovs)


def poll_out(revents: int) -> bytes:
    return POLL_OUT.pack(revents, 0)


def lseek_out(offset: int) -> bytes:
    return LSEEK_OUT.pack(offset)


def copy_file_range_out(copied: int) -> bytes:
    """For COPY_FILE_RANGE_64 (COPY_FILE_RANGE answers with write_out)."""
    return COPY_FILE_RANGE_OUT.pack(copied)


class StatxTimes(NamedTuple):
    atime: tuple[int, int]
    btime: tuple[int, int]
    ctime: tuple[int, int]
    mtime: tuple[int, int]


def statx_out(
    attr_valid: tuple[int, int],
    mask: int,
    blksize: int,
    nlink: int,
    uid: int,
    gid: int,
    mode: int,
    ino: int,
    size: int,
    blocks: int,
    times: StatxTimes,
    rdev: tuple[int, int] = (0, 0),
) -> bytes:
    stamps: list[int] = []
    for sec, nsec in times:
        stamps += (sec, nsec, 0)
    sx = STATX.pack(mask, blksize, 0, nlink, uid, gid, mode, 0, ino, size, blocks, 0, *stamps,
                    rdev[0], rdev[1], 0, 0)  # fmt: skip
    return STATX_OUT.pack(attr_valid[0], attr_valid[1], 0, 0, 0) + sx


class InitOut(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # 64 bits; the upper half goes to flags2
    max_background: int = 0
    congestion_threshold: int = 0
    max_write: int = 0
    time_gran: int = 1
    max_pages: int = 0
    map_alignment: int = 0
    max_stack_depth: int = 0
    request_timeout: int = 0


def init_out(out: InitOut) -> bytes:
    """fuse_init_out; the 24-byte form for kernels older than 7.23."""
    data = INIT_OUT.pack(
        out.major,
        out.minor,
        out.max_readahead,
        out.flags & 0xFFFFFFFF,
        out.max_background,
        out.congestion_threshold,
        out.max_write,
        out.time_gran,
        out.max_pages,
        out.map_alignment,
        out.flags >> 32,
        out.max_stack_depth,
        out.request_timeout,
    )
    return data[:24] if out.minor < 23 else data


def _padded(record: bytes, name_: bytes) -> bytes:
    return record + name_ + b"\0" * (-len(name_) % 8)


def dirent(ino: int, off: int, typ: int, name_: bytes) -> bytes:
    """One fuse_dirent, padded to 8 bytes. `typ` is the DT_* value (mode >> 12)."""
    return _padded(DIRENT.pack(ino, off, len(name_), typ), name_)


def direntplus(entry: bytes, ino: int, off: int, typ: int, name_: bytes) -> bytes:
    """One fuse_direntplus: an entry_out (see `entry_out`) then the dirent."""
    return _padded(entry + DIRENT.pack(ino, off, len(name_), typ), name_)


# -- notifications (unique 0, the code in the error field) -----------------------------------
def _notify(code: Notify, body: bytes) -> bytes:
    return OUT_HEADER.pack(OUT_HEADER.size + len(body), int(code), 0) + body


def notify_inval_inode(ino: int, off: int, length: int) -> bytes:
    """Drop cached data of `ino` from `off` for `length` bytes (0: to the end); a negative
    `off` drops only its attributes."""
    return _notify(Notify.INVAL_INODE, NOTIFY_INVAL_INODE_OUT.pack(ino, off, length))


def notify_inval_entry(parent: int, name_: bytes, flags: int = 0) -> bytes:
    return _notify(
        Notify.INVAL_ENTRY, NOTIFY_INVAL_ENTRY_OUT.pack(parent, len(name_), flags) + name_ + b"\0"
    )


def notify_delete(parent: int, child: int, name_: bytes) -> bytes:
    return _notify(
        Notify.DELETE, NOTIFY_DELETE_OUT.pack(parent, child, len(name_), 0) + name_ + b"\0"
    )


def notify_store(nodeid: int, offset: int, data: bytes) -> bytes:
    return _notify(Notify.STORE, NOTIFY_STORE_OUT.pack(nodeid, offset, len(data), 0) + data)


def notify_retrieve(notify_unique: int, nodeid: int, offset: int, size: int) -> bytes:
    return _notify(
        Notify.RETRIEVE, NOTIFY_RETRIEVE_OUT.pack(notify_unique, nodeid, offset, size, 0)
    )


def notify_poll(kh: int) -> bytes:
    return _notify(Notify.POLL, NOTIFY_POLL_OUT.pack(kh))


def notify_resend() -> bytes:
    return _notify(Notify.RESEND, b"")


def notify_inc_epoch() -> bytes:
    return _notify(Notify.INC_EPOCH, b"")


def notify_prune(nodeids: Sequence[int]) -> bytes:
    return _notify(
        Notify.PRUNE,
        NOTIFY_PRUNE_OUT.pack(len(nodeids), 0, 0) + struct.pack(f"={len(nodeids)}Q", *nodeids),
    )


def backing_map(fd: int) -> bytes:
    """The argument of DEV_IOC_BACKING_OPEN."""
    return BACKING_MAP.pack(fd, 0, 0)
