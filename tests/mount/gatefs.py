"""A one-file FUSE filesystem whose reads wait for a gate: a lower layer that blocks on demand.

Run as a script: `gatefs.py MNT GATE STARTED`. GATE and STARTED are FIFOs. The file `slow`
(SIZE bytes of b"s") answers a read only after one byte arrives on GATE; before waiting, the
read writes one byte to STARTED, so a test knows the read is in progress. Serves until
unmounted.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio

SIZE = 1 << 20
NAME = b"slow"
FILE_INO = pyfuse3.ROOT_INODE + 1


class GateFS(pyfuse3.Operations):
    def __init__(self, gate: int, started: int) -> None:
        super().__init__()
        self.gate = gate
        self.started = started

    def _attr(self, inode: int) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
            a.st_nlink = 2
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_nlink = 1
            a.st_size = SIZE
        a.st_blksize = 4096
        return a

    async def getattr(self, inode: int, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if inode not in (pyfuse3.ROOT_INODE, FILE_INO):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(inode)

    async def lookup(self, parent: int, name: bytes, ctx: Any = None) -> pyfuse3.EntryAttributes:
        if parent != pyfuse3.ROOT_INODE or name != NAME:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(FILE_INO)

    async def opendir(self, inode: int, ctx: Any) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, NAME, self._attr(FILE_INO), 1)

    async def open(self, inode: int, flags: int, ctx: Any) -> pyfuse3.FileInfo:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EROFS)
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        os.write(self.started, b"r")
        await trio.to_thread.run_sync(os.read, self.gate, 1)
        return b"s" * max(0, min(size, SIZE - off))


def main() -> None:
    mnt, gate, started = sys.argv[1:4]
    ops = GateFS(os.open(gate, os.O_RDWR), os.open(started, os.O_RDWR))
    pyfuse3.init(ops, mnt, {"fsname=gatefs", "ro"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=False)


if __name__ == "__main__":
    main()
