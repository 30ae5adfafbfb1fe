"""Bounded parallel layer downloads for a pull, read back in order by the verifying import.

The importer reads layers one after another. While it reads one, up to `jobs` worker threads
download that and the following missing blobs into spool files in STORE/tmp (removed when the
pull ends; a killed pull leaves them to the store's recovery). The importer reads each spool as
it grows, so the layer being imported still streams, and it hashes every byte exactly as from
any other source: a spool is only a buffer, nothing in it is trusted. A failed or cancelled
pull stops the workers between chunks.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any

from .errors import StoreError
from .registry import CHUNK, RegistryClient
from .sources import SourceImage


class _Cancelled(Exception):
    pass


class _Job:
    """One blob being downloaded into a spool file; `cond` guards the counters."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.cond = threading.Condition()
        self.written = 0
        self.done = False
        self.error: BaseException | None = None


class Prefetcher:
    """Downloads the blobs of `image` the store lacks, `jobs` at a time, in layer order."""

    def __init__(self, client: RegistryClient, spool_parent: Path, jobs: int) -> None:
        self.client = client
        self.dir = Path(tempfile.mkdtemp(prefix="pull-", dir=spool_parent))
        self.pool = ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="pull")
        self.jobs: dict[str, _Job] = {}
        self.cancelled = threading.Event()

    def start(self, image: SourceImage, have: set[str]) -> None:
        """Queue every layer whose DiffID is not in `have`, and point its opener at the spool."""
        for lref in image.layers:
            digest = lref.digest
            if digest is None or lref.diff_id in have:
                continue
            if digest not in self.jobs:
                job = _Job(self.dir / digest.removeprefix("sha256:"))
                self.jobs[digest] = job
                self.pool.submit(self._download, digest, job)
            lref.opener = lambda d=digest: self.open(d)  # type: ignore[misc]

    def _download(self, digest: str, job: _Job) -> None:
        try:
            if self.cancelled.is_set():
                raise _Cancelled
            with self.client.open_blob(digest) as src, open(job.path, "xb") as out:
                while chunk := src.read(CHUNK):
                    if self.cancelled.is_set():
                        raise _Cancelled
                    out.write(chunk)
                    out.flush()
                    with job.cond:
                        job.written += len(chunk)
                        job.cond.notify_all()
        except BaseException as exc:  # handed to the reader, which raises it in the importer
            job.error = exc
        finally:
            with job.cond:
                job.done = True
                job.cond.notify_all()

    def open(self, digest: str) -> IO[bytes]:
        return io.BufferedReader(_SpoolReader(self.jobs[digest]), buffer_size=CHUNK)

    def close(self) -> None:
        self.cancelled.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _SpoolReader(io.RawIOBase):
    """Reads a spool file while its download writes it; raises the download's error."""

    def __init__(self, job: _Job) -> None:
        super().__init__()
        self.job = job
        self.pos = 0
        self.fd: int | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        job = self.job
        with job.cond:
            while self.pos >= job.written and not job.done:
                job.cond.wait()
            avail = job.written - self.pos
            err = job.error
        if avail <= 0:
            if err is None:
                return 0
            if isinstance(err, StoreError):
                raise err
            if isinstance(err, OSError):
                raise OSError(str(err)) from None
            raise OSError(f"download failed: {err}") from None
        if self.fd is None:
            self.fd = os.open(job.path, os.O_RDONLY)
        view = memoryview(buf).cast("B")
        data = os.pread(self.fd, min(len(view), avail), self.pos)
        view[: len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            with contextlib.suppress(OSError):
                self.job.path.unlink()  # read through: the importer has what it needs
        super().close()
