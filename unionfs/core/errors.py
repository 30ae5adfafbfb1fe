"""Domain errors of the union engine: every failure is an FsError carrying an errno."""

from __future__ import annotations

import errno as _errno
import os


class FsError(Exception):
    """A filesystem call failed with `errno`; the adapter turns it into the caller's errno."""

    def __init__(self, errno: int, message: str = "") -> None:
        super().__init__(errno, message or os.strerror(errno))
        self.errno = errno

    @classmethod
    def from_os(cls, exc: OSError) -> FsError:
        return cls(exc.errno if exc.errno is not None else _errno.EIO, str(exc))


def enoent() -> FsError:
    return FsError(_errno.ENOENT)
