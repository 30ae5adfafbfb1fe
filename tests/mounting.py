"""Mount helpers for tests: layerfs, fuse-overlayfs and kernel overlayfs with one interface."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from layerstore.mountinfo import is_mount_point

LAYERFS = [sys.executable, "-m", "unionfs"]
MOUNT_TIMEOUT = 30.0


def is_mounted(path: Path | str) -> bool:
    return is_mount_point(path)


def wait_mounted(
    path: Path | str,
    timeout: float = MOUNT_TIMEOUT,
    proc: subprocess.Popen[bytes] | None = None,
    log: typing.IO[bytes] | None = None,
) -> None:
    """Bounded poll until `path` is a mount point; fail early if `proc` exits first.

    `log` is the file the process writes its stderr to, quoted in the error.
    """
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc is not None and proc.poll() is not None:
            err = b""
            if log is not None:
                log.seek(0)
                err = log.read()
            raise RuntimeError(
                f"mount process exited {proc.returncode}: {err.decode(errors='replace').strip()}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} not mounted after {timeout}s")
        time.sleep(0.02)


def force_unmount(path: Path | str) -> None:
    """Unmount whatever is mounted at path (FUSE or kernel), lazily as a last resort."""
    if not is_mounted(path):
        return
    for cmd in (
        ["fusermount3", "-u", "-q", str(path)],
        ["umount", str(path)],
        ["umount", "-l", str(path)],
    ):
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        if not is_mounted(path):
            return


def reap(proc: subprocess.Popen[bytes], timeout: float = MOUNT_TIMEOUT) -> None:
    """Wait (bounded) for a child we started to exit; SIGKILL it if it does not."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def overlay_options(
    lowers: Sequence[Path], upper: Path | None, work: Path | None, opts: Sequence[str] = ()
) -> str:
    parts = ["lowerdir=" + ":".join(str(p) for p in lowers)]
    if upper is not None:
        parts.append(f"upperdir={upper}")
    if work is not None:
        parts.append(f"workdir={work}")
    parts.extend(opts)
    return ",".join(parts)


def _kernel_mount(optstr: str, mnt: Path) -> None:
    """mount -t overlay; a bounded retry while the kernel still counts our upper as in use by
    an earlier mount of it that was only lazily detached (a process elsewhere on the machine
    held it busy): the kernel refuses then with "upperdir is in-use" until it is released."""
    cmd = ["mount", "-t", "overlay", "overlay", "-o", optstr, str(mnt)]
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while True:
        proc = subprocess.run(cmd, capture_output=True, check=False)
        if proc.returncode == 0:
            return
        if time.monotonic() > deadline or "index=on" not in optstr:
            raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
        time.sleep(0.1)


@contextmanager
def overlay_mount(
    impl: str,
    lowers: Sequence[Path],
    mnt: Path,
    upper: Path | None = None,
    work: Path | None = None,
    opts: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Iterator[Path]:
    """Mount an overlay of `lowers` (top first) at `mnt` with impl layerfs|fuse-overlayfs|kernel.

    Unmounts in `finally`; for FUSE implementations the daemon runs in the foreground as our
    child, so only that child is reaped (and killed if it does not exit after the unmount).
    """
    mnt.mkdir(parents=True, exist_ok=True)
    optstr = overlay_options(lowers, upper, work, opts)
    proc: subprocess.Popen[bytes] | None = None
    # The daemon's stderr goes to a file, not a pipe: a pipe nobody reads would fill and
    # block a chatty daemon.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below, after the yield
    daemon_log = b""
    try:
        if impl == "kernel":
            _kernel_mount(optstr, mnt)
        elif impl == "layerfs":
            proc = subprocess.Popen(
                [*LAYERFS, "overlay", "-f", "-o", optstr, str(mnt)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
            wait_mounted(mnt, proc=proc, log=log)
        elif impl == "fuse-overlayfs":
            proc = subprocess.Popen(
                ["fuse-overlayfs", "-f", "-o", optstr, str(mnt)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
            wait_mounted(mnt, proc=proc, log=log)
        else:
            raise ValueError(f"unknown overlay implementation {impl!r}")
        yield mnt
    finally:
        force_unmount(mnt)
        if proc is not None:
            reap(proc)
        log.seek(0)
        daemon_log = log.read()
        log.close()
    # An unexpected exception in the daemon is answered with EIO in production; in tests it
    # must fail loudly, so a logged traceback fails the test that caused it.
    if b"Traceback" in daemon_log:
        raise AssertionError(
            f"{impl} daemon logged an exception:\n{daemon_log.decode(errors='replace')}"
        )
