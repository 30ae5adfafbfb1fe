"""Store-backed layers: an image's layers read from the layer store's SQLite index."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from layerstore.model import Entry as StoreEntry
from layerstore.model import EntryKind
from layerstore.store import Store
from unionfs.core.errors import FsError
from unionfs.core.layers import split
from unionfs.core.types import Entry, Kind, Stat

log = logging.getLogger("layerfs")

T = TypeVar("T")

# Runs a function on the thread that owns the SQLite connection and returns its result.
Dispatch = Callable[[Callable[[], Any]], Any]

# Bounds of the caches (the kernel caches entries and listings of immutable layers for long,
# so these mostly serve one pass over each directory; a 100,000-file image must stay small:
# larger bounds cost memory and bought no speed, see scripts/BENCH-NOTES.md).
LOOKUP_CACHE = 2048  # names looked up one by one: index rows
CONVERTED_CACHE = 4096  # names: engine entries, per layer
LISTING_CACHE = 256  # (layer, directory) listings
LISTED_NAMES = 4096  # rows of recently listed directories, all layers, in names
_INO_BITS = 47  # below inodes.derive_ino's 48-bit limit
_INO_MASK = (1 << _INO_BITS) - 1
_NONE: dict[int, StoreEntry] = {}  # "in no layer" (shared: never changed)

_KIND = {
    EntryKind.FILE: (Kind.FILE, stat.S_IFREG),
    EntryKind.HARDLINK: (Kind.FILE, stat.S_IFREG),
    EntryKind.DIR: (Kind.DIR, stat.S_IFDIR),
    EntryKind.SYMLINK: (Kind.SYMLINK, stat.S_IFLNK),
    EntryKind.CHAR: (Kind.CHAR, stat.S_IFCHR),
    EntryKind.BLOCK: (Kind.BLOCK, stat.S_IFBLK),
    EntryKind.FIFO: (Kind.FIFO, stat.S_IFIFO),
    EntryKind.SOCKET: (Kind.SOCKET, stat.S_IFSOCK),
}


def store_parent(dir_path: bytes) -> bytes:
    """A layer-relative directory path (b"" root, b"a/b") as the index's absolute parent."""
    return b"/" + dir_path


def store_path(path: bytes) -> bytes:
    return b"/" + path


def _direct(fn: Callable[[], Any]) -> Any:
    return fn()


class StoreView:
    """The index of one image's layers (`layer_ids`, TOP first) for one mount.

    One SQLite connection, opened lazily on first use (so a daemon opens it after it forks)
    and used only on the main thread (where the FUSE event loop runs): a call from any other
    thread (the adapter runs copy-ups in worker threads) is handed to `dispatch`, which must
    run it on the main thread. Layers are immutable, so entries are cached; a lookup asks
    every layer at once (`Store.lookup_many`): its cost does not grow with their number.
    """

    def __init__(
        self,
        store_root: Path,
        layer_ids: Sequence[int],
        roots: Sequence[StoreEntry | None] | None = None,
        *,
        dispatch: Dispatch | None = None,
    ) -> None:
        self.store_root = Path(store_root)
        self.layer_ids = list(layer_ids)
        self.dispatch = dispatch or _direct
        self._store: Store | None = None
        self._lookups: OrderedDict[tuple[bytes, bytes], dict[int, StoreEntry]] = OrderedDict()
        self._converted: OrderedDict[tuple[bytes, bytes], dict[int, Entry | None]] = OrderedDict()
        self._listings: OrderedDict[tuple[int, bytes], dict[bytes, bool]] = OrderedDict()
        # parent -> name -> {layer index: entry}: every row of recently listed directories
        # (complete: a name missing there is in no layer), so that readdir's lookups of
        # the listed names cost no query and need no per-name cache.
        self._listed: OrderedDict[bytes, dict[bytes, dict[int, StoreEntry]]] = OrderedDict()
        self._listed_names = 0
        # (layer index << 48 | host inode number) -> identity (see `ino`); never shrinks
        self._paths: dict[int, bytes] = {}
        self._roots: list[StoreEntry | None] = list(roots) if roots is not None else []
        self.layers = [StoreLayer(self, i) for i in range(len(self.layer_ids))]

    @classmethod
    def prepare(cls, store: Store, layer_ids: Sequence[int], **kw: Any) -> StoreView:
        """A view whose layer roots are read now through `store` (e.g. before a fork); the
        view opens its own connection when it first needs one."""
        roots = [store.layer_lookup(lid, b"", b"") for lid in layer_ids]
        return cls(store.root, layer_ids, roots, **kw)

    def content_path(self, key: str) -> str:
        # The store's layout (Store.content_str) without needing its connection here.
        return f"{self.store_root}/content/{key[:2]}/{key}"

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- the connection ------------------------------------------------------------------
    def run(self, fn: Callable[[], T]) -> T:
        """Run `fn` (which may use the connection) on the connection's thread."""
        if threading.current_thread() is threading.main_thread():
            return fn()
        result: T = self.dispatch(fn)
        return result

    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.store_root, readonly=True)
        return self._store

    # -- entries ---------------------------------------------------------------------------
    def entries(self, parent: bytes, name: bytes) -> dict[int, StoreEntry]:
        """{layer index: entry} of every layer having `name` in `parent` (absolute)."""
        key = (parent, name)
        found = self._lookups.get(key)
        if found is not None:
            self._lookups.move_to_end(key)
            return found
        listed = self._listed.get(parent)
        if listed is not None:
            return listed.get(name, _NONE)
        rows = self.run(lambda: self.store().lookup_many(self.layer_ids, parent, name))
        # By position: an image may list one layer (e.g. an empty one) more than once.
        found = {i: rows[lid] for i, lid in enumerate(self.layer_ids) if lid in rows}
        self._remember(key, found)
        return found

    def _remember(self, key: tuple[bytes, bytes], found: dict[int, StoreEntry]) -> None:
        self._lookups[key] = found
        if len(self._lookups) > LOOKUP_CACHE:
            self._lookups.popitem(last=False)
        self._converted.pop(key, None)

    def entry(self, li: int, parent: bytes, name: bytes) -> Entry | None:
        """Layer `li`'s entry for `name` in `parent` as the engine's Entry (cached)."""
        key = (parent, name)
        conv = self._converted.get(key)
        if conv is None:
            conv = {}
            self._converted[key] = conv
            if len(self._converted) > CONVERTED_CACHE:
                self._converted.popitem(last=False)
        elif li in conv:
            return conv[li]
        e = self.entries(parent, name).get(li)
        out = None if e is None else self.convert(li, e)
        conv[li] = out
        return out

    def listing(self, li: int, parent: bytes) -> dict[bytes, bool]:
        key = (li, parent)
        out = self._listings.get(key)
        if out is not None:
            self._listings.move_to_end(key)
            return out
        # One query for every layer: the merge asks the other layers next, and each
        # listed name's lookup (readdir answers attributes) is then served from its rows.
        rows = self.run(lambda: self.store().listdir_many(self.layer_ids, parent))
        per_name: dict[bytes, dict[int, StoreEntry]] = {}
        for lj, lid in enumerate(self.layer_ids):
            names: dict[bytes, bool] = {}
            for e in rows.get(lid, []):
                names[e.name] = e.kind is EntryKind.WHITEOUT
                per_name.setdefault(e.name, {})[lj] = e
            self._listings[(lj, parent)] = names
        while len(self._listings) > LISTING_CACHE:
            self._listings.popitem(last=False)
        old = self._listed.pop(parent, None)
        self._listed_names -= len(old) if old is not None else 0
        self._listed[parent] = per_name
        self._listed_names += len(per_name)
        while self._listed_names > LISTED_NAMES and len(self._listed) > 1:
            _, gone = self._listed.popitem(last=False)
            self._listed_names -= len(gone)
        return self._listings.get(key, {})

    def root_entry(self, li: int) -> StoreEntry | None:
        if not self._roots:
            self._roots = self.run(
                lambda: [self.store().layer_lookup(lid, b"", b"") for lid in self.layer_ids]
            )
        return self._roots[li]

    def raw(self, li: int, path: bytes) -> StoreEntry | None:
        """The index entry of layer-relative `path` in layer `li`."""
        if not path:
            return self.root_entry(li)
        parent, name = split(path)
        return self.entries(store_parent(parent), name).get(li)

    def hardlinks(self, li: int, ino: int) -> list[bytes]:
        first = self._paths.get(li << 48 | ino)
        if first is None:
            return []
        lid = self.layer_ids[li]
        paths = self.run(lambda: self.store().layer_hardlinks(lid, first))
        return [p[1:] for p in paths]

    # -- conversion ------------------------------------------------------------------------
    def ino(self, li: int, identity: bytes) -> int:
        """A host inode number for the object named `identity` (its first absolute path) in
        layer `li`: derived from the path, so stable across mounts; unique in the mount.

        On a hash collision the next free number is taken; numbers are never given back, so
        walking from the hash finds an identity's number again without a second table."""
        digest = hashlib.blake2b(identity, digest_size=8).digest()
        ino = (int.from_bytes(digest, "little") & _INO_MASK) or 1
        while True:
            have = self._paths.setdefault(li << 48 | ino, identity)
            if have == identity:
                return ino
            ino = (ino + 1) & _INO_MASK or 1

    def meta_source(self, li: int, parent: bytes, e: StoreEntry) -> StoreEntry:
        """Where an implicit directory (its tar never listed it) takes its attributes from:
        the same path in the next lower layer having it, when that is a directory (umoci
        keeps the lower directory's metadata); else the 0755 root:root default."""
        if not e.implicit:
            return e
        if not e.name and not parent:
            lower = [(lj, self.root_entry(lj)) for lj in range(li + 1, len(self.layer_ids))]
        else:
            found = self.entries(parent, e.name)
            lower = [(lj, found.get(lj)) for lj in range(li + 1, len(self.layer_ids))]
        for lj, le in lower:
            if le is None:
                continue
            if le.kind is not EntryKind.DIR:
                return e
            return self.meta_source(lj, parent, le)
        return e

    def convert(self, li: int, e: StoreEntry) -> Entry:
        if e.kind is EntryKind.WHITEOUT:
            return Entry(e.name, Kind.WHITEOUT, None)
        kind, fmt = _KIND[e.kind]
        path = e.path
        identity = e.link if e.kind is EntryKind.HARDLINK and e.link is not None else path
        meta = self.meta_source(li, e.parent, e) if kind is Kind.DIR else e
        size = 4096 if kind is Kind.DIR else e.size
        st = Stat(
            mode=fmt | meta.mode,
            nlink=1 if kind is Kind.DIR else e.nlink,
            uid=meta.uid,
            gid=meta.gid,
            rdev=os.makedev(*e.rdev) if e.rdev is not None else 0,
            size=size,
            blocks=(size + 511) // 512,
            atime_ns=meta.mtime_ns,
            mtime_ns=meta.mtime_ns,
            ctime_ns=meta.mtime_ns,
            host_ino=self.ino(li, identity),
        )
        return Entry(e.name, kind, st, opaque=kind is Kind.DIR and e.opaque)

    def xattrs(self, li: int, path: bytes) -> tuple[tuple[bytes, bytes], ...]:
        e = self.raw(li, path)
        if e is None:
            raise FsError(errno.ENOENT)
        if e.kind is EntryKind.DIR:
            parent = split(path)[0]
            e = self.meta_source(li, store_parent(parent) if path else b"", e)
        return e.xattrs


class StoreLayer:
    """One layer of a StoreView, as the union engine's Layer protocol."""

    def __init__(self, view: StoreView, index: int) -> None:
        self.view = view
        self.index = index
        self.immutable = True

    @property
    def layer_id(self) -> int:
        return self.view.layer_ids[self.index]

    def lookup(self, dir_path: bytes, name: bytes) -> Entry | None:
        return self.view.entry(self.index, store_parent(dir_path), name)

    def root(self) -> Entry | None:
        e = self.view.root_entry(self.index)
        return None if e is None else self.view.convert(self.index, e)

    def names(self, dir_path: bytes) -> dict[bytes, bool]:
        return self.view.listing(self.index, store_parent(dir_path))

    def _raw(self, path: bytes) -> StoreEntry:
        e = self.view.raw(self.index, path)
        if e is None or e.kind is EntryKind.WHITEOUT:
            raise FsError(errno.ENOENT)
        return e

    def open(self, path: bytes, flags: int) -> int:
        e = self._raw(path)
        if e.kind is EntryKind.DIR:
            raise FsError(errno.EISDIR)
        if e.kind not in (EntryKind.FILE, EntryKind.HARDLINK):
            raise FsError(errno.ENXIO)
        host = self.view.content_path(e.content) if e.content else os.devnull
        try:
            return os.open(host, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            # The index names it, so the store lost it: an I/O error, not "no such file".
            log.error(
                "content %s of /%s is missing from the store %s: run `layerfs fsck`",
                e.content,
                os.fsdecode(path).lstrip("/"),
                self.view.store_root,
            )
            raise FsError(errno.EIO) from None
        except OSError as exc:
            raise FsError.from_os(exc) from exc

    def readlink(self, path: bytes) -> bytes:
        e = self._raw(path)
        if e.kind is not EntryKind.SYMLINK or e.link is None:
            raise FsError(errno.EINVAL)
        return e.link

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.view.store_root)

    def hardlinks(self, host_ino: int) -> list[bytes]:
        return self.view.hardlinks(self.index, host_ino)

    def listxattr(self, path: bytes) -> list[bytes]:
        return [k for k, _ in self.view.xattrs(self.index, path)]

    def getxattr(self, path: bytes, name: bytes) -> bytes:
        for k, v in self.view.xattrs(self.index, path):
            if k == name:
                return v
        raise FsError(errno.ENODATA)
