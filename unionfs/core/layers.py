"""Read-only layers: the Layer protocol and DirLayer, a host directory read through dir fds."""

from __future__ import annotations

import errno
import os
import stat
from collections import OrderedDict
from typing import Protocol

from unionfs.core import override
from unionfs.core.errors import FsError
from unionfs.core.statahead import StatAhead
from unionfs.core.types import Entry, Kind, Stat, kind_of_mode

NAME_MAX = 255
WH_PREFIX = b".wh."
WH_OPAQUE = b".wh..wh..opq"

ENTRY_CACHE = 65536
LISTING_CACHE = 1024
_UNSEEN = object()  # not in a cache (None is a cached answer there)
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def split(path: bytes) -> tuple[bytes, bytes]:
    """Split a layer path (b"" is the root, b"a/b" a child) into (parent, name)."""
    head, _, tail = path.rpartition(b"/")
    return head, tail


def join(parent: bytes, name: bytes) -> bytes:
    return parent + b"/" + name if parent else name


class Layer(Protocol):
    """One read-only layer. Paths are relative bytes paths (b"" is the layer root).

    Whiteout spellings are normalised here: `lookup` and `names` report Kind.WHITEOUT and an
    `opaque` flag whatever the layer's on-disk convention, and never show marker names.
    Symlinks are never followed while resolving a path inside a layer.
    """

    def lookup(self, dir_path: bytes, name: bytes) -> Entry | None: ...

    def root(self) -> Entry | None: ...

    def names(self, dir_path: bytes) -> dict[bytes, bool]:
        """Names in the directory -> True for whiteouts. Missing directory: {}."""
        ...

    def open(self, path: bytes, flags: int) -> int: ...

    def readlink(self, path: bytes) -> bytes: ...

    def statvfs(self) -> os.statvfs_result: ...

    def hardlinks(self, host_ino: int) -> list[bytes]:
        """Every path of this layer naming the object with `host_ino` (a hard link)."""
        ...

    def listxattr(self, path: bytes) -> list[bytes]: ...

    def getxattr(self, path: bytes, name: bytes) -> bytes: ...


def _proc(fd: int, name: bytes) -> bytes:
    # A short path naming `name` inside the directory open as `fd`: xattr calls have no
    # dir_fd form, and this never concatenates host paths.
    return b"/proc/self/fd/%d/%s" % (fd, name) if name else b"/proc/self/fd/%d" % fd


def _getxattr(fd: int, name: bytes, attr: bytes) -> bytes | None:
    try:
        return os.getxattr(_proc(fd, name), attr, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return None
        raise


def _listxattr(fd: int, name: bytes) -> frozenset[bytes]:
    try:
        return frozenset(
            os.fsencode(n) for n in os.listxattr(_proc(fd, name), follow_symlinks=False)
        )
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES, errno.ENODATA):
            return frozenset()
        raise


def parse_origin(value: bytes | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        num, ino = value.split(b":")
        return int(num), int(ino)
    except ValueError:
        return None


class DirLayer:
    """A host directory as a layer. Walks paths component by component with O_NOFOLLOW."""

    def __init__(self, root: str | bytes | int, *, cache_size: int = 1024) -> None:
        if isinstance(root, int):
            self.root_fd = root
        else:
            self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._cache: OrderedDict[bytes, int] = OrderedDict()
        self._cache_size = cache_size
        # The last directory asked for, by identity (see dirfd); None after any eviction.
        self._last_path: bytes | None = None
        self._last_fd = -1
        self._links: dict[int, list[bytes]] | None = None
        # A lower layer never changes while mounted: remember lookups and listings.
        self.immutable = True
        self._entries: OrderedDict[tuple[bytes, bytes], Entry | None] = OrderedDict()
        self._listings: OrderedDict[bytes, dict[bytes, bool]] = OrderedDict()
        self.set_spellings((b"trusted.overlay.", b"user.overlay."))
        # Apply override_stat xattrs (a rootless upper used as a lower layer): set by the
        # command line for rootless mounts only.
        self.overrides = False
        # Set by the daemon: warms the host's inode cache for a directory once it is listed.
        self.statahead: StatAhead | None = None

    def set_spellings(self, prefixes: tuple[bytes, ...]) -> None:
        """Which overlay xattr namespaces to read (a lower layer reads both)."""
        self._opaque_attrs = tuple(p + b"opaque" for p in prefixes)
        self._redirect_attrs = tuple(p + b"redirect" for p in prefixes)
        self._origin_attrs = tuple(p + b"layerfs.origin" for p in prefixes)

    def close(self) -> None:
        for fd in self._cache.values():
            os.close(fd)
        self._cache.clear()
        self._last_path = None
        os.close(self.root_fd)

    # -- directory fds ---------------------------------------------------------------
    def dirfd(self, path: bytes) -> int:
        """An O_PATH fd of directory `path`; owned by the cache, valid until the next call
        that may evict (the cache keeps the most recently used entries)."""
        if not path:
            return self.root_fd
        if path is self._last_path:  # a listing asks with one directory's path per entry
            return self._last_fd
        fd = self._cache.get(path)
        if fd is not None:
            self._cache.move_to_end(path)
            self._last_path, self._last_fd = path, fd
            return fd
        parent, name = split(path)
        pfd = self.dirfd(parent)
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise FsError(errno.ENOTDIR) from exc
            raise FsError.from_os(exc) from exc
        self._cache[path] = fd
        while len(self._cache) > self._cache_size:
            _, old = self._cache.popitem(last=False)
            os.close(old)
            self._last_path = None  # (it was the newest; now it may be gone)
        self._last_path, self._last_fd = path, fd
        return fd

    def forget_prefix(self, path: bytes) -> None:
        """Drop cached fds of `path` and everything under it (after rename or rmdir)."""
        if not path:
            return
        pre = path + b"/"
        self._last_path = None
        for key in [k for k in self._cache if k == path or k.startswith(pre)]:
            os.close(self._cache.pop(key))

    def _dirfd_or_none(self, path: bytes) -> int | None:
        try:
            return self.dirfd(path)
        except FsError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return None
            raise

    # -- reading -----------------------------------------------------------------------
    def _entry(self, dfd: int, name: bytes, st: os.stat_result) -> Entry:
        mode = st.st_mode
        if stat.S_ISCHR(mode) and st.st_rdev == 0:
            return Entry(name, Kind.WHITEOUT, None)
        kind = kind_of_mode(mode)
        opaque = False
        redirect = None
        origin = None
        if kind is Kind.DIR or not self.immutable:
            # One listxattr instead of a getxattr per attribute: most objects have none.
            attrs = _listxattr(dfd, name)
            if kind is Kind.DIR:
                for attr in self._opaque_attrs:
                    if attr in attrs and _getxattr(dfd, name, attr) == b"y":
                        opaque = True
                        break
                if not opaque:
                    opaque = self._has_opaque_marker(dfd, name)
                for attr in self._redirect_attrs:
                    redirect = _getxattr(dfd, name, attr) if attr in attrs else None
                    if redirect:
                        break
            for attr in self._origin_attrs if not self.immutable else ():
                origin = parse_origin(_getxattr(dfd, name, attr) if attr in attrs else None)
                if origin:
                    break
        est = Stat.of(st)
        if self.overrides and kind in (Kind.FILE, Kind.DIR):
            ov = override.read(_proc(dfd, name), follow=not name)
            if ov is not None:
                est = override.apply(est, ov)
                kind = kind_of_mode(est.mode) if kind is Kind.FILE else kind
        return Entry(name, kind, est, opaque, redirect or None, origin)

    def _has_opaque_marker(self, dfd: int, name: bytes) -> bool:
        if self.immutable:
            # `name` was just seen as a directory and a lower layer never changes: one lstat
            # through it follows no symlink.
            try:
                os.lstat(name + b"/" + WH_OPAQUE, dir_fd=dfd)
                return True
            except OSError:
                return False
        try:
            cfd = os.open(name, _DIR_FLAGS, dir_fd=dfd)
        except OSError:
            return False
        try:
            os.lstat(WH_OPAQUE, dir_fd=cfd)
            return True
        except OSError:
            return False
        finally:
            os.close(cfd)

    def lookup(self, dir_path: bytes, name: bytes) -> Entry | None:
        if not self.immutable:
            return self._lookup(dir_path, name)
        key = (dir_path, name)
        entry = self._entries.get(key, _UNSEEN)
        if entry is not _UNSEEN:
            self._entries.move_to_end(key)
            return entry  # type: ignore[return-value]
        entry = self._lookup(dir_path, name)
        self._entries[key] = entry
        if len(self._entries) > ENTRY_CACHE:
            self._entries.popitem(last=False)
        return entry

    def _lookup(self, dir_path: bytes, name: bytes) -> Entry | None:
        dfd = self._dirfd_or_none(dir_path)
        if dfd is None or name.startswith(WH_PREFIX):
            return None
        try:
            st = os.lstat(name, dir_fd=dfd)
        except FileNotFoundError:
            if len(name) + len(WH_PREFIX) <= NAME_MAX:
                try:
                    os.lstat(WH_PREFIX + name, dir_fd=dfd)
                    return Entry(name, Kind.WHITEOUT, None)
                except FileNotFoundError:
                    pass
            return None
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                return None
            raise FsError.from_os(exc) from exc
        return self._entry(dfd, name, st)

    def root(self) -> Entry | None:
        st = Stat.of(os.stat(self.root_fd))
        if self.overrides:
            ov = override.read(_proc(self.root_fd, b""), follow=True)
            if ov is not None:
                st = override.apply(st, ov)
        return Entry(b"", Kind.DIR, st)

    def stat(self, path: bytes) -> os.stat_result:
        if not path:
            return os.stat(self.root_fd)
        parent, name = split(path)
        try:
            return os.lstat(name, dir_fd=self.dirfd(parent))
        except OSError as exc:
            raise FsError.from_os(exc) from exc

    def names(self, dir_path: bytes) -> dict[bytes, bool]:
        if not self.immutable:
            return self._names(dir_path)
        try:
            out = self._listings[dir_path]
            self._listings.move_to_end(dir_path)
            return out
        except KeyError:
            pass
        out = self._names(dir_path)
        self._listings[dir_path] = out
        if len(self._listings) > LISTING_CACHE:
            self._listings.popitem(last=False)
        return out

    def stat_ahead(self, dir_path: bytes) -> None:
        """Lookups are coming for many names of `dir_path`: warm the host's inode cache for
        its entries in the background (see statahead.py), when the daemon set that up."""
        if self.statahead is None:
            return
        names = self._listings.get(dir_path)
        dfd = self._dirfd_or_none(dir_path) if names else None
        if names and dfd is not None:
            self.statahead.submit(dfd, list(names))

    def _names(self, dir_path: bytes) -> dict[bytes, bool]:
        dfd = self._dirfd_or_none(dir_path)
        if dfd is None:
            return {}
        out: dict[bytes, bool] = {}
        wh: list[bytes] = []
        # Through the fd's /proc name as bytes: scandir then yields bytes names (no decoding
        # and encoding per entry) and opens the directory itself.
        with os.scandir(_proc(dfd, b"")) as it:
            for de in it:
                name = de.name
                if name.startswith(WH_PREFIX):
                    if not name.startswith(WH_PREFIX + WH_PREFIX) and len(name) > 4:
                        wh.append(name[len(WH_PREFIX) :])
                    continue
                if not (
                    de.is_file(follow_symlinks=False)
                    or de.is_dir(follow_symlinks=False)
                    or de.is_symlink()
                ):
                    try:
                        st = os.lstat(name, dir_fd=dfd)
                    except FileNotFoundError:
                        continue
                    out[name] = stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
                else:
                    out[name] = False
        for name in wh:
            out.setdefault(name, True)
        return out

    def open(self, path: bytes, flags: int) -> int:
        parent, name = split(path)
        try:
            return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.dirfd(parent))
        except OSError as exc:
            raise FsError.from_os(exc) from exc

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.root_fd)

    def hardlinks(self, host_ino: int) -> list[bytes]:
        # One walk of the layer, on the first copy-up of a hard link (layers do not change).
        if self._links is None or not self.immutable:
            links: dict[int, list[bytes]] = {}
            self._collect_links(self.root_fd, b"", links)
            self._links = links
        return list(self._links.get(host_ino, []))

    def _collect_links(self, dfd: int, path: bytes, links: dict[int, list[bytes]]) -> None:
        fd = os.open(b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
        try:
            with os.scandir(fd) as it:
                entries = [(os.fsencode(de.name), de) for de in it]
            for name, de in entries:
                if de.is_dir(follow_symlinks=False):
                    try:
                        cfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                    except OSError:
                        continue
                    try:
                        self._collect_links(cfd, join(path, name), links)
                    finally:
                        os.close(cfd)
                    continue
                st = de.stat(follow_symlinks=False)
                if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                    links.setdefault(st.st_ino, []).append(join(path, name))
        finally:
            os.close(fd)

    def readlink(self, path: bytes) -> bytes:
        parent, name = split(path)
        try:
            return os.readlink(name, dir_fd=self.dirfd(parent))
        except OSError as exc:
            if exc.errno == errno.EINVAL and self.overrides:
                # A symlink kept as a regular file by a rootless upper: it holds the target.
                fd = self.open(path, os.O_RDONLY)
                try:
                    return os.read(fd, 1 << 16)
                finally:
                    os.close(fd)
            raise FsError.from_os(exc) from exc

    def _xpath(self, path: bytes) -> bytes:
        parent, name = split(path)
        # The root: "." inside it (xattr calls do not follow the /proc magic link).
        return _proc(self.dirfd(parent), name) if path else _proc(self.root_fd, b".")

    def listxattr(self, path: bytes) -> list[bytes]:
        try:
            return [os.fsencode(n) for n in os.listxattr(self._xpath(path), follow_symlinks=False)]
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EPERM):
                return []
            raise FsError.from_os(exc) from exc

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        try:
            return os.getxattr(self._xpath(path), name, follow_symlinks=False)
        except OSError as exc:
            raise FsError.from_os(exc) from exc
