"""Prefetch: a child process that reads lower directories ahead of a walk of the mount."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import struct
from collections.abc import Sequence

# Why: a cold walk of a mount (find, du, ls -R, tar) waits for the disk once per directory and
# per layer, one request at a time: the daemon asks, the disk answers, and only then does the
# walker ask for the next directory. The kernel's overlayfs does the same reads faster only
# because its round trips cost nothing. Once a directory is listed through the mount, its
# subdirectories are likely next: this process reads them ahead (each layer's directory, and
# an lstat of every entry, which brings its inode into the host's cache), depth first from the
# most recent listing, so that the daemon's own reads find them cached. It is a process, not a
# thread: a thread doing this contended for the interpreter lock with the loop it was meant to
# help (measured slower), while a process runs on the other core.
#
# Nothing it does is seen: it only warms the host's caches, of immutable lower layers only,
# and answers nothing. Bounds: each listing allows CREDIT more directories to be read ahead
# (one `ls` reads at most that many), a message that does not fit in one atomic pipe write is
# not sent, a full pipe drops the message, and the process ends when the daemon's end of the
# pipe closes (the daemon killed, say) or when the daemon ends it on its way out.
#
# Paths: the daemon sends the sources of a listed directory, which it resolved component by
# component without following symlinks; the child descends only into entries it saw as
# directories (not symlinks), and opens every path with openat2(RESOLVE_BENEATH |
# RESOLVE_NO_SYMLINKS) from the layer's root (component by component with O_NOFOLLOW where
# the kernel lacks openat2), so even a layer changed behind the mount's back cannot lead it
# out of the layer.
CREDIT = 64
COMM = "layerfs-ahead"
MAX_STACK = 10_000
MAX_WARMED = 200_000
_HEAD = struct.Struct("<H")  # message length
_ITEM = struct.Struct("<HH")  # layer number, path length
_PIPE_BUF = 4096
_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_SYS_OPENAT2 = 437  # the same number on every architecture (added after the tables merged)
_RESOLVE = 0x04 | 0x08  # RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_syscall = ctypes.CDLL(None, use_errno=True).syscall
_have_openat2 = True  # until the kernel says ENOSYS


def open_beneath(root: int, path: bytes) -> int:
    """An fd of directory `path` inside the directory open as `root`, following no symlink
    on the way (OSError otherwise)."""
    global _have_openat2
    if not path:
        return os.open(".", _OPEN, dir_fd=root)
    if _have_openat2:
        how = _OpenHow(_OPEN, 0, _RESOLVE)
        fd = _syscall(_SYS_OPENAT2, root, path, ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err != errno.ENOSYS:
            raise OSError(err, os.strerror(err), path)
        _have_openat2 = False
    fd = os.open(".", _OPEN, dir_fd=root)
    try:
        for part in path.split(b"/"):
            if part in (b"", b".", b".."):
                raise OSError(errno.EINVAL, "not a plain path beneath the layer", path)
            nfd = os.open(part, _OPEN, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def encode(sources: Sequence[tuple[int, bytes]]) -> bytes | None:
    """One message: the directories (layer number, path) of one listing; None if too long."""
    body = b"".join(_ITEM.pack(li, len(p)) + p for li, p in sources if li < 65536)
    if _HEAD.size + len(body) > _PIPE_BUF:
        return None
    return _HEAD.pack(len(body)) + body


def decode(buf: bytearray) -> list[list[tuple[int, bytes]]]:
    """The complete messages at the start of `buf` (removed from it)."""
    out: list[list[tuple[int, bytes]]] = []
    while len(buf) >= _HEAD.size:
        (n,) = _HEAD.unpack_from(buf)
        if len(buf) < _HEAD.size + n:
            break
        body = bytes(buf[_HEAD.size : _HEAD.size + n])
        del buf[: _HEAD.size + n]
        items: list[tuple[int, bytes]] = []
        pos = 0
        while pos + _ITEM.size <= len(body):
            li, size = _ITEM.unpack_from(body, pos)
            pos += _ITEM.size
            items.append((li, body[pos : pos + size]))
            pos += size
        out.append(items)
    return out


class Walker:
    """The child's state: a stack of directories to read (the newest listing's on top)."""

    def __init__(self, roots: dict[int, int], credit: int = CREDIT) -> None:
        self.roots = roots
        self.credit_per_listing = credit
        self.credit = 0
        self.stack: list[tuple[int, bytes]] = []
        self.warmed: set[tuple[int, bytes]] = set()
        self.read = 0  # directories read so far

    def listed(self, sources: Sequence[tuple[int, bytes]]) -> None:
        for src in reversed(sources):
            if src[0] in self.roots:
                self.stack.append(src)
        if len(self.stack) > MAX_STACK:
            del self.stack[: len(self.stack) - MAX_STACK]
        self.credit = self.credit_per_listing

    def busy(self) -> bool:
        return bool(self.stack) and self.credit > 0

    def step(self) -> None:
        """Read the directory on top of the stack and stack its subdirectories."""
        src = self.stack.pop()
        if src in self.warmed:
            return
        if len(self.warmed) >= MAX_WARMED:
            self.warmed.clear()
        self.warmed.add(src)
        self.credit -= 1
        li, path = src
        try:
            fd = open_beneath(self.roots[li], path)
        except OSError:
            return
        self.read += 1
        subdirs: list[bytes] = []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    try:
                        entry.stat(follow_symlinks=False)
                        if entry.is_dir(follow_symlinks=False):
                            subdirs.append(os.fsencode(entry.name))
                    except OSError:
                        continue
        except OSError:
            pass
        finally:
            os.close(fd)
        prefix = path + b"/" if path else b""
        self.stack.extend((li, prefix + name) for name in subdirs)


def _child(rfd: int, roots: dict[int, int]) -> None:
    walker = Walker(roots)
    buf = bytearray()
    while True:
        if walker.busy():
            ready, _, _ = select.select([rfd], [], [], 0)
            if not ready:
                walker.step()
                continue
        chunk = os.read(rfd, 65536)
        if not chunk:
            return  # the daemon is gone
        buf += chunk
        for sources in decode(buf):
            walker.listed(sources)


def _keep_only(keep: set[int]) -> None:
    """Close every other fd (the child must hold nothing of the daemon's: not the pipe that
    tells the mounting command the mount is up, not the upper directory)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):  # nor the caller's output pipes, which it may read to their end
        if fd not in keep:
            os.dup2(null, fd)
    os.close(null)
    for fd in sorted(int(n) for n in os.listdir("/proc/self/fd")):
        if fd not in keep and fd > 2:
            with contextlib.suppress(OSError):
                os.close(fd)


class Prefetch:
    """The daemon's end: `start` forks the child (before the mount: it must not hold the FUSE
    device), `listed` tells it about a listing, `close` ends it."""

    def __init__(self, roots: dict[int, int]) -> None:
        self.roots = roots  # layer number -> root directory fd, for immutable host layers
        self.pid: int | None = None
        self._wfd = -1

    def start(self) -> bool:
        if not self.roots:
            return False
        rfd, wfd = os.pipe2(os.O_CLOEXEC)
        try:
            pid = os.fork()
        except OSError:  # no process to spare: the mount goes on without read-ahead
            os.close(rfd)
            os.close(wfd)
            return False
        if pid == 0:  # the child: never returns
            code = 0
            try:
                _keep_only({rfd, *self.roots.values()})
                with contextlib.suppress(OSError), open("/proc/self/comm", "w") as f:
                    f.write(COMM)  # `ps`/`top` tell it from the daemon (same command line)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                _child(rfd, self.roots)
            except BaseException:  # noqa: BLE001 - best effort, and never back into the caller
                code = 1
            finally:
                os._exit(code)
        os.close(rfd)
        os.set_blocking(wfd, False)
        self.pid, self._wfd = pid, wfd
        return True

    def listed(self, sources: Sequence[tuple[int, bytes]]) -> None:
        if self._wfd < 0:
            return
        msg = encode([s for s in sources if s[0] in self.roots])
        if msg is None or len(msg) == _HEAD.size:
            return
        try:
            os.write(self._wfd, msg)
        except BlockingIOError:
            pass  # the child is behind: this listing goes unread ahead
        except OSError:
            self.close()

    def close(self) -> None:
        """End the child now: it only warms caches, so it is killed rather than waited for
        (a huge cold directory could keep it busy for seconds)."""
        if self._wfd >= 0:
            os.close(self._wfd)
            self._wfd = -1
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
            self.pid = None
