"""UnionFS: every filesystem operation of the merged view, synchronous, by inode number."""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ParamSpec, TypeVar

from unionfs.core import override
from unionfs.core.copyup import copy_up
from unionfs.core.errors import FsError
from unionfs.core.handles import DirHandle, FileHandle, HandleTable
from unionfs.core.idmap import OVERFLOW_ID, Presentation
from unionfs.core.inodes import InodeTable, Key, Node
from unionfs.core.layers import NAME_MAX, WH_PREFIX, Layer, join, split
from unionfs.core.prefetch import Prefetch
from unionfs.core.resolve import (
    LowerIndex,
    Resolved,
    lower_positive,
    merged_names,
    resolve_child,
)
from unionfs.core.types import ROOT_INO, Fh, Ino, Stat
from unionfs.core.upper import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    UpperLayer,
    fallocate,
)

P = ParamSpec("P")
T = TypeVar("T")


def _oserr(fn: Callable[P, T]) -> Callable[P, T]:
    """Host errors surface as FsError with the same errno."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except FsError:
            raise
        except OSError as exc:
            raise FsError.from_os(exc) from exc

    return wrapper


@dataclass(slots=True)
class Attributes:  # a value (see types.Stat)
    """What getattr reports. `immutable`: only lower layers provide the object, so the
    kernel may cache it for long."""

    ino: Ino
    st: Stat
    immutable: bool


CAPS_XATTR = b"security.capability"


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)
    if not name or b"/" in name or name in (b".", b".."):
        raise FsError(errno.EINVAL)
    if name.startswith(WH_PREFIX):
        # Whiteout spelling: every layer reads `.wh.NAME` as a whiteout, so such a file
        # would vanish (and hide NAME) instead of appearing.
        raise FsError(errno.EINVAL)


class UnionFS:
    """The merged view of `lowers` (top first) under an optional writable `upper`.

    Not thread-safe: the caller serialises calls (the FUSE adapter holds one lock across
    every call that changes state, including copy-ups run in a worker thread).
    """

    def __init__(
        self,
        lowers: Sequence[Layer],
        upper: UpperLayer | None,
        presentation: Presentation | None = None,
    ) -> None:
        self.lowers = list(lowers)
        self.upper = upper
        self.lower_index = LowerIndex(self.lowers)
        self.prefetch: Prefetch | None = None  # see start_prefetch
        self.inodes = InodeTable()
        self.handles = HandleTable()
        # A rootless upper keeps what its owner cannot give an object on disk (owner, mode,
        # device type, privileged xattrs) as override xattrs (unionfs.core.override).
        self.rootless = upper is not None and not upper.native
        # Metadata xattrs are hidden (and stored privileged xattrs shown by their names) in a
        # rootless upper and in lowers that apply overrides (rootless uppers read back).
        self.metadata_xattrs = self.rootless or any(
            getattr(layer, "overrides", False) for layer in self.lowers
        )
        # fuse-overlayfs' own xattrs (user.fuseoverlayfs.*) are hidden everywhere, as
        # fuse-overlayfs hides them: a lower written by it must not show its bookkeeping.
        self.private = (b"trusted.overlay.", override.FUSE_OVERLAYFS_PREFIX) + (
            (b"user.overlay.", *override.HIDDEN_XATTRS) if self.metadata_xattrs else ()
        )
        self.present = presentation if presentation and not presentation.identity else None
        # Files whose last name went away since the adapter last asked (take_unlinked).
        self._unlinked_files: list[Ino] = []
        root = Node(ino=ROOT_INO, key=(-1, 0), is_dir=True, parent=None, name=b"")
        root.upper = upper is not None
        root.lower = tuple((i, b"") for i in range(len(self.lowers)))
        root.lower_entry = self.lowers[0].root() if self.lowers else None
        root.lookups = 1
        self.inodes.add_root(root)
        self.root = root

    # -- helpers ---------------------------------------------------------------------
    def node(self, ino: Ino) -> Node:
        node = self.inodes.get(ino)
        if node is None:
            raise FsError(errno.ESTALE)
        return node

    def dir_node(self, ino: Ino) -> Node:
        node = self.node(ino)
        if not node.is_dir:
            raise FsError(errno.ENOTDIR)
        if node.unlinked:
            raise FsError(errno.ENOENT)
        return node

    def _writable(self) -> UpperLayer:
        if self.upper is None:
            raise FsError(errno.EROFS)
        return self.upper

    def _resolve(self, parent: Node, name: bytes) -> Resolved | None:
        return resolve_child(
            self.upper,
            self.lowers,
            parent.path() if parent.upper else None,
            parent.lower,
            name,
            self.lower_index,
        )

    def _key(self, res: Resolved) -> Key:
        if res.upper is not None:
            assert res.upper.st is not None
            return res.upper.origin or (0, res.upper.st.host_ino)
        li = res.lower[0][0]
        assert res.lower_entry is not None and res.lower_entry.st is not None
        return (li + 1, res.lower_entry.st.host_ino)

    def _node_for(self, parent: Node, name: bytes, res: Resolved) -> Node:
        key = self._key(res)
        node = self.inodes.find(key, res.is_dir)
        if node is None:
            node = self.inodes.new(key, res.is_dir, parent, name)
        elif (
            res.is_dir
            and node.parent is not None
            and (node.parent is not parent or node.name != name)
            and (node.is_ancestor_of(parent) or self._still_shown(node))
        ):
            node = self.inodes.new_secondary(key, parent, name)
        if res.is_dir:
            node.parent, node.name = parent, name
            node.upper = res.upper is not None
            node.lower = res.lower
            node.lower_entry = res.lower_entry
        elif res.upper is not None or not node.upper:
            # A lower alias of a hard link copied up through another name keeps the upper
            # copy; any other lookup refreshes what provides the object.
            node.upper = res.upper is not None
            node.lower = res.lower
            node.lower_entry = res.lower_entry
            if node.parent is None or (node.parent, node.name) != (parent, name):
                if node.parent is not None and self._alias_valid(node, node.parent, node.name):
                    self._add_alias(node, node.parent, node.name)
                node.parent, node.name = parent, name
        return node

    def _still_shown(self, node: Node) -> bool:
        """Does the directory's recorded place still show it?"""
        parent = node.parent
        if parent is None or parent.unlinked or self.inodes.get(parent.ino) is not parent:
            return False
        res = self._resolve(parent, node.name)
        return res is not None and res.is_dir and self._key(res) == node.key

    def _alias_valid(self, node: Node, parent: Node, name: bytes) -> bool:
        return self.inodes.get(parent.ino) is parent and not parent.unlinked

    def _add_alias(self, node: Node, parent: Node, name: bytes) -> None:
        for p, n in node.aliases:
            if p is parent and n == name:
                return
        node.aliases = (*node.aliases, (parent, name))

    def _remove_name(self, node: Node, parent: Node, name: bytes) -> None:
        """`parent/name` no longer names `node`."""
        if node.is_dir:
            node.unlinked = True
            return
        node.aliases = tuple((p, n) for p, n in node.aliases if not (p is parent and n == name))
        if node.parent is parent and node.name == name:
            while node.aliases:
                (p, n), node.aliases = node.aliases[-1], node.aliases[:-1]
                if self._alias_valid(node, p, n):
                    node.parent, node.name = p, n
                    return
            node.unlinked = True
            self._unlinked_files.append(node.ino)

    def gone(self, ino: Ino) -> bool:
        """Has `ino` no name left (or is it no longer in the table)?"""
        node = self.inodes.get(ino)
        return node is None or node.unlinked

    def take_unlinked(self) -> list[Ino]:
        """The files whose last name went away since the last call (open ones live on)."""
        out, self._unlinked_files = self._unlinked_files, []
        return out

    def _upper_path(self, node: Node) -> bytes:
        return node.path()

    def _upper_loc(self, node: Node) -> tuple[int, bytes]:
        """(dir fd, name) of the object's upper copy; (fd, b"") for the upper root."""
        upper = self._writable()
        if node.parent is None:
            return upper.root_fd, b""
        if node.unlinked:
            # Its name is gone (a whiteout or another object may be there now).
            raise FsError(errno.ENOENT)
        return upper.path_fd(node.path())

    def _loc_path(self, node: Node) -> bytes:
        """A path to the upper copy that xattr calls may use without following symlinks
        (for the root: its "." inside the fd's directory, not the /proc magic link)."""
        dfd, name = self._upper_loc(node)
        return b"/proc/self/fd/%d/%s" % (dfd, name or b".")

    def _loc_stat(self, node: Node) -> os.stat_result:
        dfd, name = self._upper_loc(node)
        return os.lstat(name, dir_fd=dfd) if name else os.stat(dfd)

    # -- lower hard links --------------------------------------------------------------
    def _walk(self, path: bytes, made: list[Node]) -> Node | None:
        """The node of merged `path`, creating (unreferenced) nodes on the way."""
        node = self.root
        for comp in path.split(b"/") if path else []:
            if not node.is_dir:
                return None
            res = self._resolve(node, comp)
            if res is None:
                return None
            node = self._node_for(node, comp, res)
            made.append(node)
        return node

    def _shows_alias(self, parent: Node, name: bytes, src: Layer, alias: bytes) -> bool:
        res = self._resolve(parent, name)
        if res is None or res.upper is not None or res.is_dir or not res.lower:
            return False
        return self.lowers[res.lower[0][0]] is src and res.lower[0][1] == alias

    def _alias_parent(
        self, src: Layer, ppath: bytes, name: bytes, alias: bytes, made: list[Node]
    ) -> Node | None:
        """The merged directory showing lower `alias`: at the same path, or a directory
        renamed in this mount whose lower directory is the alias' parent."""
        parent = self._walk(ppath, made)
        if parent is not None and parent.is_dir and self._shows_alias(parent, name, src, alias):
            return parent
        for cand in list(self.inodes.nodes.values()):
            if not cand.is_dir or cand.unlinked or cand is parent:
                continue
            below = any(self.lowers[li] is src and lp == ppath for li, lp in cand.lower)
            if below and self._shows_alias(cand, name, src, alias):
                return cand
        return None

    def _link_up_aliases(self, node: Node, src: Layer, src_path: bytes, host_ino: int) -> None:
        """After copying up one name of a lower hard link, give every other name of it that
        the merged view shows the same upper inode, as kernel overlayfs with index=on shows
        them; the upper then mounts with the kernel as the same tree."""
        upper = self._writable()
        made: list[Node] = []
        try:
            for alias in src.hardlinks(host_ino):
                if alias == src_path:
                    continue
                ppath, name = split(alias)
                parent = self._alias_parent(src, ppath, name, alias, made)
                if parent is None:
                    continue
                self.ensure_upper(parent)
                dfd = upper.dirfd(parent.path())
                sfd, sname = self._upper_loc(node)
                pst = os.stat(dfd)
                os.link(sname, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                os.utime(b"/proc/self/fd/%d" % dfd, ns=(pst.st_atime_ns, pst.st_mtime_ns))
                self._add_alias(node, parent, name)
        finally:
            for m in made:
                self.inodes.drop_if_unused(m)

    def _lower_layer(self, node: Node) -> tuple[Layer, bytes]:
        li, lp = node.lower[0]
        return self.lowers[li], lp

    def _merged(self, node: Node) -> bool:
        return bool(node.lower) and (node.upper or len(node.lower) > 1)

    def _overridden(self, st: Stat, target: bytes | int) -> Stat:
        ov = override.read(target) if self.rootless else None
        return st if ov is None else override.apply(st, ov)

    def _stat(self, node: Node) -> Stat:
        """The stored attributes (override applied), before presentation."""
        if node.unlinked and not node.is_dir:
            fd = self.handles.any_fd(node)
            if fd is not None:
                return replace(self._overridden(Stat.of(os.fstat(fd)), fd), nlink=0)
        if node.upper:
            st = Stat.of(self._loc_stat(node))
            if self.rootless:
                st = self._overridden(st, self._loc_path(node))
        elif node.lower_entry is not None and node.lower_entry.st is not None:
            st = node.lower_entry.st
        else:
            raise FsError(errno.ENOENT)
        if node.is_dir and self._merged(node):
            st = replace(st, nlink=1)
        if node.unlinked:
            st = replace(st, nlink=0)
        return st

    def attributes(self, node: Node) -> Attributes:
        st = self._stat(node)
        if self.present is not None:
            st = self.present.show(st)
        return Attributes(node.ino, st, not node.upper and not node.unlinked)

    def _store_ids(self, uid: int | None, gid: int | None) -> tuple[int | None, int | None]:
        """Ids from the kernel (host ids) -> ids to store; EINVAL when the map has none."""
        if self.present is None:
            return uid, gid
        suid = None if uid is None else self.present.store_uid(uid)
        sgid = None if gid is None else self.present.store_gid(gid)
        if (uid is not None and suid is None) or (gid is not None and sgid is None):
            raise FsError(errno.EINVAL)
        return suid, sgid

    def _set_override(
        self, node: Node, dfd: int, name: bytes, uid: int | None, gid: int | None, mode: int | None
    ) -> None:
        """chown/chmod in a rootless upper: recorded in the override."""
        assert self.upper is not None
        ov = self._changed_override(node, uid, gid, mode)
        override.record(dfd, name, ov, self.upper.work_fd, self.upper.tmp_name())

    def _changed_override(
        self, node: Node, uid: int | None, gid: int | None, mode: int | None
    ) -> override.Override:
        """What `node` shows after a chown/chmod (None: unchanged). A chown of a non-directory
        drops set-uid, and set-gid of a group-executable file, as the host's chown does."""
        cur = self._stat(node)
        perms = stat.S_IMODE(cur.mode if mode is None else mode)
        if mode is None and (uid is not None or gid is not None) and not stat.S_ISDIR(cur.mode):
            perms &= ~stat.S_ISUID
            if perms & stat.S_IXGRP:
                perms &= ~stat.S_ISGID
        return override.Override(
            cur.uid if uid is None else uid,
            cur.gid if gid is None else gid,
            perms,
            stat.S_IFMT(cur.mode),
            cur.rdev,
        )

    def needs_copy_up(self, ino: Ino) -> bool:
        """Would changing `ino` copy data up first? (The adapter then runs the call in a
        worker thread.)"""
        node = self.inodes.get(ino)
        return node is not None and not node.upper and self.upper is not None

    def known(self, ino: Ino) -> bool:
        """Is `ino` in the inode table (looked up or open)?"""
        return self.inodes.get(ino) is not None

    def incref(self, ino: Ino, n: int = 1) -> None:
        self.node(ino).lookups += n

    def forget(self, ino: Ino, n: int) -> None:
        node = self.inodes.get(ino)
        if node is None:
            return
        node.lookups -= n
        self.inodes.drop_if_unused(node)

    def drop_if_unused(self, ino: Ino) -> None:
        node = self.inodes.get(ino)
        if node is not None:
            self.inodes.drop_if_unused(node)

    # -- copy-up ---------------------------------------------------------------------
    def _copy_up_lower_link(self, node: Node) -> None:
        """Before a name of a lower hard link goes away, copy it up with all its names, so
        the other names show one link less (kernel overlayfs with index=on does the same)."""
        lst = node.lower_entry.st if node.lower_entry is not None else None
        if not node.upper and lst is not None and lst.nlink > 1:
            self.ensure_upper(node)

    @_oserr
    def ensure_upper(self, node: Node, *, with_data: bool = True) -> None:
        """Copy `node` (and its missing parents) into the upper."""
        upper = self._writable()
        if node.upper:
            return
        if node.unlinked:
            raise FsError(errno.ENOENT)
        assert node.parent is not None
        self.ensure_upper(node.parent)
        src, src_path = self._lower_layer(node)
        entry = node.lower_entry
        assert entry is not None and entry.st is not None
        copy_up(
            upper,
            src,
            src_path,
            entry.st,
            node.parent.path(),
            node.name,
            node.key,
            with_data=with_data,
        )
        node.upper = True
        if not node.is_dir:
            node.aliases = ()
            if entry.st.nlink > 1:
                self._link_up_aliases(node, src, src_path, entry.st.host_ino)

    # -- lookups and attributes ----------------------------------------------------------
    @_oserr
    def lookup(self, parent_ino: Ino, name: bytes) -> Attributes:
        parent = self.dir_node(parent_ino)
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if name == b".":
            node = parent
        elif name == b"..":
            node = parent.parent or parent
        else:
            res = self._resolve(parent, name)
            if res is None:
                raise FsError(errno.ENOENT)
            node = self._node_for(parent, name, res)
        attrs = self.attributes(node)
        node.lookups += 1
        return attrs

    @_oserr
    def getattr(self, ino: Ino) -> Attributes:
        return self.attributes(self.node(ino))

    @_oserr
    def setattr(
        self,
        ino: Ino,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fh: Fh | None = None,
    ) -> Attributes:
        node = self.node(ino)
        self._writable()
        uid, gid = self._store_ids(uid, gid)
        # A call that changes nothing (chown(f, -1, -1)) still changes the ctime, as on the
        # kernel's overlay (notify_change with ATTR_CTIME on the upper): an empty chown.
        touch = (uid, gid, mode, size, atime_ns, mtime_ns) == (None,) * 6
        handle = self.handles.files.get(fh) if fh is not None else None
        if node.unlinked and handle is None:
            handle_fd = self.handles.any_fd(node)
        else:
            handle_fd = handle.fd if handle is not None and handle.upper else None
        if handle_fd is None:
            self.ensure_upper(node, with_data=size != 0)
        if handle_fd is not None and node.unlinked:
            fd = handle_fd
            if size is not None:
                os.ftruncate(fd, size)
            if self.rootless and (uid is not None or gid is not None or mode is not None):
                override.record_fd(fd, self._changed_override(node, uid, gid, mode))
            else:
                if mode is not None:
                    os.chmod(fd, stat.S_IMODE(mode))
                if uid is not None or gid is not None or touch:
                    os.chown(fd, -1 if uid is None else uid, -1 if gid is None else gid)
            if atime_ns is not None or mtime_ns is not None:
                cur = os.fstat(fd)
                os.utime(
                    fd,
                    ns=(
                        cur.st_atime_ns if atime_ns is None else atime_ns,
                        cur.st_mtime_ns if mtime_ns is None else mtime_ns,
                    ),
                )
            return self.attributes(node)
        dfd, name = self._upper_loc(node)
        is_link = stat.S_ISLNK(self._stat(node).mode)
        # The root's location is an O_PATH fd, which fchmod refuses (EBADF): always a path.
        target = b"/proc/self/fd/%d/%s" % (dfd, name) if name else b"/proc/self/fd/%d" % dfd
        if size is not None:
            if node.is_dir:
                raise FsError(errno.EISDIR)
            if handle is not None and handle.upper and handle.flags & os.O_ACCMODE != os.O_RDONLY:
                os.ftruncate(handle.fd, size)
            else:
                fd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                try:
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        if self.rootless and (uid is not None or gid is not None or mode is not None):
            self._set_override(node, dfd, name, uid, gid, None if is_link else mode)
        else:
            if uid is not None or gid is not None or touch:
                # The root: through its /proc link, followed (not the link itself).
                os.chown(
                    name if name else b"/proc/self/fd/%d" % dfd,
                    -1 if uid is None else uid,
                    -1 if gid is None else gid,
                    dir_fd=dfd if name else None,
                    follow_symlinks=not name,
                )
            if mode is not None and not is_link:
                os.chmod(target, stat.S_IMODE(mode))
        if atime_ns is not None or mtime_ns is not None:
            cur = os.lstat(name, dir_fd=dfd) if name else os.stat(dfd)
            ns = (
                cur.st_atime_ns if atime_ns is None else atime_ns,
                cur.st_mtime_ns if mtime_ns is None else mtime_ns,
            )
            if name:
                os.utime(name, ns=ns, dir_fd=dfd, follow_symlinks=False)
            else:
                os.utime(b"/proc/self/fd/%d" % dfd, ns=ns)
        return self.attributes(node)

    @_oserr
    def readlink(self, ino: Ino) -> bytes:
        node = self.node(ino)
        if node.upper:
            dfd, name = self._upper_loc(node)
            if self.rootless and stat.S_ISREG(os.lstat(name, dir_fd=dfd).st_mode):
                return self._stand_in_target(dfd, name)
            return os.readlink(name, dir_fd=dfd)
        layer, path = self._lower_layer(node)
        return layer.readlink(path)

    # -- creating ----------------------------------------------------------------------
    def _prepare_create(self, parent_ino: Ino, name: bytes) -> tuple[Node, UpperLayer, bool]:
        """Check `name` is free, copy the parent up, clear a whiteout. Returns whether a
        whiteout was replaced (a new directory then hides the lower one: opaque)."""
        upper = self._writable()
        parent = self.dir_node(parent_ino)
        _check_name(name)
        if self._resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        self.ensure_upper(parent)
        had_wh = upper.clear_whiteout(parent.path(), name)
        return parent, upper, had_wh

    def _stand_in_target(self, dfd: int, name: bytes) -> bytes:
        """A symlink kept as a regular file in a rootless upper: the file holds its target."""
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            return os.read(fd, 1 << 16)
        finally:
            os.close(fd)

    def _owner(
        self,
        dfd: int,
        name: bytes,
        parent: Node,
        host_uid: int,
        host_gid: int,
        mode: int | None = None,
        rdev: int = 0,
    ) -> None:
        """Give a new object its owner (the caller's ids, mapped) and set-id bits."""
        suid, sgid = self._store_ids(host_uid, host_gid)
        uid = OVERFLOW_ID if suid is None else suid
        gid = OVERFLOW_ID if sgid is None else sgid
        pst = self._stat(parent)
        if pst.mode & stat.S_ISGID:
            gid = pst.gid
        try:
            os.chown(name, uid, gid, dir_fd=dfd, follow_symlinks=False)
        except OSError as exc:
            # Rootless, everything is ours (the override keeps the owner): EPERM, or EINVAL
            # for an id a user namespace does not map.
            if exc.errno != errno.EPERM and (not self.rootless or exc.errno != errno.EINVAL):
                raise
        if self.rootless:
            assert self.upper is not None
            st = os.lstat(name, dir_fd=dfd)
            fmt = stat.S_IFMT(mode) if mode is not None and stat.S_IFMT(mode) else None
            perms = stat.S_IMODE(st.st_mode if mode is None else mode)
            ov = override.Override(uid, gid, perms, fmt, rdev)
            override.record(dfd, name, ov, self.upper.work_fd, self.upper.tmp_name(), fresh=True)
            return
        if mode is not None and mode & (stat.S_ISUID | stat.S_ISGID):
            # chown cleared the set-id bits the caller asked for
            os.chmod(name, stat.S_IMODE(mode), dir_fd=dfd)

    def _finish_create(self, parent: Node, name: bytes) -> Node:
        res = self._resolve(parent, name)
        if res is None:
            raise FsError(errno.EIO, "created entry vanished")
        node = self._node_for(parent, name, res)
        node.lookups += 1
        return node

    @_oserr
    def mkdir(self, parent_ino: Ino, name: bytes, mode: int, uid: int, gid: int) -> Attributes:
        parent, upper, had_wh = self._prepare_create(parent_ino, name)
        dfd = upper.dirfd(parent.path())
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=dfd)
        self._owner(dfd, name, parent, uid, gid)
        if had_wh or lower_positive(self.lowers, parent.lower, name):
            upper.set_opaque(join(parent.path(), name))
        return self.attributes(self._finish_create(parent, name))

    @_oserr
    def mknod(
        self, parent_ino: Ino, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attributes:
        parent, upper, _ = self._prepare_create(parent_ino, name)
        dfd = upper.dirfd(parent.path())
        if stat.S_ISREG(mode) or stat.S_IFMT(mode) == 0:
            fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, stat.S_IMODE(mode), dir_fd=dfd)
            os.close(fd)
        else:
            try:
                os.mknod(name, mode, rdev, dir_fd=dfd)
            except PermissionError:
                if not self.rootless:
                    raise
                # A device an unprivileged daemon cannot make: an empty regular file whose
                # override says what it is.
                fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600, dir_fd=dfd)
                os.close(fd)
        self._owner(dfd, name, parent, uid, gid, mode, rdev)
        return self.attributes(self._finish_create(parent, name))

    @_oserr
    def symlink(
        self, parent_ino: Ino, name: bytes, target: bytes, uid: int, gid: int
    ) -> Attributes:
        parent, upper, _ = self._prepare_create(parent_ino, name)
        dfd = upper.dirfd(parent.path())
        os.symlink(target, name, dir_fd=dfd)
        self._owner(dfd, name, parent, uid, gid)
        return self.attributes(self._finish_create(parent, name))

    @_oserr
    def create(
        self, parent_ino: Ino, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[Fh, Attributes]:
        parent, upper, _ = self._prepare_create(parent_ino, name)
        dfd = upper.dirfd(parent.path())
        hflags = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOCTTY)) | os.O_CLOEXEC
        fd = os.open(name, hflags | os.O_CREAT | os.O_EXCL, stat.S_IMODE(mode), dir_fd=dfd)
        try:
            self._owner(dfd, name, parent, uid, gid, mode)
            node = self._finish_create(parent, name)
        except BaseException:
            os.close(fd)
            raise
        node.opens += 1
        node.no_caps = True
        fh = self.handles.add_file(FileHandle(fd, node, True, flags))
        return fh, self.attributes(node)

    @_oserr
    def link(self, ino: Ino, parent_ino: Ino, name: bytes) -> Attributes:
        node = self.node(ino)
        if node.is_dir:
            raise FsError(errno.EPERM)
        if node.unlinked:
            raise FsError(errno.ENOENT)
        upper = self._writable()
        parent = self.dir_node(parent_ino)
        _check_name(name)
        if self._resolve(parent, name) is not None:
            raise FsError(errno.EEXIST)
        self.ensure_upper(node)
        parent, upper, _ = self._prepare_create(parent_ino, name)
        sfd, sname = self._upper_loc(node)
        os.link(
            sname,
            name,
            src_dir_fd=sfd,
            dst_dir_fd=upper.dirfd(parent.path()),
            follow_symlinks=False,
        )
        self._add_alias(node, parent, name)
        node.lookups += 1
        return self.attributes(node)

    # -- removing ----------------------------------------------------------------------
    @_oserr
    def unlink(self, parent_ino: Ino, name: bytes) -> None:
        upper = self._writable()
        parent = self.dir_node(parent_ino)
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        res = self._resolve(parent, name)
        if res is None:
            raise FsError(errno.ENOENT)
        if res.is_dir:
            raise FsError(errno.EISDIR)
        node = self._node_for(parent, name, res)
        self._copy_up_lower_link(node)
        self.ensure_upper(parent)
        ppath = parent.path()
        if upper.exists(ppath, name):
            os.unlink(name, dir_fd=upper.dirfd(ppath))
        if lower_positive(self.lowers, parent.lower, name):
            upper.whiteout(ppath, name)
        self._remove_name(node, parent, name)

    @_oserr
    def rmdir(self, parent_ino: Ino, name: bytes) -> None:
        upper = self._writable()
        parent = self.dir_node(parent_ino)
        if len(name) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        if name == b".":
            raise FsError(errno.EINVAL)
        if name == b"..":
            raise FsError(errno.ENOTEMPTY)
        res = self._resolve(parent, name)
        if res is None:
            raise FsError(errno.ENOENT)
        if not res.is_dir:
            raise FsError(errno.ENOTDIR)
        node = self._node_for(parent, name, res)
        if self._names(node):
            raise FsError(errno.ENOTEMPTY)
        self.ensure_upper(parent)
        ppath = parent.path()
        if res.upper is not None:
            upper.remove_empty_dir(join(ppath, name))
        if lower_positive(self.lowers, parent.lower, name):
            upper.whiteout(ppath, name)
        self._remove_name(node, parent, name)

    # -- rename ------------------------------------------------------------------------
    def _set_redirect(self, node: Node, new_parent: Node, new_name: bytes) -> None:
        """After moving a directory that has lower layers: record where they keep it."""
        assert self.upper is not None
        path = join(new_parent.path(), new_name)
        if not node.lower:
            if self._merged(new_parent) or new_parent.lower:
                self.upper.set_opaque(path)
            return
        li, lp = node.lower[0]
        lparent, lname = split(lp)
        same_parent = any(pli == li and plp == lparent for pli, plp in new_parent.lower)
        if same_parent:
            if lname == new_name:
                self._clear_redirect(path)
            else:
                self.upper.set_redirect(path, lname)
        else:
            self.upper.set_redirect(path, b"/" + lp)

    def _clear_redirect(self, path: bytes) -> None:
        assert self.upper is not None
        dfd, name = self.upper.path_fd(path)
        self.upper.remove_xattr_at(dfd, name, self.upper.ox(b"redirect"))

    @_oserr
    def rename(self, p1: Ino, n1: bytes, p2: Ino, n2: bytes, flags: int = 0) -> None:
        upper = self._writable()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
            flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE
        ):
            raise FsError(errno.EINVAL)
        parent1 = self.dir_node(p1)
        parent2 = self.dir_node(p2)
        if len(n1) > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG)
        _check_name(n2)
        res1 = self._resolve(parent1, n1)
        if res1 is None:
            raise FsError(errno.ENOENT)
        res2 = self._resolve(parent2, n2)
        src = self._node_for(parent1, n1, res1)
        dst = self._node_for(parent2, n2, res2) if res2 is not None else None
        if flags & RENAME_NOREPLACE and dst is not None:
            raise FsError(errno.EEXIST)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise FsError(errno.ENOENT)
            self._exchange(parent1, n1, src, parent2, n2, dst)
            return
        if src.is_dir and src.is_ancestor_of(parent2):
            raise FsError(errno.EINVAL)
        if dst is not None:
            if dst is src:
                return
            if src.is_dir and not dst.is_dir:
                raise FsError(errno.ENOTDIR)
            if not src.is_dir and dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst.is_dir and dst.is_ancestor_of(parent1):
                raise FsError(errno.ENOTEMPTY)
        # Over a directory only the upper holds, the kernel leaves the emptiness check to the
        # upper filesystem's rename, after the copy-ups; with a whiteout left in one call
        # (RENAME_WHITEOUT). We do the same, so that a failed rename leaves what the kernel's
        # leaves (findings F7). Elsewhere the merged directory must be empty first.
        whiteout = lower_positive(self.lowers, parent1.lower, n1)
        direct = dst is not None and dst.is_dir and dst.upper and not dst.lower and upper.native
        if dst is not None and dst.is_dir and not direct and self._names(dst):
            raise FsError(errno.ENOTEMPTY)
        self.ensure_upper(src)
        if dst is not None and not dst.is_dir:
            self._copy_up_lower_link(dst)
        self.ensure_upper(parent1)
        self.ensure_upper(parent2)
        pp1, pp2 = parent1.path(), parent2.path()
        if direct:
            upper.rename(join(pp1, n1), join(pp2, n2), RENAME_WHITEOUT if whiteout else 0)
            whiteout = False
        elif dst is not None and dst.is_dir and dst.upper:
            upper.remove_empty_dir(join(pp2, n2))
        else:
            upper.clear_whiteout(pp2, n2)
        if not direct:
            upper.rename(join(pp1, n1), join(pp2, n2))
        if whiteout:
            upper.whiteout(pp1, n1)
        if dst is not None:
            self._remove_name(dst, parent2, n2)
        if src.is_dir:
            self._set_redirect(src, parent2, n2)
            src.parent, src.name = parent2, n2
        else:
            self._rename_alias(src, parent1, n1, parent2, n2)

    def _rename_alias(self, node: Node, p1: Node, n1: bytes, p2: Node, n2: bytes) -> None:
        if node.parent is p1 and node.name == n1:
            node.parent, node.name = p2, n2
        else:
            node.aliases = tuple((p, n) for p, n in node.aliases if not (p is p1 and n == n1))
            self._add_alias(node, p2, n2)

    def _exchange(self, p1: Node, n1: bytes, a: Node, p2: Node, n2: bytes, b: Node) -> None:
        assert self.upper is not None
        if a is b:
            return
        if (a.is_dir and a.is_ancestor_of(p2)) or (b.is_dir and b.is_ancestor_of(p1)):
            raise FsError(errno.EINVAL)
        self.ensure_upper(a)
        self.ensure_upper(b)
        self.ensure_upper(p1)
        self.ensure_upper(p2)
        self.upper.rename(join(p1.path(), n1), join(p2.path(), n2), RENAME_EXCHANGE)
        if a.is_dir:
            self._set_redirect(a, p2, n2)
        if b.is_dir:
            self._set_redirect(b, p1, n1)
        for node, (op, on), (np_, nn) in ((a, (p1, n1), (p2, n2)), (b, (p2, n2), (p1, n1))):
            if node.is_dir:
                node.parent, node.name = np_, nn
            else:
                self._rename_alias(node, op, on, np_, nn)

    # -- files -------------------------------------------------------------------------
    @_oserr
    def open(self, ino: Ino, flags: int) -> tuple[Fh, bool]:
        """Open a file; returns the handle and whether the kernel may keep its page cache."""
        node = self.node(ino)
        if node.is_dir:
            raise FsError(errno.EISDIR)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        hflags = (flags & ~(os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOCTTY)) | os.O_CLOEXEC
        if node.unlinked:
            # Opened by a name that is gone since the lookup: reopen the object through
            # an open handle if there is one; no name leads to it any more.
            fd0 = self.handles.any_fd(node)
            if fd0 is None:
                raise FsError(errno.ENOENT)
            if writing and not self.handles.any_upper(node):
                raise FsError(errno.ENOENT)
            fd = os.open(b"/proc/self/fd/%d" % fd0, hflags & ~os.O_TRUNC)
            node.opens += 1
            h = FileHandle(fd, node, self.handles.any_upper(node), flags)
            return self.handles.add_file(h), False
        if writing:
            self._writable()
            self.ensure_upper(node, with_data=not flags & os.O_TRUNC)
        if node.upper:
            dfd, name = self._upper_loc(node)
            fd = os.open(name, hflags | os.O_NOFOLLOW, dir_fd=dfd)
            on_upper = True
        else:
            layer, path = self._lower_layer(node)
            fd = layer.open(path, hflags & ~os.O_TRUNC)
            on_upper = False
        node.opens += 1
        # Lower layers never change, and the upper changes only through this mount, whose
        # writes and truncations go through the kernel's page cache of this very inode
        # (a copy-up keeps the inode number and the data): the cache stays valid.
        return self.handles.add_file(FileHandle(fd, node, on_upper, flags)), True

    def ready_fd(self, fh: Fh) -> int | None:
        """The fd to read `fh` from when `read_fd` would change nothing, else None. Safe
        without the caller's lock: it only looks (a copy-up in a worker thread may set
        `node.upper` meanwhile; the lower fd still reads the same data then)."""
        h = self.handles.file(fh)
        if h.upper or not h.node.upper or h.node.unlinked:
            return h.fd
        return None

    def read_fd(self, fh: Fh) -> int:
        """The fd to read `fh` from; a handle opened before a copy-up follows the copy."""
        h = self.handles.file(fh)
        if not h.upper and h.node.upper and not h.node.unlinked:
            dfd, name = self._upper_loc(h.node)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except OSError as exc:
                raise FsError.from_os(exc) from exc
            h.stale.append(h.fd)
            h.fd = fd
            h.upper = True
        return h.fd

    def passthrough_fd(self, fh: Fh) -> int | None:
        """The host fd the kernel may read and write `fh` through directly, for as long as it
        is open: an upper file (it stays this inode's data), or any file when nothing can be
        copied up (no upper). None for a lower file a copy-up may replace."""
        h = self.handles.file(fh)
        if h.upper or self.upper is None:
            return h.fd
        return None

    def write_fd(self, fh: Fh) -> int:
        h = self.handles.file(fh)
        if not h.upper:
            raise FsError(errno.EBADF)
        return h.fd

    @_oserr
    def release(self, fh: Fh) -> None:
        h = self.handles.pop_file(fh)
        for fd in (h.fd, *h.stale):
            os.close(fd)
        h.node.opens -= 1
        self.inodes.drop_if_unused(h.node)

    @_oserr
    def fallocate(self, fh: Fh, mode: int, offset: int, length: int) -> None:
        """fallocate(2) on an open file (the kernel sends it only for files open for
        writing, which are upper files)."""
        h = self.handles.file(fh)
        if not h.upper:
            raise FsError(errno.EBADF)
        fallocate(h.fd, mode, offset, length)

    @_oserr
    def fsync(self, fh: Fh, datasync: bool) -> None:
        h = self.handles.file(fh)
        if h.upper:
            (os.fdatasync if datasync else os.fsync)(h.fd)

    # -- directories -------------------------------------------------------------------
    def _names(self, node: Node) -> list[bytes]:
        return merged_names(
            self.upper,
            self.lowers,
            node.path() if node.upper else None,
            node.lower,
            self.lower_index,
        )

    @_oserr
    def opendir(self, ino: Ino) -> Fh:
        # The listing is read at the first readdir (as kernel overlayfs does): the kernel
        # serves most listings from its cache and never asks for this one.
        return self.handles.add_dir(DirHandle(self.dir_node(ino), None))

    @_oserr
    def listing(self, fh: Fh) -> list[bytes]:
        """The names `readdir_iter` goes through, in its order (read now if not yet); the
        caller may reorder the list in place before reading."""
        return self._read_listing(self.handles.dir(fh))

    def _read_listing(self, h: DirHandle) -> list[bytes]:
        if h.names is None:
            if h.node.unlinked:
                h.names = []
            else:
                if self.prefetch is not None and h.node.lower:
                    self.prefetch.listed(h.node.lower)  # its subdirectories may come next
                h.names = self._names(h.node)
        return h.names

    @_oserr
    def readdir(self, fh: Fh, start: int) -> list[tuple[bytes, Attributes, int]]:
        """Up to 64 entries from offset `start` (see `readdir_iter`)."""
        return list(itertools.islice(self.readdir_iter(fh, start), 64))

    def readdir_iter(self, fh: Fh, start: int) -> Iterator[tuple[bytes, Attributes, int]]:
        """Entries from offset `start` with attributes and the offset after each, made one
        at a time (a caller stops when the kernel's buffer is full: nothing is resolved in
        vain). The caller calls `incref` for each entry the kernel accepted and
        `drop_if_unused` for the others."""
        try:
            h = self.handles.dir(fh)
            if h.node.unlinked:
                return
            names = self._read_listing(h)
            for i in range(start, len(names)):
                if h.node.unlinked:
                    return
                name = names[i]
                res = self._resolve(h.node, name)
                if res is None:
                    continue
                node = self._node_for(h.node, name, res)
                yield name, self.attributes(node), i + 1
        except FsError:
            raise
        except OSError as exc:
            raise FsError.from_os(exc) from exc

    def releasedir(self, fh: Fh) -> None:
        self.handles.pop_dir(fh)

    # -- xattrs ------------------------------------------------------------------------
    @_oserr
    def getxattr(self, ino: Ino, name: bytes) -> bytes:
        if name.startswith(self.private):
            raise FsError(errno.ENODATA)  # hidden, as the kernel hides its own xattrs
        node = self.node(ino)
        if node.no_caps and name == CAPS_XATTR:
            raise FsError(errno.ENODATA)
        if node.upper:
            path = self._loc_path(node)
            if self.rootless and self._keeps_stored(name):
                with contextlib.suppress(OSError):
                    stored = override.stored_xattr(name)
                    return os.getxattr(path, stored, follow_symlinks=False)
            return os.getxattr(path, name, follow_symlinks=False)
        layer, path = self._lower_layer(node)
        if self.metadata_xattrs and self._keeps_stored(name):
            with contextlib.suppress(FsError):
                return layer.getxattr(path, override.stored_xattr(name))
        return layer.getxattr(path, name)

    def _keeps_stored(self, name: bytes) -> bool:
        """May a rootless upper keep `name` as user.layerfs.xattr.<name>?"""
        return name.startswith((b"trusted.", b"security."))

    @_oserr
    def listxattr(self, ino: Ino) -> list[bytes]:
        node = self.node(ino)
        if node.upper:
            names = [
                os.fsencode(n) for n in os.listxattr(self._loc_path(node), follow_symlinks=False)
            ]
        else:
            layer, path = self._lower_layer(node)
            names = layer.listxattr(path)
        if self.metadata_xattrs:
            names = list(dict.fromkeys(override.shown_xattr(n) or n for n in names))
        return [n for n in names if not n.startswith(self.private)]

    def _xattr_target(self, ino: Ino, name: bytes) -> bytes:
        if name.startswith(self.private):
            raise FsError(errno.EOPNOTSUPP)
        node = self.node(ino)
        self.ensure_upper(node)
        return self._loc_path(node)

    @_oserr
    def setxattr(self, ino: Ino, name: bytes, value: bytes, flags: int = 0) -> None:
        """`flags`: XATTR_CREATE or XATTR_REPLACE, applied to the upper copy (a lower object
        is copied up first, as the kernel does)."""
        if name == CAPS_XATTR:
            self.node(ino).no_caps = False
        target = self._xattr_target(ino, name)
        if self.rootless and self._keeps_stored(name):
            # trusted.* always, security.* when refused: kept under a user.* name.
            if not override.privileged_xattr(name):
                try:
                    os.setxattr(target, name, value, flags, follow_symlinks=False)
                    return
                except PermissionError:
                    pass
            stored = override.stored_xattr(name)
            os.setxattr(target, stored, value, flags, follow_symlinks=False)
            return
        os.setxattr(target, name, value, flags, follow_symlinks=False)

    @_oserr
    def removexattr(self, ino: Ino, name: bytes) -> None:
        node = self.node(ino)
        if not node.upper and not name.startswith(self.private):
            layer, path = self._lower_layer(node)
            if name not in layer.listxattr(path):
                raise FsError(errno.ENODATA)
        target = self._xattr_target(ino, name)
        if self.rootless and self._keeps_stored(name):
            try:
                os.removexattr(target, override.stored_xattr(name), follow_symlinks=False)
                return
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
        os.removexattr(target, name, follow_symlinks=False)

    # -- misc --------------------------------------------------------------------------
    @_oserr
    def statfs(self) -> os.statvfs_result:
        layer: Layer = self.upper if self.upper is not None else self.lowers[0]
        return layer.statvfs()

    @_oserr
    def access(self, ino: Ino, mode: int) -> None:
        node = self.node(ino)
        self._stat(node)
        if mode & os.W_OK and self.upper is None:
            raise FsError(errno.EROFS)

    def start_prefetch(self) -> bool:
        """Start reading lower directories ahead of walks (see prefetch.py): forks, so the
        daemon calls it before mounting. Only host directories that never change qualify."""
        roots = {
            li: layer.root_fd
            for li, layer in enumerate(self.lowers)
            if getattr(layer, "immutable", False) and hasattr(layer, "root_fd")
        }
        pf = Prefetch(roots)
        if not pf.start():
            return False
        self.prefetch = pf
        return True

    def stop_prefetch(self) -> None:
        if self.prefetch is not None:
            self.prefetch.close()
            self.prefetch = None

    def close(self) -> None:
        self.stop_prefetch()
        self.handles.close_all()
        if self.upper is not None:
            self.upper.drop_shared_whiteout()
