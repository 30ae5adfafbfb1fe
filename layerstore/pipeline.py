"""Worker threads of an import: read-ahead (read, hash, decompress), content writes, links.

An import is one Python thread parsing tar headers and indexing entries, and work that spends
its time in C code or in the kernel with the GIL released: reading, SHA-256 and zlib/zstd on
the blob, creating the content files, and at commit linking them into the store and dropping
the staged names. Doing that in worker threads lets a second core do it while the parser runs.
The helpers keep memory bounded (a fixed number of chunks or batches of files in flight), hand
any exception of a worker to the calling thread, and stop their workers on close, whatever
happened.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .blobs import CHUNK, Readable

AHEAD = 8  # chunks of CHUNK bytes decompressed ahead of the parser
IN_FLIGHT = 8  # batches of content files queued for writing
WRITERS = 2  # file creation scales on ext4/xfs across directories (a store shards by key)
PARALLEL_MIN = 512  # fewer links than this are done in the calling thread
BATCH = 32  # files per batch (one queue operation, one thread switch)
BATCH_BYTES = 1 << 20  # ... or fewer when they add up to this many bytes

_EOF = object()


class ReadAhead:
    """Reads `src` in a worker thread, CHUNK bytes at a time, at most AHEAD chunks ahead of
    the reader. `read(n)` returns at most n bytes; b"" once `src` is exhausted. An exception
    raised by `src.read` is raised by the `read` that reaches its position in the stream.

    `count()`, sampled by the worker after each read, is passed back to `progress(delta)` in
    the reading thread (the worker never calls out, so progress output stays single-threaded).
    Call `close()` when done (also after an error): it stops and joins the worker; `src` is
    not touched after close returns.
    """

    def __init__(
        self,
        src: Readable,
        count: Callable[[], int] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        self._src = src
        self._count = count
        self._progress = progress
        self._done = 0
        self._q: queue.Queue[object] = queue.Queue(maxsize=AHEAD)
        self._stop = threading.Event()
        self._buf = b""
        self._off = 0
        self._eof = False
        self._thread = threading.Thread(target=self._work, name="layerfs-read", daemon=True)
        self._thread.start()

    def _put(self, item: object) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.5)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        try:
            while not self._stop.is_set():
                data = self._src.read(CHUNK)
                if not data:
                    self._put(_EOF)
                    return
                if not self._put((data, self._count() if self._count else 0)):
                    return
        except BaseException as exc:  # handed to the reading thread, raised there
            self._put(exc)

    def read(self, n: int = -1, /) -> bytes:
        want = n if n >= 0 else CHUNK
        if want == 0:
            return b""
        while self._off >= len(self._buf):
            if self._eof:
                return b""
            item = self._q.get()
            if item is _EOF:
                self._eof = True
                self._thread.join()
                return b""
            if isinstance(item, BaseException):
                self._eof = True
                self._thread.join()
                raise item
            assert isinstance(item, tuple)
            self._buf, count = item
            self._off = 0
            if self._progress is not None and count > self._done:
                self._progress(count - self._done)
                self._done = count
        if self._off == 0 and want >= len(self._buf):
            self._off = len(self._buf)
            return self._buf
        data = self._buf[self._off : self._off + want]
        self._off += len(data)
        return data

    def close(self) -> None:
        """Stop the worker (it ends after its current read) and wait for it."""
        self._stop.set()
        while self._thread.is_alive():
            try:
                while True:
                    self._q.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=0.05)
        self._buf, self._off, self._eof = b"", 0, True


Job = tuple[str, str, bytes, str]  # (key, path to create, bytes, path that may hold them)


class ContentWriter:
    """Creates content files (O_EXCL, mode 0444) in a worker thread, in order, unless the
    same bytes are already in another file.

    `write(key, path, data, have)`: if the file `have` exists and holds exactly `data`, `key`
    goes into `found` and nothing is written; otherwise `path` is created with `data`. While a
    job is queued or being done, `pending(path)` gives its bytes (so a caller can compare
    against a file that may not be on disk yet); `key` is in `found` before `pending(path)`
    forgets it. The first error of the worker is raised by the next `write`, `check` or
    `close`; jobs after it are not done. `close()` waits for every queued job; `abort()` drops
    what is still queued. Either joins the worker.
    """

    def __init__(self) -> None:
        self._q: queue.Queue[list[Job] | None] = queue.Queue(maxsize=IN_FLIGHT)
        self._pending: dict[str, bytes] = {}
        self.found: set[str] = set()
        self._batch: list[Job] = []
        self._batch_bytes = 0
        self._error: BaseException | None = None
        self._drop = False
        self._threads = [
            threading.Thread(target=self._work, name=f"layerfs-write-{i}", daemon=True)
            for i in range(WRITERS)
        ]
        for t in self._threads:
            t.start()

    def _work(self) -> None:
        while True:
            batch = self._q.get()
            if batch is None:
                return
            for key, path, data, have in batch:
                if self._error is None and not self._drop:
                    try:
                        if _holds(have, data):
                            self.found.add(key)
                        else:
                            _create(path, data)
                    except BaseException as exc:  # handed to the submitting thread
                        self._error = exc
                self._pending.pop(path, None)

    def pending(self, path: str) -> bytes | None:
        return self._pending.get(path)

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def write(self, key: str, path: str, data: bytes, have: str) -> None:
        self.check()
        self._pending[path] = data
        self._batch.append((key, path, data, have))
        self._batch_bytes += len(data)
        if len(self._batch) >= BATCH or self._batch_bytes >= BATCH_BYTES:
            self._send()

    def _send(self) -> None:
        if self._batch:
            self._q.put(self._batch)
            self._batch = []
            self._batch_bytes = 0

    def close(self) -> None:
        """Wait until every queued file is written; raise the worker's error if it had one."""
        self._send()
        self._stop()
        self.check()

    def _stop(self) -> None:
        for _ in self._threads:
            self._q.put(None)  # one each; a worker takes one and ends
        for t in self._threads:
            t.join()
        self._threads = []

    def abort(self) -> None:
        """Stop without writing what is still queued (after a failure elsewhere)."""
        self._drop = True
        self._batch = []
        self._stop()  # the workers skip the rest, so the queue drains


def _holds(path: str, data: bytes) -> bool:
    """True if the file at `path` exists and holds exactly `data`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        if os.fstat(fd).st_size != len(data):
            return False
        got = bytearray()
        while len(got) <= len(data):
            chunk = os.read(fd, len(data) + 1 - len(got))
            if not chunk:
                break
            got += chunk
        return got == data
    finally:
        os.close(fd)


def _create(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def link_all(pairs: list[tuple[str, str]]) -> list[OSError | None]:
    """os.link(src, dst) for each pair, by WRITERS threads when there are many; the result of
    each (None or its error), in order. Every pair is tried whatever the others gave."""
    if len(pairs) < PARALLEL_MIN:
        return _link_some(pairs)
    step = max(256, -(-len(pairs) // (4 * WRITERS)))
    chunks = [pairs[i : i + step] for i in range(0, len(pairs), step)]
    with ThreadPoolExecutor(WRITERS, thread_name_prefix="layerfs-link") as ex:
        return [r for part in ex.map(_link_some, chunks) for r in part]


def _link_some(pairs: list[tuple[str, str]]) -> list[OSError | None]:
    out: list[OSError | None] = []
    for src, dst in pairs:
        try:
            os.link(src, dst)
            out.append(None)
        except OSError as exc:
            out.append(exc)
    return out


class Unlinker:
    """Removes files in a worker thread (a staging area's names, once linked elsewhere) while
    the caller goes on; `join()` waits for it. Errors are ignored: what is left goes with the
    staging directory."""

    def __init__(self, paths: list[str]) -> None:
        self._thread = threading.Thread(
            target=_unlink_all, args=(paths,), name="layerfs-unlink", daemon=True
        )
        self._thread.start()

    def join(self) -> None:
        self._thread.join()


def _unlink_all(paths: list[str]) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            os.unlink(p)
