"""Stat-ahead: a worker thread that brings the inodes of a lower directory into the host's
cache while the directory's entries are being looked up one request at a time."""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Sequence

# Why: a lookup of a lower name, after the caches were dropped, waits for the disk to read
# the name's inode (one lstat), between two round trips through the kernel; a `stat` of
# every file of a directory pays that wait once per file, serially. fuse-overlayfs reads a
# directory whole, stat and all, at its first lookup there (one sweep in C). Once we list a
# lower directory (its merged index, or a listing), this thread lstat()s its entries in the
# background, so the lookups that follow find the inodes cached and the disk works while we
# answer requests. Nothing it does is seen: it only warms the host's inode cache.
#
# Bounds: a directory of more than MAX_NAMES entries is left alone (a few lookups in a huge
# directory should not read it all), at most MAX_JOBS directories wait (older ones are
# dropped), and the thread is a daemon thread holding only duplicated directory fds.
MAX_NAMES = 20_000
MAX_JOBS = 64


class StatAhead:
    def __init__(self) -> None:
        self._jobs: collections.deque[tuple[int, Sequence[bytes]]] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, dir_fd: int, names: Sequence[bytes]) -> None:
        """lstat `names` in the directory open as `dir_fd` (not kept: duplicated here), soon."""
        if not names or len(names) > MAX_NAMES:
            return
        fd = os.dup(dir_fd)
        with self._cv:
            self._jobs.append((fd, names))
            while len(self._jobs) > MAX_JOBS:
                os.close(self._jobs.popleft()[0])
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="statahead", daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                fd, names = self._jobs.popleft()
            try:
                for name in names:
                    try:  # noqa: SIM105 - a context manager per name costs more than the lstat
                        os.lstat(name, dir_fd=fd)
                    except OSError:
                        pass  # a whiteout's name, or anything odd: the lookup will tell
            finally:
                os.close(fd)
