"""Mounting a FUSE filesystem ourselves: mount(2) with our own /dev/fuse fd as root,
`fusermount3` (which hands the fd over a socket) otherwise; the FUSE mount options."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, replace

from layerstore.mountinfo import mount_at

log = logging.getLogger("layerfs")

FUSERMOUNT = "fusermount3"
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_SYNCHRONOUS = 1, 2, 4, 8, 16
MS_DIRSYNC, MS_NOSYMFOLLOW, MS_NOATIME, MS_NODIRATIME = 128, 256, 1024, 2048
MS_RELATIME, MS_STRICTATIME, MS_LAZYTIME = 1 << 21, 1 << 24, 1 << 25
MNT_DETACH = 2

# Mount flags by name: (flag, set it). libfuse's defaults are nosuid and nodev.
FLAGS: dict[str, tuple[int, bool]] = {
    "ro": (MS_RDONLY, True), "rw": (MS_RDONLY, False),
    "nosuid": (MS_NOSUID, True), "suid": (MS_NOSUID, False),
    "nodev": (MS_NODEV, True), "dev": (MS_NODEV, False),
    "noexec": (MS_NOEXEC, True), "exec": (MS_NOEXEC, False),
    "sync": (MS_SYNCHRONOUS, True), "async": (MS_SYNCHRONOUS, False),
    "dirsync": (MS_DIRSYNC, True),
    "noatime": (MS_NOATIME, True), "atime": (MS_NOATIME, False),
    "nodiratime": (MS_NODIRATIME, True), "diratime": (MS_NODIRATIME, False),
    "relatime": (MS_RELATIME, True), "norelatime": (MS_RELATIME, False),
    "strictatime": (MS_STRICTATIME, True), "nostrictatime": (MS_STRICTATIME, False),
    "lazytime": (MS_LAZYTIME, True), "nolazytime": (MS_LAZYTIME, False),
    "nosymfollow": (MS_NOSYMFOLLOW, True), "symfollow": (MS_NOSYMFOLLOW, False),
}  # fmt: skip
# Options for the kernel's FUSE mount, without and with a value.
KERNEL = {"default_permissions", "allow_other"}
KERNEL_VALUED = {"max_read", "blksize", "context", "fscontext", "defcontext", "rootcontext"}
# Ours: allow_root (enforced by the session), auto_unmount (fusermount3 unmounts when the
# daemon dies), fsname= and subtype= (the mount's source and type).
OURS = {"allow_root", "auto_unmount"}
OURS_VALUED = {"fsname", "subtype"}


class MountError(Exception):
    """A mount could not be made; the message is one line for the user."""


def is_fuse_option(opt: str) -> bool:
    """Is `opt` (NAME or NAME=VALUE) a FUSE mount option (see parse)?"""
    key, eq, _value = opt.partition("=")
    if eq:
        return key in KERNEL_VALUED or key in OURS_VALUED
    return key in FLAGS or key in KERNEL or key in OURS


@dataclass(frozen=True, slots=True)
class MountOptions:
    flags: int  # MS_* for mount(2)
    kernel: tuple[str, ...]  # FUSE options for the kernel (default_permissions, ...)
    names: tuple[str, ...]  # the flags by name, for fusermount3
    fsname: str
    subtype: str
    allow_root: bool
    auto_unmount: bool

    @property
    def readonly(self) -> bool:
        return bool(self.flags & MS_RDONLY)

    @property
    def allow_other(self) -> bool:
        return "allow_other" in self.kernel

    def with_readonly(self) -> MountOptions:
        return replace(self, flags=self.flags | MS_RDONLY, names=(*self.names, "ro"))

    def with_allow_other(self) -> MountOptions:
        return replace(self, kernel=(*self.kernel, "allow_other"))


def parse(options: Sequence[str]) -> MountOptions:
    """FUSE mount options as libfuse reads them; MountError names the first unknown one.
    `allow_root` mounts with allow_other: the kernel then lets everyone in and the session
    refuses users other than the owner and root, as libfuse does."""
    flags = MS_NOSUID | MS_NODEV
    kernel: list[str] = []
    names: list[str] = []
    fsname = subtype = "layerfs"
    allow_root = auto_unmount = False
    for opt in options:
        if not opt:
            continue
        key, eq, value = opt.partition("=")
        if not is_fuse_option(opt):
            raise MountError(f"unknown mount option {opt!r}")
        if key in FLAGS:
            bit, on = FLAGS[key]
            flags = flags | bit if on else flags & ~bit
            names.append(key)
        elif key == "allow_root":
            allow_root = True
        elif key == "auto_unmount":
            auto_unmount = True
        elif key == "fsname":
            fsname = value
        elif key == "subtype":
            subtype = value
        elif opt not in kernel:
            kernel.append(opt)
    if allow_root and "allow_other" in kernel:
        raise MountError("allow_root and allow_other exclude each other")
    if allow_root:
        kernel.append("allow_other")
    return MountOptions(flags, tuple(kernel), tuple(names), fsname, subtype, allow_root,
                        auto_unmount)  # fmt: skip


@dataclass(slots=True)
class Mounted:
    """A live mount: the device fd the session serves, and the socket that keeps an
    auto_unmount fusermount3 waiting (it unmounts when the socket closes)."""

    mountpoint: str
    fd: int
    keeper: socket.socket | None = None
    helper: subprocess.Popen[bytes] | None = None


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def mount(mountpoint: str, opts: MountOptions, dev: str = "/dev/fuse") -> Mounted:
    """Mount a FUSE filesystem at `mountpoint` and return its device fd (close-on-exec).
    Root mounts with mount(2) itself; anyone else (and auto_unmount) through fusermount3.
    MountError says why not, in one line."""
    if os.geteuid() == 0 and not opts.auto_unmount:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            _mount_sys(mountpoint, opts, fd)
            return Mounted(mountpoint, fd)
        except PermissionError:
            # Root of a user namespace that does not own its mount namespace: the setuid
            # helper can still mount for us (libfuse falls back the same way).
            os.close(fd)
        except BaseException:
            os.close(fd)
            raise
    return _mount_helper(mountpoint, opts)


def _mount_sys(mountpoint: str, opts: MountOptions, fd: int) -> None:
    rootmode = stat.S_IFMT(os.stat(mountpoint).st_mode)
    data = ",".join(
        [f"fd={fd}", f"rootmode={rootmode:o}", f"user_id={os.getuid()}",
         f"group_id={os.getgid()}", *opts.kernel]
    )  # fmt: skip
    source = opts.fsname.encode()
    for fstype in (f"fuse.{opts.subtype}", "fuse"):  # without subtype support: plain fuse
        if _libc.mount(source, os.fsencode(mountpoint), fstype.encode(), opts.flags,
                       data.encode()) == 0:  # fmt: skip
            return
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise PermissionError(err, os.strerror(err))
        if err != errno.ENODEV:
            break
    raise MountError(f"cannot mount {mountpoint}: {os.strerror(err)}")


def _mount_helper(mountpoint: str, opts: MountOptions) -> Mounted:
    """fusermount3 opens the device, mounts, and passes the fd back over a socket
    (_FUSE_COMMFD); with auto_unmount it stays, and unmounts once that socket closes."""
    args = [*opts.names, *opts.kernel, f"fsname={opts.fsname}", f"subtype={opts.subtype}"]
    if opts.auto_unmount:
        args.append("auto_unmount")
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        try:
            helper = subprocess.Popen(
                [FUSERMOUNT, "-o", ",".join(args), "--", mountpoint],
                env=env,
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            raise MountError(f"cannot run {FUSERMOUNT}: {exc.strerror}") from None
        theirs.close()
        try:
            _msg, fds, _flags, _addr = socket.recv_fds(ours, 1, 1)
        except OSError:
            fds = []
        if not fds:
            assert helper.stderr is not None
            err = helper.stderr.read().decode(errors="replace").strip()
            helper.wait()
            reason = err.splitlines()[-1] if err else f"{FUSERMOUNT} exited {helper.returncode}"
            raise MountError(f"cannot mount {mountpoint}: {reason}")
        for extra in fds[1:]:
            os.close(extra)
        fd = fds[0]
        os.set_inheritable(fd, False)
        assert helper.stderr is not None
        if not opts.auto_unmount:
            helper.stderr.close()
            helper.wait()
            ours.close()
            return Mounted(mountpoint, fd)
        helper.stderr.close()  # it is quiet from now on
        return Mounted(mountpoint, fd, keeper=ours, helper=helper)
    except BaseException:
        ours.close()
        with contextlib.suppress(OSError):
            theirs.close()
        raise


def unmount(mountpoint: str) -> None:
    """Detach the mount (lazily: busy files keep working until closed). Best effort, logged."""
    if os.geteuid() == 0 and _libc.umount2(os.fsencode(mountpoint), MNT_DETACH) == 0:
        return
    proc = subprocess.run(
        [FUSERMOUNT, "-u", "-q", "-z", "--", mountpoint],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
    )
    if proc.returncode != 0:
        log.warning("cannot unmount %s: %s", mountpoint, proc.stderr.decode(errors="replace"))


def close(mounted: Mounted, *, unmount_it: bool) -> None:
    """The end of a mount: the device fd closed first (an unmount must not wait for this
    daemon's replies), then unmounted if asked; an auto_unmount helper is let go."""
    with contextlib.suppress(OSError):
        os.close(mounted.fd)
    if unmount_it:
        unmount(mounted.mountpoint)
    if mounted.keeper is not None:
        mounted.keeper.close()  # fusermount3 unmounts if the mount is still there
        if mounted.helper is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                mounted.helper.wait(timeout=10)


def widen_readahead(mountpoint: str, kb: int) -> None:
    """Set the readahead window of the FUSE mount at `mountpoint` (resolved) to `kb`. The
    device comes from mountinfo, not a stat of the mount (which its own daemon would have
    to answer). Best effort: needs root (sysfs)."""
    try:
        found = mount_at(mountpoint, resolved=True)
        if found is None or found.major != 0 or not found.fstype.startswith("fuse"):
            # A FUSE mount has an anonymous device (major 0): this is something else,
            # mounted over us since; leave its readahead alone.
            return
        with open(f"/sys/class/bdi/0:{found.minor}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except (OSError, ValueError) as exc:  # not root, or no sysfs: the kernel's default
        log.debug("cannot widen the readahead: %s", exc)
