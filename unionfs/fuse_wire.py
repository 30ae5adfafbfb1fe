"""Our own loop over the FUSE device: the frequent requests are decoded, served and answered
here; every other request goes to libfuse and pyfuse3 as before."""

from __future__ import annotations

import bisect
import collections
import ctypes
import errno
import inspect
import logging
import os
import select
import struct
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pyfuse3
import trio
import xxhash

from unionfs import fuse_loop
from unionfs.core.fs import Attributes
from unionfs.core.types import Fh, Ino
from unionfs.fuse_ops import (
    IMMUTABLE_TIMEOUT,
    INLINE_IO,
    NEGATIVE_TIMEOUT,
    UPPER_TIMEOUT,
    Operations,
    to_fuse_error,
)

log = logging.getLogger("layerfs")

# Why: through pyfuse3 every request costs a trio task step, a coroutine per layer and a
# reply built field by field around our handler (daemon user CPU per lookup 58 us, 45 us
# here; the core's lookup itself is ~16 us), and a sleep in trio's scheduler between
# requests. Here a request is one read(2) of the device, one struct.unpack of its header,
# our handler, one struct.pack and one write(2).
#
# How: after pyfuse3.init has mounted and made libfuse's session (its pointer comes from the
# fuse_session_new hook of fuse_fallocate.py), this loop reads the device itself instead of
# pyfuse3's `main`. The opcodes in `Wire.fast` are served here, synchronously, when the
# core's lock is free (else in a task that takes it first, as pyfuse3's handlers do). Every
# other request, and one that turns out to need a worker thread (copy-up at open), is handed
# to libfuse as it was read (fuse_session_process_buf): libfuse decodes it and calls pyfuse3's
# handler, which makes the coroutine of our async handler; pyfuse3 would keep it in a
# private global for its loop to await, so we wrap its `fuse_*_async` functions to hand the
# coroutine to us instead, and run it in a task of its own. Replies are written with one
# write(2) each (atomic per request; the kernel matches them by `unique`). When no task is
# waiting for anything, the loop waits for the device with poll(2) instead of a trip
# through trio's scheduler, and gives trio a turn every _FAIR requests and after _IDLE_MS
# of quiet (signals, the end of the mount). Layouts: include/uapi/linux/fuse.h (protocol
# 7.38+ as libfuse 3.14 negotiates it); libfuse 3.14's `struct fuse_buf`. `Wire.start`
# checks what it can and returns None (pyfuse3's loop then runs) when anything differs.

ENV_LOOP = fuse_loop.ENV_LOOP  # "pyfuse3" or "trio" select the older loops
_PYFUSE3_VERSION = "3.5.0"
# The largest request: a WRITE of max_write (1 MiB, libfuse's choice) plus its headers.
BUFSIZE = 1024 * 1024 + 64 * 1024
_FAIR = 64  # requests served in a row before other tasks get a turn (when none waits)
_FAIR_BUSY = 4  # the same while tasks wait (a read in a worker thread, a copy-up)
_IDLE_MS = 50  # longest wait in poll(2) before trio gets a turn
# After serving a request with nothing else to do, watch the device this long before
# sleeping in poll(2): the next request of a process doing one file operation after another
# (stat, open, create ...) usually comes within tens of microseconds, and a sleeping daemon
# (and its idle virtual CPU) takes longer than that to wake up. Bounded, only while no task
# waits, and never on one CPU (the process sending the next request would need it).
# $LAYERFS_SPIN_US sets it (0: never).
SPIN_NS = (
    int(float(os.environ.get("LAYERFS_SPIN_US", "30")) * 1000) if (os.cpu_count() or 1) > 1 else 0
)
_DEAD = select.POLLERR | select.POLLHUP | select.POLLNVAL

# Opcodes (enum fuse_opcode).
LOOKUP, FORGET, GETATTR, SETATTR = 1, 2, 3, 4
READLINK, SYMLINK, MKDIR, UNLINK, RMDIR = 5, 6, 9, 10, 11
OPEN, READ, WRITE, RELEASE = 14, 15, 16, 18
GETXATTR = 22
INIT, OPENDIR, READDIR = 26, 27, 28
CREATE, INTERRUPT, IOCTL, BATCH_FORGET, READDIRPLUS = 35, 36, 39, 42, 44

OPNAMES = {
    1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK", 6: "SYMLINK",
    8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR", 12: "RENAME", 13: "LINK", 14: "OPEN",
    15: "READ", 16: "WRITE", 17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR",
    22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH", 26: "INIT",
    27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR", 30: "FSYNCDIR", 34: "ACCESS",
    35: "CREATE", 36: "INTERRUPT", 39: "IOCTL", 42: "BATCH_FORGET", 43: "FALLOCATE",
    44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK", 47: "COPY_FILE_RANGE",
}  # fmt: skip

IN_HEADER = struct.Struct("<IIQQIIIHH")  # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")  # len error unique
# struct fuse_attr: ino size blocks atime mtime ctime atimensec mtimensec ctimensec mode
# nlink uid gid rdev blksize flags
_ATTR = "QQQqqqIIIIIIIIII"
# fuse_entry_out: nodeid generation entry_valid attr_valid entry_valid_nsec attr_valid_nsec
_ENTRY = "QQQQII" + _ATTR
ENTRY_REPLY = struct.Struct("<IiQ" + _ENTRY)
ENTRY_OUT = struct.Struct("<" + _ENTRY)
DIRENT = struct.Struct("<QQII")  # fuse_dirent: ino off namelen type, then the name
ATTR_REPLY = struct.Struct("<IiQ" + "QII" + _ATTR)  # fuse_attr_out: valid valid_nsec dummy
OPEN_REPLY = struct.Struct("<IiQ" + "QIi")  # fuse_open_out: fh open_flags backing_id
CREATE_REPLY = struct.Struct("<IiQ" + _ENTRY + "QIi")
WRITE_REPLY = struct.Struct("<IiQII")  # fuse_write_out: size padding
XATTR_SIZE_REPLY = struct.Struct("<IiQII")  # fuse_getxattr_out: size padding
U32X2 = struct.Struct("<II")
U64 = struct.Struct("<Q")
FORGET_ONE = struct.Struct("<QQ")  # fuse_forget_one: nodeid nlookup
CREATE_IN = struct.Struct("<IIII")  # flags mode umask open_flags
RELEASE_IN = struct.Struct("<QIIQ")  # fh flags release_flags lock_owner
READ_IN = struct.Struct("<QQII")  # fh offset size read_flags (lock_owner flags padding)
WRITE_IN = struct.Struct("<QQII")  # fh offset size write_flags (lock_owner flags padding)
WRITE_IN_SIZE = 40
# fuse_setattr_in: valid padding fh size lock_owner atime mtime ctime atimensec mtimensec
# ctimensec mode unused4 uid gid unused5
SETATTR_IN = struct.Struct("<IIQQQqqqIIIIIIII")
FATTR_MODE, FATTR_UID, FATTR_GID, FATTR_SIZE = 1, 2, 4, 8
FATTR_ATIME, FATTR_MTIME, FATTR_FH, FATTR_ATIME_NOW, FATTR_MTIME_NOW = 16, 32, 64, 128, 256

FOPEN_KEEP_CACHE = 1 << 1
READ_BUFFERS = 8  # kept for reads in worker threads, BUFSIZE each
LISTINGS = 64  # directories whose listing is kept between READDIRPLUS requests
FOPEN_PASSTHROUGH = 1 << 7
_NS = 1_000_000_000


def _valid(timeout: float) -> tuple[int, int]:
    sec = int(timeout)
    return sec, int((timeout - sec) * 1e9)


class _Slow(Exception):
    """Raised by a fast handler before it changed anything: libfuse and pyfuse3 serve it."""


class _Locked(Exception):
    """Raised by a fast handler before it changed anything: it needs the core's lock."""


class _FuseBuf(ctypes.Structure):
    _fields_ = [
        ("size", ctypes.c_size_t),
        ("flags", ctypes.c_int),
        ("mem", ctypes.c_void_p),
        ("fd", ctypes.c_int),
        ("pos", ctypes.c_int64),
    ]


Handler = Callable[[int, int, int, int, memoryview], None]


def cookie(name: bytes) -> int:
    """The directory offset after `name`: from its hash, in [3, 2**62 + 3) (1 and 2 follow
    "." and "..")."""
    return (xxhash.xxh64_intdigest(name) >> 2) + 3


class _Listing:
    """A directory's names for READDIRPLUS, ordered by their cookies (`cookie`), which are
    the offsets the kernel resumes from. Without OPENDIR (see Wire.opendir) requests carry
    no handle, so readers of one directory cannot be told apart; with offsets that name a
    place in the order of hashes, any listing of the directory resumes where another left
    off: a name present throughout is returned exactly once to each reader, whatever was
    added or removed between two reads (a seekdir/telldir offset stays valid too). Two
    names with one hash (one chance in 2**62 per pair) get consecutive cookies."""

    __slots__ = ("fh", "cookies")

    def __init__(self, fh: Fh, names: list[bytes]) -> None:
        self.fh = fh
        keyed = sorted(zip(map(cookie, names), names, strict=True))
        names[:] = [n for _c, n in keyed]  # the core's handle now reads in this order
        cookies = [c for c, _n in keyed]
        if len(set(cookies)) != len(cookies):
            for i in range(1, len(cookies)):
                if cookies[i] <= cookies[i - 1]:
                    cookies[i] = cookies[i - 1] + 1
        self.cookies = cookies


class Wire:
    """The loop. `start` builds one when this pyfuse3 and libfuse are the ones it knows."""

    def __init__(self, ops: Operations, fd: int, session: int) -> None:
        self.ops = ops
        self.fs = ops.fs
        self.fd = fd
        self.session = session
        self.cbuf = ctypes.create_string_buffer(BUFSIZE)
        self.buf = memoryview(self.cbuf).cast("B")
        self.fbuf = _FuseBuf(0, 0, ctypes.addressof(self.cbuf), -1, 0)
        process = ctypes.PyDLL("libfuse3.so.3").fuse_session_process_buf
        # PyDLL: the GIL stays held, as pyfuse3's handlers (called inside) expect.
        process.argtypes = [ctypes.c_void_p, ctypes.POINTER(_FuseBuf)]
        process.restype = None
        self._process = process
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        self.exiting = False
        self.debug = log.isEnabledFor(logging.DEBUG)  # -d: every request is logged
        self.inflight = 0  # tasks serving requests (they may wait for threads or the lock)
        self.nursery: trio.Nursery | None = None
        self._pending: Coroutine[Any, Any, Any] | None = None
        self._saved: dict[str, Any] = {}
        self._buffers: list[bytearray] = []  # for reads in worker threads (_read_rest)
        self._imm = _valid(IMMUTABLE_TIMEOUT)
        self._upp = _valid(UPPER_TIMEOUT)
        self._neg = _valid(NEGATIVE_TIMEOUT)
        # Directory listings being read, by inode: the core's directory handles (the kernel
        # opens directories itself, see opendir), least recently used first.
        self._listings: collections.OrderedDict[int, _Listing] = collections.OrderedDict()
        # opcode -> (handler, needs the core's lock)
        self.fast: dict[int, tuple[Handler, bool]] = {
            LOOKUP: (self.lookup, True),
            FORGET: (self.forget, True),
            BATCH_FORGET: (self.batch_forget, True),
            GETATTR: (self.getattr, True),
            SETATTR: (self.setattr, True),
            READLINK: (self.readlink, True),
            SYMLINK: (self.symlink, True),
            MKDIR: (self.mkdir, True),
            UNLINK: (self.unlink, True),
            RMDIR: (self.rmdir, True),
            OPEN: (self.open, True),
            CREATE: (self.create, True),
            READ: (self.read, False),
            WRITE: (self.write, False),
            RELEASE: (self.release, True),
            GETXATTR: (self.getxattr, True),
            OPENDIR: (self.opendir, False),
            READDIRPLUS: (self.readdirplus, True),
            READDIR: (self.readdir, True),
            INTERRUPT: (self.interrupt, False),
            IOCTL: (self.ioctl, False),
        }

    @classmethod
    def start(cls, ops: Operations) -> Wire | None:
        if os.environ.get(ENV_LOOP) in ("pyfuse3", "trio"):
            return None
        fds = fuse_loop.fuse_fds()
        session = getattr(getattr(ops, "_fallocate", None), "session", None)
        ok = (
            pyfuse3.__version__ == _PYFUSE3_VERSION
            and sys.byteorder == "little"
            and ctypes.sizeof(_FuseBuf) == 40
            and len(fds) == 1
            and session is not None
            and callable(getattr(pyfuse3, "terminate", None))
            and _check_handlers()
        )
        if not ok or session is None:
            log.debug("serving through pyfuse3's request loop")
            return None
        return cls(ops, fds[0], int(session))

    # -- the loop ----------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until the mount goes away or pyfuse3.terminate() is called."""
        mod: Any = pyfuse3
        orig_terminate = mod.terminate

        def terminate() -> None:
            self.exiting = True
            orig_terminate()

        self._capture()
        mod.terminate = terminate
        os.set_blocking(self.fd, False)
        try:
            async with trio.open_nursery() as nursery:
                self.nursery = nursery
                await self._loop()
                nursery.cancel_scope.cancel()  # the device is gone: nobody reads replies
        finally:
            mod.terminate = orig_terminate
            self._release_capture()

    async def _loop(self) -> None:
        fd, buf, fast, lock = self.fd, self.buf, self.fast, self.ops.lock
        served = 0
        while not self.exiting:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                if self.inflight or served >= _FAIR:
                    served = 0
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:
                        return
                else:
                    # Nothing else to run: wait here, without a trip through the scheduler.
                    ready = None
                    if SPIN_NS:
                        until = time.perf_counter_ns() + SPIN_NS
                        while not ready and time.perf_counter_ns() < until:
                            ready = self.poller.poll(0)
                    if not ready:
                        ready = self.poller.poll(_IDLE_MS)
                    if not ready:
                        served = _FAIR  # quiet: let trio run (signals) before waiting again
                    elif ready[0][1] & _DEAD:
                        return
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # interrupted before we read it
                if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                    return  # unmounted (ECONNABORTED: aborted with requests queued)
                raise
            if n < IN_HEADER.size:
                return  # end of the stream (a device read never returns less than a header)
            served += 1
            if served >= (_FAIR_BUSY if self.inflight else _FAIR):
                served = 0
                await trio.lowlevel.checkpoint()
            _len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = IN_HEADER.unpack_from(buf)
            if self.debug:
                name = OPNAMES.get(opcode, opcode)
                log.debug("%s unique %d node %d (pid %d)", name, unique, nodeid, pid)
            entry = fast.get(opcode)
            if entry is None:
                self._to_pyfuse3(ctypes.addressof(self.cbuf), n)
                if opcode == INIT:
                    self.ops.widen_readahead()  # INIT set it; no open has to wait for this
                continue
            handler, needs_lock = entry
            body = buf[IN_HEADER.size : n]
            if needs_lock and lock.locked():
                self._spawn(self._when_locked(handler, bytes(buf[:n])))
                continue
            try:
                handler(unique, nodeid, uid, gid, body)
            except _Slow:
                self._to_pyfuse3(ctypes.addressof(self.cbuf), n)
            except _Locked:
                self._spawn(self._when_locked(handler, bytes(buf[:n])))
            except Exception as exc:
                self._error(unique, exc)

    async def _when_locked(self, handler: Handler, raw: bytes) -> None:
        """A fast request (`raw`, a copy of it) that found the core busy: served once the
        lock is ours."""
        _len, _op, unique, nodeid, uid, gid, _pid, _ext, _pad = IN_HEADER.unpack_from(raw)
        async with self.ops.lock:
            try:
                handler(unique, nodeid, uid, gid, memoryview(raw)[IN_HEADER.size :])
                return
            except (_Slow, _Locked):
                pass
            except Exception as exc:
                self._error(unique, exc)
                return
        # It needs what pyfuse3's handler does (a worker thread): hand libfuse the copy.
        copy = ctypes.create_string_buffer(raw, len(raw))
        self._to_pyfuse3(ctypes.addressof(copy), len(raw))

    def _to_pyfuse3(self, mem: int, n: int) -> None:
        fbuf = self.fbuf
        fbuf.size = n
        fbuf.mem = mem
        self._pending = None
        self._process(self.session, ctypes.byref(fbuf))
        coro, self._pending = self._pending, None
        if coro is not None:
            unique = U64.unpack_from(ctypes.string_at(mem + 8, 8))[0]
            self._spawn(coro, unique)

    def _spawn(self, coro: Coroutine[Any, Any, Any], unique: int | None = None) -> None:
        assert self.nursery is not None
        self.inflight += 1
        self.nursery.start_soon(self._task, coro, unique)

    async def _task(self, coro: Coroutine[Any, Any, Any], unique: int | None) -> None:
        try:
            await coro
        except Exception as exc:
            # pyfuse3's handlers answer what ours raise (FUSEError); anything else is a bug:
            # logged, and the request (of pyfuse3's, `unique`) gets EIO. The daemon goes on.
            log.error("unexpected error in a request handler", exc_info=exc)
            if unique is not None:
                self._send(OUT_HEADER.pack(16, -errno.EIO, unique))
        finally:
            self.inflight -= 1

    def _capture(self) -> None:
        """pyfuse3's C handlers call the module's `fuse_*_async` functions (looked up on
        each call) and keep the coroutine for pyfuse3's loop: ours hand it to us instead."""
        mod: Any = pyfuse3
        for name in dir(mod):
            if name.startswith("fuse_") and name.endswith("_async"):
                orig = getattr(mod, name)
                if callable(orig):
                    self._saved[name] = orig
                    setattr(mod, name, self._capturing(orig))

    def _capturing(self, orig: Callable[..., Any]) -> Callable[..., None]:
        def capture(*args: Any) -> None:
            self._pending = orig(*args)

        return capture

    def _release_capture(self) -> None:
        for name, orig in self._saved.items():
            setattr(pyfuse3, name, orig)
        self._saved.clear()

    # -- replies -----------------------------------------------------------------------
    def _send(self, data: bytes | memoryview) -> None:
        try:
            os.write(self.fd, data)
        except OSError as exc:
            # ENOENT: the request was interrupted and is gone; else the mount is gone.
            log.debug("reply not delivered: %s", exc)

    def _sendv(self, parts: list[Any]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            log.debug("reply not delivered: %s", exc)

    def _error(self, unique: int, exc: BaseException) -> None:
        self._send(OUT_HEADER.pack(16, -to_fuse_error(exc).errno, unique))

    def _ok(self, unique: int) -> None:
        self._send(OUT_HEADER.pack(16, 0, unique))

    def _entry_fields(self, a: Attributes) -> tuple[int, ...]:
        st = a.st
        sec, nsec = self._imm if a.immutable else self._upp
        asec, ans = divmod(st.atime_ns, _NS)
        msec, mns = divmod(st.mtime_ns, _NS)
        csec, cns = divmod(st.ctime_ns, _NS)
        return (
            a.ino, 0, sec, sec, nsec, nsec,
            a.ino, st.size, st.blocks, asec, msec, csec, ans, mns, cns,
            st.mode, st.nlink, st.uid, st.gid, st.rdev & 0xFFFFFFFF, 4096, 0,
        )  # fmt: skip

    def _send_attr(self, unique: int, a: Attributes) -> None:
        f = self._entry_fields(a)  # fuse_attr_out: attr_valid, its nsec, dummy, the attr
        self._send(ATTR_REPLY.pack(ATTR_REPLY.size, 0, unique, f[3], f[5], 0, *f[6:]))

    def _send_entry(self, unique: int, a: Attributes) -> None:
        self._send(ENTRY_REPLY.pack(ENTRY_REPLY.size, 0, unique, *self._entry_fields(a)))

    def _open_flags(self, ino: int, fh: Fh, keep: bool, writing: bool) -> tuple[int, int]:
        keep, backing = self.ops.open_choice(ino, fh, keep, writing)
        if backing is not None:
            return FOPEN_PASSTHROUGH, backing
        return (FOPEN_KEEP_CACHE if keep else 0), 0

    # -- the requests served here --------------------------------------------------------
    # Each takes (unique, nodeid, uid, gid, body) and answers, or raises before it changed
    # anything (_Slow, _Locked, or an error to answer with).
    @staticmethod
    def _name(body: memoryview) -> bytes:
        raw = bytes(body)
        end = raw.find(b"\0")
        return raw if end < 0 else raw[:end]

    def lookup(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        a = self.ops.lookup_now(nodeid, self._name(body))
        if a is not None:
            self._send_entry(unique, a)
            return
        sec, nsec = self._neg
        zeros = (0,) * 16
        self._send(ENTRY_REPLY.pack(ENTRY_REPLY.size, 0, unique, 0, 0, sec, 0, nsec, 0, *zeros))

    def forget(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        self._forget([(nodeid, U64.unpack_from(body)[0])])  # FORGET has no reply

    def _forget(self, pairs: list[tuple[int, int]]) -> None:
        self.ops._forget(pairs)
        if self._listings:
            for ino, _n in pairs:
                if ino in self._listings and not self.fs.known(Ino(ino)):
                    self.fs.releasedir(self._listings.pop(ino).fh)

    def batch_forget(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        count = U32X2.unpack_from(body)[0]
        self._forget([FORGET_ONE.unpack_from(body, 8 + 16 * i) for i in range(count)])  # no reply

    def getattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        a = self.fs.getattr(Ino(nodeid))
        self._send_attr(unique, a)

    def setattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        # As pyfuse3 and libfuse pass it on: *_NOW is the current CLOCK_REALTIME time.
        valid, _p, fh, size, _lo, atime, mtime, _c, ans, mns, _cns, mode, _u, suid, sgid, _u5 = (
            SETATTR_IN.unpack_from(body)
        )
        if self.fs.needs_copy_up(Ino(nodeid)):
            raise _Slow  # a copy-up takes a worker thread
        now = time.time_ns() if valid & (FATTR_ATIME_NOW | FATTR_MTIME_NOW) else 0
        atime_ns = mtime_ns = None
        if valid & FATTR_ATIME:
            atime_ns = atime * _NS + ans
        elif valid & FATTR_ATIME_NOW:
            atime_ns = now
        if valid & FATTR_MTIME:
            mtime_ns = mtime * _NS + mns
        elif valid & FATTR_MTIME_NOW:
            mtime_ns = now
        a = self.fs.setattr(
            Ino(nodeid),
            mode=mode if valid & FATTR_MODE else None,
            uid=suid if valid & FATTR_UID else None,
            gid=sgid if valid & FATTR_GID else None,
            size=size if valid & FATTR_SIZE else None,
            atime_ns=atime_ns,
            mtime_ns=mtime_ns,
            fh=Fh(fh) if valid & FATTR_FH else None,
        )
        self._send_attr(unique, a)

    def readlink(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        target = self.fs.readlink(Ino(nodeid))
        self._send(OUT_HEADER.pack(16 + len(target), 0, unique) + target)

    def symlink(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        name, target = bytes(body).split(b"\0")[:2]
        self._send_entry(unique, self.fs.symlink(Ino(nodeid), name, target, uid, gid))

    def mkdir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        mode = U32X2.unpack_from(body)[0]
        name = self._name(body[8:])
        self._send_entry(unique, self.fs.mkdir(Ino(nodeid), name, mode, uid, gid))

    def unlink(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        try:
            self.fs.unlink(Ino(nodeid), self._name(body))
        finally:
            self.ops._unregister_unlinked()
        self._ok(unique)

    def rmdir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        self.fs.rmdir(Ino(nodeid), self._name(body))
        self._ok(unique)

    def open(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        flags = U32X2.unpack_from(body)[0]
        writing = bool(flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC)
        if writing and self.fs.needs_copy_up(Ino(nodeid)):
            raise _Slow  # a copy-up takes a thread
        fh, keep = self.fs.open(Ino(nodeid), flags)
        open_flags, backing = self._open_flags(nodeid, fh, keep, writing)
        self._send(OPEN_REPLY.pack(OPEN_REPLY.size, 0, unique, fh, open_flags, backing))

    def create(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        flags, mode, _umask, _open_flags = CREATE_IN.unpack_from(body)
        name = self._name(body[CREATE_IN.size :])
        fh, a = self.fs.create(Ino(nodeid), name, mode, flags, uid, gid)
        # The new file changes only through this mount, so its page cache stays valid.
        open_flags, backing = self._open_flags(a.ino, fh, True, True)
        self._send(
            CREATE_REPLY.pack(
                CREATE_REPLY.size, 0, unique, *self._entry_fields(a), fh, open_flags, backing
            )
        )

    def release(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        fh = RELEASE_IN.unpack_from(body)[0]
        self.ops._end_direct(fh)
        self.fs.release(Fh(fh))
        self._ok(unique)

    def read(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        fh, off, size, _flags = READ_IN.unpack_from(body)
        fd = self.fs.ready_fd(Fh(fh))
        if fd is None:
            # The handle must follow a copy-up: a core call, under the lock.
            if self.ops.lock.locked():
                raise _Locked
            fd = self.fs.read_fd(Fh(fh))
        view, done = self.ops.read_now(fd, off, size)
        if done:
            self._sendv([OUT_HEADER.pack(16 + len(view), 0, unique), view])
            return
        self._spawn(self._read_rest(unique, fd, off, size, bytes(view)))

    async def _read_rest(self, unique: int, fd: int, off: int, size: int, head: bytes) -> None:
        """The part of a read that waits for the disk, in a worker thread (so cold reads of
        several files overlap, and other requests go on), into a buffer kept for the next
        such read: a fresh 1 MiB allocation costs a page fault per 4 KiB."""
        buf = self._buffers.pop() if self._buffers else bytearray(BUFSIZE)
        try:
            view = memoryview(buf)[: size - len(head)]
            n = await trio.to_thread.run_sync(os.preadv, fd, [view], off + len(head))
            self._sendv([OUT_HEADER.pack(16 + len(head) + n, 0, unique), head, view[:n]])
        except Exception as exc:
            self._error(unique, exc)
        finally:
            if len(self._buffers) < READ_BUFFERS:
                self._buffers.append(buf)

    def write(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        fh, off, size, _flags = WRITE_IN.unpack_from(body)
        fd = self.fs.write_fd(Fh(fh))
        data = body[WRITE_IN_SIZE : WRITE_IN_SIZE + size]
        if size <= INLINE_IO:
            n = os.pwrite(fd, data, off)
            self._send(WRITE_REPLY.pack(WRITE_REPLY.size, 0, unique, n, 0))
            return
        self._spawn(self._write_big(unique, fd, off, bytes(data)))

    async def _write_big(self, unique: int, fd: int, off: int, data: bytes) -> None:
        try:
            n = await trio.to_thread.run_sync(os.pwrite, fd, data, off)
        except Exception as exc:
            self._error(unique, exc)
            return
        self._send(WRITE_REPLY.pack(WRITE_REPLY.size, 0, unique, n, 0))

    def getxattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        size = U32X2.unpack_from(body)[0]
        value = self.fs.getxattr(Ino(nodeid), self._name(body[8:]))
        if size == 0:
            self._send(XATTR_SIZE_REPLY.pack(XATTR_SIZE_REPLY.size, 0, unique, len(value), 0))
        elif len(value) > size:
            self._send(OUT_HEADER.pack(16, -errno.ERANGE, unique))
        else:
            self._send(OUT_HEADER.pack(16 + len(value), 0, unique) + value)

    def opendir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        # A listing needs no open handle here (see readdirplus): ENOSYS tells the kernel to
        # stop asking. It then opens directories itself, as if we had answered with
        # FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR (fs/fuse/file.c: fuse_file_open), and sends no
        # RELEASEDIR: two round trips less per directory read (a `find` does one per
        # directory), and listings stay cached in the kernel as before.
        self._send(OUT_HEADER.pack(16, -errno.ENOSYS, unique))

    def readdirplus(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        _fh, off, size, _flags = READ_IN.unpack_from(body)
        self._readdir(unique, nodeid, off, size, True)

    def readdir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        _fh, off, size, _flags = READ_IN.unpack_from(body)
        self._readdir(unique, nodeid, off, size, False)

    def _listing(self, ino: int, start: int) -> _Listing:
        """The listing to read `ino` from offset `start`: a fresh one at offset 0, else the
        one read before (any listing of the directory resumes alike, see _Listing)."""
        listing = self._listings.pop(ino, None)
        if listing is not None and (
            start == 0 or self.fs.handles.dir(listing.fh).node is not self.fs.node(Ino(ino))
        ):
            self.fs.releasedir(listing.fh)
            listing = None
        if listing is None:
            fh = self.fs.opendir(Ino(ino))
            try:
                listing = _Listing(fh, self.fs.listing(fh))
            except BaseException:
                self.fs.releasedir(fh)
                raise
        self._listings[ino] = listing
        while len(self._listings) > LISTINGS:
            self.fs.releasedir(self._listings.popitem(last=False)[1].fh)
        return listing

    def _readdir(self, unique: int, ino: int, start: int, size: int, plus: bool) -> None:
        # Offsets: 1 after ".", 2 after "..", an entry's cookie after it (see _Listing).
        listing = self._listing(ino, start)
        node = self.fs.handles.dir(listing.fh).node
        parts: list[bytes] = []
        room = size

        def add(name: bytes, a: Attributes, off: int) -> bool:
            nonlocal room
            head = DIRENT.pack(a.ino, off, len(name), (a.st.mode >> 12) & 0o17)
            pad = b"\0" * (-len(name) % 8)
            rec = ENTRY_OUT.pack(*self._entry_fields(a)) + head if plus else head
            if len(rec) + len(name) + len(pad) > room:
                return False
            parts.append(rec + name + pad)
            room -= len(parts[-1])
            return True

        done = True
        if start == 0:
            # "." and ".." are never linked by the kernel: no lookup count, no forget.
            done = add(b".", self.fs.getattr(node.ino), 1)
            start = 1
        if done and start == 1:
            parent = node.parent.ino if node.parent is not None else node.ino
            done = add(b"..", self.fs.getattr(parent), 2)
        if done:
            cookies = listing.cookies
            first = bisect.bisect_right(cookies, start)
            for name, a, nxt in self.fs.readdir_iter(listing.fh, first):
                if not add(name, a, cookies[nxt - 1]):
                    self.fs.drop_if_unused(a.ino)
                    break
                if plus:
                    self.fs.incref(a.ino)
                else:
                    self.fs.drop_if_unused(a.ino)
        if not parts:
            self.fs.releasedir(self._listings.pop(ino).fh)  # the end of the listing
        data = b"".join(parts)
        self._send(OUT_HEADER.pack(16 + len(data), 0, unique) + data)

    def interrupt(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        # Our handlers are not interruptible (as with pyfuse3): no reply is expected.
        return None

    def ioctl(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> None:
        # No ioctl is ours (libfuse's answer without a handler; the caller sees ENOTTY).
        self._send(OUT_HEADER.pack(16, -errno.ENOSYS, unique))


def _check_handlers() -> bool:
    mod: Any = pyfuse3
    return all(
        inspect.iscoroutinefunction(getattr(mod, f"fuse_{n}_async", None))
        for n in ("lookup", "getattr", "open", "create", "read", "write", "release")
    )
