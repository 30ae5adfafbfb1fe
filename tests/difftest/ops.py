"""File-system operations as data, and a runner that applies one to a root and records the outcome.

An `Op` is a name and arguments (paths relative to the mount root, bytes). `apply(op, root)`
performs it with the real system call (renameat2 and utimensat through ctypes, so
RENAME_NOREPLACE, RENAME_EXCHANGE, UTIME_NOW and UTIME_OMIT are reachable) and returns an
`Outcome`: the errno name of a failing call, or the observable result of a successful one
(bytes read, bytes written, a listing, an xattr value, a stat summary). Two implementations
agree on an op when their outcomes are equal.

Device nodes are never opened: FUSE mounts are `nodev` by default, so opening one tells us
about mount flags, not about overlay semantics. Fifos are never opened either (an open could
block). Symlink targets are relative and free of `..`, so nothing resolves outside the mount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import pickle
import stat
from dataclasses import dataclass
from typing import Any

from tests.difftest.fixtures import NOW_THRESHOLD_NS, pattern

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.renameat2.restype = ctypes.c_int

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.POINTER(_Timespec),
    ctypes.c_int,
]
_libc.utimensat.restype = ctypes.c_int


def renameat2(src: bytes, dst: bytes, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, src, AT_FDCWD, dst, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def utimensat(path: bytes, atime: int | str, mtime: int | str, follow: bool) -> None:
    """atime/mtime: nanoseconds since the epoch, or "now" / "omit"."""

    def ts(v: int | str) -> _Timespec:
        if v == "now":
            return _Timespec(0, UTIME_NOW)
        if v == "omit":
            return _Timespec(0, UTIME_OMIT)
        assert isinstance(v, int)
        return _Timespec(v // 10**9, v % 10**9)

    times = (_Timespec * 2)(ts(atime), ts(mtime))
    flags = 0 if follow else AT_SYMLINK_NOFOLLOW
    if _libc.utimensat(AT_FDCWD, path, times, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


@dataclass(frozen=True)
class Op:
    name: str
    args: tuple[object, ...]

    def __repr__(self) -> str:
        return f"{self.name}{self.args!r}"


@dataclass(frozen=True)
class Outcome:
    """`err` is an errno name ("ENOENT") or None; `value` the result of a successful call;
    `ino_kept` whether the object kept its st_ino across the op (None: not applicable)."""

    err: str | None
    value: object = None
    ino_kept: bool | None = None


def when(ns: int) -> object:
    """A time as compared between mounts: exact if set explicitly (before 2020), else "now"."""
    return "now" if ns >= NOW_THRESHOLD_NS else ns


def data_summary(data: bytes) -> object:
    """Short data as is; long data as (length, sha256) so a failure message stays readable."""
    if len(data) <= 64:
        return data
    return (len(data), hashlib.sha256(data).hexdigest()[:16])


def stat_summary(st: os.stat_result) -> tuple[object, ...]:
    fmt = stat.S_IFMT(st.st_mode)
    return (
        fmt,
        stat.S_IMODE(st.st_mode),
        st.st_uid,
        st.st_gid,
        st.st_size if stat.S_ISREG(fmt) or stat.S_ISLNK(fmt) else None,
        st.st_nlink if not stat.S_ISDIR(fmt) else None,
        st.st_rdev if stat.S_ISCHR(fmt) or stat.S_ISBLK(fmt) else None,
        when(st.st_mtime_ns),
    )


def _special(p: bytes) -> str | None:
    """The kind of what `p` resolves to if it must not be opened (device, fifo, socket)."""
    try:
        st = os.stat(p)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
        return None
    return "special"


def _ino(p: bytes, follow: bool = False) -> int | None:
    try:
        return (os.stat(p) if follow else os.lstat(p)).st_ino
    except OSError:
        return None


def _open(p: bytes, flags: int, mode: int = 0o644) -> int:
    return os.open(p, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)


def _do(op: Op, root: bytes, fds: dict[int, int]) -> Outcome:
    a: tuple[Any, ...] = op.args

    def P(rel: bytes) -> bytes:
        return os.path.join(root, rel) if rel != b"." else root

    name = op.name
    if name == "create":  # (path, mode, excl, trunc)
        path, mode, excl, trunc = a
        p = P(path)
        if not excl and _special(p):
            return Outcome(None, "special")
        flags = os.O_CREAT | os.O_WRONLY | (os.O_EXCL if excl else 0) | (os.O_TRUNC if trunc else 0)
        fd = _open(p, flags, int(mode))
        os.close(fd)
        return Outcome(None, stat_summary(os.lstat(p)))
    if name == "write":  # (path, offset, length, seed, trunc): no O_CREAT
        path, offset, length, seed, trunc = a
        p = P(path)
        if _special(p):
            return Outcome(None, "special")
        before = _ino(p, follow=True)
        fd = _open(p, os.O_WRONLY | (os.O_TRUNC if trunc else 0))
        try:
            n = os.pwrite(fd, pattern(int(seed), int(length)), int(offset))
            st = os.fstat(fd)
        finally:
            os.close(fd)
        return Outcome(None, (n, st.st_size), before == _ino(p, follow=True))
    if name == "append":  # (path, length, seed)
        path, length, seed = a
        p = P(path)
        if _special(p):
            return Outcome(None, "special")
        fd = _open(p, os.O_WRONLY | os.O_APPEND)
        try:
            n = os.write(fd, pattern(int(seed), int(length)))
        finally:
            os.close(fd)
        return Outcome(None, n)
    if name == "read":  # (path, offset, length)
        path, offset, length = a
        p = P(path)
        if _special(p):
            return Outcome(None, "special")
        fd = _open(p, os.O_RDONLY)
        try:
            data = os.pread(fd, int(length), int(offset))
        finally:
            os.close(fd)
        return Outcome(None, data_summary(data))
    if name == "truncate":  # (path, size)
        path, size = a
        p = P(path)
        before = _ino(p, follow=True)
        os.truncate(p, int(size))
        return Outcome(None, None, before == _ino(p, follow=True))
    if name == "chmod":  # (path, mode)
        path, mode = a
        p = P(path)
        before = _ino(p, follow=True)
        os.chmod(p, int(mode))
        return Outcome(None, stat_summary(os.stat(p)), before == _ino(p, follow=True))
    if name == "chown":  # (path, uid, gid, follow)
        path, uid, gid, follow = a
        p = P(path)
        before = _ino(p, follow=bool(follow))
        os.chown(p, int(uid), int(gid), follow_symlinks=bool(follow))
        st = os.stat(p) if follow else os.lstat(p)
        return Outcome(None, stat_summary(st), before == _ino(p, follow=bool(follow)))
    if name == "utimens":  # (path, atime, mtime, follow)
        path, atime, mtime, follow = a
        p = P(path)
        before = _ino(p, follow=bool(follow))
        utimensat(p, atime, mtime, bool(follow))
        st = os.stat(p) if follow else os.lstat(p)
        # atime only when set to an explicit value: reads (and so copy-up) move it otherwise.
        atime_seen = st.st_atime_ns if isinstance(atime, int) else None
        return Outcome(None, (atime_seen, when(st.st_mtime_ns)), before == st.st_ino)
    if name == "rename":  # (src, dst, flags)
        src, dst, flags = a
        before = _ino(P(src))
        renameat2(P(src), P(dst), int(flags))
        return Outcome(None, None, before == _ino(P(dst)))
    if name == "unlink":
        os.unlink(P(a[0]))
        return Outcome(None)
    if name == "rmdir":
        os.rmdir(P(a[0]))
        return Outcome(None)
    if name == "mkdir":  # (path, mode)
        path, mode = a
        os.mkdir(P(path), int(mode))
        return Outcome(None, stat_summary(os.lstat(P(path))))
    if name == "symlink":  # (target, path)
        target, path = a
        os.symlink(target, P(path))
        return Outcome(None, stat_summary(os.lstat(P(path))))
    if name == "link":  # (src, dst)
        src, dst = a
        before = _ino(P(src))
        os.link(P(src), P(dst), follow_symlinks=False)
        st = os.lstat(P(dst))
        return Outcome(None, stat_summary(st), before == st.st_ino == _ino(P(src)))
    if name == "mknod":  # (path, kind, mode, rdev)
        path, kind, mode, rdev = a
        fmt = {"fifo": stat.S_IFIFO, "char": stat.S_IFCHR, "sock": stat.S_IFSOCK}[str(kind)]
        major, minor = rdev
        os.mknod(P(path), fmt | int(mode), os.makedev(major, minor))
        return Outcome(None, stat_summary(os.lstat(P(path))))
    if name == "setxattr":  # (path, name, value, flags, follow)
        path, xname, value, flags, follow = a
        p = P(path)
        before = _ino(p, follow=bool(follow))
        os.setxattr(p, xname, value, int(flags), follow_symlinks=bool(follow))
        return Outcome(None, None, before == _ino(p, follow=bool(follow)))
    if name == "removexattr":  # (path, name, follow)
        path, xname, follow = a
        p = P(path)
        before = _ino(p, follow=bool(follow))
        os.removexattr(p, xname, follow_symlinks=bool(follow))
        return Outcome(None, None, before == _ino(p, follow=bool(follow)))
    if name == "getxattr":  # (path, name)
        path, xname = a
        return Outcome(None, os.getxattr(P(path), xname, follow_symlinks=False))
    if name == "listxattr":
        names = os.listxattr(P(a[0]), follow_symlinks=False)
        return Outcome(None, sorted(n for n in names if not n.startswith("security.")))
    if name == "listdir":
        return Outcome(None, sorted(os.listdir(P(a[0]))))
    if name == "lstat":
        return Outcome(None, stat_summary(os.lstat(P(a[0]))))
    if name == "readlink":
        return Outcome(None, os.readlink(P(a[0])))
    if name == "access":  # (path, mode): as the caller (see "as" for unprivileged users)
        path, mode = a
        return Outcome(None, os.access(P(path), mode, follow_symlinks=False))
    if name == "statfs":  # what must agree: the name length limit
        return Outcome(None, os.statvfs(P(a[0])).f_namemax)
    if name in ("mmapread", "mmapwrite"):  # (path, seed): a shared mapping of the whole file
        p = P(a[0])
        if _special(p):
            return Outcome(None, "special")
        fd = _open(p, os.O_RDWR if name == "mmapwrite" else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return Outcome(None, 0)
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if name == "mmapwrite" else 0)
            with mmap.mmap(fd, size, mmap.MAP_SHARED, prot) as m:
                if name == "mmapread":
                    return Outcome(None, data_summary(m[:]))
                n = min(size, 100)
                m[size - n :] = pattern(a[1], n)
                m.flush()
                return Outcome(None, n)
        finally:
            os.close(fd)
    return _fd_op(op, root, fds)


OPEN_MODES = {
    "r": os.O_RDONLY,
    "w": os.O_WRONLY,
    "rw": os.O_RDWR,
    "trunc": os.O_RDWR | os.O_TRUNC,
}


def _fd_op(op: Op, root: bytes, fds: dict[int, int]) -> Outcome:
    """Ops on descriptors held across ops (slot numbers name them): an fd opened before a
    copy-up, a rename or an unlink must keep working as on the kernel."""
    a: tuple[Any, ...] = op.args
    name = op.name
    if name == "open":  # (path, slot, mode)
        path, slot, mode = a
        if slot in fds:
            os.close(fds.pop(slot))
        p = os.path.join(root, path)
        if _special(p):
            return Outcome(None, "special")
        fds[slot] = _open(p, OPEN_MODES[mode])
        return Outcome(None)
    slot = a[0]
    if slot not in fds:
        return Outcome("EBADF")
    fd = fds[slot]
    if name == "fdread":  # (slot, offset, length)
        return Outcome(None, data_summary(os.pread(fd, a[2], a[1])))
    if name == "fdwrite":  # (slot, offset, length, seed)
        return Outcome(None, os.pwrite(fd, pattern(a[3], a[2]), a[1]))
    if name == "fdstat":
        return Outcome(None, stat_summary(os.fstat(fd)))
    if name == "fdtruncate":  # (slot, size)
        os.ftruncate(fd, a[1])
        return Outcome(None)
    if name == "fdsync":
        os.fsync(fd)
        return Outcome(None)
    if name == "close":
        os.close(fds.pop(slot))
        return Outcome(None)
    raise ValueError(f"unknown op {name}")


def close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def _as_user(uid: int, gid: int, op: Op, root: bytes) -> Outcome:
    """Apply a path op in a forked child running as uid:gid (no supplementary groups)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            data = pickle.dumps(apply(op, root))
            with os.fdopen(w, "wb") as f:
                f.write(data)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"child applying {op!r} as {uid}:{gid} failed")
    result = pickle.loads(data)
    assert isinstance(result, Outcome)
    return result


def apply(op: Op, root: bytes, fds: dict[int, int] | None = None) -> Outcome:
    """Apply `op` below `root` with the process umask fixed at 022; failures become errno names.

    `fds` holds the descriptors of open/fd* ops between calls (the caller closes them).
    """
    if op.name == "as":  # (uid, gid, path op): permission checks as an unprivileged user
        uid, gid, inner = op.args
        assert isinstance(uid, int) and isinstance(gid, int) and isinstance(inner, Op)
        return _as_user(uid, gid, inner, root)
    old = os.umask(0o022)
    try:
        return _do(op, root, {} if fds is None else fds)
    except OSError as exc:
        return Outcome(errno.errorcode.get(exc.errno or 0, str(exc.errno)))
    finally:
        os.umask(old)
