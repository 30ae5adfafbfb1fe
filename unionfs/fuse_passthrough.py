"""FUSE passthrough (Linux 6.9+): the kernel reads and writes an open file's host file itself."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import struct
from pathlib import Path

import pyfuse3

from unionfs.fuse_got import GotSlot, address, loaded_library

log = logging.getLogger("layerfs")

# Why: with passthrough, read(2), write(2) and mmap of a file opened through the mount go
# straight to the host file (the upper copy, or a lower file of a read-only mount): no
# request reaches this daemon, no second page cache holds the data. Data then moves at the
# host filesystem's speed, which no daemon in any language reaches by answering READ and
# WRITE requests.
#
# How: the kernel enables passthrough for a connection when the INIT reply carries
# FUSE_PASSTHROUGH (flags2) and a max_stack_depth; the daemon (CAP_SYS_ADMIN) then registers
# a host fd with ioctl(FUSE_DEV_IOC_BACKING_OPEN) and answers an OPEN or CREATE with
# FOPEN_PASSTHROUGH and that backing id. libfuse 3.14 (Debian 12) knows none of this and
# fills those replies itself, so we rewrite the two kinds of reply on their way out: libfuse
# sends every reply with writev(2) through its GOT slot for `writev`, which we point at a
# small function of ours exactly while such a reply is being sent (the INIT reply, and the
# OPEN/CREATE replies our handlers "arm"); the rest of the time the slot holds libc's writev
# again. The function checks what it rewrites (the handle number we expect) and writes
# nothing it does not recognise. `install` checks the library and the slot first and leaves
# everything alone when anything differs.
#
# The kernel's rule we follow (fs/fuse/iomode.c): while a file is open, every open of the
# same inode must use the same backing file, or none may use passthrough; the adapter
# (fuse_ops.Operations) keeps one backing id per inode while it has passthrough opens.

ENV = "LAYERFS_PASSTHROUGH"  # "0" turns passthrough off (for comparisons)

FUSE_INIT_EXT = 1 << 30
FUSE_PASSTHROUGH_FLAGS2 = 1 << (37 - 32)
# Our mount may sit on host files of stacking depth 0 (ext4, xfs, tmpfs...); depth 1 keeps
# it usable as a lower of a kernel overlay. A host file on an overlay is refused by the
# kernel (ELOOP) and that file is then served without passthrough.
MAX_STACK_DEPTH = 1
FOPEN_PASSTHROUGH = 1 << 7
# The only other open flags the kernel accepts with it (FOPEN_PASSTHROUGH_MASK): direct_io,
# noflush, parallel_direct_writes. Keep_cache in particular makes the open fail (EIO).
_PASSTHROUGH_MASK = FOPEN_PASSTHROUGH | (1 << 0) | (1 << 5) | (1 << 6)
_IOC_WRITE = 1
FUSE_DEV_IOC_BACKING_OPEN = (_IOC_WRITE << 30) | (16 << 16) | (229 << 8) | 1
FUSE_DEV_IOC_BACKING_CLOSE = (_IOC_WRITE << 30) | (4 << 16) | (229 << 8) | 2

# struct fuse_init_out (include/uapi/linux/fuse.h): flags at 12, flags2 at 32,
# max_stack_depth at 36; libfuse 3.14 sends the 64-byte form.
_INIT_OUT_SIZE = 64
_OPEN_OUT_SIZE = 16  # fh u64, open_flags u32, backing_id i32
_ENTRY_OUT_SIZE = 128
_HEADER_SIZE = 16
_CAP_SYS_ADMIN = 21

_LIBFUSE = "libfuse3.so.3"


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_WRITEV = ctypes.CFUNCTYPE(ctypes.c_ssize_t, ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_int)


def _has_cap_sys_admin() -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return False


class Passthrough:
    """The connection's passthrough: set up by `install` before the INIT request is served;
    `usable` once the kernel took it (known at the first `backing_open`)."""

    def __init__(self) -> None:
        self.fuse_fd = -1
        self.usable = False
        self._slot: GotSlot | None = None
        self._hook_addr = 0
        self._hook = _WRITEV(self._writev)  # kept alive as long as the slot may point at it
        libc = ctypes.CDLL(None, use_errno=True)
        self._libc_writev = _WRITEV(("writev", libc))
        self._errno_location = ctypes.CFUNCTYPE(ctypes.c_void_p)(
            ("__errno_location", ctypes.CDLL(None))
        )
        self._init_pending = False
        self._armed: tuple[int, int] | None = None  # (fh, backing id) of the reply to rewrite

    def install(self, fuse_fd: int) -> bool:
        """Prepare the INIT reply to ask for passthrough. False (and nothing changed) when
        this process cannot use it or the library is not the one we know."""
        if os.environ.get(ENV) == "0":
            return False
        # (GotSlot.find checks the machine: x86-64, 64-bit pointers.)
        if pyfuse3.__version__ != "3.5.0" or not _has_cap_sys_admin():
            return False
        found = loaded_library(_LIBFUSE)
        if found is None or not os.path.basename(found[0]).startswith("libfuse3.so.3.14"):
            log.debug("passthrough: libfuse %s is not 3.14", found)
            return False
        slot = GotSlot.find(found[0], b"writev", address(ctypes.CDLL(None).writev))
        if slot is None:
            return False
        self.fuse_fd = fuse_fd
        self._slot = slot
        self._hook_addr = address(self._hook)
        self._init_pending = True
        slot.point(self._hook_addr)
        return True

    # -- the hook ----------------------------------------------------------------------
    def _writev(self, fd: int, iov: ctypes._Pointer[_Iovec], count: int) -> int:
        # Runs inside libfuse's reply; never raises (ctypes would only print it).
        try:
            if self._slot is not None:
                self._slot.restore()  # one reply, then libc's writev again
            if count == 2 and iov[0].len == _HEADER_SIZE:
                payload = iov[1]
                if self._init_pending:
                    self._init_pending = False
                    if payload.len == _INIT_OUT_SIZE and payload.base:
                        self._patch_init(payload.base)
                elif self._armed is not None and payload.len in (
                    _OPEN_OUT_SIZE,
                    _ENTRY_OUT_SIZE + _OPEN_OUT_SIZE,
                ):
                    self._patch_open(payload.base + payload.len - _OPEN_OUT_SIZE)
            self._armed = None
        except Exception:  # pragma: no cover - a bug here must not take replies down
            log.exception("passthrough: rewriting a reply failed")
        n = int(self._libc_writev(fd, iov, count))
        if n < 0:
            # libfuse reads errno after a failed writev: hand it the call's, which ctypes
            # kept aside (use_errno), in this thread's errno.
            err = ctypes.get_errno()
            where = self._errno_location()
            if where:
                ctypes.c_int.from_address(where).value = err
        return n

    def _patch_init(self, base: int) -> None:
        major, _minor, _ra, flags = struct.unpack_from("<IIII", ctypes.string_at(base, 16))
        if major != 7:
            return
        ctypes.c_uint32.from_address(base + 12).value = flags | FUSE_INIT_EXT
        flags2 = ctypes.c_uint32.from_address(base + 32)
        flags2.value |= FUSE_PASSTHROUGH_FLAGS2
        ctypes.c_uint32.from_address(base + 36).value = MAX_STACK_DEPTH
        self.usable = True  # until the kernel says otherwise at the first backing_open

    def _patch_open(self, at: int) -> None:
        assert self._armed is not None
        fh, backing_id = self._armed
        if ctypes.c_uint64.from_address(at).value != fh:
            log.error("passthrough: an open reply for another handle; left as it is")
            return
        flags = ctypes.c_uint32.from_address(at + 8)
        flags.value = (flags.value | FOPEN_PASSTHROUGH) & _PASSTHROUGH_MASK
        ctypes.c_int32.from_address(at + 12).value = backing_id

    # -- for the handlers --------------------------------------------------------------
    def backing_open(self, fd: int) -> int | None:
        """Register host file `fd` with the kernel; its backing id, or None when this file
        (or, for good, this connection) cannot be passed through."""
        if not self.usable:
            return None
        arg = bytearray(struct.pack("<iIQ", fd, 0, 0))
        try:
            return int(fcntl.ioctl(self.fuse_fd, FUSE_DEV_IOC_BACKING_OPEN, arg, True))
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS):
                log.info("passthrough refused by the kernel (%s): serving data ourselves", exc)
                self.usable = False
            else:  # e.g. ELOOP: a host file on a stacked filesystem
                log.debug("passthrough: cannot pass fd %d through: %s", fd, exc)
            return None

    def backing_close(self, backing_id: int) -> None:
        arg = bytearray(struct.pack("<I", backing_id))
        try:
            fcntl.ioctl(self.fuse_fd, FUSE_DEV_IOC_BACKING_CLOSE, arg, True)
        except OSError as exc:
            log.debug("passthrough: closing backing id %d: %s", backing_id, exc)

    def arm(self, fh: int, backing_id: int) -> None:
        """The next reply libfuse sends is the OPEN or CREATE reply for `fh`: rewrite it to
        pass through `backing_id`. Call with no await between this and the handler's return."""
        assert self._slot is not None
        self._armed = (fh, backing_id)
        self._slot.point(self._hook_addr)
