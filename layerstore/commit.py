"""Turn an overlay upper directory into an OCI layer (and a new image in the store), or into
`docker diff`-style change lines, against the merged tree of the image below it.

The upper is read in both spellings: overlayfs native (char 0/0 whiteouts, `*.overlay.opaque`
= y, `*.overlay.redirect` on renamed lower directories) and the `.wh.` one. The layer must make
any OCI tool produce the mount's tree when applied over the image:
- a whiteout is written only where the image has the name; nothing below a deleted directory;
- an opaque upper directory over an image directory gets `.wh..wh..opq` and its full content;
- a redirected (renamed) lower directory is written in full under its new name (the lower
  content it shows plus the upper's changes); the kernel left a whiteout at the old name.
The tar is deterministic: depth-first, names sorted bytewise, PAX format (long and non-UTF-8
names, SCHILY.xattr.*), numeric ids only, whole-second mtimes, hard links within the upper
(and within one lower layer) kept as tar hard links.
A rootless upper's metadata xattrs (layerstore.override) are applied: owner, mode, type and
device numbers from the override_stat, `user.layerfs.xattr.X` written as X; overlay-private
xattrs never enter the layer.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import stat
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from . import override
from .blobwriter import TO_OCI, BlobWriter
from .errors import StoreError
from .model import Entry, EntryKind
from .reference import local_name
from .sources import OCI_MANIFEST, LayerRef, SourceImage, sha256_digest
from .store import Store

WH = b".wh."
OPQ = b".wh..wh..opq"
OVERLAY_XATTRS = (b"trusted.overlay.", b"user.overlay.")
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def join(parent: bytes, name: bytes) -> bytes:
    return b"/" + name if parent == b"/" else parent + b"/" + name


# ---- the image's merged tree (what the new layer is applied onto) ----------------------------


@dataclass(frozen=True)
class LowerDir:
    """A merged directory of the image: its path and contributing layers, top first."""

    path: bytes
    layers: tuple[int, ...]


@dataclass(frozen=True)
class LowerNode:
    """A merged name of the image: the entry that decides it (for a directory, the topmost
    real one: implicit directories take a lower layer's attributes), its layer, and for a
    directory its merged view."""

    path: bytes
    entry: Entry
    layer: int
    dir: LowerDir | None


class LowerView:
    """Merged, read-only view of an image's layers through the store's index."""

    def __init__(self, store: Store, top_first: list[int]) -> None:
        self.store = store
        self.root = LowerDir(b"/", tuple(top_first))
        self._cache: dict[bytes, LowerNode | None] = {}

    def _merge(self, d: LowerDir, name: bytes, found: dict[int, Entry]) -> LowerNode | None:
        path = join(d.path, name)
        dirs: list[int] = []
        top: Entry | None = None
        meta: Entry | None = None
        for lid in d.layers:
            e = found.get(lid)
            if e is None:
                continue
            if top is None:
                if e.kind == EntryKind.WHITEOUT:
                    return None
                if e.kind != EntryKind.DIR:
                    return LowerNode(path, e, lid, None)
                top = e
            elif e.kind != EntryKind.DIR:
                break  # a whiteout or a non-directory ends the directory stack
            dirs.append(lid)
            if meta is None and not e.implicit:
                meta = e
            if e.opaque:
                break
        if top is None:
            return None
        return LowerNode(path, meta or top, dirs[0], LowerDir(path, tuple(dirs)))

    def child(self, d: LowerDir, name: bytes) -> LowerNode | None:
        path = join(d.path, name)
        if path not in self._cache:
            self._cache[path] = self._merge(d, name, self.store.lookup_many(d.layers, d.path, name))
        return self._cache[path]

    def children(self, d: LowerDir) -> dict[bytes, LowerNode]:
        per = self.store.listdir_many(d.layers, d.path)
        by_name: dict[bytes, dict[int, Entry]] = {}
        for lid, entries in per.items():
            for e in entries:
                by_name.setdefault(e.name, {})[lid] = e
        out: dict[bytes, LowerNode] = {}
        for name in sorted(by_name):
            node = self._merge(d, name, by_name[name])
            if node is not None:
                out[name] = node
        return out

    def lookup(self, path: bytes) -> LowerNode | None:
        """The merged node at an absolute path (None if absent; never follows symlinks)."""
        comps = [c for c in path.split(b"/") if c]
        d = self.root
        node: LowerNode | None = None
        for i, comp in enumerate(comps):
            node = self.child(d, comp)
            if node is None:
                return None
            if i < len(comps) - 1:
                if node.dir is None:
                    return None
                d = node.dir
        return node

    def lookup_dir(self, path: bytes) -> LowerDir | None:
        if path.strip(b"/") == b"":
            return self.root
        node = self.lookup(path)
        return None if node is None else node.dir


# ---- the upper directory ---------------------------------------------------------------------


def _xattr(path: bytes, names: tuple[bytes, ...]) -> bytes | None:
    for n in names:
        try:
            return os.getxattr(path, n, follow_symlinks=False)
        except OSError:
            continue
    return None


@dataclass
class UpperDir:
    names: dict[bytes, os.stat_result] = field(default_factory=dict)
    whiteouts: set[bytes] = field(default_factory=set)
    opaque: bool = False


def scan_upper(path: bytes) -> UpperDir:
    """One upper directory: its real entries, whiteouts (both spellings), opaque marker file."""
    out = UpperDir()
    with os.scandir(path) as it:
        for de in it:
            name = de.name
            st = de.stat(follow_symlinks=False)
            if name == OPQ:
                out.opaque = True
            elif name.startswith(WH + WH):
                continue  # other AUFS internals
            elif name.startswith(WH) and stat.S_ISREG(st.st_mode):
                out.whiteouts.add(name[len(WH) :])
            elif stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                out.whiteouts.add(name)
            else:
                out.names[name] = st
    for n in out.names:
        out.whiteouts.discard(n)  # an entry always wins over a stale whiteout
    return out


def _is_opaque(path: bytes) -> bool:
    if _xattr(path, (b"trusted.overlay.opaque", b"user.overlay.opaque")) == b"y":
        return True
    return os.path.lexists(path + b"/" + OPQ)


def _redirect(path: bytes) -> bytes | None:
    return _xattr(path, (b"trusted.overlay.redirect", b"user.overlay.redirect")) or None


# ---- the walk --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One thing the layer says about a path (absolute): `op` is "upper" (an entry copied from
    the upper: `src`, `st`), "lower" (an entry copied from the image: `lower`), "whiteout"
    (the name is deleted) or "opaque" (the directory hides the image's children)."""

    path: bytes
    op: str
    src: bytes | None = None
    st: os.stat_result | None = None
    lower: LowerNode | None = None


class Walker:
    """Compares an upper directory with the image below it; `walk()` gives the layer's items
    depth-first, a directory before its children, names sorted."""

    def __init__(self, view: LowerView, upper: bytes) -> None:
        self.view = view
        self.upper = upper.rstrip(b"/") or b"/"
        self.items: list[Item] = []

    def walk(self) -> list[Item]:
        self.items = []
        st = os.lstat(self.upper)
        if self._root_changed(st):
            self.items.append(Item(b"/", "upper", self.upper, st))
        self._diff(b"/", self.upper, self.view.root)
        return self.items

    def _root_changed(self, st: os.stat_result) -> bool:
        """True if the mount's root (the upper root's attributes, as overlayfs shows them)
        differs from the image's root in mode, owner or xattrs."""
        root = None
        for lid in self.view.root.layers:
            e = self.view.store.layer_lookup(lid, b"", b"")
            if e is not None and not e.implicit:
                root = e
                break
        xattrs: tuple[tuple[bytes, bytes], ...] = ()
        mode, uid, gid = 0o755, 0, 0
        if root is not None:
            mode, uid, gid, xattrs = root.mode, root.uid, root.gid, root.xattrs
        meta = upper_meta(self.upper, st)
        ours = (meta.mode, meta.uid, meta.gid, tuple(sorted(_upper_xattrs(self.upper))))
        return ours != (mode, uid, gid, tuple(sorted(xattrs)))

    def _redirected(self, parent: LowerDir | None, redirect: bytes) -> LowerDir | None:
        if redirect.startswith(b"/"):
            return self.view.lookup_dir(redirect)
        if parent is None:
            return None
        node = self.view.child(parent, redirect)
        return None if node is None else node.dir

    def _origin(
        self, src: bytes, parent: LowerDir | None, same_name: LowerNode | None
    ) -> LowerDir | None:
        """The image directory an upper directory shows through (overlay semantics)."""
        if _is_opaque(src):
            return None
        redirect = _redirect(src)
        if redirect is not None:
            return self._redirected(parent, redirect)
        return same_name.dir if same_name is not None else None

    def _diff(self, path: bytes, src: bytes, here: LowerDir) -> None:
        """An upper directory merged with the image's directory at the same path."""
        ud = scan_upper(src)
        for name in sorted(ud.names.keys() | ud.whiteouts):
            child = join(path, name)
            base = self.view.child(here, name)
            if name not in ud.names:
                if base is not None:
                    self.items.append(Item(child, "whiteout"))
                continue
            st = ud.names[name]
            csrc = src + b"/" + name
            self.items.append(Item(child, "upper", csrc, st))
            if not stat.S_ISDIR(st.st_mode):
                continue
            origin = self._origin(csrc, here, base)
            if base is not None and base.dir is not None and origin == base.dir:
                self._diff(child, csrc, base.dir)
                continue
            if base is not None and base.dir is not None:
                self.items.append(Item(child, "opaque"))
            self._full(child, csrc, origin)

    def _full(self, path: bytes, src: bytes | None, origin: LowerDir | None) -> None:
        """A directory written in full: the upper's entries plus what `origin` shows."""
        ud = scan_upper(src) if src is not None else UpperDir()
        if ud.opaque:
            origin = None
        lower = self.view.children(origin) if origin is not None else {}
        for name in sorted(ud.names.keys() | (lower.keys() - ud.whiteouts)):
            child = join(path, name)
            st = ud.names.get(name)
            if st is not None and src is not None:
                csrc = src + b"/" + name
                self.items.append(Item(child, "upper", csrc, st))
                if stat.S_ISDIR(st.st_mode):
                    self._full(child, csrc, self._origin(csrc, origin, lower.get(name)))
            else:
                node = lower[name]
                self.items.append(Item(child, "lower", lower=node))
                if node.dir is not None:
                    self._full(child, None, node.dir)


def changes(view: LowerView, upper: bytes) -> list[Item]:
    return Walker(view, os.fsencode(upper)).walk()


def diff_lines(view: LowerView, items: list[Item]) -> list[tuple[str, bytes]]:
    """`docker diff` lines (kind, path): A added, C changed (parents of changes too), D deleted."""
    out: dict[bytes, str] = {}
    emitted = {it.path for it in items if it.op in ("upper", "lower")}
    for it in items:
        if it.path == b"/":
            continue  # the root's own attributes: docker diff never lists it
        if it.op == "whiteout":
            out[it.path] = "D"
        elif it.op == "opaque":
            d = view.lookup_dir(it.path)
            if d is not None:
                for name in view.children(d):
                    p = join(it.path, name)
                    if p not in emitted:
                        out[p] = "D"
        else:
            out[it.path] = "C" if view.lookup(it.path) is not None else "A"
    return [(out[p], p) for p in sorted(out)]


# ---- writing the tar -------------------------------------------------------------------------


def _name(path: bytes) -> str:
    return os.fsdecode(path.lstrip(b"/")) if path != b"/" else "."


def _pax_xattrs(xattrs: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {
        "SCHILY.xattr." + k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
        for k, v in sorted(xattrs)
    }


def _upper_xattrs(path: bytes) -> list[tuple[bytes, bytes]]:
    """The xattrs the layer carries for an upper object (override.real_xattrs)."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return []
    out = []
    for n in names:
        try:
            out.append((os.fsencode(n), os.getxattr(path, n, follow_symlinks=False)))
        except OSError:
            continue
    return override.real_xattrs(out)


def upper_meta(
    path: bytes, st: os.stat_result, warn: Callable[[str], None] | None = None
) -> override.Meta:
    """Type, mode, owner and device number an upper object stands for: its own, or its
    override_stat's (a rootless upper). A malformed override is ignored, as the mount
    ignores it (the object shows its own attributes), with a warning."""
    try:
        ov = override.read(path)
    except override.OverrideError as exc:
        if warn is not None:
            warn(f"{os.fsdecode(path)}: {exc} ignored")
        ov = None
    return override.effective(st, ov)


_KIND_TYPE = {
    EntryKind.FILE: tarfile.REGTYPE,
    EntryKind.HARDLINK: tarfile.REGTYPE,
    EntryKind.DIR: tarfile.DIRTYPE,
    EntryKind.SYMLINK: tarfile.SYMTYPE,
    EntryKind.CHAR: tarfile.CHRTYPE,
    EntryKind.BLOCK: tarfile.BLKTYPE,
    EntryKind.FIFO: tarfile.FIFOTYPE,
}


class LayerTarWriter:
    """Writes Items as a deterministic PAX tar into a binary stream."""

    def __init__(self, store: Store, out: IO[bytes] | BlobWriter, warn: Callable[[str], None]):
        self.store = store
        self.warn = warn
        self.tar = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 - close()
            fileobj=out,  # a BlobWriter has write(): all stream mode needs
            mode="w|",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        )
        self.links: dict[tuple[object, ...], str] = {}

    def close(self) -> None:
        self.tar.close()

    def add(self, it: Item) -> None:
        if it.op == "whiteout":
            parent, _, name = it.path.rpartition(b"/")
            self._marker(parent + b"/" + WH + name)
        elif it.op == "opaque":
            self._marker(it.path + b"/" + OPQ)
        elif it.op == "upper":
            assert it.src is not None and it.st is not None
            self._upper(it.path, it.src, it.st)
        else:
            assert it.lower is not None
            self._lower(it.path, it.lower)

    def _marker(self, path: bytes) -> None:
        ti = tarfile.TarInfo(_name(path))
        ti.mode = 0o644
        ti.mtime = 0
        self.tar.addfile(ti)

    def _info(self, path: bytes, mode: int, uid: int, gid: int, mtime_ns: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(_name(path))
        ti.mode = mode
        ti.uid, ti.gid = uid, gid
        ti.uname = ti.gname = ""
        ti.mtime = mtime_ns // 1_000_000_000
        return ti

    def _hardlink(self, key: tuple[object, ...] | None, ti: tarfile.TarInfo) -> bool:
        """True (and `ti` written as a hard link) if the inode was already written."""
        if key is None:
            return False
        first = self.links.get(key)
        if first is None:
            self.links[key] = ti.name
            return False
        ti.type = tarfile.LNKTYPE
        ti.linkname = first
        ti.size = 0
        self.tar.addfile(ti)
        return True

    def _upper(self, path: bytes, src: bytes, st: os.stat_result) -> None:
        meta = upper_meta(src, st, self.warn)
        fmt = meta.fmt
        if fmt == stat.S_IFSOCK:
            self.warn(f"{os.fsdecode(path)}: socket not committed (tar cannot hold sockets)")
            return
        ti = self._info(path, meta.mode, meta.uid, meta.gid, st.st_mtime_ns)
        xattrs = _upper_xattrs(src)
        if xattrs:
            ti.pax_headers = _pax_xattrs(xattrs)
        # Hard links of symlinks, devices and fifos are kept too (tar can say so).
        multi = fmt != stat.S_IFDIR and st.st_nlink > 1
        if multi and self._hardlink(("u", st.st_dev, st.st_ino), ti):
            return
        if fmt == stat.S_IFREG:
            ti.type = tarfile.REGTYPE
            with open(src, "rb") as fh:
                ti.size = os.fstat(fh.fileno()).st_size
                self.tar.addfile(ti, fh)
            return
        if fmt == stat.S_IFDIR:
            ti.type = tarfile.DIRTYPE
        elif fmt == stat.S_IFLNK:
            ti.type = tarfile.SYMTYPE
            if stat.S_ISREG(st.st_mode):  # a rootless stand-in holds the target
                with open(src, "rb") as fh:
                    ti.linkname = os.fsdecode(fh.read())
            else:
                ti.linkname = os.fsdecode(os.readlink(src))
        elif fmt in (stat.S_IFCHR, stat.S_IFBLK):
            ti.type = tarfile.CHRTYPE if fmt == stat.S_IFCHR else tarfile.BLKTYPE
            ti.devmajor, ti.devminor = os.major(meta.rdev), os.minor(meta.rdev)
        elif fmt == stat.S_IFIFO:
            ti.type = tarfile.FIFOTYPE
        self.tar.addfile(ti)

    def _lower(self, path: bytes, node: LowerNode) -> None:
        """An image entry written at `path` (its own path, or below a renamed directory)."""
        e = node.entry
        if e.kind == EntryKind.SOCKET:
            self.warn(f"{os.fsdecode(path)}: socket not committed (tar cannot hold sockets)")
            return
        ti = self._info(path, e.mode, e.uid, e.gid, e.mtime_ns)
        ti.type = _KIND_TYPE[e.kind]
        if e.xattrs:
            ti.pax_headers = _pax_xattrs(list(e.xattrs))
        if e.kind in (EntryKind.FILE, EntryKind.HARDLINK):
            first = e.link if e.kind == EntryKind.HARDLINK and e.link else node.path
            key = ("l", node.layer, first) if e.nlink > 1 else None
            if self._hardlink(key, ti):
                return
            ti.size = e.size
            if e.content is None:
                self.tar.addfile(ti)
                return
            with open(self.store.content_str(e.content), "rb") as fh:
                self.tar.addfile(ti, fh)
            return
        if e.kind == EntryKind.SYMLINK:
            ti.linkname = os.fsdecode(e.link or b"")
        elif e.kind in (EntryKind.CHAR, EntryKind.BLOCK):
            ti.devmajor, ti.devminor = e.rdev or (0, 0)
        self.tar.addfile(ti)


def retar_layer(
    store: Store, layer: int, out: IO[bytes] | BlobWriter, warn: Callable[[str], None]
) -> None:
    """Write one stored layer as a tar from its entries (for a layer without a tar-split): the
    same tree when applied, not the same bytes. Implicit directories are left out, as the
    original tar had them; whiteouts and opaque markers are spelled the OCI way."""
    tw = LayerTarWriter(store, out, warn)
    for e in store.layer_entries(layer):
        if e.parent == b"" or e.implicit:
            continue
        path = e.path
        if e.kind == EntryKind.WHITEOUT:
            tw.add(Item(path, "whiteout"))
            continue
        tw.add(Item(path, "lower", lower=LowerNode(path, e, layer, None)))
        if e.opaque:
            tw.add(Item(path, "opaque"))
    tw.close()


# ---- commit ----------------------------------------------------------------------------------


@dataclass
class CommitResult:
    image: str | None  # None: nothing to commit
    names: list[str]
    diff_id: str | None = None
    digest: str | None = None
    empty: bool = False
    warnings: list[str] = field(default_factory=list)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def image_view(store: Store, image: str) -> LowerView:
    return LowerView(store, [lay.id for lay in reversed(store.image_layers(image))])


def _never() -> IO[bytes]:
    raise StoreError("internal: a base layer of the committed image is not in the store")


def commit_upper(
    store: Store,
    upper: Path | str,
    image_ref: str,
    new_name: str,
    message: str | None = None,
    compression: str = "gzip",
    allow_empty: bool = False,
) -> CommitResult:
    """Write the upper's changes as a new layer over `image_ref` and import the image
    `new_name` (tag `latest` if none) through the store's verified import path."""
    name = local_name(new_name)
    upper_b = os.fsencode(str(upper))
    if not os.path.isdir(upper_b):
        raise StoreError(f"upper directory {upper}: not a directory")
    # Shared lock from the walk to the end of the import (whose own shared() is the same
    # flock): gc cannot remove the base layers or contents the layer is copied from meanwhile.
    with store.shared():
        return _commit_locked(store, upper_b, image_ref, name, message, compression, allow_empty)


def _commit_locked(
    store: Store,
    upper_b: bytes,
    image_ref: str,
    name: str,
    message: str | None,
    compression: str,
    allow_empty: bool,
) -> CommitResult:
    from .ingest import import_source

    image = store.resolve(image_ref)
    base_layers = store.image_layers(image)
    view = LowerView(store, [lay.id for lay in reversed(base_layers)])
    items = Walker(view, upper_b).walk()
    if not items and not allow_empty:
        return CommitResult(None, [name], empty=True)
    warnings: list[str] = []
    blob_path = store.tmp_dir / f"commit-{os.getpid()}-{secrets.token_hex(4)}.blob"
    try:
        with open(blob_path, "xb") as fh:
            bw = BlobWriter(fh, compression)
            tw = LayerTarWriter(store, bw, warnings.append)
            for it in items:
                tw.add(it)
            tw.close()
            bw.close()
        cfg = store.image_config(image)
        rootfs = cfg.setdefault("rootfs", {"type": "layers", "diff_ids": []})
        rootfs.setdefault("diff_ids", []).append(bw.diff_id)
        created = _now()
        cfg["created"] = created
        hist: dict[str, object] = {"created": created, "created_by": "layerfs commit"}
        if message:
            hist["comment"] = message
        cfg.setdefault("history", []).append(hist)
        config = json.dumps(cfg, separators=(",", ":")).encode()
        layers = [
            LayerRef(
                lay.blob_digest,
                TO_OCI.get(lay.media_type, lay.media_type),
                lay.blob_size,
                lay.diff_id,
                _never,
            )
            for lay in base_layers
        ]
        layers.append(
            LayerRef(
                bw.digest,
                bw.media_type,
                bw.size,
                bw.diff_id,
                lambda: open(blob_path, "rb"),  # noqa: SIM115 - the importer closes it
            )
        )
        manifest_obj = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": sha256_digest(config),
                "size": len(config),
            },
            "layers": [
                {"mediaType": lr.media_type, "digest": lr.digest, "size": lr.size} for lr in layers
            ],
        }
        manifest = json.dumps(manifest_obj, separators=(",", ":")).encode()
        src = SourceImage(
            config=config,
            config_digest=sha256_digest(config),
            manifest=manifest,
            manifest_digest=sha256_digest(manifest),
            media_type=OCI_MANIFEST,
            layers=layers,
            names=[name],
        )
        res = import_source(store, [src], [])
    finally:
        blob_path.unlink(missing_ok=True)
    new_image, names = res.images[0]
    return CommitResult(new_image, names, bw.diff_id, bw.digest, not items, warnings)


def iter_diff(store: Store, upper: Path | str, image_ref: str) -> Iterator[str]:
    """`layerfs diff` output lines for an upper over an image."""
    view = image_view(store, store.resolve(image_ref))
    items = Walker(view, os.fsencode(str(upper))).walk()
    for kind, path in diff_lines(view, items):
        yield f"{kind} {os.fsdecode(path)}"
