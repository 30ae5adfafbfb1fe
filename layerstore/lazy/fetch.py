"""Fetch a lazy layer's chunks by HTTP Range, verify each, and keep it as store content.

`ChunkFetcher.fetch(chunk)` is called from worker threads (the mount daemon's): concurrent
calls for one chunk make one request; the bytes are decompressed into a temporary file of
the store, hashed, and only if their SHA-256 is the chunk's digest linked into `content/`
under the store's usual key (xxh3-128 + size) and recorded in the index with no references
yet (a later pull that needs the same bytes finds them; `gc` drops them when unused). A
mismatch raises ChunkError and leaves nothing. A connection that fails or is cut is retried
a bounded number of times with exponential backoff; an expired bearer token is renewed by
the registry client.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import httpx
import xxhash

from ..blobs import DecompressingReader, Readable
from ..errors import LayerError
from ..registry import RegistryClient, RegistryError, RegistryUnreachable
from ..store import Store, same_bytes
from .model import Chunk, LazyFile, LazyLayer

RETRIES = 4  # further attempts of one request after a transient failure
BACKOFF = 0.2  # seconds before the first retry; doubled each time, with jitter
MAX_BACKOFF = 5.0
PIECE = 1 << 16
_RETRY_STATUS = {408, 429, 500, 502, 503, 504}

T = TypeVar("T")


class ChunkError(LayerError):
    """A chunk's bytes do not match its digest (or do not decode): nothing was kept."""


class Transient(Exception):
    """A failure worth retrying: connection refused, reset or cut short, a 5xx answer."""


class RangeSource(Protocol):
    """Random access to one blob's bytes."""

    def read_at(self, offset: int, length: int) -> bytes: ...

    def open_range(self, offset: int, end: int) -> contextlib.AbstractContextManager[Readable]:
        """A reader of blob bytes [offset, end); it raises Transient if they stop early."""
        ...


def retry(op: Callable[[], T], retries: int, backoff: float, what: str) -> T:
    """`op()`, again after each Transient failure, at most `retries` more times."""
    for attempt in itertools.count():
        try:
            return op()
        except (Transient, RegistryUnreachable) as exc:
            if attempt >= retries:
                raise RegistryError(f"{what}: failed after {retries} retries: {exc}") from None
            delay = min(backoff * (2**attempt), MAX_BACKOFF)
            time.sleep(delay * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")  # pragma: no cover


class FileSource:
    """A blob in a local file (a layout on disk, tests)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def read_at(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as f:
            return os.pread(f.fileno(), length, offset)

    @contextlib.contextmanager
    def open_range(self, offset: int, end: int) -> Iterator[Readable]:
        with open(self.path, "rb") as f:
            f.seek(offset)
            yield _Limited(f, end - offset)


class _Limited:
    def __init__(self, src: Readable, left: int) -> None:
        self._src = src
        self._left = left

    def read(self, n: int = -1, /) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        data = self._src.read(n) if n else b""
        self._left -= len(data)
        return data


class RegistrySource:
    """A registry blob read by HTTP Range requests through `client` (auth, token renewal)."""

    def __init__(
        self,
        client: RegistryClient,
        digest: str,
        size: int,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
    ) -> None:
        self.client = client
        self.digest = digest
        self.size = size
        self.retries = retries
        self.backoff = backoff
        self.path = f"/v2/{client.ref.repo}/blobs/{digest}"
        self._count_lock = threading.Lock()
        self.requests = 0
        self.received = 0  # blob bytes read from responses

    def read_at(self, offset: int, length: int) -> bytes:
        """Blob bytes [offset, offset + length), retried (the TOC, the footer)."""

        def once() -> bytes:
            with self.open_range(offset, offset + length) as r:
                buf = bytearray()
                while len(buf) < length:
                    more = r.read(length - len(buf))
                    if not more:
                        raise Transient(f"short read at {offset + len(buf)}")
                    buf += more
                return bytes(buf)

        return retry(once, self.retries, self.backoff, f"blob {self.digest}")

    @contextlib.contextmanager
    def open_range(self, offset: int, end: int) -> Iterator[Readable]:
        if not 0 <= offset < end <= self.size:
            raise LayerError(
                f"blob {self.digest}: range {offset}-{end} outside its {self.size} bytes"
            )
        headers = {"Range": f"bytes={offset}-{end - 1}", "Accept-Encoding": "identity"}
        with self._count_lock:
            self.requests += 1
        resp = self.client.request("GET", self.path, headers, stream=True)
        try:
            if resp.status_code in _RETRY_STATUS:
                raise Transient(f"the registry answered {resp.status_code} {resp.reason_phrase}")
            self.client.check(resp, f"blob {self.digest} of {self.client.ref.name}")
            skip = 0
            if resp.status_code == 206:
                got = resp.headers.get("Content-Range", "")
                if not got.startswith(f"bytes {offset}-{end - 1}/"):
                    raise RegistryError(
                        f"blob {self.digest}: asked for bytes {offset}-{end - 1}, got {got!r}"
                    )
            else:
                skip = offset  # Range ignored: the whole blob comes, read up to our bytes
            yield _RangeBody(self, resp, skip, end - offset)
        finally:
            resp.close()


class _RangeBody:
    """The body of a range response: exactly `want` bytes after `skip`, else Transient."""

    def __init__(self, src: RegistrySource, resp: httpx.Response, skip: int, want: int) -> None:
        self._src = src
        self._it = resp.iter_bytes()
        self._skip = skip
        self._left = want
        self._want = want
        self._pending = b""

    def read(self, n: int = -1, /) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        if n == 0:
            return b""
        while not self._pending:
            try:
                piece = next(self._it)
            except StopIteration:
                got = self._want - self._left
                raise Transient(f"connection closed after {got} of {self._want} bytes") from None
            except httpx.TransportError as exc:
                raise Transient(str(exc) or type(exc).__name__) from None
            with self._src._count_lock:
                self._src.received += len(piece)
            if self._skip:
                k = min(self._skip, len(piece))
                self._skip -= k
                piece = piece[k:]
            self._pending = piece
        out, self._pending = self._pending[:n], self._pending[n:]
        self._left -= len(out)
        return out


def decode_chunk(
    raw: Readable, compression: str, chunk: Chunk, out: Callable[[bytes], None], what: str
) -> None:
    """Decompress a chunk's compressed bytes, hand its `size` bytes to `out` piece by piece,
    and raise ChunkError unless their SHA-256 is the chunk's digest. (`out` sees bytes before
    the check: it must keep them aside until this returns.) Memory stays bounded by PIECE."""
    h = hashlib.sha256()
    try:
        if chunk.zeros:
            src: Readable = _Zeros(chunk.size)
        else:
            src = DecompressingReader(raw, compression, what)
            skip = chunk.inner
            while skip:
                got = src.read(min(skip, PIECE))
                if not got:
                    raise ChunkError(f"{what}: stream ends before the chunk")
                skip -= len(got)
        left = chunk.size
        while left:
            piece = src.read(min(left, PIECE))
            if not piece:
                raise ChunkError(f"{what}: stream ends {left} bytes before the chunk's end")
            h.update(piece)
            out(piece)
            left -= len(piece)
    except ChunkError:
        raise
    except LayerError as exc:  # corrupt or truncated compressed data
        raise ChunkError(str(exc)) from None
    got_dg = "sha256:" + h.hexdigest()
    if got_dg != chunk.digest:
        raise ChunkError(f"{what}: digest {got_dg} does not match the TOC's {chunk.digest}")


class _Zeros:
    def __init__(self, n: int) -> None:
        self._left = n

    def read(self, n: int = -1, /) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return bytes(n)


class ContentSink:
    """Puts verified bytes into a store's content, under the store's key, atomically: a temp
    file in STORE/tmp, linked into content/ (never overwriting: a taken key with other bytes
    gets `.<n>`), then recorded with refs 0. Usable from any thread. While open it holds the
    store's shared lock, as a mount does: gc and recovery wait, so neither removes a temp
    file or an unreferenced content in use."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._n = itertools.count()
        self._db_lock = threading.Lock()
        self._lockf = open(store.root / "lock", "a+b")  # noqa: SIM115 - closed by close()
        fcntl.flock(self._lockf, fcntl.LOCK_SH)
        # Its own connection: the Store's belongs to the thread that opened it.
        self._conn = sqlite3.connect(
            store.db_path, timeout=60, isolation_level=None, check_same_thread=False
        )
        self._conn.execute("PRAGMA synchronous = NORMAL")

    def close(self) -> None:
        self._conn.close()
        self._lockf.close()  # releases the shared lock

    def __enter__(self) -> ContentSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, key: str, size: int) -> None:
        with self._db_lock, self.store.commit_lock():
            self._conn.execute(
                "INSERT INTO contents (key, size, refs) VALUES (?, ?, 0) "
                "ON CONFLICT(key) DO NOTHING",
                (key, size),
            )

    @contextlib.contextmanager
    def writing(self) -> Iterator[_Staged]:
        tmp = self.store.tmp_dir / f"lazy-{os.getpid()}-{threading.get_ident()}-{next(self._n)}"
        staged = _Staged(self, tmp)
        try:
            yield staged
        finally:
            staged.f.close()
            tmp.unlink(missing_ok=True)


class _Staged:
    """One content being written: `write()` the bytes, then `place()` once verified."""

    def __init__(self, sink: ContentSink, tmp: Path) -> None:
        self.sink = sink
        self.tmp = tmp
        self.f = open(tmp, "xb")  # noqa: SIM115 - closed by ContentSink.writing
        self.h = xxhash.xxh3_128()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.f.write(data)
        self.h.update(data)
        self.size += len(data)

    def place(self) -> str:
        """Link the file into content/ and record it; return its key."""
        self.f.close()
        os.chmod(self.tmp, 0o444)
        base = f"{self.h.hexdigest()}-{self.size}"
        st = self.sink.store
        for n in itertools.count():
            key = base if n == 0 else f"{base}.{n}"
            dst = st.content_path(key)
            if not dst.parent.is_dir():
                dst.parent.mkdir(exist_ok=True)
                st.adopt([dst.parent])
            try:
                os.link(self.tmp, dst)
                st.adopt([dst])
            except FileExistsError:
                if not same_bytes(self.tmp, dst):
                    continue
            break
        self.sink.record(key, self.size)
        return key


@dataclass
class _Flight:
    done: threading.Event
    key: str | None = None
    error: BaseException | None = None


class ChunkFetcher:
    """Verified chunks of one lazy layer, each fetched once, kept as store content."""

    def __init__(
        self,
        layer: LazyLayer,
        source: RangeSource,
        sink: ContentSink,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
    ) -> None:
        self.layer = layer
        self.source = source
        self.sink = sink
        self.retries = retries
        self.backoff = backoff
        self._lock = threading.Lock()
        self._flights: dict[Chunk, _Flight] = {}
        self._keys: dict[Chunk, str] = {}  # chunks already in the store
        self.fetches = 0  # chunks fetched (not served from an earlier fetch)

    def fetch(self, chunk: Chunk, what: str = "chunk") -> str:
        """The content key of the chunk's verified bytes, fetching them if not yet done.
        ChunkError on a digest mismatch, RegistryError when the registry fails for good."""
        with self._lock:
            key = self._keys.get(chunk)
            if key is not None:
                return key
            flight = self._flights.get(chunk)
            mine = flight is None
            if flight is None:
                flight = self._flights[chunk] = _Flight(threading.Event())
        if not mine:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.key is not None
            return flight.key
        try:
            key = retry(lambda: self._once(chunk, what), self.retries, self.backoff, what)
            flight.key = key
            with self._lock:
                self._keys[chunk] = key
            return key
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                del self._flights[chunk]
            flight.done.set()

    def _once(self, chunk: Chunk, what: str) -> str:
        with self.sink.writing() as staged:
            if chunk.zeros:
                decode_chunk(_Zeros(0), self.layer.compression, chunk, staged.write, what)
            else:
                with self.source.open_range(chunk.offset, chunk.end) as raw:
                    decode_chunk(raw, self.layer.compression, chunk, staged.write, what)
            key = staged.place()
        with self._lock:
            self.fetches += 1
        return key

    def read(self, lf: LazyFile, offset: int, length: int) -> bytes:
        """File bytes [offset, offset + length) (fewer at the end of the file), every chunk
        they touch fetched and verified first."""
        out = bytearray()
        end = min(offset + length, lf.size)
        for c in lf.chunks_for(offset, end - offset):
            key = self.fetch(c, f"{lf.path.decode(errors='replace')} chunk at {c.file_offset}")
            lo, hi = max(offset, c.file_offset), min(end, c.file_offset + c.size)
            with open(self.sink.store.content_path(key), "rb") as f:
                out += os.pread(f.fileno(), hi - lo, lo - c.file_offset)
        return bytes(out)
