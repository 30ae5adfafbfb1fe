"""Import images: stream and verify each layer into a staging area, then commit all at once.

Protocol (crash-safe at every step, see store.py for the layout):
1. Take the store's shared lock for the whole run (gc, fsck and recovery wait for it) and make
   a staging dir STORE/tmp/imp-<pid>-<rand>/ holding `stage.db` (entries of the new layers,
   same tables as the index) and `c/` (contents not yet in the store).
2. For each layer whose DiffID the store lacks: stream blob -> SHA-256 (blob digest) ->
   gzip/zstd -> SHA-256 (DiffID) -> tar reader -> entries. Each file's bytes are hashed with
   xxh3-128; on a key hit (staged or stored) the bytes are compared, else they are staged.
   Nothing is written to the index.
3. When every layer is verified: take the commit lock, hard-link staged contents into
   content/ (os.link never overwrites: a key hit is compared again, a collision gets `.<n>`),
   then insert layers, entries, xattrs, contents refcounts and images in ONE transaction.
4. Remove the staging dir. A crash before the transaction leaves files the index does not
   know plus the staging dir; the next open removes both (store.Store.recover).

Speed (pipeline.py): this thread parses tar headers and indexes entries; a read-ahead thread
reads the blob, computes both SHA-256s and decompresses; writer threads look for small
contents in the store and create the staged files. Every check of the protocol stays: a
layer's digests are compared once its stream has been read to the end, and the writers are
waited for (their errors raised) before anything is committed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

import xxhash

from .blobs import DecompressingReader, HashingReader, PeekReader, Readable, sniff
from .errors import LayerError, StoreError
from .index import ENTRY_COLS, INSERT_ENTRY, connect, entry_from_row, entry_row, schema_sql
from .model import Entry, EntryKind
from .paths import ancestors, join, show
from .paths import split as _split
from .pipeline import ContentWriter, ReadAhead, Unlinker, link_all
from .progress import Progress
from .sources import SourceImage
from .store import Store, crashpoint, same_bytes, with_tag
from .tarsplit import SplitRecorder
from .tarstream import read_layer

COPY = 1 << 20
SMALL = 1 << 20  # files up to this size are hashed in memory before anything is written
ROWS_PER_INSERT = 500  # rows of one multi-row INSERT into stage.db
STAGE_CACHE_KIB = 256 << 10  # SQLite page cache of stage.db and of the index while committing


def _file_is(path: str, data: bytes) -> bool:
    """True if the file at `path` holds exactly `data` (a small content)."""
    with open(path, "rb") as fh:
        return fh.read(len(data) + 1) == data


def _same_file(path: str, data: bytes | None, tmp: str | None) -> bool:
    """True if the file at `path` holds the content given as `data` or as file `tmp`."""
    if tmp is not None:
        return same_bytes(Path(tmp), Path(path))
    assert data is not None
    return _file_is(path, data)


def _same(queued: bytes, data: bytes | None, tmp: str | None) -> bool:
    """True if `queued` (bytes still on their way to a file) is the content `data` or `tmp`."""
    if tmp is not None:
        with open(tmp, "rb") as fh:
            return fh.read(len(queued) + 1) == queued
    return data == queued


@dataclass
class StagedLayer:
    sid: int  # layer number inside stage.db
    diff_id: str
    blob_digest: str
    media_type: str
    blob_size: int
    tar_size: int
    files: int = 0
    logical_bytes: int = 0
    new_bytes: int = 0
    keys: set[str] = field(default_factory=set)
    tarsplit: bool = True  # a split file rebuilds the exact tar (see tarsplit.py)
    split_keys: set[str] = field(default_factory=set)


@dataclass
class ImportResult:
    images: list[tuple[str, list[str]]]  # (image id, names)
    new_layers: int
    reused_layers: int


class Importer:
    """One import run into a Store (see the module docstring for the protocol)."""

    def __init__(self, store: Store, progress: Progress | None = None) -> None:
        self.store = store
        self.progress = progress or Progress(enabled=False)
        self.warnings: list[str] = []

    def warn(self, msg: str) -> None:
        self.warnings.append(msg)
        self.progress.warn(msg)

    def run(self, images: list[SourceImage], extra_tags: list[str]) -> ImportResult:
        with self.store.shared():
            stage = self.store.tmp_dir / f"imp-{os.getpid()}-{secrets.token_hex(4)}"
            stage.mkdir()
            self.writer = ContentWriter()
            self._cleanup: Unlinker | None = None
            try:
                return self._run(stage, images, extra_tags)
            finally:
                self.writer.abort()  # (a no-op after a successful run's close)
                if self._cleanup is not None:
                    self._cleanup.join()
                if hasattr(self, "sdb"):
                    self.sdb.close()
                shutil.rmtree(stage, ignore_errors=True)

    def _run(self, stage: Path, images: list[SourceImage], extra_tags: list[str]) -> ImportResult:
        self.stage = stage
        (stage / "c").mkdir()
        self.sdb = connect(stage / "stage.db")
        self.sdb.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;\n" + schema_sql())
        # One transaction for the whole staging (committed before the store's commit attaches
        # it): in autocommit every row would be its own transaction, with its locks, page
        # writes and journal probes. The cache holds the staged rows and their indexes.
        self.sdb.execute(f"PRAGMA cache_size = -{STAGE_CACHE_KIB}")
        self._max_vars = self.sdb.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        self.sdb.execute("BEGIN")
        self.staged_keys: dict[str, int] = {}  # key -> size, contents in stage/c
        self.reused_keys: set[str] = set()  # keys found already in the store
        self._stager: dict[str, StagedLayer] = {}  # key given to the writer -> its layer
        self._tmpn = 0
        self.cdir = str(stage / "c")
        self._subdirs: set[str] = set()
        self._staged_dirs: set[str] = set()
        self._placed: list[str] = []  # content files this import linked into content/
        self._new_subdirs: list[str] = []  # content/xx dirs this import created
        staged: dict[str, StagedLayer] = {}
        reused = 0
        for img in images:
            n = len(img.layers)
            for i, lref in enumerate(img.layers):
                label = f"{lref.diff_id} ({i + 1}/{n})"
                short = lref.diff_id.removeprefix("sha256:")[:12]
                if lref.diff_id in staged or self.store.layer_by_diff_id(lref.diff_id):
                    self.progress.line(f"{short}: Already exists")
                    reused += 1
                    continue
                sl = StagedLayer(
                    len(staged) + 1, lref.diff_id, lref.digest or "", lref.media_type,
                    0, 0,
                )  # fmt: skip
                # One read snapshot of the index per layer: _stored() then costs no lock.
                self.store.conn.execute("BEGIN")
                try:
                    with self.progress.bar(short, lref.size) as tick:
                        self._ingest_layer(sl, lref.opener, lref.digest, lref.size, label, tick)
                finally:
                    if self.store.conn.in_transaction:
                        self.store.conn.execute("COMMIT")
                staged[lref.diff_id] = sl
                self.progress.line(f"{short}: Pull complete")
                crashpoint("layer-staged")
        self.writer.close()  # every staged content is on disk from here on
        for key in self.writer.found:  # staged as new, but the store had them
            self._stager[key].new_bytes -= self.staged_keys.pop(key)
            self.reused_keys.add(key)
        self.sdb.commit()
        crashpoint("before-commit")
        with self.store.commit_lock():
            ids = self._commit(staged, images, extra_tags)
        crashpoint("after-commit")
        return ImportResult(ids, len(staged), reused)

    # ---- one layer -------------------------------------------------------------------------

    def _ingest_layer(
        self,
        sl: StagedLayer,
        opener: Callable[[], IO[bytes]],
        digest: str | None,
        size: int | None,
        label: str,
        tick: Callable[[int], None],
    ) -> None:
        try:
            raw = opener()
        except StoreError:
            raise
        except OSError as exc:
            raise LayerError(f"layer {label}: cannot read: {exc}") from None
        with raw:
            blob = HashingReader(raw)
            peek = PeekReader(blob)
            kind = sniff(peek.peek(4))
            plain: Readable = peek if kind == "none" else DecompressingReader(peek, kind, label)
            tar = HashingReader(plain)
            # Reading, both SHA-256s and decompression run in a worker thread (C code that
            # releases the GIL), ahead of the tar parser.
            ahead = ReadAhead(tar, lambda: blob.count, tick)
            split = open(self._split_path(sl), "xb")  # noqa: SIM115 - closed in finally
            rec = SplitRecorder(ahead, split)
            try:
                self._entries(sl, rec, label)
                rec.drain()  # padding after the end-of-archive marker belongs to the DiffID
                ahead.close()  # at the end of `tar`: the worker is done with the chain
                rec.finish()
                blob.drain()
                self.writer.check()
            except LayerError as exc:
                msg = str(exc)
                raise LayerError(
                    msg if msg.startswith("layer ") else f"layer {label}: {msg}"
                ) from None
            except (tarfile.TarError, EOFError) as exc:
                raise LayerError(f"layer {label}: truncated or corrupt tar: {exc}") from None
            except OSError as exc:
                raise LayerError(f"layer {label}: read error: {exc}") from None
            finally:
                ahead.close()
                split.close()
        if digest is not None and blob.digest() != digest:
            raise LayerError(
                f"layer {label}: blob digest mismatch (got {blob.digest()}, expected {digest})"
            )
        if size is not None and blob.count != size:
            raise LayerError(f"layer {label}: blob is {blob.count} bytes, descriptor says {size}")
        if tar.digest() != sl.diff_id:
            raise LayerError(f"layer {label}: DiffID mismatch (uncompressed tar is {tar.digest()})")
        sl.blob_digest = digest or blob.digest()
        sl.blob_size = blob.count
        sl.tar_size = tar.count
        self._finish_layer(sl)

    def _split_path(self, sl: StagedLayer) -> Path:
        return self.stage / f"split-{sl.sid}"

    def _entries(self, sl: StagedLayer, tar: SplitRecorder, label: str) -> None:
        db = self.sdb
        lid = sl.sid
        dirs: set[bytes] = {b"/"}
        # Names of the linked inodes of this layer: path -> inode, inode -> names (the first
        # one's row is the FILE, the others' rows HARDLINKs to it), as the tar built them so far.
        self._ino: dict[bytes, int] = {}
        self._names: dict[int, list[bytes]] = {}
        self._inodes = 0
        self._seen: set[bytes] = set()  # paths with a row in this layer
        self._pending: list[tuple[object, ...]] = []
        self._pending_x: list[tuple[object, ...]] = []
        self._layer_id = lid
        self._put(lid, _implicit_dir(b"", b""), dirs)
        nfile = 0
        cut: list[int] = []

        def on_data(offset: int, size: int) -> None:
            tar.cut(offset, size)
            cut.append(size)

        for e, fobj in read_layer(tar, self.warn, on_data):
            path = e.path
            try:
                for anc in ancestors(path) if path != b"/" else []:
                    if anc not in dirs:
                        self._ensure_dir(lid, anc, dirs)
            except LayerError:
                if e.kind == EntryKind.WHITEOUT or (e.kind == EntryKind.DIR and e.implicit):
                    # umoci writes `dir -> target` plus `dir/.wh.child` in one layer when a
                    # directory becomes a symlink: below a non-directory of the same layer a
                    # whiteout hides nothing (the non-directory already ends every lookup).
                    self.warn(
                        f"layer {label}: whiteout {show(path)} below a non-directory, ignored"
                    )
                    continue
                raise
            if e.kind == EntryKind.DIR:
                self._put_dir(lid, e, dirs)
            elif e.kind == EntryKind.WHITEOUT:
                old = self._get(lid, e.parent, e.name)
                if old is None:
                    self._put(lid, e, dirs)
                elif old.kind == EntryKind.DIR:
                    db.execute(
                        "UPDATE entries SET opaque = 1 WHERE layer = ? AND parent = ? AND name = ?",
                        (lid, e.parent, e.name),
                    )
                # an entry of the same layer always wins over its whiteout
            elif e.kind == EntryKind.HARDLINK:
                assert e.link is not None
                self._forget_name(path)  # a name linked again joins the target's inode
                target = self._get(lid, *_split(e.link))
                if target is None or target.kind in (EntryKind.DIR, EntryKind.WHITEOUT):
                    raise LayerError(
                        f"entry {show(path)}: hard link to {show(e.link)} which is not a file "
                        "earlier in this layer (links may not leave the layer)"
                    )
                if target.kind in (EntryKind.FILE, EntryKind.HARDLINK):
                    ino = self._ino.get(e.link)
                    if ino is None:  # the target's first link
                        self._inodes += 1
                        ino = self._ino[e.link] = self._inodes
                        self._names[ino] = [e.link]
                    first = self._names[ino][0]
                    if target.kind == EntryKind.HARDLINK:
                        target = self._get(lid, *_split(first))
                        assert target is not None
                    linked = replace(
                        target, parent=e.parent, name=e.name, kind=EntryKind.HARDLINK,
                        link=first, nlink=1, implicit=False,
                    )  # fmt: skip
                    self._put(lid, linked, dirs)
                    self._ino[path] = ino
                    self._names[ino].append(path)
                else:  # a hard link to a symlink/device/fifo: stored as a copy of it
                    self._put(lid, replace(target, parent=e.parent, name=e.name), dirs)
            elif e.kind == EntryKind.FILE:
                assert fobj is not None
                key = self._stage_content(fobj, e.size, path, sl)
                if cut:
                    tar.file(key, cut.pop())
                    sl.split_keys.add(key)
                self._put(lid, e, dirs, key)
                nfile += 1
                if nfile % 64 == 0:
                    crashpoint(f"file-{nfile}")
            else:
                self._put(lid, e, dirs)

    def _flush(self) -> None:
        if self._pending:
            self._insert_rows(INSERT_ENTRY, self._pending)
            self._pending.clear()
        if self._pending_x:
            self._insert_rows(
                "INSERT OR REPLACE INTO xattrs (layer, parent, name, key, value) "
                "VALUES (?,?,?,?,?)",
                self._pending_x,
            )
            self._pending_x.clear()

    def _insert_rows(self, sql: str, rows: list[tuple[object, ...]]) -> None:
        """executemany(sql, rows) with many rows per statement: the same rows in the same
        order, far fewer statement steps (each step releases the GIL, which the worker
        threads then hold for a while)."""
        head, sep, one = sql.partition(" VALUES ")
        assert sep and rows
        per = max(1, min(ROWS_PER_INSERT, self._max_vars // len(rows[0])))
        for i in range(0, len(rows), per):
            part = rows[i : i + per]
            self.sdb.execute(
                f"{head} VALUES {','.join([one] * len(part))}", [v for r in part for v in r]
            )

    def _get(self, lid: int, parent: bytes, name: bytes) -> Entry | None:
        if join(parent, name) not in self._seen:
            return None  # no row: no need to flush and ask
        self._flush()
        row = self.sdb.execute(
            f"SELECT {ENTRY_COLS} FROM entries WHERE layer = ? AND parent = ? AND name = ?",
            (lid, parent, name),
        ).fetchone()
        if row is None:
            return None
        xs = self.sdb.execute(
            "SELECT key, value FROM xattrs WHERE layer = ? AND parent = ? AND name = ? "
            "ORDER BY key",
            (lid, parent, name),
        ).fetchall()
        return entry_from_row(row, tuple((bytes(k), bytes(v)) for k, v in xs))

    def _ensure_dir(self, lid: int, path: bytes, dirs: set[bytes]) -> None:
        parent, name = _split(path)
        old = self._get(lid, parent, name)
        if old is not None and old.kind == EntryKind.DIR:
            dirs.add(path)
            return
        if old is not None and old.kind != EntryKind.WHITEOUT:
            raise LayerError(
                f"entry under {show(path)}: its parent is a {old.kind.name.lower()} in this layer"
            )
        d = replace(_implicit_dir(parent, name), opaque=old is not None)
        self._put(lid, d, dirs)

    def _put_dir(self, lid: int, e: Entry, dirs: set[bytes]) -> None:
        old = self._get(lid, e.parent, e.name)
        if e.implicit:  # an opaque marker: only the flag is meaningful
            if old is not None and old.kind == EntryKind.DIR:
                self.sdb.execute(
                    "UPDATE entries SET opaque = 1 WHERE layer = ? AND parent = ? AND name = ?",
                    (lid, e.parent, e.name),
                )
                return
            if old is not None and old.kind != EntryKind.WHITEOUT:
                raise LayerError(f"opaque marker in {show(e.path)}, which is not a directory")
            self._put(lid, replace(_implicit_dir(e.parent, e.name), opaque=True), dirs)
            return
        opaque = old is not None and (
            old.kind == EntryKind.WHITEOUT or (old.kind == EntryKind.DIR and old.opaque)
        )
        self._put(lid, replace(e, opaque=opaque), dirs)

    def _put(self, lid: int, e: Entry, dirs: set[bytes], content: str | None = None) -> None:
        """Insert or replace one entry, with `content` as its content key if given (rows are
        buffered; _get and _flush write them)."""
        db = self.sdb
        path = e.path
        if path in dirs and e.kind != EntryKind.DIR:
            # A non-directory replaces a directory of this layer: drop its subtree.
            self._flush()
            lo, hi = path + b"/", path + b"0"
            for table in ("entries", "xattrs"):
                db.execute(
                    f"DELETE FROM {table} WHERE layer = ? "
                    "AND (parent = ? OR (parent >= ? AND parent < ?))",
                    (lid, path, lo, hi),
                )
            for d in [d for d in dirs if d == path or d.startswith(lo)]:
                dirs.discard(d)
            self._seen = {p for p in self._seen if not p.startswith(lo)}
            for p in sorted(p for p in self._ino if p.startswith(lo)):
                self._forget_name(p)
        self._forget_name(path)
        if path in self._seen:
            self._flush()
            db.execute(
                "DELETE FROM xattrs WHERE layer = ? AND parent = ? AND name = ?",
                (lid, e.parent, e.name),
            )
        self._seen.add(path)
        self._pending.append(entry_row(lid, e, content))
        self._pending_x.extend((lid, e.parent, e.name, k, v) for k, v in e.xattrs)
        if len(self._pending) >= 2000:
            self._flush()
        if e.kind == EntryKind.DIR:
            dirs.add(path)

    def _forget_name(self, path: bytes) -> None:
        """`path` stops being a name of its linked inode (the tar replaces it, or drops the
        directory holding it): if it was the inode's first name, the next one becomes the
        FILE row and the others link to it, as the inode lives on under them."""
        ino = self._ino.pop(path, None)
        if ino is None:
            return
        names = self._names[ino]
        was_first = names[0] == path
        names.remove(path)
        if not names:
            del self._names[ino]
        elif was_first:
            self._flush()
            lid, first = self._layer_id, names[0]
            self.sdb.execute(
                "UPDATE entries SET kind = ?, link = NULL WHERE layer = ? AND parent = ? "
                "AND name = ?",
                (int(EntryKind.FILE), lid, *_split(first)),
            )
            self.sdb.execute(
                "UPDATE entries SET link = ? WHERE layer = ? AND kind = ? AND link = ?",
                (first, lid, int(EntryKind.HARDLINK), path),
            )

    def _finish_layer(self, sl: StagedLayer) -> None:
        self._flush()
        db = self.sdb
        lid = sl.sid
        for names in self._names.values():
            n = len(names)
            db.execute(
                "UPDATE entries SET nlink = ? WHERE layer = ? AND parent = ? AND name = ? "
                "AND kind = ?",
                (n, lid, *_split(names[0]), int(EntryKind.FILE)),
            )
            db.executemany(
                "UPDATE entries SET nlink = ? WHERE layer = ? AND parent = ? AND name = ? "
                "AND kind = ? AND link = ?",
                [(n, lid, *_split(p), int(EntryKind.HARDLINK), names[0]) for p in names[1:]],
            )
        sl.files = int(
            db.execute("SELECT COUNT(*) FROM entries WHERE layer = ?", (lid,)).fetchone()[0]
        )
        sl.logical_bytes = int(
            db.execute(
                "SELECT COALESCE(SUM(size), 0) FROM entries WHERE layer = ? AND kind = ?",
                (lid, int(EntryKind.FILE)),
            ).fetchone()[0]
        )
        sl.keys = {
            str(r[0])
            for r in db.execute(
                "SELECT DISTINCT content FROM entries WHERE layer = ? AND content IS NOT NULL",
                (lid,),
            )
        }
        if not sl.split_keys <= sl.keys:
            # A content only an overwritten duplicate had: nothing would keep it alive, so
            # this layer goes without a tar-split rather than with a dangling one.
            sl.tarsplit = False

    # ---- contents --------------------------------------------------------------------------

    def _stage_content(self, fobj: Readable, size: int, path: bytes, sl: StagedLayer) -> str:
        """Store one file's bytes in the staging area (or find them already there or in the
        store, bytes compared); return its content key."""
        if size <= SMALL:
            data = self._read(fobj, size, path)  # short only if the stream ends
            if len(data) != size or self._read(fobj, 1, path):
                raise LayerError(
                    f"entry {show(path)}: truncated data ({len(data)} of {size} bytes)"
                )
            return self._key_for(xxhash.xxh3_128_hexdigest(data), size, data, None, sl)
        self._tmpn += 1
        tmp = os.path.join(self.cdir, f".tmp-{self._tmpn}")
        h = xxhash.xxh3_128()
        got = 0
        with open(tmp, "xb") as out:
            while chunk := self._read(fobj, COPY, path):
                h.update(chunk)
                out.write(chunk)
                got += len(chunk)
        if got != size:
            raise LayerError(f"entry {show(path)}: truncated data ({got} of {size} bytes)")
        return self._key_for(h.hexdigest(), size, None, tmp, sl)

    def _staged(self, key: str) -> str:
        """Staging path of a content (sharded like content/: big flat dirs are slow)."""
        sub = f"{self.cdir}/{key[:2]}"
        if sub not in self._staged_dirs:
            os.makedirs(sub, exist_ok=True)
            self._staged_dirs.add(sub)
        return f"{sub}/{key}"

    @staticmethod
    def _read(fobj: Readable, n: int, path: bytes) -> bytes:
        try:
            return fobj.read(n)
        except tarfile.TarError as exc:
            raise LayerError(f"entry {show(path)}: truncated data: {exc}") from None

    def _key_for(
        self, digest: str, size: int, data: bytes | None, tmp: str | None, sl: StagedLayer
    ) -> str:
        """Pick the key for content held in `data` or in file `tmp` (which is consumed)."""
        base = f"{digest}-{size}"
        n = 0
        while True:
            key = base if n == 0 else f"{base}.{n}"
            same: bool | None = None  # None: no content under this key yet
            if key in self.staged_keys:
                other = self._staged(key)
                queued = self.writer.pending(other)  # not on disk yet: compare in memory
                if queued is not None:
                    same = _same(queued, data, tmp)
                elif key in self.writer.found:  # the store had these bytes: nothing staged
                    same = _same_file(self.store.content_str(key), data, tmp)
                else:
                    self.writer.check()
                    same = _same_file(other, data, tmp)
            elif key in self.reused_keys or (tmp is not None and self._stored(key)):
                try:
                    same = _same_file(self.store.content_str(key), data, tmp)
                except FileNotFoundError:
                    pass  # indexed but missing (a damaged store): staged anew, placed again
                else:
                    if same:
                        self.reused_keys.add(key)
            if same is None:
                dst = self._staged(key)
                if tmp is not None:
                    os.chmod(tmp, 0o444)
                    os.rename(tmp, dst)
                else:
                    # The writer looks for the bytes in the store first (off this thread):
                    # if there, the key ends up in writer.found and nothing is staged.
                    assert data is not None
                    self.writer.write(key, dst, data, self.store.content_str(key))
                    self._stager[key] = sl
                self.staged_keys[key] = size
                sl.new_bytes += size
                return key
            if same:
                if tmp is not None:
                    os.unlink(tmp)
                return key
            n += 1

    def _stored(self, key: str) -> bool:
        """True if the index records content `key`. (A content committed by a concurrent
        import after this check is staged again; placing it finds the file and compares.)"""
        row = self.store.conn.execute("SELECT 1 FROM contents WHERE key = ?", (key,)).fetchone()
        return row is not None

    # ---- commit ----------------------------------------------------------------------------

    def _ensure_subdir(self, sub: str) -> None:
        """content/<xx> exists (made by this import: removed again if it fails)."""
        if sub not in self._subdirs:
            try:
                os.mkdir(sub)
                self._new_subdirs.append(sub)
            except FileExistsError:
                pass
            self._subdirs.add(sub)

    def _place_all(self, keys: list[str], layers: list[StagedLayer]) -> None:
        """Link staged contents into content/ (in parallel); a name already taken there
        goes through _place (compare, or re-key)."""
        for key in keys:
            self._ensure_subdir(os.path.dirname(self.store.content_str(key)))
        dsts = [self.store.content_str(k) for k in keys]
        results = link_all([(self._staged(k), dst) for k, dst in zip(keys, dsts, strict=True)])
        taken: list[str] = []
        error: OSError | None = None
        for i, (key, dst, res) in enumerate(zip(keys, dsts, results, strict=True)):
            if res is None:
                self._placed.append(dst)
            elif isinstance(res, FileExistsError):
                taken.append(key)
            elif error is None:
                error = res
            if i % 64 == 63:
                crashpoint(f"placed-{i + 1}")
        if error is not None:
            raise error
        for key in taken:
            self._place(key, layers)

    def _place(self, key: str, layers: list[StagedLayer]) -> None:
        """Link a staged content into content/; on a collision re-key it in stage.db."""
        src = self._staged(key)
        base = key.split(".")[0]
        n = 0
        while True:
            cand = base if n == 0 else f"{base}.{n}"
            dst = self.store.content_str(cand)
            self._ensure_subdir(os.path.dirname(dst))
            try:
                os.link(src, dst)
                self._placed.append(dst)
                break
            except FileExistsError:
                if same_bytes(Path(src), Path(dst)):
                    break
            n += 1
        if cand != key:
            self.sdb.execute("UPDATE entries SET content = ? WHERE content = ?", (cand, key))
            for sl in layers:
                if key in sl.keys:
                    sl.keys.discard(key)
                    sl.keys.add(cand)
                if key in sl.split_keys:
                    sl.tarsplit = False  # its split names the old key

    def _commit(
        self, staged: dict[str, StagedLayer], images: list[SourceImage], extra_tags: list[str]
    ) -> list[tuple[str, list[str]]]:
        st = self.store
        c = st.conn
        new = [sl for sl in staged.values() if st.layer_by_diff_id(sl.diff_id) is None]
        keys = sorted({k for sl in new for k in sl.keys})
        try:
            self._place_all([k for k in keys if k in self.staged_keys], new)
            for key in keys:
                if key not in self.staged_keys and not os.path.exists(st.content_str(key)):
                    raise StoreError(f"content {key} vanished from the store during the import")
            self.sdb.commit()
            for sl in new:
                if sl.tarsplit:
                    dst = st.tarsplit_str(sl.diff_id)
                    try:
                        os.link(self._split_path(sl), dst)
                        self._placed.append(dst)
                    except FileExistsError:
                        pass  # a leftover of a killed import of the same layer: same bytes
            crashpoint("placed")
            st.adopt([*self._new_subdirs, *self._placed])
            # The staged names are not needed any more: drop them while the index commits.
            self._cleanup = Unlinker([self._staged(k) for k in keys if k in self.staged_keys])
            c.execute("ATTACH DATABASE ? AS stage", (str(self.stage / "stage.db"),))
            # A cache that holds what the transaction touches (index pages of random keys).
            cache = c.execute("PRAGMA main.cache_size").fetchone()[0]
            c.execute(f"PRAGMA main.cache_size = -{STAGE_CACHE_KIB}")
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    out = self._commit_rows(new, images, extra_tags)
                    crashpoint("in-transaction")
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
            finally:
                c.execute(f"PRAGMA main.cache_size = {int(cache)}")
                c.execute("DETACH DATABASE stage")
        except BaseException:
            self._unplace()
            raise
        return out

    def _unplace(self) -> None:
        """After a failed commit: remove the content files (and subdirs) this import added,
        so the store is as it was. (After a kill -9, recovery on the next open does this.)"""
        for dst in reversed(self._placed):
            with contextlib.suppress(OSError):
                os.unlink(dst)
        for sub in self._new_subdirs:
            with contextlib.suppress(OSError):
                os.rmdir(sub)

    def _commit_rows(
        self, new: list[StagedLayer], images: list[SourceImage], extra_tags: list[str]
    ) -> list[tuple[str, list[str]]]:
        c = self.store.conn
        now = time.time()
        for sl in new:
            cur = c.execute(
                "INSERT INTO layers (diff_id, blob_digest, media_type, blob_size, tar_size, files, "
                "logical_bytes, new_bytes, imported, tarsplit) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (sl.diff_id, sl.blob_digest, sl.media_type, sl.blob_size, sl.tar_size, sl.files,
                 sl.logical_bytes, sl.new_bytes, now, int(sl.tarsplit)),
            )  # fmt: skip
            real = cur.lastrowid
            c.execute(
                "INSERT INTO main.entries SELECT ?, parent, name, kind, mode, uid, gid, size, "
                "mtime_ns, rdev_major, rdev_minor, link, content, opaque, nlink, implicit, nxattrs "
                "FROM stage.entries WHERE layer = ?",
                (real, sl.sid),
            )
            c.execute(
                "INSERT INTO main.xattrs SELECT ?, parent, name, key, value FROM stage.xattrs "
                "WHERE layer = ?",
                (real, sl.sid),
            )
            c.execute(
                "INSERT INTO main.contents (key, size, refs) SELECT content, MAX(size), COUNT(*) "
                "FROM stage.entries WHERE layer = ? AND content IS NOT NULL GROUP BY content "
                "ON CONFLICT(key) DO UPDATE SET refs = refs + excluded.refs",
                (sl.sid,),
            )
        out: list[tuple[str, list[str]]] = []
        for img in images:
            cfg = img.config_json
            image = img.config_digest
            exists = c.execute("SELECT 1 FROM images WHERE id = ?", (image,)).fetchone()
            if not exists:
                plat = "/".join(
                    str(x)
                    for x in (cfg.get("os"), cfg.get("architecture"), cfg.get("variant"))
                    if x
                )
                size = 0
                rows = []
                for pos, lref in enumerate(img.layers):
                    lid, tar_size = c.execute(
                        "SELECT id, tar_size FROM layers WHERE diff_id = ?", (lref.diff_id,)
                    ).fetchone()
                    size += tar_size
                    rows.append((image, pos, lid))
                c.execute(
                    "INSERT INTO images (id, config, manifest_digest, manifest, media_type, "
                    "platform, created, size, imported) VALUES (?,?,?,?,?,?,?,?,?)",
                    (image, img.config, img.manifest_digest, img.manifest, img.media_type, plat,
                     str(cfg.get("created") or ""), size, now),
                )  # fmt: skip
                c.executemany(
                    "INSERT INTO image_layers (image, position, layer) VALUES (?,?,?)", rows
                )
            names = [with_tag(n) for n in img.names + extra_tags]
            for n in names:
                c.execute("INSERT OR REPLACE INTO tags (name, image) VALUES (?, ?)", (n, image))
            for d in img.repo_digests:
                c.execute(
                    "INSERT OR REPLACE INTO repo_digests (name, image) VALUES (?, ?)", (d, image)
                )
            out.append((image, names))
        return out


def _implicit_dir(parent: bytes, name: bytes) -> Entry:
    return Entry(parent, name, EntryKind.DIR, 0o755, 0, 0, 0, 0, implicit=True)


def import_source(
    store: Store,
    images: list[SourceImage],
    tags: list[str],
    progress: Progress | None = None,
) -> ImportResult:
    from .reference import local_name

    if tags and len(images) != 1:
        raise StoreError(
            f"--tag needs exactly one image, the source has {len(images)}: name one with :REF"
        )
    tags = [local_name(t) for t in tags]
    try:
        return Importer(store, progress).run(images, tags)
    except sqlite3.Error as exc:
        raise StoreError(f"index error during import: {exc}") from None
