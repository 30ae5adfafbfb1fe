"""The data path through a real mount: page cache kept across opens, reads that miss the
host's cache, concurrent reads on one handle, and the mount's readahead."""

from __future__ import annotations

import mmap
import os
import threading
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.conftest import require_fuse, require_root
from tests.mounting import overlay_mount

pytestmark = pytest.mark.mount

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


def pattern(n: int, seed: int) -> bytes:
    """n bytes that differ at every 8-byte offset (a read at the wrong offset shows)."""
    words = (((i * 0x9E3779B1) ^ seed) & 0xFFFFFFFFFFFFFFFF for i in range(n // 8 + 1))
    return b"".join(w.to_bytes(8, "little") for w in words)[:n]


class Stack:
    def __init__(self, base: Path) -> None:
        self.lower, self.upper, self.work, self.mnt = (base / d for d in ("l", "u", "w", "m"))
        for d in (self.lower, self.upper, self.work, self.mnt):
            d.mkdir()
        self.big = pattern(3 * MiB + 777, 1)
        (self.lower / "big").write_bytes(self.big)
        for i in range(4):
            (self.lower / f"p{i}").write_bytes(pattern(MiB + 13 * i, 10 + i))
        (self.lower / "small").write_bytes(b"lower small file")

    def mount(self) -> AbstractContextManager[Path]:
        return overlay_mount("layerfs", [self.lower], self.mnt, self.upper, self.work)

    def drop_host_cache(self, name: str) -> None:
        """Make the next reads of lower `name` wait for the disk (no RWF_NOWAIT hit)."""
        fd = os.open(self.lower / name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_mount_cache(path: Path) -> None:
    """Drop the kernel's cached pages of a file in the mount: the next read asks the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: Path, chunk: int = MiB) -> bytes:
    out = bytearray()
    with open(path, "rb", buffering=0) as f:
        while b := f.read(chunk):
            out += b
    return bytes(out)


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path)


def test_reads_that_miss_the_host_cache(stack: Stack) -> None:
    with stack.mount() as m:
        for name in ("big", "p0"):
            stack.drop_host_cache(name)
            drop_mount_cache(m / name)
        assert read_all(m / "big") == stack.big
        assert read_all(m / "p0") == pattern(MiB, 10)
        # Unaligned reads across the end of file, cold again.
        stack.drop_host_cache("big")
        drop_mount_cache(m / "big")
        fd = os.open(m / "big", os.O_RDONLY)
        try:
            n = len(stack.big)
            for off, size in ((n - 5, 100), (MiB - 3, 2 * MiB), (n, 10), (0, 1)):
                assert os.pread(fd, size, off) == stack.big[off : off + size], (off, size)
        finally:
            os.close(fd)


def test_concurrent_reads_on_one_handle_and_of_several_files(stack: Stack) -> None:
    with stack.mount() as m:
        for i in range(4):
            stack.drop_host_cache(f"p{i}")
        stack.drop_host_cache("big")
        fd = os.open(m / "big", os.O_RDONLY)
        errors: list[str] = []

        def one_handle(k: int) -> None:
            for j in range(24):
                off = ((j * 7 + k * 13) % 40) * (MiB // 16) + k
                size = 200_000 + 4096 * k
                if os.pread(fd, size, off) != stack.big[off : off + size]:
                    errors.append(f"handle reader {k} at {off}")

        def whole_file(i: int) -> None:
            if read_all(m / f"p{i}", 256 * 1024) != pattern(MiB + 13 * i, 10 + i):
                errors.append(f"file p{i}")

        threads = [threading.Thread(target=one_handle, args=(k,)) for k in range(4)]
        threads += [threading.Thread(target=whole_file, args=(i,)) for i in range(4)]
        try:
            for t in threads:
                t.start()
        finally:
            for t in threads:
                t.join()
            os.close(fd)
        assert errors == []


def test_upper_page_cache_stays_true_across_opens(stack: Stack) -> None:
    """Upper files keep their page cache across opens: every way of changing the data
    through the mount must show in a later open's reads."""
    with stack.mount() as m:
        f = m / "new"
        # created, written, read back through a later open
        with open(f, "wb") as w:
            w.write(b"A" * 10000)
        assert f.read_bytes() == b"A" * 10000
        # a second writer while a reader holds the file open
        r = os.open(f, os.O_RDONLY)
        try:
            with open(f, "r+b") as rw:
                rw.seek(5000)
                rw.write(b"B" * 100)
            assert os.pread(r, 10000, 0) == b"A" * 5000 + b"B" * 100 + b"A" * 4900
        finally:
            os.close(r)
        assert f.read_bytes() == b"A" * 5000 + b"B" * 100 + b"A" * 4900
        # truncate by path (no open handle), then by a truncating open
        os.truncate(f, 3000)
        assert f.read_bytes() == b"A" * 3000
        with open(f, "wb") as w:
            w.write(b"C" * 10)
        assert f.read_bytes() == b"C" * 10
        # O_APPEND from two descriptors
        a1 = os.open(f, os.O_WRONLY | os.O_APPEND)
        a2 = os.open(f, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(a1, b"1")
            os.write(a2, b"22")
            os.write(a1, b"333")
        finally:
            os.close(a1)
            os.close(a2)
        assert f.read_bytes() == b"C" * 10 + b"1" + b"22" + b"333"
        # shared mmap writes, seen by a later open and in the upper
        with open(f, "r+b") as rw, mmap.mmap(rw.fileno(), 0) as mm:
            mm[0:4] = b"MMAP"
        assert f.read_bytes() == b"MMAP" + b"C" * 6 + b"122333"
        assert (stack.upper / "new").read_bytes() == b"MMAP" + b"C" * 6 + b"122333"


def test_copy_up_under_an_open_reader(stack: Stack) -> None:
    """A lower file read (and cached) before a copy-up shows the writes made after it,
    through the old handle and through new opens."""
    with stack.mount() as m:
        r = os.open(m / "small", os.O_RDONLY)
        try:
            assert os.pread(r, 100, 0) == b"lower small file"
            with open(m / "small", "r+b") as w:
                w.write(b"UPPER")
            assert os.pread(r, 100, 0) == b"UPPER small file"
        finally:
            os.close(r)
        assert (m / "small").read_bytes() == b"UPPER small file"
        with open(m / "small", "r+b") as rw:
            rw.truncate(5)
        assert (m / "small").read_bytes() == b"UPPER"
    assert (stack.lower / "small").read_bytes() == b"lower small file"
    assert (stack.upper / "small").read_bytes() == b"UPPER"


def test_mount_readahead_is_widened(stack: Stack) -> None:
    """As root the daemon widens its mount's readahead right after the kernel's INIT, before
    any open (1 MiB read requests instead of 128 KiB)."""
    require_root()
    with stack.mount() as m:
        dev = os.stat(m).st_dev
        ra = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
        if not ra.exists():
            pytest.skip(f"no {ra} (sysfs not mounted?)")
        assert int(ra.read_text()) == 1024
        assert (m / "small").read_bytes() == b"lower small file"
        assert int(ra.read_text()) == 1024
