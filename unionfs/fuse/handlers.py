"""FUSE requests served by the union core: decode, call UnionFS under one lock, encode the
reply; the one place where a failure becomes an errno."""

from __future__ import annotations

import bisect
import collections
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import trio
import xxhash

from unionfs.core.errors import FsError
from unionfs.core.fs import Attributes, UnionFS
from unionfs.core.types import Fh, Ino
from unionfs.fuse import protocol as p
from unionfs.fuse.passthrough import Backing
from unionfs.fuse.policy import Policy
from unionfs.fuse.session import Handler, Later, Reply

if TYPE_CHECKING:
    from unionfs.fuse.session import Session

log = logging.getLogger("layerfs")
T = TypeVar("T")
Op = p.Opcode

# Lower layers never change: the kernel may cache what only they provide for a long time.
IMMUTABLE_TIMEOUT = 86400.0
# Upper objects change only through this daemon, and the kernel learns every change from
# its own requests and our replies (or drops what it cached: writes, renames, failed renames
# through an invalidation), as it does for lower objects; fuse-overlayfs caches both for
# ever. The timeout bounds how long a change made behind the mount's back (undefined for
# overlayfs too) stays unseen; $LAYERFS_UPPER_TIMEOUT sets it (seconds).
UPPER_TIMEOUT = float(os.environ.get("LAYERFS_UPPER_TIMEOUT", "3600"))
# Names appear only through this mount, and the kernel replaces a cached negative entry
# when one does: "no such name" is cached (compilers probe many paths).
NEGATIVE_TIMEOUT = 3600.0
# Reads and writes up to this size run on the event loop (page-cache speed); larger ones go
# to a worker thread so one big transfer does not stall every other request.
INLINE_IO = 128 * 1024
READ_BUFFERS = 8  # kept for reads in worker threads, MAX_READ each
MAX_READ = 1 << 20  # the largest READ the kernel sends (max_pages of 4 KiB, see session)
LISTINGS = 64  # directories whose listing is kept between READDIRPLUS requests
# A file opened only for reading passes through from this size on (see open_choice).
PASSTHROUGH_MIN_READ = 256 * 1024
# Backing files kept registered for inodes with no open file (each holds the host file open).
IDLE_BACKING = 1024
_NS = 1_000_000_000
_NO_ATTR = (0,) * 16
_ENTRY_OUT = p.ENTRY_OUT.pack
_ATTR_OUT = p.ATTR_OUT.pack


def errno_of(exc: BaseException) -> int:
    """The one place where a failure becomes the errno of a reply: FsError and OSError carry
    theirs; anything else is a bug, logged, and answered EIO (the daemon goes on)."""
    if isinstance(exc, FsError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno is not None:
        return exc.errno
    log.error("unexpected error, answering EIO", exc_info=exc)
    return errno.EIO


def _valid(timeout: float) -> tuple[int, int]:
    sec = int(timeout)
    return sec, int((timeout - sec) * 1e9)


def cookie(name: bytes) -> int:
    """The directory offset after `name`: from its hash, in [3, 2**62 + 3) (1 and 2 follow
    "." and "..")."""
    return (xxhash.xxh64_intdigest(name) >> 2) + 3


class Listing:
    """A directory's names for READDIRPLUS, ordered by their cookies (`cookie`), which are
    the offsets the kernel resumes from. Without OPENDIR (see Handlers.opendir) requests
    carry no handle, so readers of one directory cannot be told apart; with offsets that name
    a place in the order of hashes, any listing of the directory resumes where another left
    off: a name present throughout is returned exactly once to each reader, whatever was
    added or removed between two reads (a seekdir/telldir offset stays valid too). Two names
    with one hash (one chance in 2**62 per pair) get consecutive cookies."""

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


class Handlers:
    """Every request of a union mount. The core is not thread-safe: calls that change it
    hold `lock`, which a copy-up running in a worker thread keeps until it is done."""

    def __init__(self, fs: UnionFS, policy: Policy | None = None) -> None:
        self.fs = fs
        self.policy = policy or Policy()
        self.lock = trio.Lock()
        self.session: Session | None = None
        self.nowait = True  # the host filesystem supports RWF_NOWAIT reads (until it fails)
        self._rbuf = bytearray(INLINE_IO)  # see read_now
        self._buffers: list[bytearray] = []  # for reads in worker threads (_read_rest)
        self._static_nlink = self.policy.static_nlink
        t = self.policy.timeout
        self._imm = _valid(IMMUTABLE_TIMEOUT if t is None else t)
        self._upp = _valid(UPPER_TIMEOUT if t is None else t)
        self._neg = _valid(NEGATIVE_TIMEOUT if t is None else t)
        self.no_opendir = False  # the kernel can open directories without asking us
        # Directory listings being read, by inode: the core's directory handles (the kernel
        # opens directories itself, see opendir), least recently used first.
        self._listings: collections.OrderedDict[int, Listing] = collections.OrderedDict()
        # Passthrough (see passthrough.py), once INIT took it: per inode with a registered
        # backing file, [backing id, number of passthrough opens]; the inode of each
        # passthrough handle; and the inodes whose backing file is kept while none of their
        # files is open (least recently used first), so that a reopen costs no registration.
        self.passthrough: Backing | None = None
        self._backing: dict[int, list[int]] = {}
        self._direct: dict[int, int] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()

    # -- the session's side ----------------------------------------------------------------
    def errno_of(self, exc: BaseException) -> int:
        return errno_of(exc)

    def started(self, session: Session) -> None:
        self.session = session
        conn = session.conn
        assert conn is not None
        self.no_opendir = bool(conn.kernel_flags & p.NO_OPENDIR_SUPPORT)
        if conn.passthrough:
            self.passthrough = Backing(session.fd)

    def table(self) -> Mapping[int, tuple[Handler, bool]]:
        locked: dict[int, Handler] = {
            Op.LOOKUP: self.lookup,
            Op.FORGET: self.forget,
            Op.BATCH_FORGET: self.batch_forget,
            Op.GETATTR: self.getattr,
            Op.SETATTR: self.setattr,
            Op.READLINK: self.readlink,
            Op.SYMLINK: self.symlink,
            Op.MKNOD: self.mknod,
            Op.MKDIR: self.mkdir,
            Op.UNLINK: self.unlink,
            Op.RMDIR: self.rmdir,
            Op.RENAME: self.rename,
            Op.RENAME2: self.rename2,
            Op.LINK: self.link,
            Op.OPEN: self.open,
            Op.CREATE: self.create,
            Op.RELEASE: self.release,
            Op.STATFS: self.statfs,
            Op.SETXATTR: self.setxattr,
            Op.GETXATTR: self.getxattr,
            Op.LISTXATTR: self.listxattr,
            Op.REMOVEXATTR: self.removexattr,
            Op.READDIR: self.readdir,
            Op.READDIRPLUS: self.readdirplus,
            Op.ACCESS: self.access,
            Op.FALLOCATE: self.fallocate,
            Op.LSEEK: self.lseek,
        }
        free: dict[int, Handler] = {
            Op.READ: self.read,
            Op.WRITE: self.write,
            Op.FLUSH: self.flush,
            Op.FSYNC: self.fsync,
            Op.OPENDIR: self.opendir,
            Op.RELEASEDIR: self.releasedir,
            Op.FSYNCDIR: self.fsyncdir,
            Op.NOTIFY_REPLY: self.notify_reply,
        }
        # Answered ENOSYS on purpose (the kernel then stops asking or does the work
        # itself): locks stay local to the kernel, ioctl gives ENOTTY, poll the default mask,
        # copy_file_range is done by the kernel through READ and WRITE, statx falls back to
        # GETATTR; bmap, DAX mappings, syncfs, O_TMPFILE and CUSE are not for this mount.
        unserved = (
            Op.GETLK, Op.SETLK, Op.SETLKW, Op.BMAP, Op.IOCTL, Op.POLL, Op.COPY_FILE_RANGE,
            Op.COPY_FILE_RANGE_64, Op.SETUPMAPPING, Op.REMOVEMAPPING, Op.SYNCFS, Op.TMPFILE,
            Op.STATX, Op.CUSE_INIT,
        )  # fmt: skip
        table: dict[int, tuple[Handler, bool]] = {op: (fn, True) for op, fn in locked.items()}
        table.update({op: (fn, False) for op, fn in free.items()})
        table.update({op: (self.enosys, False) for op in unserved})
        return table

    # -- helpers ---------------------------------------------------------------------------
    # Entries and attributes are packed here with the codec's layouts directly: they answer
    # most requests (LOOKUP, GETATTR, READDIRPLUS), and a call less per reply shows.
    def _out(self, a: Attributes, entry: bool) -> bytes:
        """fuse_entry_out (`entry`) or fuse_attr_out for `a` (see protocol.entry_out)."""
        st = a.st
        sec, nsec = self._imm if a.immutable else self._upp
        asec, ans = divmod(st.atime_ns, _NS)
        msec, mns = divmod(st.mtime_ns, _NS)
        csec, cns = divmod(st.ctime_ns, _NS)
        nlink = 1 if self._static_nlink and stat.S_ISDIR(st.mode) else st.nlink
        head = (a.ino, 0, sec, sec, nsec, nsec) if entry else (sec, nsec, 0)
        return (_ENTRY_OUT if entry else _ATTR_OUT)(
            *head, a.ino, st.size, st.blocks, asec, msec, csec, ans, mns, cns,
            st.mode, nlink, st.uid, st.gid, st.rdev & 0xFFFFFFFF, 4096, 0,
        )  # fmt: skip

    async def _core(self, fn: Callable[..., T], *args: Any, thread: bool = False) -> T:
        """`fn(*args)` under the lock, in a worker thread if `thread` (a copy-up)."""
        async with self.lock:
            if thread:
                return await trio.to_thread.run_sync(functools.partial(fn, *args))
            return fn(*args)

    def _notify_attr(self, inos: Sequence[int]) -> None:
        """Make the kernel ask for the attributes of `inos` again (takes no kernel lock, so
        safe while it waits for our reply to a request on them)."""
        if self.session is not None:
            for ino in dict.fromkeys(inos):
                self.session.notify(p.notify_inval_inode(ino, -1, 0))

    # -- names and attributes --------------------------------------------------------------
    def lookup(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        try:
            a = self.fs.lookup(Ino(nodeid), p.name(body))
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return p.entry_out(0, self._neg, (0, 0), _NO_ATTR)
        return self._out(a, True)

    def forget(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self._forget([(nodeid, p.decode_forget(body).nlookup)])
        return None

    def batch_forget(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self._forget(p.decode_batch_forget(body))
        return None

    def _forget(self, pairs: Sequence[tuple[int, int]]) -> None:
        fs = self.fs
        for ino, n in pairs:
            fs.forget(Ino(ino), n)
            if fs.known(Ino(ino)):
                continue
            if ino in self._idle:
                # Gone from the kernel and from us (an unlinked file's space is freed only
                # once its backing file is closed).
                self._drop_backing(ino)
            listing = self._listings.pop(ino, None)
            if listing is not None:
                fs.releasedir(listing.fh)

    def getattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        return self._out(self.fs.getattr(Ino(nodeid)), False)

    def setattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_setattr(body)
        call = functools.partial(self._setattr, nodeid, req, time.time_ns())
        if self.fs.needs_copy_up(Ino(nodeid)):
            raise Later(self._core(call, thread=True))  # a copy-up takes a worker thread
        return call()

    def _setattr(self, nodeid: int, req: p.SetattrIn, now: int) -> bytes:
        # *_NOW: the current CLOCK_REALTIME time, as libfuse passed it on.
        valid = req.valid
        atime_ns = mtime_ns = None
        if valid & p.FATTR_ATIME:
            atime_ns = req.atime * _NS + req.atimensec
        elif valid & p.FATTR_ATIME_NOW:
            atime_ns = now
        if valid & p.FATTR_MTIME:
            mtime_ns = req.mtime * _NS + req.mtimensec
        elif valid & p.FATTR_MTIME_NOW:
            mtime_ns = now
        a = self.fs.setattr(
            Ino(nodeid),
            mode=req.mode if valid & p.FATTR_MODE else None,
            uid=req.uid if valid & p.FATTR_UID else None,
            gid=req.gid if valid & p.FATTR_GID else None,
            size=req.size if valid & p.FATTR_SIZE else None,
            atime_ns=atime_ns,
            mtime_ns=mtime_ns,
            fh=Fh(req.fh) if valid & p.FATTR_FH else None,
        )
        return self._out(a, False)

    def readlink(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        return self.fs.readlink(Ino(nodeid))

    def symlink(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_symlink(body)
        return self._out(self.fs.symlink(Ino(nodeid), req.name, req.target, uid, gid), True)

    def mknod(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_mknod(body)
        a = self.fs.mknod(Ino(nodeid), req.name, req.mode, req.rdev, uid, gid)
        return self._out(a, True)

    def mkdir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_mkdir(body)
        return self._out(self.fs.mkdir(Ino(nodeid), req.name, req.mode, uid, gid), True)

    def unlink(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        try:
            self.fs.unlink(Ino(nodeid), p.name(body))
        finally:
            self._unregister_unlinked()
        return b""

    def rmdir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self.fs.rmdir(Ino(nodeid), p.name(body))
        return b""

    def rename(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        raise Later(self._rename(nodeid, p.decode_rename(body)))  # copy-ups: a worker thread

    def rename2(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        raise Later(self._rename(nodeid, p.decode_rename2(body)))

    async def _rename(self, nodeid: int, req: p.RenameIn) -> Reply:
        try:
            await self._core(
                self.fs.rename,
                Ino(nodeid),
                req.old,
                Ino(req.newdir),
                req.new,
                req.flags,
                thread=True,
            )
        except FsError:
            # A rename that fails in the upper filesystem (as the kernel's does, after its
            # copy-ups) may still have touched the parents' times: the kernel must not go on
            # showing the attributes it cached.
            self._notify_attr([nodeid, req.newdir])
            raise
        finally:
            self._unregister_unlinked()  # a file renamed over
        return b""

    def link(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_link(body)
        call = functools.partial(self.fs.link, Ino(req.oldnodeid), Ino(nodeid), req.name)
        raise Later(self._entry_later(call))

    async def _entry_later(self, call: Callable[[], Attributes]) -> Reply:
        return self._out(await self._core(call, thread=True), True)

    def _unregister_unlinked(self) -> None:
        """A backing file kept for a file whose last name is gone would keep its blocks in
        use until the kernel forgets the inode: unregister it now."""
        for ino in self.fs.take_unlinked():
            if ino in self._idle:
                self._drop_backing(ino)

    # -- files -----------------------------------------------------------------------------
    def open(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        flags = p.decode_open(body).flags
        writing = bool(flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC)
        if writing and self.fs.needs_copy_up(Ino(nodeid)):
            raise Later(self._open_later(nodeid, flags))  # a copy-up takes a thread
        fh, keep = self.fs.open(Ino(nodeid), flags)
        return self._open_out(nodeid, fh, keep, writing)

    async def _open_later(self, nodeid: int, flags: int) -> Reply:
        async with self.lock:
            fh, keep = await trio.to_thread.run_sync(self.fs.open, Ino(nodeid), flags)
            return self._open_out(nodeid, fh, keep, True)

    def _open_out(self, ino: int, fh: Fh, keep: bool, writing: bool) -> bytes:
        keep, backing = self.open_choice(ino, fh, keep, writing)
        if backing is not None:
            return p.open_out(fh, p.FOPEN_PASSTHROUGH, backing)
        return p.open_out(fh, p.FOPEN_KEEP_CACHE if keep else 0)

    def create(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_create(body)
        fh, a = self.fs.create(Ino(nodeid), req.name, req.mode, req.flags, uid, gid)
        # The new file changes only through this mount, so its page cache stays valid.
        return self._out(a, True) + self._open_out(a.ino, fh, True, True)

    def open_choice(self, ino: int, fh: Fh, keep: bool, writing: bool) -> tuple[bool, int | None]:
        """For an OPEN or CREATE just served by the core: may the kernel keep the page cache,
        and the backing id when the open passes through.

        The kernel's rule (fs/fuse/iomode.c): while an inode is open, all its opens pass
        through the same backing file, or none does. An inode with passthrough opens gets
        the same backing id; one with ordinary opens gets ordinary ones (a lower file opened
        before its copy-up follows the copy through us). An inode with no open file passes
        through when its host file can no longer change identity (fs.passthrough_fd) and the
        open writes or reads a large file: a small file read through us stays in the
        kernel's page cache across opens, while each passthrough read makes the next stat
        ask us for the atime (fs/fuse: fuse_file_accessed)."""
        pt = self.passthrough
        if pt is not None and pt.usable:
            node = self.fs.node(Ino(ino))
            held = self._backing.get(ino)
            if held is None or held[1] == 0:  # no passthrough open: a free choice?
                if node.opens == 1 and (writing or self._large(fh)):
                    if held is None:
                        fd = self.fs.passthrough_fd(fh)
                        bid = pt.open(fd) if fd is not None else None
                        if bid is not None:
                            held = self._backing[ino] = [bid, 0]
                else:
                    held = None
            if held is not None:
                if held[1] == 0:
                    self._idle.pop(ino, None)
                held[1] += 1
                self._direct[fh] = ino
                node.passed_through = True
                return False, held[0]
            if node.passed_through:
                # The kernel wrote the host file directly since it last cached pages of
                # this inode: this open drops them (and later ones may keep theirs again).
                keep = False
                node.passed_through = False
        return keep, None

    def _large(self, fh: Fh) -> bool:
        fd = self.fs.passthrough_fd(fh)
        return fd is not None and os.fstat(fd).st_size >= PASSTHROUGH_MIN_READ

    def _end_direct(self, fh: int) -> None:
        ino = self._direct.pop(fh, None)
        if ino is None:
            return
        held = self._backing[ino]
        held[1] -= 1
        if held[1] == 0:
            if self.fs.gone(Ino(ino)):
                # Unlinked while open: keeping it registered would keep its blocks.
                del self._backing[ino]
                assert self.passthrough is not None
                self.passthrough.close(held[0])
                return
            self._idle[ino] = None
            if len(self._idle) > IDLE_BACKING:
                self._drop_backing(self._idle.popitem(last=False)[0])

    def _drop_backing(self, ino: int) -> None:
        """Unregister the backing file of `ino`, which has no passthrough open."""
        self._idle.pop(ino, None)
        held = self._backing.pop(ino)
        assert self.passthrough is not None and held[1] == 0
        self.passthrough.close(held[0])

    def release(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        fh = p.decode_release(body).fh
        self._end_direct(fh)
        self.fs.release(Fh(fh))
        return b""

    def read(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        # Reads need no lock unless the handle must follow a copy-up: a read is not held up
        # behind a copy-up running in a worker thread.
        fh, off, size, *_ = p.decode_read(body)
        fd = self.fs.ready_fd(Fh(fh))
        if fd is None:
            raise Later(self._read_later(fh, off, size))
        view, done = self.read_now(fd, off, size)
        if done:
            return view
        raise Later(self._read_rest(fd, off, size, bytes(view)))

    async def _read_later(self, fh: int, off: int, size: int) -> Reply:
        fd = await self._core(self.fs.read_fd, Fh(fh))
        view, done = self.read_now(fd, off, size)
        if done:
            return bytes(view)
        return await self._read_rest(fd, off, size, bytes(view))

    def read_now(self, fd: int, off: int, size: int) -> tuple[memoryview, bool]:
        """What can be read at once: (data, complete). Only a read that would wait for the
        disk is incomplete (its rest goes to a worker thread, so cold reads of several files
        overlap); the page cache is read here. `data` is a view of one buffer that serves
        every read: the reply must be sent, or the data copied, before the next call."""
        if len(self._rbuf) < size:
            self._rbuf = bytearray(size)
        view = memoryview(self._rbuf)[:size]
        if not self.nowait:
            if size <= INLINE_IO:
                return view[: os.preadv(fd, [view], off)], True
            return view[:0], False
        got = 0
        try:
            while got < size:
                n = os.preadv(fd, [view[got:]], off + got, os.RWF_NOWAIT)
                if n == 0:
                    break  # end of file
                got += n
            return view[:got], True
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            self.nowait = False  # the host filesystem cannot say "would block"
        return view[:got], False

    async def _read_rest(self, fd: int, off: int, size: int, head: bytes) -> Reply:
        """The part of a read that waits for the disk, in a worker thread, into a buffer kept
        for the next such read (a fresh 1 MiB allocation costs a page fault per 4 KiB).

        The buffer goes back to the pool as this returns its view: the session writes the
        reply before any other task runs, so no other read can take the buffer first."""
        buf = self._buffers.pop() if self._buffers else bytearray(max(size, MAX_READ))
        if len(buf) < size:
            buf = bytearray(size)
        try:
            view = memoryview(buf)[: size - len(head)]
            n = await trio.to_thread.run_sync(os.preadv, fd, [view], off + len(head))
            return [head, view[:n]]
        finally:
            if len(self._buffers) < READ_BUFFERS:
                self._buffers.append(buf)

    def write(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_write(body)
        fd = self.fs.write_fd(Fh(req.fh))
        if req.size <= INLINE_IO:
            return p.write_out(os.pwrite(fd, req.data, req.offset))
        raise Later(self._write_big(fd, req.offset, bytes(req.data)))

    async def _write_big(self, fd: int, off: int, data: bytes) -> Reply:
        return p.write_out(await trio.to_thread.run_sync(os.pwrite, fd, data, off))

    def flush(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        # Nothing to do on close(): ENOSYS tells the kernel to stop sending FLUSH, one round
        # trip less per close (it still writes cached data back before a close).
        raise FsError(errno.ENOSYS)

    def fsync(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_fsync(body)
        if not self.policy.fsync:
            return b""
        datasync = bool(req.fsync_flags & p.FSYNC_FDATASYNC)
        raise Later(self._fsync(req.fh, datasync))

    async def _fsync(self, fh: int, datasync: bool) -> Reply:
        await trio.to_thread.run_sync(self.fs.fsync, Fh(fh), datasync)
        return b""

    def fallocate(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_fallocate(body)
        self.fs.fallocate(Fh(req.fh), req.mode, req.offset, req.length)
        return b""

    def lseek(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        # SEEK_DATA and SEEK_HOLE (the kernel answers the other whences itself), on the host
        # file that holds the data; the fd's own offset is never used (all I/O is positional).
        req = p.decode_lseek(body)
        fd = self.fs.read_fd(Fh(req.fh))
        return p.lseek_out(os.lseek(fd, req.offset, req.whence))

    # -- directories -----------------------------------------------------------------------
    def opendir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        if self.no_opendir:
            # A listing needs no open handle here (see readdir): ENOSYS tells the kernel to
            # stop asking. It then opens directories itself, as if answered with
            # FOPEN_KEEP_CACHE | FOPEN_CACHE_DIR (fs/fuse/file.c: fuse_file_open), and sends
            # no RELEASEDIR: two round trips less per directory read (a `find` does one per
            # directory), and listings stay cached in the kernel.
            raise FsError(errno.ENOSYS)
        # A kernel older than 5.1 needs an answer: the same flags, no handle.
        return p.open_out(0, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR)

    def releasedir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        return b""  # listings are kept by inode, not by handle (see readdir)

    def fsyncdir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        return b""  # directories change through the upper's own calls, never cached here

    def readdirplus(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_read(body)
        return self._readdir(nodeid, req.offset, req.size, True)

    def readdir(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        req = p.decode_read(body)
        return self._readdir(nodeid, req.offset, req.size, False)

    def _listing(self, ino: int, start: int) -> Listing:
        """The listing to read `ino` from offset `start`: a fresh one at offset 0, else the
        one read before (any listing of the directory resumes alike, see Listing)."""
        listing = self._listings.pop(ino, None)
        if listing is not None and (
            start == 0 or self.fs.handles.dir(listing.fh).node is not self.fs.node(Ino(ino))
        ):
            self.fs.releasedir(listing.fh)
            listing = None
        if listing is None:
            fh = self.fs.opendir(Ino(ino))
            try:
                listing = Listing(fh, self.fs.listing(fh))
            except BaseException:
                self.fs.releasedir(fh)
                raise
        self._listings[ino] = listing
        while len(self._listings) > LISTINGS:
            self.fs.releasedir(self._listings.popitem(last=False)[1].fh)
        return listing

    def _readdir(self, ino: int, start: int, size: int, plus: bool) -> Reply:
        # Offsets: 1 after ".", 2 after "..", an entry's cookie after it (see Listing).
        listing = self._listing(ino, start)
        fs = self.fs
        node = fs.handles.dir(listing.fh).node
        parts: list[bytes | memoryview] = []
        room = size

        def add(name: bytes, a: Attributes, off: int) -> bool:
            nonlocal room
            typ = (a.st.mode >> 12) & 0o17
            if plus:
                rec = p.direntplus(self._out(a, True), a.ino, off, typ, name)
            else:
                rec = p.dirent(a.ino, off, typ, name)
            if len(rec) > room:
                return False
            parts.append(rec)
            room -= len(rec)
            return True

        done = True
        if start == 0:
            # "." and ".." are never linked by the kernel: no lookup count, no forget.
            done = add(b".", fs.getattr(node.ino), 1)
            start = 1
        if done and start == 1:
            parent = node.parent.ino if node.parent is not None else node.ino
            done = add(b"..", fs.getattr(parent), 2)
        if done:
            cookies = listing.cookies
            first = bisect.bisect_right(cookies, start)
            for name, a, nxt in fs.readdir_iter(listing.fh, first):
                if not add(name, a, cookies[nxt - 1]):
                    fs.drop_if_unused(a.ino)
                    break
                if plus:
                    fs.incref(a.ino)
                else:
                    fs.drop_if_unused(a.ino)
        if not parts:
            fs.releasedir(self._listings.pop(ino).fh)  # the end of the listing
        return parts

    # -- xattrs ----------------------------------------------------------------------------
    def _xattrs_on(self) -> None:
        if not self.policy.xattrs:
            raise FsError(errno.ENOSYS)  # noxattrs=1, as fuse-overlayfs answers

    def getxattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self._xattrs_on()
        req = p.decode_getxattr(body)
        value = self.fs.getxattr(Ino(nodeid), req.name)
        return _sized(value, req.size)

    def listxattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self._xattrs_on()
        size = p.decode_listxattr(body).size
        names = self.fs.listxattr(Ino(nodeid))
        return _sized(b"".join(n + b"\0" for n in names), size)

    def setxattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self._xattrs_on()
        req = p.decode_setxattr(body)
        call = functools.partial(self._setxattr, nodeid, req.name, req.value, req.flags)
        if self.fs.needs_copy_up(Ino(nodeid)):
            raise Later(self._core(call, thread=True))
        return call()

    def _setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int) -> bytes:
        self.fs.setxattr(Ino(nodeid), name, value, flags)
        return b""

    def removexattr(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self._xattrs_on()
        call = functools.partial(self._removexattr, nodeid, p.name(body))
        if self.fs.needs_copy_up(Ino(nodeid)):
            raise Later(self._core(call, thread=True))
        return call()

    def _removexattr(self, nodeid: int, name: bytes) -> bytes:
        self.fs.removexattr(Ino(nodeid), name)
        return b""

    # -- the rest --------------------------------------------------------------------------
    def statfs(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        s = self.fs.statfs()
        return p.statfs_out(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, 255, s.f_frsize
        )

    def access(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        self.fs.access(Ino(nodeid), p.decode_access(body).mask)
        return b""

    def notify_reply(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        return None  # we never ask for data back (NOTIFY_RETRIEVE)

    def enosys(self, unique: int, nodeid: int, uid: int, gid: int, body: memoryview) -> Reply:
        raise FsError(errno.ENOSYS)


def _sized(value: bytes, size: int) -> Reply:
    """A GETXATTR or LISTXATTR answer: the size when asked with 0, else the value if it fits."""
    if size == 0:
        return p.getxattr_out(len(value))
    if len(value) > size:
        raise FsError(errno.ERANGE)
    return value
