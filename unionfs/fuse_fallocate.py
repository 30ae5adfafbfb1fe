"""fallocate(2) through the mount (preallocate, punch holes, zero ranges), which pyfuse3 3.5
has no handler for."""

from __future__ import annotations

import ctypes
import errno
import logging
from collections.abc import Callable

import pyfuse3

from unionfs.core.errors import FsError
from unionfs.fuse_got import GotSlot, address

log = logging.getLogger("layerfs")

# Why: without a FALLOCATE handler libfuse answers ENOSYS and the kernel refuses every
# fallocate(2) on the mount with EOPNOTSUPP from then on — no hole punching, no
# preallocation, where kernel overlayfs passes them to the upper filesystem.
#
# How: pyfuse3 hands libfuse its table of request handlers (`struct fuse_lowlevel_ops`,
# libfuse 3.14's layout: 44 pointers, `fallocate` the 41st) in its one call to
# `fuse_session_new`, which copies it. We redirect that call (fuse_got) to a function that
# passes a copy of the table with our handler filled in, then put the slot back. The
# handler runs synchronously in the loop's thread, as the request is processed, answers
# with fuse_reply_err (0 for success), and never raises into libfuse.
_OPS_SIZE = 44 * 8
_FALLOCATE_AT = 40 * 8
_READDIRPLUS_AT = 41 * 8
_FI_FH_AT = 16  # struct fuse_file_info: int flags, two words of bits, then uint64_t fh

_HANDLER = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p,  # fuse_req_t
    ctypes.c_uint64,  # fuse_ino_t
    ctypes.c_int,  # mode
    ctypes.c_int64,  # offset
    ctypes.c_int64,  # length
    ctypes.c_void_p,  # struct fuse_file_info *
)
_SESSION_NEW = ctypes.CFUNCTYPE(
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p
)

# What the handler does: (fh, mode, offset, length) -> None, raising OSError or FsError.
Allocate = Callable[[int, int, int, int], None]


class Fallocate:
    def __init__(self, allocate: Allocate) -> None:
        self.allocate = allocate
        self.installed = False  # the session was made with our handler
        self.session: int | None = None  # libfuse's struct fuse_session *, once made
        self._slot: GotSlot | None = None
        self._hook = _SESSION_NEW(self._session_new)
        self._handler = _HANDLER(self._fallocate)
        self._ops = ctypes.create_string_buffer(_OPS_SIZE)
        libfuse = ctypes.CDLL("libfuse3.so.3")
        self._real_new = _SESSION_NEW(address(libfuse.fuse_session_new))
        self._reply_err = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_int)(
            address(libfuse.fuse_reply_err)
        )

    def prepare(self) -> bool:
        """Before pyfuse3.init: its next fuse_session_new gets our handler. False when this
        pyfuse3 is not the one we know (fallocate then stays EOPNOTSUPP)."""
        if pyfuse3.__version__ != "3.5.0":
            return False
        self._slot = GotSlot.find(pyfuse3.__file__, b"fuse_session_new", address(self._real_new))
        if self._slot is None:
            return False
        self._slot.point(address(self._hook))
        return True

    def _session_new(self, args: int, ops: int, size: int, userdata: int) -> int:
        if self._slot is not None:
            self._slot.restore()
        try:
            table = ctypes.string_at(ops, size) if ops else b""
            fallocate = int.from_bytes(table[_FALLOCATE_AT : _FALLOCATE_AT + 8], "little")
            readdirplus = int.from_bytes(table[_READDIRPLUS_AT : _READDIRPLUS_AT + 8], "little")
            if size == _OPS_SIZE and fallocate == 0 and readdirplus != 0:
                ctypes.memmove(self._ops, table, size)
                handler = address(self._handler).to_bytes(8, "little")
                ctypes.memmove(ctypes.addressof(self._ops) + _FALLOCATE_AT, handler, 8)
                ops = ctypes.addressof(self._ops)
                self.installed = True
            else:
                log.debug("fallocate: pyfuse3's handler table is not the one we know")
        except Exception:  # pragma: no cover - must not raise into libfuse
            log.exception("fallocate: setting up the handler failed")
        session = int(self._real_new(args, ops, size, userdata) or 0)
        self.session = session or None
        return session

    def _fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: int) -> None:
        err = 0
        try:
            fh = ctypes.c_uint64.from_address(fi + _FI_FH_AT).value
            self.allocate(fh, mode, offset, length)
        except FsError as exc:
            err = exc.errno
        except OSError as exc:
            err = exc.errno or errno.EIO
        except Exception:
            log.exception("unexpected error in fallocate, answering EIO")
            err = errno.EIO
        self._reply_err(req, err)
