"""Faults: kill -9 of the daemon in a copy-up, a full upper filesystem, thousands of open files."""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require_fuse, require_root
from tests.mounting import (
    LAYERFS,
    MOUNT_TIMEOUT,
    force_unmount,
    overlay_mount,
    reap,
    wait_mounted,
)

STRESS = bool(os.environ.get("LAYERFS_STRESS"))
BIG = (64 if STRESS else 24) << 20


def _pattern(n: int) -> bytes:
    block = bytes(range(256)) * 4096  # 1 MiB, no zero runs: a half copy cannot look whole
    return (block * (n // len(block) + 1))[:n]


def _work_files(work: Path) -> list[str]:
    return [
        os.path.relpath(os.path.join(dp, n), work)
        for dp, dns, fns in os.walk(work)
        for n in fns + dns
        if n != "work" or dp != str(work)
    ]


@pytest.mark.mount
@pytest.mark.parametrize("round_", range(3 if STRESS else 1))
def test_kill_9_during_copy_up(tmp_path: Path, round_: int) -> None:
    """The daemon dies mid copy-up: after unmount + remount the file is whole (lower or copied
    and written), never half copied, and the work dir holds nothing."""
    require_root()
    require_fuse()
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for p in (lower, upper, work, mnt):
        p.mkdir()
    data = _pattern(BIG)
    (lower / "big").write_bytes(data)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    daemon = subprocess.Popen(
        [*LAYERFS, "overlay", "-f", "-o", opts, str(mnt)], stdout=subprocess.DEVNULL, stderr=log
    )
    writer: subprocess.Popen[bytes] | None = None
    seen_partial = False
    try:
        wait_mounted(mnt, proc=daemon, log=log)
        # The writer's first write triggers the copy-up of BIG bytes.
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import os,sys; fd=os.open(sys.argv[1], os.O_WRONLY); os.pwrite(fd, b'W', 5)",
                str(mnt / "big"),
            ],
            stderr=subprocess.DEVNULL,
        )
        # Bounded poll for the copy in progress (a partial file in the work or upper dir).
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline and writer.poll() is None:
            sizes = [
                os.lstat(os.path.join(dp, n)).st_size
                for top in (work, upper)
                for dp, _, fns in os.walk(top)
                for n in fns
            ]
            if any(0 < s < BIG for s in sizes):
                seen_partial = True
                break
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    finally:
        if daemon.poll() is None:
            reap(daemon, timeout=0)
        force_unmount(mnt)
        if writer is not None:
            reap(writer)
        log.close()
    assert not (upper / "big").exists() or (upper / "big").stat().st_size == BIG, (
        "a partial copy is in the upper"
    )
    with overlay_mount("layerfs", [lower], mnt, upper, work):
        got = (mnt / "big").read_bytes()
        written = data[:5] + b"W" + data[6:]
        assert got in (data, written), "half-copied file visible after remount"
        assert _work_files(work) == [], "work dir not cleaned"
    assert (lower / "big").read_bytes() == data
    # Whether the kill landed inside the copy is the race this test provokes; when it did
    # not, the assertions above still held for a completed or never-started copy.
    print(f"kill during copy-up observed: {seen_partial}")


CHUNK = 64 << 10
_WRITER = """
import os, sys
path, acks, start = sys.argv[1], sys.argv[2], int(sys.argv[3])
fd = os.open(path, os.O_WRONLY)
i = 0
while True:
    os.pwrite(fd, bytes([i % 251]) * CHUNK, start + i * CHUNK)
    i += 1
    with open(acks + ".tmp", "w") as a:
        a.write(str(i))
    os.rename(acks + ".tmp", acks)
"""


@pytest.mark.mount
@pytest.mark.parametrize("name", ["low", "up"])
def test_kill_9_during_writes(tmp_path: Path, name: str) -> None:
    """Writes a process saw succeed are in the upper after a kill -9 and a remount; what follows
    them is the next writes' data, never garbage."""
    require_root()
    require_fuse()
    lower, upper, work, mnt = (tmp_path / n for n in ("lower", "upper", "work", "mnt"))
    for p in (lower, upper, work, mnt):
        p.mkdir()
    head = _pattern(100_000)
    (lower / "low").write_bytes(head)
    (upper / "up").write_bytes(head)
    acks = tmp_path / "acks"
    want_acks = 40 if STRESS else 12
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
    daemon = subprocess.Popen(
        [*LAYERFS, "overlay", "-f", "-o", opts, str(mnt)], stdout=subprocess.DEVNULL, stderr=log
    )
    writer: subprocess.Popen[bytes] | None = None
    try:
        wait_mounted(mnt, proc=daemon, log=log)
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                _WRITER.replace("CHUNK", str(CHUNK)),
                str(mnt / name),
                str(acks),
                "4096",
            ],
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + MOUNT_TIMEOUT  # bounded poll for enough acknowledged writes
        while time.monotonic() < deadline and writer.poll() is None:
            if acks.exists() and int(acks.read_text() or 0) >= want_acks:
                break
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
    finally:
        if daemon.poll() is None:
            reap(daemon, timeout=0)
        force_unmount(mnt)
        if writer is not None:
            # Writes through a passthrough file reach the upper without the daemon: the
            # writer would go on after the kill. Stop our child; what it acknowledged stays.
            reap(writer, timeout=0)
        log.close()
    acked = int(acks.read_text())
    assert acked >= want_acks, acked
    with overlay_mount("layerfs", [lower], mnt, upper, work):
        got = (mnt / name).read_bytes()
        assert _work_files(work) == [], "work dir not cleaned"
    assert got[:4096] == head[:4096]
    body = got[4096:]
    expect = b"".join(bytes([i % 251]) * CHUNK for i in range(acked + 2))
    assert len(body) >= acked * CHUNK, (len(body), acked)
    assert body == expect[: len(body)], "acknowledged writes lost or garbage after them"


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        force_unmount(path)


@pytest.mark.mount
def test_full_upper_gives_enospc_and_stays_consistent(tmp_path: Path) -> None:
    require_root()
    require_fuse()
    lower, mnt = tmp_path / "lower", tmp_path / "mnt"
    lower.mkdir()
    (lower / "big-lower").write_bytes(_pattern(6 << 20))  # more than the upper can hold
    (lower / "small").write_bytes(b"small lower\n")
    with tmpfs(tmp_path / "small", "4m") as small:
        upper, work = small / "upper", small / "work"
        upper.mkdir()
        work.mkdir()
        with overlay_mount("layerfs", [lower], mnt, upper, work):
            (mnt / "keep").write_bytes(b"kept\n")
            # 1. a new file growing past the end of the filesystem
            # the error may come at any write, at the flush or at the fsync
            with pytest.raises(OSError) as exc, open(mnt / "huge", "wb") as f:  # noqa: PT012
                for _ in range(8):
                    f.write(_pattern(1 << 20))
                    f.flush()
                os.fsync(f.fileno())
            assert exc.value.errno == errno.ENOSPC, exc.value
            # 2. copy-up of a lower file larger than the free space fails; the lower shows
            with pytest.raises(OSError) as exc2, open(mnt / "big-lower", "r+b") as f:  # noqa: PT012
                f.write(b"X")
                f.flush()
            assert exc2.value.errno == errno.ENOSPC, exc2.value
            assert (mnt / "big-lower").read_bytes() == _pattern(6 << 20)
            # 3. the rest of the tree is intact, and space comes back
            assert (mnt / "keep").read_bytes() == b"kept\n"
            assert (mnt / "small").read_bytes() == b"small lower\n"
            os.unlink(mnt / "huge")
            with open(mnt / "small", "ab") as f:
                f.write(b"more\n")
            assert (mnt / "small").read_bytes() == b"small lower\nmore\n"
            names = sorted(os.listdir(mnt))
            assert names == ["big-lower", "keep", "small"], names
        # nothing half-copied left in the upper or work dir
        assert sorted(os.listdir(upper)) == ["keep", "small"], os.listdir(upper)
        assert _work_files(work) == [], _work_files(work)


@pytest.mark.mount
def test_thousands_of_open_files(tmp_path: Path) -> None:
    """The daemon starts with the usual soft limit of 1024 descriptors; we hold N files open."""
    require_root()
    require_fuse()
    n = 12000 if STRESS else 4000
    lower, upper, work, mnt = (tmp_path / x for x in ("lower", "upper", "work", "mnt"))
    for p in (lower, upper, work):
        p.mkdir()
    for i in range(n // 2):
        (lower / f"l{i}").write_bytes(b"L%d" % i)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < n + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n + 200}")
    fds: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the daemon inherits this
        with overlay_mount("layerfs", [lower], mnt, upper, work):
            resource.setrlimit(resource.RLIMIT_NOFILE, (n + 200, hard))
            for i in range(n // 2):
                fds.append(os.open(mnt / f"l{i}", os.O_RDONLY))
            for i in range(n // 2):
                fds.append(os.open(mnt / f"u{i}", os.O_RDWR | os.O_CREAT, 0o644))
            for i in range(n // 2):
                assert os.pread(fds[i], 32, 0) == b"L%d" % i
                os.pwrite(fds[n // 2 + i], b"U%d" % i, 0)
            for fd in fds:
                os.close(fd)
            fds.clear()
            assert (mnt / f"u{n // 2 - 1}").read_bytes() == b"U%d" % (n // 2 - 1)
            assert len(os.listdir(mnt)) == n
    finally:
        for fd in fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
