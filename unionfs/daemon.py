"""Run a union mount: mount, serve until unmounted or signalled; the one daemonizer of
`overlay` and `mount`."""

from __future__ import annotations

import gc
import logging
import logging.handlers
import os
import resource
import signal
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import trio

from layerstore.mountinfo import is_mount_point
from unionfs.core.errors import FsError
from unionfs.core.fs import UnionFS
from unionfs.core.idmap import Presentation
from unionfs.core.layers import DirLayer, Layer
from unionfs.core.statahead import StatAhead
from unionfs.core.upper import UpperLayer
from unionfs.fuse import mount, passthrough
from unionfs.fuse.handlers import Handlers
from unionfs.fuse.mount import Mounted, MountError, MountOptions
from unionfs.fuse.policy import Policy
from unionfs.fuse.session import Options, Session

log = logging.getLogger("layerfs")
ENV_LOG_SOCKET = "LAYERFS_LOG_SOCKET"
# Readahead window of the mount (KiB): the largest read request the kernel then sends is
# min(this, max_pages = 1 MiB), 8 times fewer requests than its default of 128 KiB.
READAHEAD_KB = 1024


@dataclass(frozen=True, slots=True)
class Hooks:
    """Calls into the command that asked for the mount, made in the serving process."""

    mounted: Callable[[int], None] | None = None  # the mount is live; the daemon's pid
    ended: Callable[[], None] | None = None  # the daemon is done (unmounted or failed)


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


def check_unprivileged(
    options: Sequence[str], fuse_conf: str = "/etc/fuse.conf", dev: str = "/dev/fuse"
) -> None:
    """What a mount by an ordinary user needs, checked up front for a clear message:
    /dev/fuse readable and writable (fusermount3 opens it as the user), and
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
    """A detached daemon without a log file logs to syslog ($LAYERFS_LOG_SOCKET, by default
    /dev/log) when there is one, else nowhere."""
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


@dataclass(slots=True)
class _Daemon:
    """What one mount serves, made before anything is mounted."""

    fs: UnionFS
    handlers: Handlers
    mountpoint: Path
    options: MountOptions

    def mount(self) -> Mounted:
        # Before the mount: the read-ahead process must not hold the FUSE device.
        if os.environ.get("LAYERFS_PREFETCH") != "0" and self.fs.start_prefetch():
            log.debug("reading lower directories ahead")
        try:
            return mount.mount(os.fspath(self.mountpoint), self.options)
        except BaseException:
            self.fs.stop_prefetch()
            raise

    def serve(self, mounted: Mounted) -> int:
        where = os.fspath(self.mountpoint)
        session = Session(
            mounted.fd,
            self.handlers,
            Options(
                passthrough=passthrough.wanted(),
                deny_others=self.options.allow_root,
                # INIT set the mount's readahead; no open has to wait for this.
                after_init=lambda: mount.widen_readahead(where, READAHEAD_KB),
            ),
        )
        signalled = False
        try:
            signalled = trio.run(_run, session)
        finally:
            self.fs.close()
            mount.close(mounted, unmount_it=signalled)
        return 0


async def _run(session: Session) -> bool:
    """Serve until the mount goes away (False) or a signal asks us to stop (True)."""
    signalled = False
    async with trio.open_nursery() as nursery:

        async def watch(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            nonlocal signalled
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
                task_status.started()
                async for _ in sigs:
                    signalled = True
                    session.stop()
                    return

        # Started, not just scheduled: the request loop may not yield to trio for a while,
        # and a SIGTERM before the receiver exists would kill us without unmounting.
        await nursery.start(watch)
        await session.run()
        nursery.cancel_scope.cancel()
    return signalled


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
    policy: Policy | None = None,
    log_path: Path | None = None,
    hooks: Hooks | None = None,
) -> int:
    """Mount `layers` (top first) under an optional upper at `mountpoint` and serve it.

    In the foreground, returns the exit code once the mount is gone. Otherwise forks: the
    parent returns 0 once the mount is live, or raises MountError with the daemon's reason
    in one line. The detached daemon writes its log to `log_path` when given, else to
    syslog. Raises MountError for anything wrong before mounting; nothing is changed then.
    """
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="layerfs[%(process)d] %(levelname)s %(message)s",
    )
    hooks = hooks or Hooks()
    mountpoint = Path(os.path.abspath(mountpoint))
    if log_path is not None:
        log_path = Path(os.path.abspath(log_path))  # opened after chdir("/")
    options = list(fuse_options)
    opts = mount.parse(options)
    check_mountpoint(mountpoint)
    check_unprivileged(options)
    _raise_nofile()
    os.umask(0)
    try:
        upper_layer = (
            UpperLayer(os.fsencode(upper), os.fsencode(work), privileged_upper(work))
            if upper is not None and work is not None
            else None
        )
    except (OSError, FsError) as exc:
        raise MountError(f"cannot use upperdir/workdir: {exc}") from None
    if upper_layer is None and not opts.readonly:
        opts = opts.with_readonly()
    if os.geteuid() == 0 and not (opts.allow_other or opts.allow_root):
        # As kernel overlayfs (and fuse-overlayfs run as root): other users reach the mount
        # as the modes allow (default_permissions is always on), instead of EACCES for all.
        opts = opts.with_allow_other()
    if os.environ.get("LAYERFS_STATAHEAD") != "0":
        ahead = StatAhead()  # see core/statahead.py; started at the first listing
        for layer in layers:
            if isinstance(layer, DirLayer) and layer.immutable:
                layer.statahead = ahead
    fs = UnionFS(layers, upper_layer, presentation)
    # The inode table and the layer caches are many long-lived objects (a mounted
    # 100,000-file image: millions): with the default thresholds the collector scans them
    # again and again (see scripts/BENCH-NOTES.md). Few of our objects form cycles.
    gc.set_threshold(50_000, 20, 100)
    daemon = _Daemon(fs, Handlers(fs, policy), mountpoint, opts)
    os.chdir("/")
    if foreground:
        try:
            mounted = daemon.mount()
            if hooks.mounted is not None:
                hooks.mounted(os.getpid())
            return daemon.serve(mounted)
        finally:
            if hooks.ended is not None:
                hooks.ended()
    return _detach(daemon, hooks, log_path)


def _detach(daemon: _Daemon, hooks: Hooks, log_path: Path | None) -> int:
    """Fork the daemon; return 0 once its mount is live, or raise MountError with its reason."""
    sys.stdout.flush()
    sys.stderr.flush()
    log_fd = None
    if log_path is not None:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(wfd)
        if log_fd is not None:
            os.close(log_fd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace").strip()
        if msg == "ok":
            return 0
        _pid, status = os.waitpid(pid, 0)
        if not msg:
            msg = f"the daemon exited before mounting (status {status})"
            if log_path is not None:
                msg += f"; see {log_path}"
        raise MountError(msg)
    # The daemon: detached from the terminal, its output to the log, then mount and report.
    os.close(rfd)
    code = 1
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        out = log_fd if log_fd is not None else devnull
        os.dup2(devnull, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(devnull)
        if log_fd is None:
            _log_to_syslog()
        try:
            mounted = daemon.mount()
        except MountError as exc:
            os.write(wfd, str(exc).encode())
            raise
        except BaseException as exc:
            log.exception("the daemon failed before mounting")
            where = f"; see {log_path}" if log_path is not None else "; run with -f -d for more"
            os.write(wfd, f"the daemon failed: {exc}{where}".encode())
            raise
        if hooks.mounted is not None:
            hooks.mounted(os.getpid())
        os.write(wfd, b"ok\n")
        os.close(wfd)
        code = daemon.serve(mounted)
    except MountError:
        pass
    except BaseException:
        log.exception("daemon failed")
    finally:
        try:
            if hooks.ended is not None:
                hooks.ended()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)


__all__ = ["serve", "Hooks", "MountError", "check_mountpoint", "check_unprivileged"]
