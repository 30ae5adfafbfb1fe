"""A one-file FUSE filesystem whose reads wait for a gate: a lower layer that blocks on demand.

Run as a script: `gatefs.py MNT GATE STARTED`. GATE and STARTED are FIFOs. The file `slow`
(SIZE bytes of b"s") answers a read only after one byte arrives on GATE; before waiting, the
read writes one byte to STARTED, so a test knows the read is in progress. Served by layerfs'
own FUSE session (unionfs.fuse), with handlers of its own, until unmounted.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Mapping

import trio

from unionfs.fuse import mount
from unionfs.fuse import protocol as p
from unionfs.fuse.session import Handler, Later, Reply, Session

SIZE = 1 << 20
NAME = b"slow"
FILE_INO = p.ROOT_ID + 1
VALID = (1, 0)


def _attr(ino: int) -> tuple[int, ...]:
    if ino == p.ROOT_ID:
        mode, nlink, size = stat.S_IFDIR | 0o755, 2, 0
    else:
        mode, nlink, size = stat.S_IFREG | 0o644, 1, SIZE
    return (ino, size, 0, 0, 0, 0, 0, 0, 0, mode, nlink, 0, 0, 0, 4096, 0)


class GateFS:
    def __init__(self, gate: int, started_fd: int) -> None:
        self.gate = gate
        self.started_fd = started_fd
        self.lock = trio.Lock()

    def errno_of(self, exc: BaseException) -> int:
        return exc.errno if isinstance(exc, OSError) and exc.errno else errno.EIO

    def started(self, session: Session) -> None:
        pass

    def table(self) -> Mapping[int, tuple[Handler, bool]]:
        handlers: dict[int, Handler] = {
            p.Opcode.LOOKUP: self.lookup,
            p.Opcode.GETATTR: self.getattr,
            p.Opcode.OPEN: self.open,
            p.Opcode.READ: self.read,
            p.Opcode.RELEASE: self.ok,
            p.Opcode.READDIRPLUS: self.readdirplus,
            p.Opcode.FORGET: self.none,
            p.Opcode.BATCH_FORGET: self.none,
        }
        return {op: (fn, False) for op, fn in handlers.items()}

    def ok(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        return b""

    def none(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        return None

    def getattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        if nodeid not in (p.ROOT_ID, FILE_INO):
            raise OSError(errno.ENOENT, "no such inode")
        return p.attr_out(VALID, _attr(nodeid))

    def lookup(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        if nodeid != p.ROOT_ID or p.name(body) != NAME:
            raise OSError(errno.ENOENT, "no such name")
        return p.entry_out(FILE_INO, VALID, VALID, _attr(FILE_INO))

    def readdirplus(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        if p.decode_read(body).offset != 0:
            return b""
        entry = p.entry_out(FILE_INO, VALID, VALID, _attr(FILE_INO))
        return p.direntplus(entry, FILE_INO, 1, stat.S_IFREG >> 12, NAME)

    def open(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        if p.decode_open(body).flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EROFS, "read-only")
        return p.open_out(nodeid, 0)

    def read(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_read(body)
        raise Later(self._gated(req.offset, req.size))

    async def _gated(self, off: int, size: int) -> Reply:
        os.write(self.started_fd, b"r")
        await trio.to_thread.run_sync(os.read, self.gate, 1)
        return b"s" * max(0, min(size, SIZE - off))


def main() -> None:
    mnt, gate, started = sys.argv[1:4]
    fs = GateFS(os.open(gate, os.O_RDWR), os.open(started, os.O_RDWR))
    mounted = mount.mount(mnt, mount.parse(["fsname=gatefs", "subtype=gatefs", "ro"]))
    try:
        trio.run(Session(mounted.fd, fs).run)
    finally:
        mount.close(mounted, unmount_it=False)


if __name__ == "__main__":
    main()
