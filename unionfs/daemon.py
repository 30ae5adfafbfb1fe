"""Run a union mount: mount, serve until unmounted or signalled, daemonize on request."""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import resource
import signal
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import pyfuse3
import trio

from layerstore.mountinfo import is_mount_point
from unionfs import fuse_loop, fuse_wire
from unionfs.core.errors import FsError
from unionfs.core.fs import UnionFS
from unionfs.core.idmap import Presentation
from unionfs.core.layers import DirLayer, Layer
from unionfs.core.statahead import StatAhead
from unionfs.core.upper import UpperLayer
from unionfs.fuse_ops import Operations

log = logging.getLogger("layerfs")
ENV_LOG_SOCKET = "LAYERFS_LOG_SOCKET"


class MountError(Exception):
    """A mount could not be made; the message is one line for the user."""


def check_mountpoint(mountpoint: Path) -> None:
    if not mountpoint.exists():
        raise MountError(f"mount point {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise MountError(f"mount point {mountpoint} is not a directory")
    if is_mount_point(mountpoint):
        raise MountError(f"mount point {mountpoint} is busy (something is mounted there)")


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _run(ops: Operations) -> bool:
    """Serve until the mount goes away (False) or a signal asks us to stop (True)."""
    signalled = False
    async with trio.open_nursery() as nursery:

        async def watch(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal signalled
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                task_status.started()
                async for _ in sigs:
                    signalled = True
                    pyfuse3.terminate()
                    return

        # Started, not just scheduled: the request loop may not yield to trio for a while,
        # and a SIGTERM before the receiver exists would kill us without unmounting.
        await nursery.start(watch)
        try:
            wire = fuse_wire.Wire.start(ops)
            if wire is not None:
                await wire.run()
            else:
                await fuse_loop.main()
        except* OSError as group:
            # An unmount while requests are still queued (releases of files closed just
            # before it; since FLUSH is off, close() waits for nothing) makes reading the
            # device fail with ECONNABORTED on this kernel (6.18), where pyfuse3 expects
            # ENODEV and raises. The mount is gone either way (tests/hardening/test_faults.py
            # test_thousands_of_open_files failed in most runs without this).
            _, rest = group.split(
                lambda e: isinstance(e, OSError) and e.errno == errno.ECONNABORTED
            )
            if rest is not None:
                raise rest from None
            log.debug("the kernel aborted the connection: the mount is gone")
        nursery.cancel_scope.cancel()
    return signalled


def check_unprivileged(
    options: Sequence[str], fuse_conf: str = "/etc/fuse.conf", dev: str = "/dev/fuse"
) -> None:
    """What a mount by an ordinary user needs, checked up front for a clear message:
    /dev/fuse readable and writable (libfuse opens it before calling fusermount3), and
    `user_allow_other` in /etc/fuse.conf for allow_other/allow_root."""
    if os.geteuid() == 0:
        return
    try:
        os.close(os.open(dev, os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        try:
            mode = f"mode {stat.filemode(os.stat(dev).st_mode)}"
        except OSError:
            mode = "missing"
        raise MountError(
            f"cannot open {dev} ({mode}): {exc.strerror}; an ordinary user needs it "
            "read-writable, as udev normally makes it (0666, crw-rw-rw-)"
        ) from None
    asked = [o for o in options if o in ("allow_other", "allow_root")]
    if asked:
        try:
            with open(fuse_conf, encoding="utf-8", errors="replace") as f:
                allowed = any(line.strip() == "user_allow_other" for line in f)
        except OSError:
            allowed = False
        if not allowed:
            raise MountError(
                f"-o {asked[0]} needs 'user_allow_other' in {fuse_conf} when not run as root"
            )


def privileged_upper(work: Path) -> bool:
    """Can the upper be written in overlayfs' native format? Real root can; root of a user
    namespace (`unshare -r`, rootless podman) has euid 0 but no trusted.* xattrs, so it gets
    the rootless format like any user."""
    if os.geteuid() != 0:
        return False
    probe = b"trusted.overlay.layerfs.probe"
    try:
        os.setxattr(work, probe, b"1")
        os.removexattr(work, probe)
    except OSError:
        return False
    return True


def _log_to_syslog() -> None:
    """A detached daemon has no stderr: its log goes to syslog ($LAYERFS_LOG_SOCKET, by
    default /dev/log) when there is one, else nowhere (image mounts log to the store)."""
    address = os.environ.get(ENV_LOG_SOCKET, "/dev/log")
    try:
        handler = logging.handlers.SysLogHandler(
            address, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
    except OSError:
        return
    handler.ident = f"layerfs[{os.getpid()}]: "
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    for h in root.handlers[:]:
        root.removeHandler(h)
    root.addHandler(handler)


def _mount(ops: Operations, mountpoint: Path, options: Sequence[str]) -> None:
    ops.prepare_session()
    # Before the mount: the read-ahead process must not hold the FUSE device.
    if os.environ.get("LAYERFS_PREFETCH") != "0" and ops.fs.start_prefetch():
        log.debug("reading lower directories ahead")
    try:
        pyfuse3.init(ops, os.fspath(mountpoint), set(options))
    except RuntimeError as exc:
        ops.fs.stop_prefetch()
        raise MountError(f"cannot mount {mountpoint}: {exc}") from None
    fds = fuse_loop.fuse_fds()
    if len(fds) == 1 and ops.start_passthrough(fds[0]):
        log.debug("asking the kernel for passthrough")


def _serve_mounted(ops: Operations) -> int:
    try:
        signalled = trio.run(_run, ops)
    finally:
        ops.fs.close()
    pyfuse3.close(unmount=signalled)
    return 0


def serve(
    layers: Sequence[Layer],
    upper: Path | None,
    work: Path | None,
    mountpoint: Path,
    fuse_options: Sequence[str],
    foreground: bool,
    *,
    debug: bool = False,
    presentation: Presentation | None = None,
) -> int:
    """Mount `layers` (top first) under an optional upper at `mountpoint` and serve it.

    In the foreground, returns the exit code once the mount is gone. Otherwise forks: the
    parent returns 0 once the mount is live, or raises MountError with the child's reason.
    Raises MountError for anything wrong before mounting; nothing is changed then.
    """
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="layerfs[%(process)d] %(levelname)s %(message)s",
    )
    mountpoint = Path(os.path.abspath(mountpoint))
    check_mountpoint(mountpoint)
    check_unprivileged(fuse_options)
    _raise_nofile()
    os.umask(0)
    options = list(fuse_options)
    try:
        upper_layer = (
            UpperLayer(os.fsencode(upper), os.fsencode(work), privileged_upper(work))
            if upper is not None and work is not None
            else None
        )
    except (OSError, FsError) as exc:
        raise MountError(f"cannot use upperdir/workdir: {exc}") from None
    if upper_layer is None and "ro" not in options:
        options.append("ro")
    if os.geteuid() == 0 and not {"allow_other", "allow_root"} & set(options):
        # As kernel overlayfs (and fuse-overlayfs run as root): other users reach the mount
        # as the modes allow (default_permissions is always on), instead of EACCES for all.
        options.append("allow_other")
    if os.environ.get("LAYERFS_STATAHEAD") != "0":
        ahead = StatAhead()  # see core/statahead.py; started at the first listing
        for layer in layers:
            if isinstance(layer, DirLayer) and layer.immutable:
                layer.statahead = ahead
    fs = UnionFS(layers, upper_layer, presentation)
    ops = Operations(fs, os.fspath(mountpoint))
    os.chdir("/")
    if foreground:
        _mount(ops, mountpoint, options)
        return _serve_mounted(ops)

    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace").strip()
        if msg == "ok":
            return 0
        os.waitpid(pid, 0)
        raise MountError(msg or "the daemon exited before mounting")
    # Child: mount, report, detach, serve.
    os.close(rfd)
    code = 1
    try:
        os.setsid()
        try:
            _mount(ops, mountpoint, options)
        except MountError as exc:
            os.write(wfd, str(exc).encode())
            os._exit(1)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        _log_to_syslog()
        os.write(wfd, b"ok\n")
        os.close(wfd)
        code = _serve_mounted(ops)
    except BaseException:
        log.exception("daemon failed")
    finally:
        sys.stdout.flush()
        os._exit(code)


__all__ = ["serve", "MountError", "errno"]
