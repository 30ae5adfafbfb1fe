"""FUSE passthrough (Linux 6.9+): host files registered on our device fd, so the kernel reads
and writes them itself."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import sys
from pathlib import Path

from unionfs.fuse import protocol as p

log = logging.getLogger("layerfs")

# Why: with passthrough, read(2), write(2) and mmap of a file opened through the mount go
# straight to its host file: no READ or WRITE request reaches the daemon, and no second page
# cache holds the data. The session asks for it in its INIT reply (FUSE_PASSTHROUGH with a
# stack depth); an OPEN or CREATE reply then names a host file registered here. The kernel
# allows this only to a daemon with CAP_SYS_ADMIN.

ENV = "LAYERFS_PASSTHROUGH"  # "0" turns passthrough off (for comparisons)
_CAP_SYS_ADMIN = 21


def wanted() -> bool:
    """Should the session ask for passthrough? Only a daemon the kernel would allow it."""
    if os.environ.get(ENV) == "0":
        return False
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return False


class Backing:
    """The backing files of one connection (FUSE_DEV_IOC_BACKING_OPEN/CLOSE on `fuse_fd`)."""

    def __init__(self, fuse_fd: int) -> None:
        self.fuse_fd = fuse_fd
        self.usable = True  # until the kernel refuses for good

    def open(self, fd: int) -> int | None:
        """Register host file `fd`; its backing id, or None when this file (or, for good, this
        connection) cannot be passed through."""
        if not self.usable:
            return None
        arg = bytearray(p.backing_map(fd))
        try:
            return int(fcntl.ioctl(self.fuse_fd, p.DEV_IOC_BACKING_OPEN, arg, True))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
                log.info("passthrough refused by the kernel (%s): serving data ourselves", exc)
                self.usable = False
            else:  # e.g. ELOOP: a host file on a stacked filesystem
                log.debug("passthrough: cannot pass fd %d through: %s", fd, exc)
            return None

    def close(self, backing_id: int) -> None:
        arg = bytearray(backing_id.to_bytes(4, sys.byteorder))
        try:
            fcntl.ioctl(self.fuse_fd, p.DEV_IOC_BACKING_CLOSE, arg, True)
        except OSError as exc:
            log.debug("passthrough: closing backing id %d: %s", backing_id, exc)
