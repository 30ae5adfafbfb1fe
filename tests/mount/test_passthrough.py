"""Kernel passthrough (unionfs.fuse.passthrough): upper files, and every file of a read-only
mount, are read and written by the kernel directly; the rest keeps overlayfs' semantics.

How a test sees passthrough: the kernel then reads the host file itself, so bytes changed in
the host file behind the mount's back show at once; an ordinary open with `keep_cache`
serves the page cache the daemon's earlier reads or writes filled, the old bytes. Each such
test also runs with LAYERFS_PASSTHROUGH=0, where it must see the old bytes: the observation
is real."""

from __future__ import annotations

import mmap
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require_fuse, require_root
from tests.mounting import force_unmount, overlay_mount

pytestmark = pytest.mark.mount


@pytest.fixture(autouse=True)
def _root_fuse() -> None:
    require_fuse()
    require_root()  # passthrough needs CAP_SYS_ADMIN in the daemon


def env(passthrough: bool) -> dict[str, str]:
    e = dict(os.environ)
    e["LAYERFS_PASSTHROUGH"] = "1" if passthrough else "0"
    return e


def rewrite_behind(path: Path, data: bytes) -> None:
    """Change a host file in place, not through the mount, keeping its inode, size and
    mtime: the kernel has no reason to drop what it cached of the file."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def read(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


LARGE = 1 << 20  # read-only opens pass through from handlers.PASSTHROUGH_MIN_READ (256 KiB)
SMALL = 4096


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "off"])
@pytest.mark.parametrize("size", [LARGE, SMALL], ids=["large", "small"])
def test_upper_file_is_read_by_the_kernel(tmp_path: Path, passthrough: bool, size: int) -> None:
    """A large upper file is read by the kernel directly; a small one is read through us
    once and then served from the kernel's page cache (no request per open)."""
    lower, upper, work, mnt = (tmp_path / d for d in ("l", "u", "w", "m"))
    for d in (lower, upper, work):
        d.mkdir()
    old, new = b"A" * size, b"B" * size
    with overlay_mount("layerfs", [lower], mnt, upper, work, env=env(passthrough)):
        (mnt / "f").write_bytes(old)  # created through the mount: an upper file
        assert read(mnt / "f") == old
        rewrite_behind(upper / "f", new)
        got = read(mnt / "f")
        assert got == (new if passthrough and size == LARGE else old)


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "off"])
def test_read_only_mount_passes_lower_files_through(tmp_path: Path, passthrough: bool) -> None:
    top, bottom, mnt = tmp_path / "top", tmp_path / "bottom", tmp_path / "m"
    top.mkdir()
    bottom.mkdir()
    (bottom / "f").write_bytes(b"A" * LARGE)
    with overlay_mount("layerfs", [top, bottom], mnt, env=env(passthrough)):
        assert read(mnt / "f") == b"A" * LARGE
        rewrite_behind(bottom / "f", b"B" * LARGE)
        got = read(mnt / "f")
        assert got == (b"B" * LARGE if passthrough else b"A" * LARGE)


def test_small_file_written_directly_is_read_fresh(tmp_path: Path) -> None:
    """A small file written through passthrough, then opened for reading only (an ordinary
    open): the kernel's earlier pages of it are dropped at that open, so the reader sees
    what the passthrough writes put in the host file."""
    lower, upper, work, mnt = (tmp_path / d for d in ("l", "u", "w", "m"))
    for d in (lower, upper, work):
        d.mkdir()
    with overlay_mount("layerfs", [lower], mnt, upper, work, env=env(True)):
        (mnt / "f").write_bytes(b"1" * SMALL)
        assert read(mnt / "f") == b"1" * SMALL  # ordinary open: now in the page cache
        with open(mnt / "f", "r+b", buffering=0) as w:  # writing: passthrough
            rewrite_behind(upper / "f", b"3" * SMALL)
            assert w.read() == b"3" * SMALL  # the host file itself, not cached pages
            w.seek(0)
            w.write(b"2" * SMALL)
        assert read(mnt / "f") == b"2" * SMALL
        assert read(mnt / "f") == b"2" * SMALL


def test_lower_file_of_a_writable_mount_is_not_passed_through(tmp_path: Path) -> None:
    """A lower file may be copied up while open: its opens stay ours, so a reader follows
    the copy as kernel overlayfs' does (the next test); its page cache is kept."""
    lower, upper, work, mnt = (tmp_path / d for d in ("l", "u", "w", "m"))
    for d in (lower, upper, work):
        d.mkdir()
    (lower / "f").write_bytes(b"A" * LARGE)
    with overlay_mount("layerfs", [lower], mnt, upper, work, env=env(True)):
        assert read(mnt / "f") == b"A" * LARGE
        rewrite_behind(lower / "f", b"B" * LARGE)
        assert read(mnt / "f") == b"A" * LARGE


def scenario(mnt: Path) -> list[object]:
    """Opens that mix ordinary and passthrough handles of one inode; what each step saw."""
    out: list[object] = []
    # A reader of a lower file, then a writer that copies it up while the reader is open:
    # the reader sees the copy (both opens are ours: the inode has an ordinary open).
    r = os.open(mnt / "lowerfile", os.O_RDONLY)
    w = os.open(mnt / "lowerfile", os.O_WRONLY)
    os.pwrite(w, b"written", 0)
    out.append(os.pread(r, 32, 0))
    os.close(w)
    # A third open while the reader is still open, then all closed; the next opens find an
    # upper file with no open: passthrough (two at once share the backing file).
    a = os.open(mnt / "lowerfile", os.O_RDWR | os.O_APPEND)
    os.write(a, b"+appended")
    out.append(os.pread(r, 64, 0))
    os.close(a)
    os.close(r)
    a = os.open(mnt / "lowerfile", os.O_RDWR | os.O_APPEND)
    b = os.open(mnt / "lowerfile", os.O_RDONLY)
    os.write(a, b"+again")
    out.append(os.pread(b, 64, 0))
    out.append(os.fstat(b).st_size)
    # Truncation by path while open, then through the handle.
    os.truncate(mnt / "lowerfile", 5)
    out.append(os.pread(b, 64, 0))
    os.ftruncate(a, 3)
    out.append((os.pread(b, 64, 0), os.stat(mnt / "lowerfile").st_size))
    os.close(a)
    os.close(b)
    # A new file: create, write, mmap both ways, unlink while open.
    fd = os.open(mnt / "new", os.O_CREAT | os.O_RDWR, 0o644)
    os.write(fd, b"x" * 8192)
    with mmap.mmap(fd, 8192) as m:
        m[0:5] = b"hello"
        m.flush()
    out.append(os.pread(fd, 8, 0))
    fd2 = os.open(mnt / "new", os.O_RDONLY)
    with mmap.mmap(fd2, 8192, prot=mmap.PROT_READ) as m:
        out.append(m[0:8])
    os.unlink(mnt / "new")
    os.pwrite(fd, b"after", 8187)
    out.append(os.pread(fd2, 16, 8184))
    out.append(os.fstat(fd2).st_size)
    os.close(fd)
    os.close(fd2)
    out.append(sorted(os.listdir(mnt)))
    out.append(read(mnt / "lowerfile"))
    return out


def run_on(impl: str, base: Path, opts_env: dict[str, str] | None) -> list[object]:
    lower, upper, work, mnt = (base / d for d in ("l", "u", "w", "m"))
    for d in (lower, upper, work):
        d.mkdir(parents=True)
    (lower / "lowerfile").write_bytes(b"lower content of the file")
    with overlay_mount(impl, [lower], mnt, upper, work, env=opts_env):
        return scenario(mnt)


def test_mixed_opens_match_kernel_overlayfs(tmp_path: Path) -> None:
    want = run_on("kernel", tmp_path / "k", None)
    assert run_on("layerfs", tmp_path / "p", env(True)) == want
    assert run_on("layerfs", tmp_path / "o", env(False)) == want


def test_many_files_written_and_read_back(tmp_path: Path) -> None:
    """Each passthrough open registers a backing file, kept after the last close for the
    next open of the same file until 1024 others are kept (handlers.IDLE_BACKING): more
    files than that, some open at once, read twice; every open gets its own file's bytes
    (no backing id reaches the wrong file, none is used after it was dropped)."""
    lower, upper, work, mnt = (tmp_path / d for d in ("l", "u", "w", "m"))
    for d in (lower, upper, work):
        d.mkdir()
    blob: Callable[[int], bytes] = lambda i: (b"%06d" % i) * (100 + i)  # noqa: E731
    with overlay_mount("layerfs", [lower], mnt, upper, work, env=env(True)):
        held = [os.open(mnt / f"h{i}", os.O_CREAT | os.O_RDWR, 0o600) for i in range(50)]
        try:
            for i, fd in enumerate(held):
                os.write(fd, blob(i))
            for i in range(1100):
                (mnt / f"f{i}").write_bytes(blob(i))
            for i, fd in enumerate(held):
                assert os.pread(fd, 1 << 16, 0) == blob(i)
        finally:
            for fd in held:
                os.close(fd)
        for _ in range(2):
            for i in range(1100):
                assert read(mnt / f"f{i}") == blob(i)
        for i in range(0, 1100, 7):
            os.unlink(mnt / f"f{i}")
            (mnt / f"f{i}").write_bytes(blob(i + 1))
            assert read(mnt / f"f{i}") == blob(i + 1)
    for i in range(1100):
        assert read(upper / f"f{i}") == blob(i + 1 if i % 7 == 0 else i)


def test_space_of_unlinked_files_comes_back(tmp_path: Path) -> None:
    """Backing files are kept registered after the last close, holding the host file open:
    an unlinked file's blocks must still come back at once — unlinked after the last close,
    and unlinked while open (then closed). The upper is a 4 MiB tmpfs; each file is 3 MiB."""
    lower, mnt, small = tmp_path / "l", tmp_path / "m", tmp_path / "small"
    lower.mkdir()
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        upper, work = small / "u", small / "w"
        upper.mkdir()
        work.mkdir()
        data = b"z" * (3 << 20)
        with overlay_mount("layerfs", [lower], mnt, upper, work, env=env(True)):
            free = os.statvfs(small).f_bfree
            for _ in range(3):
                (mnt / "a").write_bytes(data)
                assert read(mnt / "a") == data  # a large file: read through passthrough too
                os.unlink(mnt / "a")
                assert os.statvfs(small).f_bfree == free
            for _ in range(3):
                fd = os.open(mnt / "b", os.O_CREAT | os.O_RDWR, 0o644)
                os.write(fd, data)
                os.unlink(mnt / "b")
                assert os.pread(fd, 8, 0) == b"z" * 8
                os.close(fd)
                (mnt / "sync").write_bytes(b"")  # a request after the release: it is served
                assert os.statvfs(small).f_bfree == free  # (an empty file takes no block)
                os.unlink(mnt / "sync")
            (mnt / "c").write_bytes(data)
    finally:
        force_unmount(small)
