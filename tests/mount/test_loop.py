"""The request loop (unionfs.fuse.session): requests are served while a handler waits."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require_fuse
from tests.mount import gatefs
from tests.mounting import (
    LAYERFS,
    MOUNT_TIMEOUT,
    force_unmount,
    is_mounted,
    overlay_mount,
    overlay_options,
    reap,
    wait_mounted,
)

pytestmark = pytest.mark.mount

GATEFS = [sys.executable, str(Path(gatefs.__file__))]
READER = "import sys; d = open(sys.argv[1], 'rb').read(); print(len(d), d.count(b's'))"
OTHERS = """
import os, sys
m = sys.argv[1]
print(os.lstat(os.path.join(m, 'other')).st_size)
print(open(os.path.join(m, 'other'), 'rb').read().decode())
print(sorted(os.listdir(m)))
with open(os.path.join(m, 'new'), 'wb') as f:
    f.write(b'n' * 300000)
print(os.path.getsize(os.path.join(m, 'new')))
"""


def _wait_byte(fd: int, timeout: float) -> None:
    """Bounded wait for one byte on a FIFO: a read has reached the gate."""
    ready, _, _ = select.select([fd], [], [], timeout)
    assert ready, f"no read reached the gate within {timeout}s"
    assert os.read(fd, 1) == b"r"


@contextmanager
def gated_lower(tmp_path: Path) -> Iterator[tuple[Path, int, int]]:
    """A mounted gatefs: (its mount point, the gate's write end, the started FIFO's read end)."""
    require_fuse()
    gmnt = tmp_path / "gmnt"
    gmnt.mkdir()
    gate, started = tmp_path / "gate", tmp_path / "started"
    os.mkfifo(gate)
    os.mkfifo(started)
    gate_fd = os.open(gate, os.O_RDWR)
    started_fd = os.open(started, os.O_RDWR | os.O_NONBLOCK)
    with open(tmp_path / "gatefs.log", "w+b") as log:
        gproc = subprocess.Popen([*GATEFS, str(gmnt), str(gate), str(started)], stderr=log)
        try:
            wait_mounted(gmnt, proc=gproc, log=log)
            yield gmnt, gate_fd, started_fd
        finally:
            os.write(gate_fd, b"g" * 4096)  # let every read of `slow` through
            force_unmount(gmnt)
            reap(gproc)
            os.close(gate_fd)
            os.close(started_fd)


@contextmanager
def gated_stack(tmp_path: Path) -> Iterator[tuple[Path, Path, int, int]]:
    """layerfs over a top layer holding `other` (b"hello") and a gated lower holding `slow`:
    (its mount point, its upper, the gate's write end, the started FIFO's read end)."""
    top, upper, work, mnt = (tmp_path / n for n in ("top", "up", "wk", "mnt"))
    for d in (top, upper, work, mnt):
        d.mkdir()
    (top / "other").write_bytes(b"hello")
    with (
        gated_lower(tmp_path) as (gmnt, gate_fd, started_fd),
        overlay_mount("layerfs", [top, gmnt], mnt, upper=upper, work=work),
    ):
        yield mnt, upper, gate_fd, started_fd


def test_requests_served_while_a_read_waits_on_its_lower(tmp_path: Path) -> None:
    """A read whose lower layer blocks (in a worker thread of the daemon) must not stop the
    daemon: another process stats, reads, lists and writes meanwhile, and the blocked read
    completes with the right data once the lower answers."""
    with gated_stack(tmp_path) as (mnt, upper, gate_fd, started_fd):
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(mnt / "slow")], stdout=subprocess.PIPE
        )
        try:
            _wait_byte(started_fd, MOUNT_TIMEOUT)
            others = subprocess.run(
                [sys.executable, "-c", OTHERS, str(mnt)],
                capture_output=True,
                timeout=MOUNT_TIMEOUT,
                check=True,
            )
            assert others.stdout.decode().split("\n")[:4] == [
                "5",
                "hello",
                "['other', 'slow']",
                "300000",
            ]
            assert reader.poll() is None  # still waiting behind the gate
        finally:
            os.write(gate_fd, b"g" * 4096)
            out, _ = reader.communicate(timeout=MOUNT_TIMEOUT)
        assert out.split() == [b"1048576", b"1048576"]
        assert (upper / "new").stat().st_size == 300000


def test_sigterm_while_a_read_waits_ends_the_daemon_once_the_read_returns(
    tmp_path: Path,
) -> None:
    """The exit path with a handler in a worker thread: SIGTERM stops the loop (no task may
    stay parked), the daemon exits 0 once the waiting handler returns, and unmounts."""
    top, upper, work, mnt = (tmp_path / n for n in ("top", "up", "wk", "mnt"))
    for d in (top, upper, work, mnt):
        d.mkdir()
    with gated_lower(tmp_path) as (gmnt, gate_fd, started_fd):
        optstr = overlay_options([top, gmnt], upper, work)
        daemon = subprocess.Popen(
            [*LAYERFS, "overlay", "-f", "-o", optstr, str(mnt)], stderr=subprocess.PIPE
        )
        reader: subprocess.Popen[bytes] | None = None
        try:
            wait_mounted(mnt, proc=daemon)
            reader = subprocess.Popen(
                [sys.executable, "-c", READER, str(mnt / "slow")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            _wait_byte(started_fd, MOUNT_TIMEOUT)
            for _ in range(3):  # more requests than one, served meanwhile
                assert (mnt / "up-file").exists() is False
            daemon.send_signal(signal.SIGTERM)
            os.write(gate_fd, b"g" * 4096)
            _, err = daemon.communicate(timeout=MOUNT_TIMEOUT)
            assert daemon.returncode == 0, err
            assert not is_mounted(mnt)
        finally:
            os.write(gate_fd, b"g" * 4096)
            if reader is not None:
                reader.communicate(timeout=MOUNT_TIMEOUT)  # data or an error: either is fine
            force_unmount(mnt)
            reap(daemon)
