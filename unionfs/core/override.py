"""Override stat of a rootless upper: the owner/mode/type/rdev an object shows, kept in a
`user.*` xattr because an unprivileged daemon cannot give the object those on disk.

Value (containers/storage's name and format): `UID:GID:0MODE:TYPE`, MODE the permission bits
(set-id and sticky included) in octal, TYPE one of file, dir, symlink, pipe, socket,
char-MAJ-MIN, block-MAJ-MIN. Readers also accept the 3-field form `UID:GID:MODE` (the type is
then the object's own), as fuse-overlayfs writes it in `user.fuseoverlayfs.override_stat`;
MODE may carry S_IFMT bits there, which are ignored.

Privileged xattrs (`trusted.*`, and `security.*` when the kernel refuses them) are kept as
`user.layerfs.xattr.<name>` and shown under their real name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from dataclasses import replace

from layerstore.override import CONTAINERS_XATTR_PREFIX as CONTAINERS_XATTR_PREFIX
from layerstore.override import OVERRIDE_XATTR as OVERRIDE_XATTR
from layerstore.override import OVERRIDE_XATTRS as READ_XATTRS  # ours, then fuse-overlayfs
from layerstore.override import Override as Override
from layerstore.override import OverrideError
from layerstore.override import parse as parse_strict
from unionfs.core.types import Stat

# The value's format (Override, parse, encode) is the store's (layerstore.override): the mount
# shows exactly what `commit` writes.
XATTR_PREFIX = b"user.layerfs."
STORED_XATTR_PREFIX = b"user.layerfs.xattr."
# fuse-overlayfs' own markers in a rootless upper (opaque, origin, override_stat).
FUSE_OVERLAYFS_PREFIX = b"user.fuseoverlayfs."
# Names a rootless mount never shows (prefix match).
HIDDEN_XATTRS = (OVERRIDE_XATTR, FUSE_OVERLAYFS_PREFIX, XATTR_PREFIX)


def parse(value: bytes) -> Override | None:
    """The override in `value`; None when it is not one (a damaged value is ignored)."""
    try:
        return parse_strict(value)
    except OverrideError:
        return None


def format_override(ov: Override, disk_fmt: int) -> bytes:
    """The 4-field value; `disk_fmt` is the object's type when the override keeps it."""
    return (ov if ov.fmt is not None else replace(ov, fmt=disk_fmt)).encode()


def apply(st: Stat, ov: Override) -> Stat:
    """The on-disk `st` with owner, permission bits, type and rdev replaced. Only a regular
    file (a stand-in) changes type, and never into a directory: a type the object cannot be
    is ignored (the object on disk decides)."""
    disk_fmt = stat.S_IFMT(st.mode)
    fmt = disk_fmt
    if ov.fmt is not None and disk_fmt == stat.S_IFREG and ov.fmt != stat.S_IFDIR:
        fmt = ov.fmt
    rdev = ov.rdev if fmt in (stat.S_IFCHR, stat.S_IFBLK) else 0
    return replace(st, uid=ov.uid, gid=ov.gid, mode=fmt | ov.mode, rdev=rdev)


def shows_as(st: os.stat_result, ov: Override) -> bool:
    """Does the object on disk already show exactly `ov` (no xattr needed)?"""
    fmt = stat.S_IFMT(st.st_mode)
    if ov.fmt is not None and ov.fmt != fmt:
        return False
    if fmt in (stat.S_IFCHR, stat.S_IFBLK) and st.st_rdev != ov.rdev:
        return False
    perms_count = fmt != stat.S_IFLNK  # a symlink's mode is always 0777
    return (
        st.st_uid == ov.uid
        and st.st_gid == ov.gid
        and (not perms_count or stat.S_IMODE(st.st_mode) == ov.mode)
    )


def _proc(fd: int, name: bytes) -> bytes:
    return b"/proc/self/fd/%d/%s" % (fd, name) if name else b"/proc/self/fd/%d" % fd


def _follow(target: bytes | int, follow: bool) -> bool:
    # An fd has nothing to follow (and Python refuses follow_symlinks=False with one); a
    # /proc/self/fd/N path of a directory fd must be followed to reach the directory.
    return follow or isinstance(target, int)


def read(target: bytes | int, follow: bool = False) -> Override | None:
    """The override of the object at `target` (a path, followed only if `follow`, or an fd).

    One listxattr first: most objects have no override, and a failed getxattr per spelling
    costs several times more (an exception each)."""
    fl = _follow(target, follow)
    try:
        present = os.listxattr(target, follow_symlinks=fl)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise
    for name in READ_XATTRS:
        if name.decode() not in present:
            continue
        try:
            value = os.getxattr(target, name, follow_symlinks=fl)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                continue
            raise
        ov = parse(value)
        if ov is not None:
            return ov
    return None


def write(target: bytes | int, ov: Override, disk_fmt: int, follow: bool = False) -> None:
    value = format_override(ov, disk_fmt)
    os.setxattr(target, OVERRIDE_XATTR, value, follow_symlinks=_follow(target, follow))


def remove(target: bytes | int, follow: bool = False) -> None:
    """Drop every override spelling (the object shows its own attributes again)."""
    for name in READ_XATTRS:
        try:
            os.removexattr(target, name, follow_symlinks=_follow(target, follow))
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                raise


def privileged_xattr(name: bytes) -> bool:
    """Names an unprivileged process can never set: kept under STORED_XATTR_PREFIX."""
    return name.startswith(b"trusted.")


def stored_xattr(name: bytes) -> bytes:
    return STORED_XATTR_PREFIX + name


def shown_xattr(stored: bytes) -> bytes | None:
    """The real name of a stored privileged xattr (ours, or fuse-overlayfs'
    `user.containers.override_<name>`); None for any other name."""
    for prefix in (STORED_XATTR_PREFIX, CONTAINERS_XATTR_PREFIX):
        if stored.startswith(prefix) and len(stored) > len(prefix) and stored not in READ_XATTRS:
            return stored[len(prefix) :]
    return None


def record(
    dfd: int,
    name: bytes,
    ov: Override,
    work_fd: int | None = None,
    tmp: bytes = b"",
    *,
    fresh: bool = False,
) -> None:
    """Make the upper object `name` in directory `dfd` (b"": `dfd` itself) show `ov`.

    The object stays usable by its unprivileged owner, the daemon: a file keeps u+rw and a
    directory u+rwx on disk, the bits asked for go into the override. A symlink, fifo or
    socket cannot carry a `user.*` xattr (kernel rule): when it does not show `ov` by
    itself it is replaced by a stand-in, a regular file (holding a symlink's target) made
    as `tmp` in `work_fd` with the override, renamed over it. `fresh`: the object was just
    made and has no override to remove.
    """
    target = _proc(dfd, name)
    st = os.lstat(name, dir_fd=dfd) if name else os.stat(dfd)
    fmt = stat.S_IFMT(st.st_mode)
    if ov.fmt is None:
        ov = replace(ov, fmt=fmt)
    if fmt in (stat.S_IFREG, stat.S_IFDIR):
        if fmt == stat.S_IFDIR:
            disk = (ov.mode & 0o777) | 0o700
        elif ov.fmt == stat.S_IFREG:
            disk = (ov.mode & 0o777) | 0o600
        else:
            disk = 0o600  # a stand-in: its type and mode are in the override only
        if stat.S_IMODE(st.st_mode) != disk:
            os.chmod(target, disk)
            st = os.lstat(name, dir_fd=dfd) if name else os.stat(dfd)
        if shows_as(st, ov):
            if not fresh:
                remove(target, follow=not name)
        else:
            write(target, ov, fmt, follow=not name)
        return
    if shows_as(st, ov):
        return
    if work_fd is None or not tmp:
        raise OSError(errno.EPERM, "cannot record an override on this object")
    content = os.readlink(name, dir_fd=dfd) if fmt == stat.S_IFLNK else b""
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=work_fd)
    try:
        try:
            os.write(fd, content)
            write(fd, ov, stat.S_IFREG)
        finally:
            os.close(fd)
        os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=work_fd)
        os.rename(tmp, name, src_dir_fd=work_fd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=work_fd)
        raise


def record_fd(fd: int, ov: Override) -> None:
    """`record` for an open regular file that has no name any more (unlinked while open)."""
    st = os.fstat(fd)
    disk = (ov.mode & 0o777) | 0o600
    if stat.S_IMODE(st.st_mode) != disk:
        os.chmod(fd, disk)
        st = os.fstat(fd)
    if ov.fmt is None:
        ov = replace(ov, fmt=stat.S_IFMT(st.st_mode))
    if shows_as(st, ov):
        remove(fd)
    else:
        write(fd, ov, stat.S_IFMT(st.st_mode))
