"""The FUSE session: INIT negotiated here, one trio loop that reads /dev/fuse, dispatches each
request and writes its reply exactly once."""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from unionfs.fuse import protocol as p

log = logging.getLogger("layerfs")

# A handler gets (unique, nodeid, uid, gid, body) and returns the body of its reply: bytes, a
# view, a list of buffers (written with one writev), or None for no reply at all (FORGET).
# It raises for an error reply, or `Later` to finish in a task. `body` is a view of the
# session's read buffer, valid only until the handler returns.
Reply = bytes | memoryview | list[bytes | memoryview] | None
Handler = Callable[[int, int, int, int, memoryview], Reply]


class Later(Exception):
    """Raised by a handler before it changed anything: the request is finished by `coro`
    in a task of its own (a worker thread, or a wait for the core's lock), whose result is
    the reply."""

    def __init__(self, coro: Coroutine[Any, Any, Reply]) -> None:
        super().__init__()
        self.coro = coro


class Served(Protocol):
    """What a session serves."""

    # Held across every core call that changes state; a handler marked as needing it is
    # called only while it is free (else in a task, once it is).
    lock: trio.Lock

    def table(self) -> Mapping[int, tuple[Handler, bool]]:
        """opcode -> (handler, needs the lock). Opcodes not listed get ENOSYS."""
        ...

    def errno_of(self, exc: BaseException) -> int:
        """The errno a failed request is answered with."""
        ...

    def started(self, session: Session) -> None:
        """INIT is answered: `session.conn` holds what was negotiated."""
        ...


# What we ask the kernel for (the rest of what it offers stays off): parallel reads,
# O_TRUNC passed to OPEN, "." and ".." lookups, large writes, cached pages dropped when
# mtime or size change, READDIRPLUS always (never READDIR), asynchronous direct I/O, 1 MiB
# requests (max_pages), and flags2 (for passthrough). The same set libfuse 3.14 took for
# us before. Not taken: the writeback cache (measured slower for compile-like work),
# HANDLE_KILLPRIV_V2 (see the README), POSIX locks (the kernel keeps them locally), splice.
WANT = (
    p.ASYNC_READ
    | p.ATOMIC_O_TRUNC
    | p.EXPORT_SUPPORT
    | p.BIG_WRITES
    | p.AUTO_INVAL_DATA
    | p.DO_READDIRPLUS
    | p.ASYNC_DIO
    | p.MAX_PAGES
    | p.INIT_EXT
)
MAX_WRITE = 1 << 20
# Our mount may sit on host files of stacking depth 0 (ext4, xfs, tmpfs...); depth 1 keeps
# it usable as a lower of a kernel overlay. A host file on an overlay is refused by the
# kernel (ELOOP) and is then served without passthrough.
MAX_STACK_DEPTH = 1
# With allow_root, requests of users other than the owner and root get EACCES, except those
# that only continue what an earlier, checked request opened (libfuse's rule,
# fuse_lowlevel.c) and those that carry no reply. READDIR and READDIRPLUS are checked too:
# libfuse exempts them after a checked OPENDIR, which our kernels no longer send.
_OPEN_TO_OTHERS = frozenset(
    int(op)
    for op in (
        p.Opcode.INIT,
        p.Opcode.READ,
        p.Opcode.WRITE,
        p.Opcode.FSYNC,
        p.Opcode.RELEASE,
        p.Opcode.FSYNCDIR,
        p.Opcode.RELEASEDIR,
        *p.NO_REPLY,
    )
)

# The largest request: a WRITE of MAX_WRITE plus its headers.
BUFSIZE = MAX_WRITE + 64 * 1024
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
_HEADER = p.IN_HEADER
_OUT = p.OUT_HEADER


@dataclass(frozen=True, slots=True)
class Options:
    want: int = WANT
    max_write: int = MAX_WRITE
    passthrough: bool = False  # ask for it (the daemon has CAP_SYS_ADMIN)
    deny_others: bool = False  # -o allow_root: the owner and root only (see _OPEN_TO_OTHERS)
    owner: int = -1  # the mounting user (getuid()); -1: this process's
    after_init: Callable[[], None] | None = None  # run once INIT is answered


@dataclass(frozen=True, slots=True)
class Connection:
    """What INIT settled."""

    major: int
    minor: int
    kernel_flags: int  # everything the kernel offered
    flags: int  # what we took
    max_readahead: int
    max_write: int

    @property
    def passthrough(self) -> bool:
        return bool(self.flags & p.PASSTHROUGH)


class Session:
    """One mount's connection: `run` serves it until the mount goes away or `stop`."""

    def __init__(self, fd: int, served: Served, options: Options | None = None) -> None:
        self.fd = fd
        self.served = served
        self.options = options or Options()
        self.owner = self.options.owner if self.options.owner >= 0 else os.getuid()
        self.conn: Connection | None = None
        self.buf = bytearray(BUFSIZE)
        self.exiting = False
        self.debug = log.isEnabledFor(logging.DEBUG)  # -d: every request is logged
        self.inflight = 0  # tasks serving requests (they may wait for threads or the lock)
        self.nursery: trio.Nursery | None = None
        self.poller = select.poll()
        self.poller.register(fd, select.POLLIN)
        # Requests waiting for the core's lock, by unique: an INTERRUPT cancels the wait.
        self.waiting: dict[int, trio.CancelScope] = {}
        self._in_trio_wait = False
        table = {**served.table(), p.Opcode.INIT: (self._init, False),
                 p.Opcode.INTERRUPT: (self._interrupt, False),
                 p.Opcode.DESTROY: (self._destroy, False)}  # fmt: skip
        # Plain int keys: the opcode read from the device is an int, found without an
        # IntEnum comparison.
        self.table: dict[int, tuple[Handler, bool]] = {int(k): v for k, v in table.items()}

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> None:
        """Serve until the mount goes away (the device reports it) or `stop`."""
        os.set_blocking(self.fd, False)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            if not await self._loop():
                nursery.cancel_scope.cancel()  # the device is gone: nobody reads replies

    def stop(self) -> None:
        """End `run` (from a task of the same trio run): it returns at its next turn."""
        self.exiting = True
        if self._in_trio_wait:
            trio.lowlevel.notify_closing(self.fd)

    async def _loop(self) -> bool:
        """Serve requests; True when the requests in flight may still be answered (the end
        of a stream that stands in for the device, in tests)."""
        fd, buf, table, lock = self.fd, self.buf, self.table, self.served.lock
        view = memoryview(buf)
        poller = self.poller
        deny = self.options.deny_others
        owner = self.owner
        served = 0
        while not self.exiting:
            try:
                n = os.readv(fd, [buf])
            except BlockingIOError:
                if self.inflight or served >= _FAIR:
                    served = 0
                    self._in_trio_wait = True
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    except trio.ClosedResourceError:
                        return False
                    finally:
                        self._in_trio_wait = False
                else:
                    # Nothing else to run: wait here, without a trip through the scheduler.
                    ready = None
                    if SPIN_NS:
                        until = time.perf_counter_ns() + SPIN_NS
                        while not ready and time.perf_counter_ns() < until:
                            ready = poller.poll(0)
                    if not ready:
                        ready = poller.poll(_IDLE_MS)
                    if not ready:
                        served = _FAIR  # quiet: let trio run (signals) before waiting again
                    elif ready[0][1] & _DEAD:
                        return False
                continue
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue  # interrupted before we read it
                if exc.errno in (errno.ENODEV, errno.ECONNABORTED):
                    # Unmounted (ECONNABORTED: aborted with requests queued, which this
                    # kernel reports even without FUSE_ABORT_ERROR).
                    return False
                raise
            if n == 0:
                return True  # end of the stream (a socket standing in for the device)
            served += 1
            if served >= (_FAIR_BUSY if self.inflight else _FAIR):
                served = 0
                await trio.lowlevel.checkpoint()
            if n < _HEADER.size:
                log.error("a request of %d bytes, shorter than its header: ignored", n)
                continue
            length, opcode, unique, nodeid, uid, gid, pid, extlen, _pad = _HEADER.unpack_from(buf)
            if length != n or extlen * 8 > n - _HEADER.size:
                log.error("malformed request %d (opcode %d): header says %d bytes, %d read",
                          unique, opcode, length, n)  # fmt: skip
                self._send_error(unique, errno.EIO)
                continue
            if self.debug:
                log.debug("%s unique %d node %d (pid %d uid %d)",
                          _opname(opcode), unique, nodeid, pid, uid)  # fmt: skip
            if deny and uid != owner and uid != 0 and opcode not in _OPEN_TO_OTHERS:
                self._send_error(unique, errno.EACCES)
                continue
            entry = table.get(opcode)
            if entry is None:
                self._send_error(unique, errno.ENOSYS)
                continue
            handler, needs_lock = entry
            body = view[_HEADER.size : n - 8 * extlen]
            if needs_lock and lock.locked():
                # Registered now, not when the task starts: an INTERRUPT may come next.
                scope = self.waiting[unique] = trio.CancelScope()
                copy = bytes(body)
                self._spawn(
                    unique, self._when_locked(scope, handler, unique, nodeid, uid, gid, copy)
                )
                continue
            try:
                reply = handler(unique, nodeid, uid, gid, body)
            except Later as later:
                self._spawn(unique, later.coro)
                continue
            except Exception as exc:
                self._fail(unique, exc)
                continue
            if type(reply) is bytes:  # most replies: one write(2), header and body
                try:
                    os.write(fd, _OUT.pack(_OUT.size + len(reply), 0, unique) + reply)
                except OSError as exc:
                    log.debug("reply not delivered: %s", exc)  # see _write
            elif reply is not None:
                self._reply(unique, reply)
        return False

    async def _when_locked(
        self,
        scope: trio.CancelScope,
        handler: Handler,
        unique: int,
        nodeid: int,
        uid: int,
        gid: int,
        body: bytes,
    ) -> Reply:
        """A request (`body`: a copy) that found the core busy, served once the lock is ours.
        An INTERRUPT while it waits (`scope`, in `waiting`) answers it EINTR."""
        lock = self.served.lock
        with scope:
            try:
                await lock.acquire()
            finally:
                del self.waiting[unique]
        if scope.cancelled_caught:
            raise InterruptedError(errno.EINTR, "interrupted")
        try:
            reply = handler(unique, nodeid, uid, gid, memoryview(body))
        except Later as later:
            coro = later.coro
        else:
            return reply
        finally:
            lock.release()
        return await coro  # it takes the lock itself when it needs it

    def _spawn(self, unique: int, coro: Coroutine[Any, Any, Reply]) -> None:
        assert self.nursery is not None
        self.inflight += 1
        self.nursery.start_soon(self._task, unique, coro)

    async def _task(self, unique: int, coro: Coroutine[Any, Any, Reply]) -> None:
        try:
            reply = await coro
        except Exception as exc:
            self._fail(unique, exc)
        else:
            if reply is not None:
                self._reply(unique, reply)
        finally:
            self.inflight -= 1

    # -- replies ---------------------------------------------------------------------------
    def _write(self, parts: list[bytes | memoryview]) -> None:
        try:
            os.writev(self.fd, parts)
        except OSError as exc:
            # ENOENT: the request was interrupted and is gone; else the mount is gone.
            log.debug("reply not delivered: %s", exc)

    def _reply(self, unique: int, reply: bytes | memoryview | list[bytes | memoryview]) -> None:
        if isinstance(reply, list):
            size = sum(len(part) for part in reply)
            self._write([_OUT.pack(_OUT.size + size, 0, unique), *reply])
        else:
            self._write([_OUT.pack(_OUT.size + len(reply), 0, unique), reply])

    def _send_error(self, unique: int, err: int) -> None:
        self._write([_OUT.pack(_OUT.size, -err, unique)])

    def _fail(self, unique: int, exc: BaseException) -> None:
        if isinstance(exc, p.ProtocolError):
            log.error("malformed request %d: %s", unique, exc)
            self._send_error(unique, errno.EIO)
            return
        self._send_error(unique, self.served.errno_of(exc))

    def notify(self, message: bytes) -> None:
        """Send a notification (see protocol.notify_*); best effort."""
        try:
            os.write(self.fd, message)
        except OSError as exc:
            log.debug("notification not delivered: %s", exc)

    # -- requests the session answers itself -----------------------------------------------
    def _init(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_init(body)
        if req.major < p.VERSION:
            log.error("the kernel speaks FUSE %d.%d, we need 7", req.major, req.minor)
            raise OSError(errno.EPROTO, "unsupported protocol")
        if req.major > p.VERSION:
            # Answer with ours only: the kernel sends a new INIT for 7 (<linux/fuse.h>).
            return p.init_out(p.InitOut(p.VERSION, p.MINOR, 0, 0))
        opts = self.options
        want = opts.want | (p.PASSTHROUGH if opts.passthrough else 0)
        flags = req.flags & want
        if not req.flags & p.INIT_EXT:
            flags &= 0xFFFFFFFF
        minor = min(req.minor, p.MINOR)
        max_pages = opts.max_write // 4096 if flags & p.MAX_PAGES else 0
        out = p.InitOut(
            major=p.VERSION,
            minor=minor,
            max_readahead=req.max_readahead,
            flags=flags,
            max_write=opts.max_write,
            time_gran=1,
            max_pages=max_pages,
            max_stack_depth=MAX_STACK_DEPTH if flags & p.PASSTHROUGH else 0,
        )
        self.conn = Connection(
            p.VERSION, minor, req.flags, flags, req.max_readahead, opts.max_write
        )
        log.debug("INIT: kernel %d.%d flags %#x, taken %#x", req.major, req.minor, req.flags, flags)
        self.served.started(self)
        # Answered here, not by the loop: the hook runs after the kernel took the reply.
        self._reply(unique, p.init_out(out))
        hook = opts.after_init
        if hook is not None:
            try:
                hook()
            except Exception:
                log.exception("after INIT")
        return None

    def _interrupt(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        # Only a request still waiting for the core's lock can be given up (it changed
        # nothing yet); any other is answered when it is done. No reply to the INTERRUPT.
        target = p.decode_interrupt(body).unique
        scope = self.waiting.get(target)
        if scope is not None:
            scope.cancel()
        return None

    def _destroy(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self.exiting = True
        return b""


def _opname(opcode: int) -> str:
    try:
        return p.Opcode(opcode).name
    except ValueError:
        return str(opcode)
