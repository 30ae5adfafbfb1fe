"""Materialise an image's merged root filesystem into a directory, as `umoci unpack` does,
except that whiteouts never follow symlinks (kernel overlayfs semantics)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import StoreError
from .model import Entry, EntryKind
from .paths import show
from .store import Store

_Warn = Callable[[str], None]


def _real_dir_path(root: bytes, path: bytes) -> bool:
    """True if every component of `path` (absolute in the rootfs) is a real directory."""
    cur = root
    for comp in path.strip(b"/").split(b"/") if path != b"/" else []:
        cur = cur + b"/" + comp
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(st.st_mode):
            return False
    return True


def _remove(p: bytes) -> None:
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(p)
    else:
        os.unlink(p)


def _clear_dir(p: bytes) -> None:
    for name in os.listdir(p):
        _remove(p + b"/" + name)


class Unpacker:
    def __init__(self, store: Store, root: Path, warn: _Warn) -> None:
        self.store = store
        self.root = os.fsencode(str(root.resolve()))
        self.warn = warn
        self.privileged = os.geteuid() == 0
        self.ids = (os.geteuid(), os.getegid())
        self.not_owned = 0  # entries whose image owner could not be given
        self.dir_times: dict[bytes, int] = {}
        # Not root: directories stay u+rwx while their children are made (root needs no
        # permission bits); their own modes are set at the end.
        self.dir_modes: dict[bytes, int] = {}

    def host(self, path: bytes) -> bytes:
        return self.root if path == b"/" else self.root + path

    def run(self, ref: str) -> None:
        for layer in self.store.image_layers(ref):
            self.apply_layer(layer.id)
        # Directory times last, deepest first: creating children changed them.
        for path in sorted(self.dir_times, key=lambda p: p.count(b"/"), reverse=True):
            hp = self.host(path)
            if _real_dir_path(self.root, path):
                ns = self.dir_times[path]
                os.utime(hp, ns=(ns, ns), follow_symlinks=False)
        for path in sorted(self.dir_modes, key=lambda p: p.count(b"/"), reverse=True):
            if _real_dir_path(self.root, path):
                os.chmod(self.host(path), self.dir_modes[path])

    def apply_layer(self, layer: int) -> None:
        entries = list(self.store.layer_entries(layer))
        # 1. opaque directories lose their lower children; 2. whiteouts remove lower names.
        for e in entries:
            if e.kind == EntryKind.DIR and e.opaque and _real_dir_path(self.root, e.path):
                _clear_dir(self.host(e.path))
        for e in entries:
            if e.kind == EntryKind.WHITEOUT and _real_dir_path(self.root, e.parent or b"/"):
                _remove(self.host(e.path))
        # 3. entries, parents first; hard links last (their target may sort after them).
        links = []
        for e in entries:
            if e.kind == EntryKind.WHITEOUT:
                continue
            if e.kind == EntryKind.HARDLINK:
                links.append(e)
                continue
            self.create(e)
        for e in links:
            assert e.link is not None
            hp = self.host(e.path)
            _remove(hp)
            os.link(self.host(e.link), hp, follow_symlinks=False)

    def create(self, e: Entry) -> None:
        hp = self.host(e.path)
        if e.path != b"/" and not _real_dir_path(self.root, e.parent):
            raise StoreError(f"unpack: parent of {show(e.path)} is not a directory")
        try:
            st: os.stat_result | None = os.lstat(hp)
        except FileNotFoundError:
            st = None
        if e.kind == EntryKind.DIR:
            if st is not None and stat.S_ISDIR(st.st_mode):
                if e.implicit:
                    return  # a missing parent entry does not change a lower directory
            else:
                if st is not None:
                    _remove(hp)
                os.mkdir(hp, 0o700)
            self.meta(e, hp)
            if not e.implicit:
                self.dir_times[e.path] = e.mtime_ns
            return
        if st is not None:
            _remove(hp)
        if e.kind == EntryKind.FILE:
            assert e.content is not None
            shutil.copyfile(self.store.content_path(e.content), hp)
        elif e.kind == EntryKind.SYMLINK:
            assert e.link is not None
            os.symlink(e.link, hp)
        elif e.kind in (EntryKind.CHAR, EntryKind.BLOCK):
            assert e.rdev is not None
            if not self.privileged:
                self.warn(f"{show(e.path)}: device node skipped (needs root)")
                return
            kind = stat.S_IFCHR if e.kind == EntryKind.CHAR else stat.S_IFBLK
            try:
                os.mknod(hp, kind | 0o600, os.makedev(*e.rdev))
            except PermissionError:
                # root of a user namespace: CAP_MKNOD counts in the initial one only
                self.warn(f"{show(e.path)}: device node skipped (needs real root)")
                return
        elif e.kind == EntryKind.FIFO:
            os.mkfifo(hp, 0o600)
        elif e.kind == EntryKind.SOCKET:
            self.warn(f"{show(e.path)}: socket skipped")
            return
        self.meta(e, hp)
        os.utime(hp, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)

    def meta(self, e: Entry, hp: bytes) -> None:
        link = e.kind == EntryKind.SYMLINK
        if self.privileged:
            try:
                os.chown(hp, e.uid, e.gid, follow_symlinks=False)
            except OSError as exc:
                # root of a user namespace: an id its map lacks cannot be given
                if exc.errno not in (errno.EINVAL, errno.EPERM):
                    raise
                self.not_owned += 1
        elif (e.uid, e.gid) != self.ids:
            self.not_owned += 1
        if e.kind == EntryKind.DIR and not self.privileged and e.mode & 0o700 != 0o700:
            self.dir_modes[e.path] = e.mode
            os.chmod(hp, e.mode | 0o700)
        elif not link:
            self.dir_modes.pop(e.path, None)  # a later layer's mode wins
            os.chmod(hp, e.mode)  # after chown, which clears setuid/setgid
        try:
            for name in os.listxattr(hp, follow_symlinks=False):
                if not name.startswith("security.selinux"):
                    os.removexattr(hp, name, follow_symlinks=False)
        except OSError:
            pass
        for k, v in e.xattrs:
            try:
                os.setxattr(hp, k, v, follow_symlinks=False)
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    self.warn(f"{show(e.path)}: xattr {show(k)} not set: {exc.strerror}")
                else:
                    raise


def unpack(store: Store, ref: str, dest: Path, warn: _Warn) -> None:
    """Unpack image `ref` into `dest` (created; must be absent or an empty directory)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise StoreError(f"unpack: {dest} exists and is not an empty directory")
    image = store.resolve(ref)
    dest.mkdir(parents=True, exist_ok=True)
    unpacker = Unpacker(store, dest, warn)
    unpacker.run(image)
    if unpacker.not_owned:
        # One line, not one per file: a rootless unpack cannot chown, and most images are
        # owned by root throughout.
        warn(
            f"{unpacker.not_owned} entries do not have the owners the image gives them (only "
            "real root can give them; unpack as root to keep them)"
        )
