"""The request loop (unionfs.fuse_loop): requests are served while a handler waits on a thread."""

from __future__ import annotations

import os
import select
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_fuse
from tests.mount import gatefs
from tests.mounting import MOUNT_TIMEOUT, force_unmount, overlay_mount, reap, wait_mounted

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


def test_requests_served_while_a_read_waits_on_its_lower(tmp_path: Path) -> None:
    """A read whose lower layer blocks (in a worker thread of the daemon) must not stop the
    daemon: another process stats, reads, lists and writes meanwhile, and the blocked read
    completes with the right data once the lower answers."""
    require_fuse()
    top, gmnt, upper, work, mnt = (tmp_path / n for n in ("top", "gmnt", "up", "wk", "mnt"))
    for d in (top, gmnt, upper, work, mnt):
        d.mkdir()
    (top / "other").write_bytes(b"hello")
    gate, started = tmp_path / "gate", tmp_path / "started"
    os.mkfifo(gate)
    os.mkfifo(started)
    gate_fd = os.open(gate, os.O_RDWR)
    started_fd = os.open(started, os.O_RDWR | os.O_NONBLOCK)
    with open(tmp_path / "gatefs.log", "w+b") as log:
        gproc = subprocess.Popen([*GATEFS, str(gmnt), str(gate), str(started)], stderr=log)
        try:
            wait_mounted(gmnt, proc=gproc, log=log)
            with overlay_mount("layerfs", [top, gmnt], mnt, upper=upper, work=work):
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
                    os.write(gate_fd, b"g" * 4096)  # let every read of `slow` through
                    out, _ = reader.communicate(timeout=MOUNT_TIMEOUT)
                assert out.split() == [b"1048576", b"1048576"]
                assert (upper / "new").stat().st_size == 300000
        finally:
            os.write(gate_fd, b"g" * 4096)
            force_unmount(gmnt)
            reap(gproc)
            os.close(gate_fd)
            os.close(started_fd)
