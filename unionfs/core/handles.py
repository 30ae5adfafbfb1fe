"""Open files and directories: host fds and stable directory listings, by handle number."""

from __future__ import annotations

import errno
import itertools
import os
from dataclasses import dataclass, field

from unionfs.core.errors import FsError
from unionfs.core.inodes import Node
from unionfs.core.types import Fh


@dataclass(eq=False)
class FileHandle:
    fd: int
    node: Node
    upper: bool  # fd is on the upper copy (else on a lower layer, read-only)
    flags: int
    # fds replaced after a copy-up; closed on release, since a read in a worker thread may
    # still use one
    stale: list[int] = field(default_factory=list)


@dataclass(eq=False)
class DirHandle:
    node: Node
    names: list[bytes] | None = None  # read at the first readdir, then kept while open


class HandleTable:
    def __init__(self) -> None:
        self.files: dict[Fh, FileHandle] = {}
        self.dirs: dict[Fh, DirHandle] = {}
        self._next = itertools.count(1)

    def add_file(self, h: FileHandle) -> Fh:
        fh = Fh(next(self._next))
        self.files[fh] = h
        return fh

    def add_dir(self, h: DirHandle) -> Fh:
        fh = Fh(next(self._next))
        self.dirs[fh] = h
        return fh

    def file(self, fh: Fh) -> FileHandle:
        try:
            return self.files[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def dir(self, fh: Fh) -> DirHandle:
        try:
            return self.dirs[fh]
        except KeyError:
            raise FsError(errno.EBADF) from None

    def pop_file(self, fh: Fh) -> FileHandle:
        h = self.file(fh)
        del self.files[fh]
        return h

    def pop_dir(self, fh: Fh) -> DirHandle:
        h = self.dir(fh)
        del self.dirs[fh]
        return h

    def any_fd(self, node: Node) -> int | None:
        for h in self.files.values():
            if h.node is node:
                return h.fd
        return None

    def any_upper(self, node: Node) -> bool:
        return any(h.node is node and h.upper for h in self.files.values())

    def close_all(self) -> None:
        for h in self.files.values():
            for fd in (h.fd, *h.stale):
                os.close(fd)
        self.files.clear()
        self.dirs.clear()
