"""Copy-up: copy one lower object into the upper through the work dir and an atomic rename."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat

from unionfs.core import override
from unionfs.core.errors import FsError
from unionfs.core.layers import Layer
from unionfs.core.types import Kind, Stat, kind_of_mode
from unionfs.core.upper import RENAME_NOREPLACE, UpperLayer, renameat2

PRIVATE_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.")
ROOTLESS_PRIVATE = (override.OVERRIDE_XATTR, override.FUSE_OVERLAYFS_PREFIX)
_CHUNK = 1 << 20
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
F_SETPIPE_SZ = 1031
# "Not this way on this filesystem": try the next way to copy.
_NOT_HERE = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY)


def copy_data(src_fd: int, dst_fd: int) -> None:
    """Copy a whole file (`dst_fd` new and empty): a reflink where the filesystem shares
    extents (btrfs, xfs); else splice(2) through a 1 MiB pipe, which on ext4 moves 100 MB in
    21-25 ms where copy_file_range (and sendfile), splicing through the kernel's 64 KiB pipe,
    take 25-30; else copy_file_range; else read and write."""
    try:
        fcntl.ioctl(dst_fd, FICLONE, src_fd)
        return
    except OSError as exc:
        if exc.errno not in _NOT_HERE:
            raise
    off = _splice(src_fd, dst_fd)
    try:
        while True:
            n = os.copy_file_range(src_fd, dst_fd, _CHUNK * 16, off, off)
            if n == 0:
                return
            off += n
    except OSError as exc:
        if exc.errno not in _NOT_HERE:
            raise
    while True:
        buf = os.pread(src_fd, _CHUNK, off)
        if not buf:
            return
        view = memoryview(buf)
        while view:
            n = os.pwrite(dst_fd, view, off)
            off += n
            view = view[n:]


def _splice(src_fd: int, dst_fd: int) -> int:
    """Copy from offset 0 through a pipe of _CHUNK bytes as far as splice goes: the offset
    reached (at the end, or 0 when splice or a pipe that big is not to be had here)."""
    try:
        r, w = os.pipe2(os.O_CLOEXEC)
    except OSError:
        return 0
    off = 0
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, _CHUNK)
        while True:
            try:
                n = os.splice(src_fd, w, _CHUNK, offset_src=off)
            except OSError as exc:
                if off == 0 and exc.errno in _NOT_HERE:
                    return 0
                raise
            if n == 0:
                return off
            left = n
            while left:
                m = os.splice(r, dst_fd, left, offset_dst=off + n - left)
                if m == 0:
                    raise OSError(errno.EIO, "splice wrote nothing")
                left -= m
            off += n
    except OSError as exc:
        if off == 0 and exc.errno in (errno.EPERM, errno.EBUSY):
            return 0  # the pipe cannot grow (a user's pipe limit): copy_file_range then
        raise
    finally:
        os.close(r)
        os.close(w)


def copy_xattrs(src: Layer, src_path: bytes, upper: UpperLayer, dfd: int, name: bytes) -> None:
    """Copy the xattrs a copy keeps. A rootless upper keeps privileged ones (trusted.*, and
    security.* the kernel refuses) under user.layerfs.xattr.<name>."""
    for attr in src.listxattr(src_path):
        if attr.startswith(PRIVATE_XATTR_PREFIXES):
            continue
        if not upper.native and attr.startswith(ROOTLESS_PRIVATE):
            continue  # another rootless overlay's markers; the override is made anew
        try:
            value = src.getxattr(src_path, attr)
            if not upper.native and override.privileged_xattr(attr):
                upper.set_xattr_at(dfd, name, override.stored_xattr(attr), value)
                continue
            try:
                upper.set_xattr_at(dfd, name, attr, value)
            except FsError as exc:
                if upper.native or exc.errno != errno.EPERM or not attr.startswith(b"security."):
                    raise
                upper.set_xattr_at(dfd, name, override.stored_xattr(attr), value)
        except FsError as exc:
            # security.* labels and ACLs may be refused by the upper filesystem: the kernel
            # skips them too (ovl_copy_xattr ignores EOPNOTSUPP for those).
            if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.ENODATA):
                raise


def copy_up(
    upper: UpperLayer,
    src: Layer,
    src_path: bytes,
    st: Stat,
    dst_dir: bytes,
    dst_name: bytes,
    origin: tuple[int, int],
    *,
    with_data: bool = True,
) -> None:
    """Create `dst_dir/dst_name` in the upper as a copy of `src_path` (a directory is copied
    without its children). The object appears in one rename, with mode, owner, times and
    xattrs already in place; `with_data=False` (truncating open) leaves a file empty."""
    wfd = upper.work_fd
    tmp = upper.tmp_name()
    kind = kind_of_mode(st.mode)
    # Rootless: an object whose owner or type the daemon cannot reproduce is copied as a
    # stand-in regular file (holding a symlink's target) that the override describes.
    stand_in = not upper.native and not _reproducible(kind, st)
    try:
        if kind is Kind.DIR:
            os.mkdir(tmp, 0o700, dir_fd=wfd)
        elif stand_in:
            dfd = os.open(
                tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=wfd
            )
            try:
                if kind is Kind.SYMLINK:
                    os.write(dfd, src.readlink(src_path))
            finally:
                os.close(dfd)
        elif kind is Kind.FILE:
            dfd = os.open(
                tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=wfd
            )
            try:
                if with_data and st.size:
                    sfd = src.open(src_path, os.O_RDONLY)
                    try:
                        copy_data(sfd, dfd)
                    finally:
                        os.close(sfd)
            finally:
                os.close(dfd)
        elif kind is Kind.SYMLINK:
            os.symlink(src.readlink(src_path), tmp, dir_fd=wfd)
        else:
            os.mknod(tmp, st.mode, st.rdev, dir_fd=wfd)
        # Owner first (chown clears set-id bits and security.capability), then xattrs
        # (user.* needs write permission without privileges), then the mode.
        try:
            os.chown(tmp, st.uid, st.gid, dir_fd=wfd, follow_symlinks=False)
        except OSError as exc:
            # Rootless, the copy stays ours (the override keeps the owner): EPERM, or
            # EINVAL for an id a user namespace does not map.
            if exc.errno != errno.EPERM and (upper.native or exc.errno != errno.EINVAL):
                raise
        if upper.native or kind in (Kind.FILE, Kind.DIR) or stand_in:
            copy_xattrs(src, src_path, upper, wfd, tmp)
            upper.set_origin(wfd, tmp, origin)
        # else: a real symlink/fifo/socket in a rootless upper takes no user.* xattrs
        if not upper.native:
            ov = override.Override(st.uid, st.gid, stat.S_IMODE(st.mode), stat.S_IFMT(st.mode))
            if kind in (Kind.CHAR, Kind.BLOCK):
                ov = override.Override(ov.uid, ov.gid, ov.mode, ov.fmt, st.rdev)
            override.record(wfd, tmp, ov, fresh=True)
        elif kind is not Kind.SYMLINK:
            os.chmod(tmp, stat.S_IMODE(st.mode), dir_fd=wfd)
        os.utime(tmp, ns=(st.atime_ns, st.mtime_ns), dir_fd=wfd, follow_symlinks=False)
        target_fd = upper.dirfd(dst_dir)
        # A copy-up is not a change of the parent directory: keep its times (as the kernel).
        pst = os.stat(target_fd)
        renameat2(wfd, tmp, target_fd, dst_name, RENAME_NOREPLACE)
        os.utime(b"/proc/self/fd/%d" % target_fd, ns=(pst.st_atime_ns, pst.st_mtime_ns))
    except BaseException:
        with contextlib.suppress(OSError):
            upper._remove_tree(wfd, tmp)
        raise


def _reproducible(kind: Kind, st: Stat) -> bool:
    """Can an unprivileged daemon make this object as it is (owner and type)?"""
    if kind in (Kind.FILE, Kind.DIR):
        return True  # the owner and mode go into the override when needed
    if kind in (Kind.CHAR, Kind.BLOCK):
        return False
    return st.uid == os.geteuid() and st.gid == os.getegid()
