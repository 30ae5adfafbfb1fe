"""The writable upper directory and its work directory: primitive changes in overlay format."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import itertools
import os

from unionfs.core.errors import FsError
from unionfs.core.layers import (
    _DIR_FLAGS,
    WH_OPAQUE,
    WH_PREFIX,
    DirLayer,
    _proc,
    join,
    split,
)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

WORK_SUBDIR = b"work"
TMP_PREFIX = b"#layerfs-"
# Whiteouts are hard links of one whiteout kept in the work directory, as the kernel makes
# them (since 5.8): a new inode costs far more than a link (scripts/BENCH-NOTES.md). A new
# one is made after this many links (ext4 allows 65,000 per inode) or when a link gets
# EMLINK.
WHITEOUT_LINKS = 60_000


def renameat2(sfd: int, sname: bytes, dfd: int, dname: bytes, flags: int = 0) -> None:
    if _renameat2(sfd, sname, dfd, dname, flags) != 0:
        err = ctypes.get_errno()
        raise FsError(err, os.strerror(err))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with its mode flags (os.posix_fallocate has none)."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise FsError(err, os.strerror(err))


class UpperLayer(DirLayer):
    """The upper directory. `native` selects the kernel format (char 0/0 whiteouts, trusted
    xattrs) over the `.wh.` spelling used without privileges."""

    def __init__(self, root: str | bytes | int, work: str | bytes | int, native: bool) -> None:
        # Upper directories change under us (renames): keep few cached fds and drop prefixes.
        super().__init__(root, cache_size=256)
        self.immutable = False
        self.native = native
        self.xprefix = b"trusted.overlay." if native else b"user.overlay."
        self.set_spellings((self.xprefix,))
        if isinstance(work, int):
            self.work_root = work
        else:
            self.work_root = os.open(work, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        with contextlib.suppress(FileExistsError):
            os.mkdir(WORK_SUBDIR, 0o700, dir_fd=self.work_root)
        self.work_fd = os.open(WORK_SUBDIR, _DIR_FLAGS, dir_fd=self.work_root)
        self._tmp = itertools.count()
        self._clean_work()
        # The shared whiteout's name in the work directory (None until the first whiteout),
        # how many links it has been given, and False once linking proved impossible here.
        self._shared_wh: bytes | None = None
        self._shared_links = 0
        self._link_whiteouts = True

    def close(self) -> None:
        self.drop_shared_whiteout()
        super().close()
        for fd in (self.work_fd, self.work_root):
            os.close(fd)

    def _clean_work(self) -> None:
        """Remove leftovers of interrupted copy-ups (ours only)."""
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.work_fd)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        for name in names:
            bname = os.fsencode(name)
            if bname.startswith(TMP_PREFIX):
                self._remove_tree(self.work_fd, bname)

    def _remove_tree(self, dfd: int, name: bytes) -> None:
        try:
            os.unlink(name, dir_fd=dfd)
            return
        except IsADirectoryError:
            pass
        except FileNotFoundError:
            return
        cfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        try:
            for child in os.listdir(cfd):
                self._remove_tree(cfd, os.fsencode(child))
        finally:
            os.close(cfd)
        os.rmdir(name, dir_fd=dfd)

    def tmp_name(self) -> bytes:
        return TMP_PREFIX + b"%d-%d" % (os.getpid(), next(self._tmp))

    # -- xattr spelling ----------------------------------------------------------------
    def ox(self, suffix: bytes) -> bytes:
        return self.xprefix + suffix

    def set_xattr_at(self, dfd: int, name: bytes, attr: bytes, value: bytes) -> None:
        try:
            os.setxattr(_proc(dfd, name), attr, value, follow_symlinks=False)
        except OSError as exc:
            raise FsError.from_os(exc) from exc

    def remove_xattr_at(self, dfd: int, name: bytes, attr: bytes) -> None:
        try:
            os.removexattr(_proc(dfd, name), attr, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:
                raise FsError.from_os(exc) from exc

    # -- primitive changes -------------------------------------------------------------
    def whiteout(self, dir_path: bytes, name: bytes) -> None:
        """Create a whiteout for `name` (the name must be free in the upper directory)."""
        dfd = self.dirfd(dir_path)
        wname = name if self.native else WH_PREFIX + name
        try:
            if self._link_whiteouts and self._link_whiteout(dfd, wname):
                return
            self._new_whiteout(dfd, wname)
        except OSError as exc:
            raise FsError.from_os(exc) from exc

    def _new_whiteout(self, dfd: int, wname: bytes) -> None:
        if self.native:
            os.mknod(wname, 0o020000, os.makedev(0, 0), dir_fd=dfd)
        else:  # (an existing `.wh.` file is already that whiteout)
            os.close(os.open(wname, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dfd))

    def _link_whiteout(self, dfd: int, wname: bytes) -> bool:
        """Link the shared whiteout as `wname` in `dfd`. False: make this one anew (and,
        where hard links cannot be made, every later one). Errors that making a whiteout
        anew would get as well are raised."""
        for _attempt in range(3):
            if self._shared_wh is None or self._shared_links >= WHITEOUT_LINKS:
                self._fresh_shared_whiteout()
            assert self._shared_wh is not None
            try:
                os.link(
                    self._shared_wh, wname, src_dir_fd=self.work_fd, dst_dir_fd=dfd,
                    follow_symlinks=False,
                )  # fmt: skip
            except OSError as exc:
                if exc.errno == errno.EMLINK:  # full: link a new one
                    self._shared_links = WHITEOUT_LINKS
                    continue
                if exc.errno == errno.ENOENT and self._shared_gone():
                    self._shared_wh = None  # removed behind our back: make another
                    continue
                if exc.errno == errno.EEXIST and not self.native:
                    return False
                if exc.errno in (errno.EPERM, errno.EXDEV, errno.EOPNOTSUPP):
                    self._link_whiteouts = False  # no hard links on this filesystem
                    return False
                raise
            self._shared_links += 1
            return True
        return False

    def drop_shared_whiteout(self) -> None:
        """Remove the shared whiteout's name from the work directory (the whiteouts linked
        from it stay); the next whiteout makes a new one. Called on the way out."""
        if self._shared_wh is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._shared_wh, dir_fd=self.work_fd)
            self._shared_wh = None

    def _fresh_shared_whiteout(self) -> None:
        self.drop_shared_whiteout()
        name = self.tmp_name()
        self._new_whiteout(self.work_fd, name)
        self._shared_wh, self._shared_links = name, 0

    def _shared_gone(self) -> bool:
        assert self._shared_wh is not None
        try:
            os.lstat(self._shared_wh, dir_fd=self.work_fd)
            return False
        except FileNotFoundError:
            return True

    def clear_whiteout(self, dir_path: bytes, name: bytes) -> bool:
        """Remove a whiteout for `name` if there is one; True if one was removed."""
        dfd = self.dirfd(dir_path)
        try:
            st = os.lstat(name, dir_fd=dfd)
            if (st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0:
                os.unlink(name, dir_fd=dfd)
                return True
        except FileNotFoundError:
            pass
        if len(name) + 4 <= 255:
            try:
                os.unlink(WH_PREFIX + name, dir_fd=dfd)
                return True
            except FileNotFoundError:
                pass
        return False

    def set_opaque(self, path: bytes) -> None:
        parent, name = split(path)
        if self.native:
            self.set_xattr_at(self.dirfd(parent), name, self.ox(b"opaque"), b"y")
        else:
            fd = os.open(
                WH_OPAQUE, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=self.dirfd(path)
            )
            os.close(fd)

    def set_redirect(self, path: bytes, value: bytes) -> None:
        parent, name = split(path)
        self.set_xattr_at(self.dirfd(parent), name, self.ox(b"redirect"), value)

    def set_origin(self, dfd: int, name: bytes, origin: tuple[int, int]) -> None:
        self.set_xattr_at(dfd, name, self.ox(b"layerfs.origin"), b"%d:%d" % origin)

    def remove_empty_dir(self, path: bytes) -> None:
        """rmdir an upper directory whose merged view is empty: drop whiteouts first."""
        dfd = self.dirfd(path)
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            names = [os.fsencode(n) for n in os.listdir(fd)]
        finally:
            os.close(fd)
        for n in names:
            st = os.lstat(n, dir_fd=dfd)
            is_wh = ((st.st_mode & 0o170000) == 0o020000 and st.st_rdev == 0) or n.startswith(
                WH_PREFIX
            )
            if not is_wh:
                raise FsError(errno.ENOTEMPTY)
            os.unlink(n, dir_fd=dfd)
        parent, name = split(path)
        self.forget_prefix(path)
        try:
            os.rmdir(name, dir_fd=self.dirfd(parent))
        except OSError as exc:
            raise FsError.from_os(exc) from exc

    def exists(self, dir_path: bytes, name: bytes) -> bool:
        try:
            os.lstat(name, dir_fd=self.dirfd(dir_path))
            return True
        except FileNotFoundError:
            return False
        except FsError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return False
            raise

    def rename(self, src: bytes, dst: bytes, flags: int = 0) -> None:
        sp, sn = split(src)
        dp, dn = split(dst)
        sfd = self.dirfd(sp)
        dfd = self.dirfd(dp)
        renameat2(sfd, sn, dfd, dn, flags)
        self.forget_prefix(src)
        self.forget_prefix(dst)

    def path_fd(self, path: bytes) -> tuple[int, bytes]:
        """(directory fd, name) for an upper path."""
        parent, name = split(path)
        return self.dirfd(parent), name


__all__ = [
    "UpperLayer",
    "renameat2",
    "RENAME_NOREPLACE",
    "RENAME_EXCHANGE",
    "RENAME_WHITEOUT",
    "join",
]
