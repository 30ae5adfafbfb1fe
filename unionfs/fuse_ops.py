"""pyfuse3 adapter: requests in, UnionFS calls under one lock, bulk I/O in worker threads."""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import gc
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar, cast

import pyfuse3
import trio

from layerstore.mountinfo import mount_at
from unionfs.core.errors import FsError
from unionfs.core.fs import Attributes, UnionFS
from unionfs.core.types import Fh, Ino
from unionfs.fuse_dircache import install as cache_listings
from unionfs.fuse_fallocate import Fallocate
from unionfs.fuse_passthrough import Passthrough

log = logging.getLogger("layerfs")

T = TypeVar("T")
P = ParamSpec("P")

# Lower layers never change: the kernel may cache what only they provide for a long time.
IMMUTABLE_TIMEOUT = 86400.0
# Upper objects change only through this daemon, and the kernel learns every change from
# its own requests and our replies (or drops what it cached: writes, renames, failed renames
# through invalidate_inode), as it does for lower objects; fuse-overlayfs caches both for
# ever. The timeout bounds how long a change made behind the mount's back (undefined for
# overlayfs too) stays unseen; $LAYERFS_UPPER_TIMEOUT sets it (seconds).
UPPER_TIMEOUT = float(os.environ.get("LAYERFS_UPPER_TIMEOUT", "3600"))
NEGATIVE_TIMEOUT = 3600.0
# Reads and writes up to this size run on the event loop (page-cache speed); larger ones
# go to a worker thread so one big transfer does not stall every other request.
INLINE_IO = 128 * 1024
# Readahead window of the mount (KiB): the largest read request the kernel then sends is
# min(this, max_pages = 1 MiB with libfuse 3), 8 times fewer requests than the default.
READAHEAD_KB = 1024
# A file opened only for reading passes through from this size on (see _file_info).
PASSTHROUGH_MIN_READ = 256 * 1024
# Backing files kept registered for inodes with no open file (each holds the host file open).
IDLE_BACKING = 1024


def _buffer(b: memoryview) -> bytes:
    # pyfuse3 replies with any contiguous buffer (it takes PyObject_GetBuffer of the result);
    # its stub says bytes. Returning a view saves copying every read once more.
    return cast(bytes, b)


def to_fuse_error(exc: BaseException) -> pyfuse3.FUSEError:
    """The one place where failures become FUSE errors."""
    if isinstance(exc, pyfuse3.FUSEError):
        return exc
    if isinstance(exc, FsError):
        return pyfuse3.FUSEError(exc.errno)
    if isinstance(exc, OSError) and exc.errno is not None:
        return pyfuse3.FUSEError(exc.errno)
    log.error("unexpected error, answering EIO", exc_info=exc)
    return pyfuse3.FUSEError(errno.EIO)


def _guard(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except trio.Cancelled:
            raise
        except Exception as exc:
            raise to_fuse_error(exc) from None

    return wrapper


def entry_attributes(a: Attributes) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    st = a.st
    e.st_ino = a.ino
    e.generation = 0
    timeout = IMMUTABLE_TIMEOUT if a.immutable else UPPER_TIMEOUT
    e.entry_timeout = timeout
    e.attr_timeout = timeout
    e.st_mode = st.mode
    e.st_nlink = st.nlink
    e.st_uid = st.uid
    e.st_gid = st.gid
    e.st_rdev = st.rdev
    e.st_size = st.size
    e.st_blksize = 4096
    e.st_blocks = st.blocks
    e.st_atime_ns = st.atime_ns
    e.st_mtime_ns = st.mtime_ns
    e.st_ctime_ns = st.ctime_ns
    return e


class Operations(pyfuse3.Operations):
    """Every handler takes the lock for its core call: between awaits a task owns the core,
    and a copy-up running in a worker thread keeps the lock until it is done."""

    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, fs: UnionFS, mountpoint: str | None = None) -> None:
        super().__init__()
        self.fs = fs
        self.lock = trio.Lock()
        self.nowait = True  # the host filesystem supports RWF_NOWAIT reads (until it fails)
        self._rbuf = bytearray(READAHEAD_KB * 1024)  # see read()
        # Where we are mounted (resolved now, before the mount), to widen its readahead.
        self.mountpoint = os.path.realpath(mountpoint) if mountpoint is not None else None
        # Kernel passthrough (see fuse_passthrough.py), once `start_passthrough` set it up:
        # per inode with a registered backing file, [backing id, number of passthrough
        # opens]; the inode of each passthrough handle; and the inodes whose backing file
        # is kept while none of their files is open (least recently used first), so that
        # opening a file again costs no registration.
        self.passthrough: Passthrough | None = None
        self._backing: dict[int, list[int]] = {}
        self._direct: dict[int, int] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()
        # The kernel keeps listings and drops them on any change made through the mount.
        cache_listings()
        # The inode table and the layer caches are many long-lived objects (a mounted
        # 100,000-file image: millions): with the default thresholds the collector scans
        # them again and again, 40% of a cold walk's time. Few of our objects form cycles.
        gc.set_threshold(50_000, 20, 100)

    def prepare_session(self) -> None:
        """Right before pyfuse3.init: add the FALLOCATE handler pyfuse3 lacks."""
        self._fallocate = Fallocate(self._allocate)
        if not self._fallocate.prepare():
            log.debug("fallocate stays unsupported with pyfuse3 %s", pyfuse3.__version__)

    def _allocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        # Called synchronously in the loop's thread (see fuse_fallocate.py): it only looks
        # up the handle and calls fallocate(2) on its upper fd, as an inline write does.
        self.fs.fallocate(Fh(fh), mode, offset, length)

    def start_passthrough(self, fuse_fd: int) -> bool:
        """After mounting, before serving: ask the kernel for passthrough in the INIT reply."""
        pt = Passthrough()
        if not pt.install(fuse_fd):
            return False
        self.passthrough = pt
        return True

    def _file_info(self, ino: int, fh: Fh, keep: bool, writing: bool) -> pyfuse3.FileInfo:
        """The reply to an OPEN or CREATE just served by the core, through pyfuse3 (no await
        may follow: a passthrough reply is armed here for pyfuse3's very next reply)."""
        keep, backing = self.open_choice(ino, fh, keep, writing)
        if backing is not None:
            assert self.passthrough is not None
            self.passthrough.arm(fh, backing)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep)

    def open_choice(self, ino: int, fh: Fh, keep: bool, writing: bool) -> tuple[bool, int | None]:
        """For an OPEN or CREATE just served by the core: may the kernel keep the page cache,
        and the backing id when the open passes through (see fuse_passthrough.py).

        The kernel's rule: while an inode is open, all its opens pass through the same
        backing file, or none does. An inode with passthrough opens gets the same backing
        id; one with ordinary opens gets ordinary ones (a lower file opened before its
        copy-up follows the copy through us). An inode with no open file passes through
        when its host file can no longer change identity (fs.passthrough_fd) and the open
        writes or reads a large file: a small file read through us stays in the kernel's
        page cache across opens, while each passthrough read makes the next stat ask us
        for the atime (fs/fuse: fuse_file_accessed)."""
        pt = self.passthrough
        if pt is not None and pt.usable:
            node = self.fs.node(Ino(ino))
            held = self._backing.get(ino)
            if held is None or held[1] == 0:  # no passthrough open: a free choice?
                if node.opens == 1 and (writing or self._large(fh)):
                    if held is None:
                        fd = self.fs.passthrough_fd(fh)
                        bid = pt.backing_open(fd) if fd is not None else None
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
                # (Its mtime usually tells the kernel too, but not within one clock tick.)
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
                self.passthrough.backing_close(held[0])
                return
            self._idle[ino] = None
            if len(self._idle) > IDLE_BACKING:
                self._drop_backing(self._idle.popitem(last=False)[0])

    def _drop_backing(self, ino: int) -> None:
        """Unregister the backing file of `ino`, which has no passthrough open."""
        self._idle.pop(ino, None)
        held = self._backing.pop(ino)
        assert self.passthrough is not None and held[1] == 0
        self.passthrough.backing_close(held[0])

    def widen_readahead(self) -> None:
        """Once, after the kernel's INIT (which set the mount's readahead to 128 KiB): widen
        it so a sequential read asks for 1 MiB at a time, 8 times fewer requests. The
        device is read from mountinfo, not by a stat of the mount (which this loop would
        have to answer). Best effort: needs root (sysfs)."""
        mountpoint, self.mountpoint = self.mountpoint, None
        if mountpoint is None:
            return
        try:
            found = mount_at(mountpoint, resolved=True)
            if found is None or found.major != 0 or not found.fstype.startswith("fuse"):
                # A FUSE mount has an anonymous device (major 0): this is something else,
                # mounted over us since; leave its readahead alone.
                return
            with open(f"/sys/class/bdi/0:{found.minor}/read_ahead_kb", "w") as f:
                f.write(str(READAHEAD_KB))
        except (OSError, ValueError) as exc:  # not root, or no sysfs: the kernel's default
            log.debug("cannot widen the readahead: %s", exc)

    async def _core(self, fn: Callable[..., T], *args: Any, thread: bool = False) -> T:
        if not thread and not self.lock.locked():
            # Nothing else runs between this check and the call (no await in between), so
            # this excludes others as the lock would, without a trip through the scheduler.
            return fn(*args)
        async with self.lock:
            if thread:
                return await trio.to_thread.run_sync(functools.partial(fn, *args))
            return fn(*args)

    def lookup_now(self, parent_inode: int, name: bytes) -> Attributes | None:
        """fs.lookup; None when there is no such name. Names appear only through this
        mount, and the kernel replaces a cached negative entry when one does: the reply
        caches "no such name" (compilers probe many paths)."""
        try:
            return self.fs.lookup(Ino(parent_inode), name)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            return None

    @_guard
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        a = await self._core(self.lookup_now, parent_inode, name)
        if a is not None:
            return entry_attributes(a)
        neg = pyfuse3.EntryAttributes()
        neg.st_ino = 0
        neg.entry_timeout = NEGATIVE_TIMEOUT
        return neg

    @_guard
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        await self._core(self._forget, inode_list)

    def _forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for ino, n in inode_list:
            self.fs.forget(Ino(ino), n)
            if ino in self._idle and not self.fs.known(Ino(ino)):
                # Gone from the kernel and from us (an unlinked file's space is freed
                # only once its backing file is closed).
                self._drop_backing(ino)

    @_guard
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return entry_attributes(await self._core(self.fs.getattr, Ino(inode)))

    @_guard
    async def setattr(
        self, inode: int, attr: Any, fields: Any, fh: int | None, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        call = functools.partial(
            self.fs.setattr,
            Ino(inode),
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=Fh(fh) if fh is not None else None,
        )
        return entry_attributes(await self._core(call, thread=self.fs.needs_copy_up(Ino(inode))))

    @_guard
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._core(self.fs.readlink, Ino(inode))

    @_guard
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        a = await self._core(self.fs.mknod, Ino(parent_inode), name, mode, rdev, ctx.uid, ctx.gid)
        return entry_attributes(a)

    @_guard
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        a = await self._core(self.fs.mkdir, Ino(parent_inode), name, mode, ctx.uid, ctx.gid)
        return entry_attributes(a)

    @_guard
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        try:
            await self._core(self.fs.unlink, Ino(parent_inode), name)
        finally:
            self._unregister_unlinked()

    def _unregister_unlinked(self) -> None:
        """A backing file kept for a file whose last name is gone would keep its blocks in
        use until the kernel forgets the inode: unregister it now."""
        for ino in self.fs.take_unlinked():
            if ino in self._idle:
                self._drop_backing(ino)

    @_guard
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._core(self.fs.rmdir, Ino(parent_inode), name)

    @_guard
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        a = await self._core(self.fs.symlink, Ino(parent_inode), name, target, ctx.uid, ctx.gid)
        return entry_attributes(a)

    @_guard
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        try:
            await self._core(
                self.fs.rename,
                Ino(parent_inode_old),
                name_old,
                Ino(parent_inode_new),
                name_new,
                flags,
                thread=True,
            )
        except FsError:
            # A rename that fails in the upper filesystem (as the kernel's does, after its
            # copy-ups) may still have touched the parents' times: the kernel must not go on
            # showing the attributes it cached. Attributes only: takes no lock of the kernel's.
            for ino in {parent_inode_old, parent_inode_new}:
                with contextlib.suppress(OSError):
                    pyfuse3.invalidate_inode(ino, attr_only=True)
            raise
        finally:
            self._unregister_unlinked()  # a file renamed over

    @_guard
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        a = await self._core(self.fs.link, Ino(inode), Ino(new_parent_inode), new_name, thread=True)
        return entry_attributes(a)

    @_guard
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if self.mountpoint is not None:
            self.widen_readahead()  # the older loops (fuse_wire does it after INIT)
        writing = flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC
        copy = bool(writing) and self.fs.needs_copy_up(Ino(inode))
        fh, keep = await self._core(self.fs.open, Ino(inode), flags, thread=copy)
        return self._file_info(inode, fh, keep, bool(writing))

    @_guard
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        if self.mountpoint is not None:
            self.widen_readahead()  # as in open
        fh, a = await self._core(
            self.fs.create, Ino(parent_inode), name, mode, flags, ctx.uid, ctx.gid
        )
        # The new file changes only through this mount, so its page cache stays valid.
        return self._file_info(a.ino, fh, True, True), entry_attributes(a)

    @_guard
    async def read(self, fh: int, off: int, size: int) -> bytes:
        # Reads need no lock unless the handle must follow a copy-up: a read is not held up
        # behind a copy-up running in a worker thread.
        fd = self.fs.ready_fd(Fh(fh))
        if fd is None:
            fd = await self._core(self.fs.read_fd, Fh(fh))
        view, done = self.read_now(fd, off, size)
        if done:
            return _buffer(view)
        head = bytes(view)  # copied out of the shared buffer before the await
        rest = await trio.to_thread.run_sync(os.pread, fd, size - len(head), off + len(head))
        return head + rest if head else rest

    def read_now(self, fd: int, off: int, size: int) -> tuple[memoryview, bool]:
        """What can be read at once: (data, complete). Only a read that would wait for the
        disk is incomplete (its rest goes to a worker thread, so cold reads of several files
        overlap); the page cache is read here. `data` is a view of one buffer that serves
        every read (no 1 MiB allocation per read): the reply must be sent, or the data
        copied, before the next call."""
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

    @_guard
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        fd = self.fs.write_fd(Fh(fh))
        if len(buf) <= INLINE_IO:
            return os.pwrite(fd, buf, off)
        return await trio.to_thread.run_sync(os.pwrite, fd, buf, off)

    @_guard
    async def flush(self, fh: int) -> None:
        # Nothing to do on close(): ENOSYS tells the kernel to stop sending FLUSH, one
        # round trip less per close (it still writes cached data back before a close).
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_guard
    async def release(self, fh: int) -> None:
        self._end_direct(fh)
        await self._core(self.fs.release, Fh(fh))

    @_guard
    async def fsync(self, fh: int, datasync: bool) -> None:
        await trio.to_thread.run_sync(self.fs.fsync, Fh(fh), datasync)

    @_guard
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return await self._core(self.fs.opendir, Ino(inode))

    @_guard
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self._core(self._readdir, Fh(fh), start_id, token)

    def _readdir(self, fh: Fh, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Offsets: 1 after ".", 2 after "..", 2 + n after the core's entry n - 1.
        node = self.fs.handles.dir(fh).node
        if start_id == 0:
            # "." and ".." are never linked by the kernel: no lookup count, no forget.
            a = self.fs.getattr(node.ino)
            if not pyfuse3.readdir_reply(token, b".", entry_attributes(a), 1):
                return
            start_id = 1
        if start_id == 1:
            a = self.fs.getattr(node.parent.ino if node.parent is not None else node.ino)
            if not pyfuse3.readdir_reply(token, b"..", entry_attributes(a), 2):
                return
            start_id = 2
        for name, attrs, nxt in self.fs.readdir_iter(fh, start_id - 2):
            if not pyfuse3.readdir_reply(token, name, entry_attributes(attrs), nxt + 2):
                self.fs.drop_if_unused(attrs.ino)
                return
            self.fs.incref(attrs.ino)

    @_guard
    async def releasedir(self, fh: int) -> None:
        await self._core(self.fs.releasedir, Fh(fh))

    @_guard
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        return None

    @_guard
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = await self._core(self.fs.statfs)
        out = pyfuse3.StatvfsData()
        out.f_bsize = s.f_bsize
        out.f_frsize = s.f_frsize
        out.f_blocks = s.f_blocks
        out.f_bfree = s.f_bfree
        out.f_bavail = s.f_bavail
        out.f_files = s.f_files
        out.f_ffree = s.f_ffree
        out.f_favail = s.f_favail
        out.f_namemax = 255
        return out

    @_guard
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        await self._core(
            self.fs.setxattr, Ino(inode), name, value, thread=self.fs.needs_copy_up(Ino(inode))
        )

    @_guard
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return await self._core(self.fs.getxattr, Ino(inode), name)

    @_guard
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return await self._core(self.fs.listxattr, Ino(inode))

    @_guard
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self._core(
            self.fs.removexattr, Ino(inode), name, thread=self.fs.needs_copy_up(Ino(inode))
        )

    @_guard
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        await self._core(self.fs.access, Ino(inode), mode)
        return True
