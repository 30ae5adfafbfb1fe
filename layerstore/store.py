"""The Store: on-disk layout, locks, recovery on open, read API for the mount, images, gc, fsck."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import xxhash

from . import containers
from .errors import ImageNotFound, StoreError
from .index import ENTRY_COLS, SCHEMA_VERSION, connect, entry_from_row, schema_sql, user_version
from .model import Entry, EntryKind, ImageInfo, LayerInfo
from .paths import join, split

# On-disk layout of a store directory:
#   index.db           the SQLite index (schema.sql)
#   content/ab/<key>   one plain file per distinct content, key = '<xxh3-128 hex>-<size>[.<n>]'
#   tarsplit/<hex>     per layer (DiffID hex): its tar minus file data (tarsplit.py)
#   tmp/               one directory per running import (staging) or gc; a leftover here means
#                      a process died: the next open that can take the lock exclusively removes
#                      it and any content file the index does not know (orphans)
#   lock               flock: shared by importers for their whole run, exclusive for gc/fsck/
#                      recovery (so recovery never races a live import)
#   commit.lock        flock: exclusive while one importer places contents and commits


def in_user_namespace() -> bool:
    """True inside a user namespace other than the initial one (e.g. `unshare -r`, rootless
    podman), where uid 0 is an ordinary user of the host."""
    try:
        with open("/proc/self/uid_map") as f:
            maps = [line.split() for line in f if line.strip()]
    except OSError:
        return False
    return maps != [["0", "0", "4294967295"]]


def default_store_dir() -> Path:
    env = os.environ.get("LAYERFS_STORE")
    if env:
        return Path(env)
    if os.geteuid() == 0 and not in_user_namespace():
        return Path("/var/lib/layerfs")
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(xdg) / "layerfs"


def describe_pid(pid: int) -> str:
    """`pid 123 (layerfs import x.tar)`: a process as a user recognises it."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        argv = []
    # `python -m unionfs ...` and `.venv/bin/layerfs ...` both read as `layerfs ...`
    for i, a in enumerate(argv):
        if (a == "unionfs" and i > 0 and argv[i - 1] == "-m") or a.endswith("/layerfs"):
            argv = ["layerfs", *argv[i + 1 :]]
            break
    cmd = " ".join(argv)
    if len(cmd) > 80:
        cmd = cmd[:79] + "…"
    return f"pid {pid} ({cmd})" if cmd else f"pid {pid}"


def lock_holders(fd: int) -> str:
    """Who holds a flock on the file open at `fd` (other than us), from /proc/locks:
    `pid 12 (layerfs import …), pid 34 (…)`; "" when unknown."""
    st = os.fstat(fd)
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids: list[int] = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->"
                if len(fields) < 6 or fields[1] == "->" or fields[1] != "FLOCK":
                    continue
                pid = int(fields[4]) if fields[4].isdigit() else 0
                if fields[5] == want and pid not in (0, os.getpid()) and pid not in pids:
                    pids.append(pid)
    except OSError:
        return ""
    return ", ".join(describe_pid(p) for p in pids)


def crashpoint(name: str) -> None:
    """Test hook: die by SIGKILL here when LAYERFS_TEST_CRASH names this point."""
    want = os.environ.get("LAYERFS_TEST_CRASH")
    if want and want == name:
        os.kill(os.getpid(), 9)


def same_bytes(a: Path, b: Path) -> bool:
    """True if two files have identical contents (compared in chunks, never all in memory)."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        if os.fstat(fa.fileno()).st_size != os.fstat(fb.fileno()).st_size:
            return False
        while True:
            x = fa.read(1 << 20)
            y = fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def has_tag(name: str) -> bool:
    return ":" in name.rsplit("/", 1)[-1]


def with_tag(name: str) -> str:
    """`name` -> `name:latest` when it has no tag (docker's default)."""
    return name if has_tag(name) or "@" in name else name + ":latest"


def _canonical(ref: str) -> str | None:
    from .reference import local_name

    try:
        return local_name(ref)
    except StoreError:
        return None


@dataclass
class GcReport:
    layers: list[str]  # DiffIDs removed (or to be removed)
    contents: int
    bytes: int
    orphans: int
    stale_tmp: int
    kept: list[tuple[str, list[str]]] = field(default_factory=list)  # unused, but mounted


class Store:
    """A layer store directory. One instance per process and thread (SQLite connection)."""

    def __init__(
        self,
        root: Path | str,
        readonly: bool = False,
        *,
        missing_ok: bool = False,
        recover: bool = True,
        timeout: float | None = None,
    ) -> None:
        """Open (or, unless `readonly`, create) the store at `root`. `missing_ok` (with
        `readonly`): a store that does not exist reads as an empty one and nothing is created.
        `recover`: clean what a killed process left (gc and fsck do it themselves). `timeout`:
        how long a lock may be waited for (None: as long as it takes)."""
        # Absolute: a mount daemon opens its store lazily after chdir("/").
        self.root = Path(os.path.abspath(root))
        self.readonly = readonly
        self.timeout = timeout
        self.content_dir = self.root / "content"
        self.tmp_dir = self.root / "tmp"
        self.db_path = self.root / "index.db"
        self._content_prefix = f"{self.content_dir}/"
        self.tarsplit_dir = self.root / "tarsplit"
        self._lockf: IO[bytes] | None = None
        self._locked = 0
        self.owner: tuple[int, int] | None = None
        # True for the empty stand-in of a store that does not exist (nothing on disk).
        self.missing = False
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root}: not a directory (the store is one)")
        if readonly and not self.db_path.exists():
            if not missing_ok:
                raise StoreError(f"{self.root}: not a layerfs store (no index.db)")
            self.missing = True
            self.conn = sqlite3.connect(":memory:", isolation_level=None)
            self.conn.executescript(schema_sql())
            return
        if self.root.is_dir() and not os.access(self.root, os.W_OK):
            # Even reading needs it: SQLite makes the WAL index (-shm) next to the database.
            raise self._not_writable()
        if not readonly:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                self.content_dir.mkdir(exist_ok=True)
                self.tmp_dir.mkdir(exist_ok=True)
                self.tarsplit_dir.mkdir(exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create store {self.root}: {exc.strerror}") from None
        # Root working in a user's store gives what it adds to the store's owner, who could
        # not otherwise remove it (gc) or replace it.
        if os.geteuid() == 0:
            st = os.stat(self.root)
            if st.st_uid != 0:
                self.owner = (st.st_uid, st.st_gid)
        try:
            self.conn = connect(self.db_path, readonly)
            if not readonly and user_version(self.conn) == 0:
                with self.commit_lock():
                    if user_version(self.conn) == 0:
                        self.conn.executescript("BEGIN IMMEDIATE;\n" + schema_sql() + "\nCOMMIT;")
                        # WAL: readers (a mounted image) never wait for an import's commit.
                        self.conn.execute("PRAGMA journal_mode = WAL")
            v = user_version(self.conn)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.db_path}: cannot open the index: {exc}") from None
        if v != SCHEMA_VERSION:
            raise StoreError(f"{self.db_path}: index version {v}, expected {SCHEMA_VERSION}")
        if not readonly and recover:
            self.recover()

    def adopt(self, paths: Sequence[str | Path]) -> None:
        """Give files and directories just added to the store to the store's owner (a no-op
        unless root works in another user's store)."""
        if self.owner is not None:
            for p in paths:
                os.chown(p, *self.owner, follow_symlinks=False)

    def _not_writable(self) -> StoreError:
        owner = self.root.stat().st_uid
        return StoreError(
            f"{self.root}: store of uid {owner}, not writable by you (uid {os.geteuid()}); "
            f"a store serves its owner only: use your own ({default_store_dir()} unless "
            "--store or $LAYERFS_STORE says otherwise)"
        )

    def close(self) -> None:
        self.conn.close()
        if self._lockf is not None:
            self._lockf.close()
            self._lockf = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- locks -----------------------------------------------------------------------------

    def _lockfile(self) -> IO[bytes]:
        if self._lockf is None:
            self._lockf = open(self.root / "lock", "a+b")  # noqa: SIM115 - kept for the lifetime
        return self._lockf

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """Held by an importer (pull, push, commit) for its whole run: gc, fsck and recovery
        wait for it. Mounts do not hold it: they register in mounts/ instead."""
        if self.missing:
            yield
            return
        self._wait_lock(fcntl.LOCK_SH, "a running gc or fsck")
        try:
            yield
        finally:
            fcntl.flock(self._lockfile(), fcntl.LOCK_UN)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held by gc and fsck: waits for running imports (never for mounts)."""
        if self.missing:
            yield
            return
        self._wait_lock(fcntl.LOCK_EX, "running imports")
        try:
            yield
        finally:
            fcntl.flock(self._lockfile(), fcntl.LOCK_UN)

    def _wait_lock(self, mode: int, what: str) -> None:
        """Take the store's lock; when it is busy say who holds it (pid and command line, from
        /proc/locks) and wait, at most `self.timeout` seconds."""
        f = self._lockfile()
        try:
            fcntl.flock(f, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        holders = lock_holders(f.fileno()) or what
        limit = "" if self.timeout is None else f" (at most {self.timeout:g}s, --timeout)"
        print(f"layerfs: waiting for {holders}{limit}...", file=sys.stderr, flush=True)
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(f, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreError(
                    f"gave up after {self.timeout:g}s waiting for "
                    f"{lock_holders(f.fileno()) or what}"
                )
            time.sleep(0.05)

    @contextlib.contextmanager
    def commit_lock(self) -> Iterator[None]:
        with open(self.root / "commit.lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # ---- recovery --------------------------------------------------------------------------

    def recover(self) -> bool:
        """Remove what a killed process left, if no importer is running. True if it did work."""
        f = self._lockfile()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        try:
            return self._recover_locked()
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

    def _recover_locked(self) -> bool:
        stale = list(self.tmp_dir.iterdir()) if self.tmp_dir.exists() else []
        if not stale:
            return False
        # Orphans first, then the markers: a crash here leaves the markers for the next open.
        self._remove_orphans(dry_run=False)
        for p in stale:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        return True

    def _content_files(self) -> Iterator[tuple[str, Path]]:
        if not self.content_dir.exists():
            return
        for sub in sorted(self.content_dir.iterdir()):
            if not sub.is_dir():
                yield sub.name, sub
                continue
            for f in sorted(sub.iterdir()):
                yield f.name, f

    def _split_orphans(self) -> list[Path]:
        known = {
            str(r[0]).removeprefix("sha256:")
            for r in self.conn.execute("SELECT diff_id FROM layers WHERE tarsplit = 1")
        }
        if not self.tarsplit_dir.exists():
            return []
        return [p for p in sorted(self.tarsplit_dir.iterdir()) if p.name not in known]

    def _remove_orphans(self, dry_run: bool) -> int:
        known = {r[0] for r in self.conn.execute("SELECT key FROM contents")}
        n = 0
        for p in self._split_orphans():
            n += 1
            if not dry_run:
                p.unlink(missing_ok=True)
        for key, path in self._content_files():
            if key not in known or path.parent.name != key[:2]:
                n += 1
                if not dry_run:
                    path.unlink(missing_ok=True)
        return n

    # ---- content ---------------------------------------------------------------------------

    def content_path(self, key: str) -> Path:
        """Path of the plain file holding the content `key` (read it with pread)."""
        return self.content_dir / key[:2] / key

    def tarsplit_str(self, diff_id: str) -> str:
        return str(self.tarsplit_dir / diff_id.removeprefix("sha256:"))

    def layer_tar(self, layer: int) -> Iterator[bytes]:
        """The layer's original uncompressed tar, byte for byte (its SHA-256 is the DiffID),
        rebuilt from its tar-split and the stored contents. StoreError if it has no split."""
        from .tarsplit import rebuild

        row = self.conn.execute(
            "SELECT diff_id, tarsplit FROM layers WHERE id = ?", (layer,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no layer {layer}")
        if not row[1]:
            raise StoreError(f"layer {row[0]} has no tar-split (it cannot be rebuilt exactly)")
        with open(self.tarsplit_str(row[0]), "rb") as split:
            # rebuild() closes each content it opens
            yield from rebuild(split, lambda key: open(self.content_str(key), "rb"))  # noqa: SIM115

    def content_str(self, key: str) -> str:
        """content_path() as a str, without pathlib's cost (hot loops)."""
        return f"{self._content_prefix}{key[:2]}/{key}"

    # ---- read API for the mount ------------------------------------------------------------

    def resolve(self, ref: str) -> str:
        """Image ID (config digest) for `name[:tag]`, `name@sha256:…`, an ID or an ID prefix."""
        c = self.conn
        if "@" in ref:
            row = c.execute("SELECT image FROM repo_digests WHERE name = ?", (ref,)).fetchone()
            if row:
                return str(row[0])
            name, _, dig = ref.partition("@")
            rows = c.execute(
                "SELECT id FROM images WHERE manifest_digest = ? OR id = ?", (dig, dig)
            ).fetchall()
            if len(rows) == 1:
                return str(rows[0][0])
            raise ImageNotFound(f"no such image: {ref}")
        row = c.execute("SELECT image FROM tags WHERE name = ?", (with_tag(ref),)).fetchone()
        if row:
            return str(row[0])
        canonical = _canonical(ref)
        if canonical is not None:  # docker.io/library/x -> x:latest, as tag wrote it
            row = c.execute("SELECT image FROM tags WHERE name = ?", (canonical,)).fetchone()
            if row:
                return str(row[0])
        hexpart = ref.removeprefix("sha256:")
        if len(hexpart) >= 4 and all(ch in "0123456789abcdef" for ch in hexpart):
            rows = c.execute(
                "SELECT id FROM images WHERE substr(id, 8, ?) = ?", (len(hexpart), hexpart)
            ).fetchall()
            if len(rows) == 1:
                return str(rows[0][0])
            if len(rows) > 1:
                raise ImageNotFound(f"ambiguous image ID prefix: {ref}")
        raise ImageNotFound(f"no such image: {ref}")

    def image_layers(self, ref: str) -> list[LayerInfo]:
        """The layers of an image, BOTTOM FIRST (index 0 is the base layer; reverse for
        overlay's top-first lowerdir order)."""
        image = self.resolve(ref)
        rows = self.conn.execute(
            "SELECT l.id, l.diff_id, l.blob_digest, l.media_type, l.blob_size, l.tar_size, "
            "l.files, l.logical_bytes, l.new_bytes FROM image_layers il "
            "JOIN layers l ON l.id = il.layer WHERE il.image = ? ORDER BY il.position",
            (image,),
        ).fetchall()
        return [LayerInfo(*r) for r in rows]

    def _xattrs(self, layer: int, parent: bytes, name: bytes) -> tuple[tuple[bytes, bytes], ...]:
        rows = self.conn.execute(
            "SELECT key, value FROM xattrs WHERE layer = ? AND parent = ? AND name = ? "
            "ORDER BY key",
            (layer, parent, name),
        ).fetchall()
        return tuple((bytes(k), bytes(v)) for k, v in rows)

    def _entry(self, layer: int, row: tuple[Any, ...]) -> Entry:
        xattrs = self._xattrs(layer, bytes(row[0]), bytes(row[1])) if row[-1] else ()
        return entry_from_row(row, xattrs)

    def layer_lookup(self, layer: int, parent: bytes, name: bytes) -> Entry | None:
        """The entry `name` in directory `parent` (absolute, b"/" for the top level) of one
        layer, or None. The layer root is layer_lookup(layer, b"", b""). One index probe."""
        row = self.conn.execute(
            f"SELECT {ENTRY_COLS} FROM entries WHERE layer = ? AND parent = ? AND name = ?",
            (layer, parent, name),
        ).fetchone()
        return None if row is None else self._entry(layer, row)

    def layer_listdir(self, layer: int, parent: bytes) -> list[Entry]:
        """Every entry of one layer directly in `parent`, whiteouts included, sorted by name
        (bytewise). One index range scan."""
        rows = self.conn.execute(
            f"SELECT {ENTRY_COLS} FROM entries WHERE layer = ? AND parent = ? ORDER BY name",
            (layer, parent),
        ).fetchall()
        return [self._entry(layer, r) for r in rows]

    def lookup_many(self, layers: Sequence[int], parent: bytes, name: bytes) -> dict[int, Entry]:
        """layer_lookup() in several layers with one query: {layer id: entry} for the layers
        that have the name (whiteouts included). Cost: one index probe per layer."""
        if not layers:
            return {}
        marks = ",".join("?" * len(layers))
        rows = self.conn.execute(
            f"SELECT layer, {ENTRY_COLS} FROM entries WHERE layer IN ({marks}) "
            "AND parent = ? AND name = ?",
            (*layers, parent, name),
        ).fetchall()
        return {int(r[0]): self._entry(int(r[0]), r[1:]) for r in rows}

    def listdir_many(self, layers: Sequence[int], parent: bytes) -> dict[int, list[Entry]]:
        """layer_listdir() in several layers with one query: {layer id: entries sorted by
        name} for the layers that have entries in `parent`."""
        out: dict[int, list[Entry]] = {}
        if not layers:
            return out
        marks = ",".join("?" * len(layers))
        for r in self.conn.execute(
            f"SELECT layer, {ENTRY_COLS} FROM entries WHERE layer IN ({marks}) AND parent = ? "
            "ORDER BY layer, name",
            (*layers, parent),
        ):
            out.setdefault(int(r[0]), []).append(self._entry(int(r[0]), r[1:]))
        return out

    def layer_hardlinks(self, layer: int, path: bytes) -> list[bytes]:
        """Every absolute path of the inode named `path` in one layer, sorted (just [path]
        for a file that is not hard-linked). `path` may be any of its names."""
        e = self.layer_lookup(layer, *split(path))
        if e is None:
            return []
        first = e.link if e.kind == EntryKind.HARDLINK and e.link is not None else path
        rows = self.conn.execute(
            # kind = 4 (HARDLINK) spelled literally: the partial index requires it.
            "SELECT parent, name FROM entries INDEXED BY entries_by_link "
            "WHERE layer = ? AND link = ? AND kind = 4",
            (layer, first),
        ).fetchall()
        return sorted([first, *(join(bytes(p), bytes(n)) for p, n in rows)])

    def layer_entries(self, layer: int) -> Iterator[Entry]:
        """Every entry of a layer, each directory before its children (ordered by parent, name)."""
        cur = self.conn.execute(
            f"SELECT {ENTRY_COLS} FROM entries WHERE layer = ? ORDER BY parent, name", (layer,)
        )
        rows = cur.fetchmany(1000)
        while rows:
            for r in rows:
                yield self._entry(layer, r)
            rows = cur.fetchmany(1000)

    def layer_by_diff_id(self, diff_id: str) -> int | None:
        row = self.conn.execute("SELECT id FROM layers WHERE diff_id = ?", (diff_id,)).fetchone()
        return None if row is None else int(row[0])

    def all_layers(self) -> list[LayerInfo]:
        rows = self.conn.execute(
            "SELECT id, diff_id, blob_digest, media_type, blob_size, tar_size, files, "
            "logical_bytes, new_bytes FROM layers ORDER BY id"
        ).fetchall()
        return [LayerInfo(*r) for r in rows]

    def layer_users(self, layer: int) -> list[str]:
        rows = self.conn.execute(
            "SELECT DISTINCT image FROM image_layers WHERE layer = ? ORDER BY image", (layer,)
        )
        return [str(r[0]) for r in rows]

    # ---- images ----------------------------------------------------------------------------

    def image_ids(self) -> list[str]:
        rows = self.conn.execute("SELECT id FROM images ORDER BY imported DESC, id")
        return [str(r[0]) for r in rows]

    def image_info(self, image: str) -> ImageInfo:
        row = self.conn.execute(
            "SELECT id, manifest_digest, created, size, imported, platform FROM images "
            "WHERE id = ?",
            (image,),
        ).fetchone()
        if row is None:
            raise ImageNotFound(f"no such image: {image}")
        tags = tuple(
            str(r[0])
            for r in self.conn.execute(
                "SELECT name FROM tags WHERE image = ? ORDER BY name", (image,)
            )
        )
        digests = tuple(
            str(r[0])
            for r in self.conn.execute(
                "SELECT name FROM repo_digests WHERE image = ? ORDER BY name", (image,)
            )
        )
        return ImageInfo(row[0], row[1], tags, digests, row[2], row[3], row[4], row[5])

    def image_config(self, image: str) -> dict[str, Any]:
        row = self.conn.execute("SELECT config FROM images WHERE id = ?", (image,)).fetchone()
        if row is None:
            raise ImageNotFound(f"no such image: {image}")
        cfg: dict[str, Any] = json.loads(bytes(row[0]))
        return cfg

    def image_blobs(self, image: str) -> tuple[bytes, bytes, str]:
        """(config bytes, manifest bytes, manifest media type) exactly as imported. The config
        digest is the image ID; layers can be rebuilt exactly with layer_tar()."""
        row = self.conn.execute(
            "SELECT config, manifest, media_type FROM images WHERE id = ?", (image,)
        ).fetchone()
        if row is None:
            raise ImageNotFound(f"no such image: {image}")
        return bytes(row[0]), bytes(row[1]), str(row[2])

    def tag(self, ref: str, name: str) -> str:
        from .reference import local_name

        name = local_name(name)
        image = self.resolve(ref)
        with self.commit_lock():
            self.conn.execute(
                "INSERT OR REPLACE INTO tags (name, image) VALUES (?, ?)", (name, image)
            )
        return image

    def rmi(self, ref: str, force: bool = False) -> list[str]:
        """Untag `ref`, deleting the image when it was its last name (or when given by ID).
        Returns docker-style lines ("Untagged: …", "Deleted: …"). Layers stay until gc."""
        image = self.resolve(ref)
        out: list[str] = []
        c = self.conn
        # pin_lock: no mount of this image can register between the check and the delete.
        with contextlib.ExitStack() as locks:
            if not self.missing:
                locks.enter_context(containers.pin_lock(self.root))
            locks.enter_context(self.commit_lock())
            c.execute("BEGIN IMMEDIATE")
            try:
                tags = [
                    str(r[0]) for r in c.execute("SELECT name FROM tags WHERE image = ?", (image,))
                ]
                tagged = c.execute(
                    "SELECT 1 FROM tags WHERE name = ? AND image = ?", (with_tag(ref), image)
                ).fetchone()
                by_name = "@" in ref or tagged is not None
                if tagged is not None and len(tags) > 1:
                    c.execute("DELETE FROM tags WHERE name = ?", (with_tag(ref),))
                    c.execute("COMMIT")
                    return [f"Untagged: {with_tag(ref)}"]
                if not by_name and len(tags) > 1 and not force:
                    raise StoreError(
                        f"image {image[7:19]} has several tags ({', '.join(tags)}): "
                        "remove them by name or use --force"
                    )
                out += [f"Untagged: {t}" for t in tags]
                out += [
                    f"Untagged: {r[0]}"
                    for r in c.execute("SELECT name FROM repo_digests WHERE image = ?", (image,))
                ]
                # A container (named upper) pins its image: deleting the image would let gc
                # take the layers its upper sits on. As docker does, refuse; --force only
                # untags, keeping the image (by ID) for its containers.
                users = [k.name for k in containers.all_containers(self.root) if k.image == image]
                if users:
                    if not force:
                        raise StoreError(
                            f"image {image[7:19]} is used by container(s) {', '.join(users)}: "
                            "remove them first, or use --force to untag only"
                        )
                    for table in ("tags", "repo_digests"):
                        c.execute(f"DELETE FROM {table} WHERE image = ?", (image,))
                    c.execute("COMMIT")
                    return out
                # A read-only (or --upper) mount reads the image's layers: refused as docker
                # refuses to remove a running container's image; --force removes the image
                # and the mount's registration keeps its layers from gc until it ends.
                mounts = [r for r in containers.live_records(self.root) if r.image == image]
                if mounts and not force:
                    where = ", ".join(f"{r.mountpoint} (pid {r.pid})" for r in mounts)
                    raise StoreError(
                        f"image {image[7:19]} is mounted at {where}: umount it first, "
                        "or use --force (gc keeps its layers until the mount ends)"
                    )
                for table in ("tags", "repo_digests", "image_layers"):
                    c.execute(f"DELETE FROM {table} WHERE image = ?", (image,))
                c.execute("DELETE FROM images WHERE id = ?", (image,))
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        out.append(f"Deleted: {image}")
        return out

    # ---- gc --------------------------------------------------------------------------------

    def gc(self, dry_run: bool = False) -> GcReport:
        """Remove layers no image and no live mount uses, contents no layer uses, orphan files,
        stale temp dirs. The dry run counts exactly what the real one removes."""
        with self.exclusive():
            c = self.conn
            stale = len(list(self.tmp_dir.iterdir())) if self.tmp_dir.is_dir() else 0
            marker = self.tmp_dir / f"gc-{os.getpid()}"
            # Mounts register under pin_lock; holding it from the choice to the commit, no
            # mount can start on a layer gc is about to delete.
            with self._pins(lock=not dry_run) as pins:
                if not dry_run:
                    marker.mkdir(exist_ok=True)
                    c.execute("BEGIN IMMEDIATE")
                try:
                    unused = c.execute(
                        "SELECT id, diff_id FROM layers "
                        "WHERE id NOT IN (SELECT layer FROM image_layers) ORDER BY id"
                    ).fetchall()
                    kept = [(str(d), pins[str(d)]) for _, d in unused if str(d) in pins]
                    gone = [(int(i), str(d)) for i, d in unused if str(d) not in pins]
                    ids = [i for i, _ in gone]
                    dead = self._dead_contents(ids)
                    if not dry_run:
                        self._delete_layers(ids)
                        c.execute("COMMIT")
                except BaseException:
                    if not dry_run:
                        c.execute("ROLLBACK")
                    raise
            report = GcReport(
                [d for _, d in gone], len(dead), sum(n for _, n in dead), 0, stale, kept
            )
            if dry_run:
                report.orphans = self._remove_orphans(dry_run=True)
                return report
            crashpoint("gc-committed")
            for key, _ in dead:
                self.content_path(key).unlink(missing_ok=True)
            # Their tar-splits go with the layers (not counted as orphans: the dry run, made
            # while the layers were still known, could not count them so).
            for _, diff in gone:
                Path(self.tarsplit_str(diff)).unlink(missing_ok=True)
            report.orphans = self._remove_orphans(dry_run=False)
            for p in self.tmp_dir.iterdir():
                if p != marker:
                    shutil.rmtree(p, ignore_errors=True)
            shutil.rmtree(marker, ignore_errors=True)
            return report

    @contextlib.contextmanager
    def _pins(self, lock: bool = True) -> Iterator[dict[str, list[str]]]:
        """Under the pin lock (unless not `lock`: a dry run changes nothing): DiffID -> what
        keeps it (`mounted at MNT (pid N)`) for every live registered mount."""
        if self.missing:
            yield {}
            return
        with contextlib.ExitStack() as stack:
            if lock:
                stack.enter_context(containers.pin_lock(self.root))
            pins: dict[str, list[str]] = {}
            for rec in containers.live_records(self.root):
                for diff in rec.layers:
                    pins.setdefault(diff, []).append(f"mounted at {rec.mountpoint} (pid {rec.pid})")
            yield pins

    def _delete_layers(self, ids: list[int]) -> None:
        """Delete the rows of layers `ids` and drop the contents left unreferenced (inside the
        caller's transaction)."""
        c = self.conn
        for lid in ids:
            c.execute(
                "UPDATE contents SET refs = refs - (SELECT COUNT(*) FROM entries e "
                "WHERE e.layer = ? AND e.content = contents.key) "
                "WHERE key IN (SELECT content FROM entries WHERE layer = ? "
                "AND content IS NOT NULL)",
                (lid, lid),
            )
            c.execute("DELETE FROM entries WHERE layer = ?", (lid,))
            c.execute("DELETE FROM xattrs WHERE layer = ?", (lid,))
            c.execute("DELETE FROM layers WHERE id = ?", (lid,))
        c.execute("DELETE FROM contents WHERE refs <= 0")

    def _dead_contents(self, layer_ids: list[int]) -> list[tuple[str, int]]:
        """Contents whose every reference is in the given layers."""
        if not layer_ids:
            return []
        marks = ",".join("?" * len(layer_ids))
        rows = self.conn.execute(
            f"SELECT c.key, c.size FROM contents c WHERE c.refs <= (SELECT COUNT(*) FROM entries e "
            f"WHERE e.content = c.key AND e.layer IN ({marks})) AND c.key IN "
            f"(SELECT content FROM entries WHERE layer IN ({marks}) AND content IS NOT NULL)",
            (*layer_ids, *layer_ids),
        ).fetchall()
        return [(str(k), int(s)) for k, s in rows]

    # ---- fsck ------------------------------------------------------------------------------

    def fsck(self, full: bool = False) -> list[str]:
        """Check the store; return one line per problem ([] when healthy)."""
        with self.exclusive():
            self._recover_locked()
            return self._fsck_locked(full)

    def _fsck_locked(self, full: bool) -> list[str]:
        c = self.conn
        problems: list[str] = []
        for (res,) in c.execute("PRAGMA quick_check"):
            if res != "ok":
                problems.append(f"index: {res}")
        for key, refs, n in c.execute(
            "SELECT c.key, c.refs, (SELECT COUNT(*) FROM entries e WHERE e.content = c.key) "
            "FROM contents c"
        ):
            if refs != n:
                problems.append(f"content {key}: refcount {refs} but {n} entries use it")
        for (key,) in c.execute(
            "SELECT DISTINCT content FROM entries WHERE content IS NOT NULL "
            "AND content NOT IN (SELECT key FROM contents)"
        ):
            problems.append(f"content {key}: used by entries but not recorded")
        for key, size in c.execute("SELECT key, size FROM contents"):
            p = self.content_path(key)
            try:
                st = p.lstat()
            except FileNotFoundError:
                problems.append(f"content {key}: missing file")
                continue
            if st.st_size != size:
                problems.append(f"content {key}: size {st.st_size}, expected {size}")
            elif full and not self._hash_ok(key, p):
                problems.append(f"content {key}: data does not match its hash")
        known = {r[0] for r in c.execute("SELECT key FROM contents")}
        for key, path in self._content_files():
            if key not in known or path.parent.name != key[:2]:
                problems.append(f"orphan content file {path.relative_to(self.root)}")
        for lid, diff_id in c.execute(
            "SELECT id, diff_id FROM layers WHERE tarsplit = 1"
        ).fetchall():
            if not os.path.exists(self.tarsplit_str(diff_id)):
                problems.append(f"layer {diff_id}: missing tar-split file")
            elif full:
                h = hashlib.sha256()
                try:
                    for chunk in self.layer_tar(lid):
                        h.update(chunk)
                except (OSError, StoreError) as exc:
                    problems.append(f"layer {diff_id}: cannot rebuild its tar: {exc}")
                    continue
                if "sha256:" + h.hexdigest() != diff_id:
                    problems.append(f"layer {diff_id}: rebuilt tar does not match its DiffID")
        for p in self._split_orphans():
            problems.append(f"orphan tar-split file {p.relative_to(self.root)}")
        for lid, files, n in c.execute(
            "SELECT l.id, l.files, (SELECT COUNT(*) FROM entries e WHERE e.layer = l.id) "
            "FROM layers l"
        ):
            if files != n:
                problems.append(f"layer {lid}: {n} entries, expected {files}")
        for image, lid in c.execute(
            "SELECT image, layer FROM image_layers WHERE layer NOT IN (SELECT id FROM layers) "
            "OR image NOT IN (SELECT id FROM images)"
        ):
            problems.append(f"image {image}: dangling layer reference {lid}")
        for name, image in c.execute(
            "SELECT name, image FROM tags WHERE image NOT IN (SELECT id FROM images) UNION ALL "
            "SELECT name, image FROM repo_digests WHERE image NOT IN (SELECT id FROM images)"
        ):
            problems.append(f"name {name}: points to missing image {image}")
        for (image,) in c.execute("SELECT id FROM images").fetchall():
            cfg = self.image_config(image)
            want = list((cfg.get("rootfs") or {}).get("diff_ids") or [])
            have = [
                str(r[0])
                for r in c.execute(
                    "SELECT l.diff_id FROM image_layers il JOIN layers l ON l.id = il.layer "
                    "WHERE il.image = ? ORDER BY il.position",
                    (image,),
                )
            ]
            if want != have:
                problems.append(f"image {image}: layers do not match the config's DiffIDs")
        return problems

    @staticmethod
    def _hash_ok(key: str, path: Path) -> bool:
        h = xxhash.xxh3_128()
        size = 0
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        return key.split(".")[0] == f"{h.hexdigest()}-{size}"

    # ---- df --------------------------------------------------------------------------------

    def df(self) -> dict[str, int]:
        c = self.conn

        def one(sql: str) -> int:
            return int(c.execute(sql).fetchone()[0] or 0)

        images_logical = one(
            "SELECT SUM(l.logical_bytes) FROM image_layers il JOIN layers l ON l.id = il.layer"
        )
        layers_logical = one("SELECT SUM(logical_bytes) FROM layers")
        stored = one("SELECT SUM(size) FROM contents")
        return {
            "images": one("SELECT COUNT(*) FROM images"),
            "layers": one("SELECT COUNT(*) FROM layers"),
            "contents": one("SELECT COUNT(*) FROM contents"),
            "entries": one("SELECT COUNT(*) FROM entries"),
            "logical_bytes": images_logical,
            "layers_bytes": layers_logical,
            "stored_bytes": stored,
            "saved_by_layer_dedup": images_logical - layers_logical,
            "saved_by_file_dedup": layers_logical - stored,
            "index_bytes": 0 if self.missing else self.db_path.stat().st_size,
            "unused_layers": one(
                "SELECT COUNT(*) FROM layers WHERE id NOT IN (SELECT layer FROM image_layers)"
            ),
        }


def now() -> float:
    return time.time()
