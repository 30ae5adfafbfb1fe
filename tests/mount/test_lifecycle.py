"""`layerfs overlay` lifecycle: daemonize, foreground, signals, read-only, refused mounts."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_fuse
from tests.mounting import LAYERFS, MOUNT_TIMEOUT, force_unmount, is_mounted, wait_mounted

pytestmark = pytest.mark.mount


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[dict[str, Path]]:
    d = {k: tmp_path / k for k in ("lower", "upper", "work", "mnt")}
    for p in d.values():
        p.mkdir()
    (d["lower"] / "f").write_bytes(b"lower")
    try:
        yield d
    finally:
        force_unmount(d["mnt"])


def opts(d: dict[str, Path], upper: bool = True) -> str:
    o = f"lowerdir={d['lower']}"
    if upper:
        o += f",upperdir={d['upper']},workdir={d['work']}"
    return o


def _daemon_pids(mnt: Path) -> list[int]:
    """Processes serving `mnt` (its path is unique to the test, so these are ours)."""
    pids = []
    needle = os.fsencode(mnt)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if needle in args and b"overlay" in args:
            pids.append(int(entry))
    return pids


def _wait_gone(mnt: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while _daemon_pids(mnt):
        assert time.monotonic() < deadline, "daemon did not exit after unmount"
        time.sleep(0.02)


def test_daemonize_returns_once_mounted_and_exits_on_umount(dirs: dict[str, Path]) -> None:
    r = subprocess.run(
        [*LAYERFS, "overlay", "-o", opts(dirs), str(dirs["mnt"])],
        capture_output=True,
        timeout=MOUNT_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    try:
        assert is_mounted(dirs["mnt"]), "mount must be live when the command returns"
        assert (dirs["mnt"] / "f").read_bytes() == b"lower"
        (dirs["mnt"] / "g").write_bytes(b"new")
        assert (dirs["upper"] / "g").read_bytes() == b"new"
        assert _daemon_pids(dirs["mnt"])
    finally:
        subprocess.run(["umount", str(dirs["mnt"])], check=True)
    _wait_gone(dirs["mnt"])


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[1])


@pytest.mark.parametrize("prefetch", ["1", "0"])
def test_read_ahead_process_lives_and_ends_with_the_daemon(
    dirs: dict[str, Path], prefetch: str
) -> None:
    """The process reading lower directories ahead (core/prefetch.py) is the daemon's child,
    holds no output pipe of the mounting command (which reads them to their end: this run
    would time out), and is gone once the mount is; LAYERFS_PREFETCH=0 starts none."""
    for i in range(20):
        (dirs["lower"] / f"d{i}" / "e").mkdir(parents=True)
    r = subprocess.run(
        [*LAYERFS, "overlay", "-o", opts(dirs), str(dirs["mnt"])],
        capture_output=True,
        timeout=MOUNT_TIMEOUT,
        env=dict(os.environ, LAYERFS_PREFETCH=prefetch),
    )
    assert r.returncode == 0, r.stderr
    try:
        assert len(os.listdir(dirs["mnt"])) == 21  # a listing: its subdirectories are read
        assert sorted(os.listdir(dirs["mnt"] / "d3")) == ["e"]
        pids = _daemon_pids(dirs["mnt"])
        if prefetch == "0":
            assert len(pids) == 1
        else:
            assert len(pids) == 2
            daemon = [p for p in pids if _parent(p) not in pids]
            assert len(daemon) == 1
            assert [p for p in pids if _parent(p) == daemon[0]]
    finally:
        subprocess.run(["umount", str(dirs["mnt"])], check=True)
    _wait_gone(dirs["mnt"])


def test_daemonized_log_goes_to_syslog(dirs: dict[str, Path], tmp_path: Path) -> None:
    """A detached daemon has no stderr: with -d its log reaches the syslog socket."""
    sock_path = tmp_path / "log.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(MOUNT_TIMEOUT)
        env = dict(os.environ, LAYERFS_LOG_SOCKET=str(sock_path))
        r = subprocess.run(
            [*LAYERFS, "overlay", "-d", "-o", opts(dirs), str(dirs["mnt"])],
            capture_output=True,
            timeout=MOUNT_TIMEOUT,
            env=env,
        )
        assert r.returncode == 0, r.stderr
        try:
            (dirs["mnt"] / "f").read_bytes()
            got = sock.recv(65536)
        finally:
            subprocess.run(["umount", str(dirs["mnt"])], check=True)
    _wait_gone(dirs["mnt"])
    # <facility daemon (3) * 8 + severity>layerfs[PID]: LEVEL message
    assert got.startswith(b"<3") and b"layerfs[" in got and b"DEBUG" in got, got


@pytest.mark.parametrize("how", ["umount", "fusermount3", "SIGTERM", "SIGINT"])
def test_foreground_exits_zero_when_unmounted_or_signalled(dirs: dict[str, Path], how: str) -> None:
    proc = subprocess.Popen(
        [*LAYERFS, "overlay", "-f", "-o", opts(dirs), str(dirs["mnt"])],
        stderr=subprocess.PIPE,
    )
    try:
        wait_mounted(dirs["mnt"], proc=proc)
        assert (dirs["mnt"] / "f").read_bytes() == b"lower"
        if how == "umount":
            subprocess.run(["umount", str(dirs["mnt"])], check=True)
        elif how == "fusermount3":
            subprocess.run(["fusermount3", "-u", str(dirs["mnt"])], check=True)
        else:
            proc.send_signal(getattr(signal, how))
        _, err = proc.communicate(timeout=MOUNT_TIMEOUT)
    finally:
        if proc.poll() is None:
            force_unmount(dirs["mnt"])
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert b"Traceback" not in err
    assert not is_mounted(dirs["mnt"])


def test_without_upper_is_read_only(dirs: dict[str, Path]) -> None:
    proc = subprocess.Popen(
        [*LAYERFS, "overlay", "-f", "-o", opts(dirs, upper=False), str(dirs["mnt"])],
        stderr=subprocess.PIPE,
    )
    try:
        wait_mounted(dirs["mnt"], proc=proc)
        mnt = dirs["mnt"]
        assert (mnt / "f").read_bytes() == b"lower"
        for call in (
            lambda: (mnt / "f").write_bytes(b"x"),
            lambda: (mnt / "new").write_bytes(b"x"),
            lambda: (mnt / "f").unlink(),
            lambda: os.mkdir(mnt / "d"),
            lambda: os.chmod(mnt / "f", 0o600),
            lambda: os.setxattr(mnt / "f", b"user.x", b"1"),
        ):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EROFS
    finally:
        force_unmount(dirs["mnt"])
        _, err = proc.communicate(timeout=MOUNT_TIMEOUT)
    assert proc.returncode == 0, err


def _refused(args: list[str], *untouched: Path) -> str:
    before = {p: sorted(os.listdir(p)) for p in untouched}
    r = subprocess.run([*LAYERFS, *args], capture_output=True, timeout=MOUNT_TIMEOUT)
    err = r.stderr.decode()
    assert r.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), err
    for p, names in before.items():
        assert sorted(os.listdir(p)) == names, f"{p} was touched"
    return lines[0]


def test_refused_mounts_say_why_in_one_line(dirs: dict[str, Path], tmp_path: Path) -> None:
    d = dirs
    keep = (d["upper"], d["work"], d["mnt"])
    mnt = str(d["mnt"])
    assert "unknown mount option" in _refused(["overlay", "-o", opts(d) + ",bogus", mnt], *keep)
    assert "lowerdir" in _refused(["overlay", "-o", f"upperdir={d['upper']}", mnt], *keep)
    assert "go together" in _refused(
        ["overlay", "-o", f"lowerdir={d['lower']},upperdir={d['upper']}", mnt], *keep
    )
    missing = tmp_path / "missing"
    assert "does not exist" in _refused(["overlay", "-o", opts(d), str(missing)], *keep)
    assert "No such file" in _refused(["overlay", "-o", f"lowerdir={missing}", mnt], *keep)
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(d["upper"]).st_dev:
        o = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={shm}"
        assert "same filesystem" in _refused(["overlay", "-o", o, mnt], *keep)
    nested = d["upper"] / "w"
    o = f"lowerdir={d['lower']},upperdir={d['upper']},workdir={nested}"
    nested.mkdir()
    try:
        assert "nested" in _refused(["overlay", "-o", o, mnt], *keep)
    finally:
        nested.rmdir()


def test_busy_mount_point_is_refused(dirs: dict[str, Path]) -> None:
    proc = subprocess.Popen(
        [*LAYERFS, "overlay", "-f", "-o", opts(dirs, upper=False), str(dirs["mnt"])],
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_mounted(dirs["mnt"], proc=proc)
        line = _refused(["overlay", "-o", opts(dirs), str(dirs["mnt"])], dirs["upper"])
        assert "busy" in line
        assert os.listdir(dirs["work"]) == []
    finally:
        force_unmount(dirs["mnt"])
        proc.wait(timeout=MOUNT_TIMEOUT)
