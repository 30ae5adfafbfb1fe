"""The FUSE engine through a real mount (unionfs.fuse): directory listings without OPENDIR
and their offsets, requests that wait for the core, and a daemon that needs no pyfuse3."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.conftest import require_fuse
from tests.mount.test_loop import READER, _wait_byte, gated_stack
from tests.mounting import (
    MOUNT_TIMEOUT,
    force_unmount,
    overlay_mount,
    overlay_options,
    reap,
    wait_mounted,
)

pytestmark = pytest.mark.mount

IMPLS = ("layerfs", "kernel")


def _merged_stack(base: Path, n: int) -> tuple[list[Path], Path, Path]:
    """Two lowers sharing directory `d`: names 0..n-1 split between them, some whited out
    by the top one."""
    top, bottom = base / "l0", base / "l1"
    for layer in (top, bottom):
        (layer / "d").mkdir(parents=True)
    for i in range(n):
        layer = top if i % 3 == 0 else bottom
        (layer / "d" / f"name-{i:05d}").write_bytes(b"x")
    for i in range(1, n, 50):
        if i % 3:
            os.mknod(top / "d" / f"name-{i:05d}", 0o600 | 0o020000, 0)  # whiteout
    return [top, bottom], base / "u", base / "w"


def _mount(impl: str, base: Path, n: int) -> AbstractContextManager[Path]:
    lowers, upper, work = _merged_stack(base, n)
    upper.mkdir()
    work.mkdir()
    return overlay_mount(impl, lowers, base / "m", upper, work)


@pytest.mark.parametrize("impl", IMPLS)
def test_listing_resumes_across_changes(tmp_path: Path, impl: str) -> None:
    """A reader part-way through a directory, while entries are added and removed and another
    process lists the directory from the start: every name present throughout comes exactly
    once, and nothing comes twice (POSIX leaves only the changed names open)."""
    require_fuse()
    n = 3000
    with _mount(impl, tmp_path, n) as m:
        d = m / "d"
        before = set(os.listdir(d))
        it = os.scandir(d)
        seen = [next(it).name for _ in range(300)]
        removed = sorted(before)[::7]
        for name in removed:
            os.unlink(d / name)
        added = [f"new-{i}" for i in range(200)]
        for name in added:
            (d / name).write_bytes(b"n")
        middle = set(os.listdir(d))  # another listing, from offset 0
        seen.extend(e.name for e in it)
        it.close()
    assert len(seen) == len(set(seen)), "a name came twice"
    unchanged = before - set(removed)
    assert unchanged <= set(seen)
    assert set(seen) <= before | set(added)
    assert middle == unchanged | set(added)


@pytest.mark.parametrize("impl", IMPLS)
def test_seekdir_returns_to_the_same_place(tmp_path: Path, impl: str) -> None:
    """telldir/seekdir through the mount: after reading on, seeking back reads the same
    entries again."""
    require_fuse()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.opendir.argtypes = [ctypes.c_char_p]
    libc.readdir.restype = ctypes.c_void_p
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    name_at = 19  # struct dirent64: d_ino, d_off, d_reclen, d_type, d_name

    def names(dirp: int, k: int) -> list[bytes]:
        out = []
        for _ in range(k):
            ent = libc.readdir(dirp)
            assert ent, "directory ended early"
            out.append(ctypes.string_at(ent + name_at))
        return out

    with _mount(impl, tmp_path, 2000) as m:
        dirp = libc.opendir(os.fsencode(m / "d"))
        assert dirp
        try:
            first = names(dirp, 700)
            pos = libc.telldir(dirp)
            later = names(dirp, 900)
            libc.seekdir(dirp, pos)
            again = names(dirp, 900)
        finally:
            libc.closedir(dirp)
    assert again == later
    assert not set(first) & set(later)


NO_PYFUSE3 = (
    "import sys; sys.modules['pyfuse3'] = None; "  # any import of it now fails
    "from unionfs.cli import main; sys.exit(main())"
)


def test_the_daemon_needs_no_pyfuse3(tmp_path: Path) -> None:
    """The daemon mounts and serves with pyfuse3 made impossible to import: files made,
    copied up, renamed, removed, preallocated and given xattrs give the expected tree; the
    readahead was widened after INIT (root); its -d log shows our INIT and requests and
    nothing degraded (no warning or error at all)."""
    require_fuse()
    lowers, upper, work = _merged_stack(tmp_path, 300)
    upper.mkdir()
    work.mkdir()
    mnt = tmp_path / "m"
    mnt.mkdir()
    log = tmp_path / "daemon.log"
    opts = overlay_options(lowers, upper, work)
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-c", NO_PYFUSE3, "overlay", "-f", "-d", "-o", opts, str(mnt)],
            stdout=subprocess.DEVNULL,
            stderr=logf,
        )
        try:
            wait_mounted(mnt, proc=proc)
            d = mnt / "d"
            (d / "made").write_bytes(b"abc" * 100_000)
            ra = Path(f"/sys/class/bdi/0:{os.minor(os.stat(mnt).st_dev)}/read_ahead_kb")
            if os.geteuid() == 0 and ra.exists():
                assert int(ra.read_text()) == 1024
            os.mkdir(d / "sub")
            os.symlink("made", d / "sub" / "ln")
            os.rename(d / "name-00002", d / "sub" / "moved")
            os.unlink(d / "name-00004")
            with open(d / "name-00005", "r+b") as f:  # copy-up
                f.write(b"Y")
            with open(d / "g", "wb") as f:
                os.posix_fallocate(f.fileno(), 0, 1 << 20)
            os.setxattr(d / "name-00007", "user.k", b"v")
            tree = {}
            for root, dirs, files in os.walk(mnt):
                for name in dirs + files:
                    path = Path(root) / name
                    st = os.lstat(path)
                    data = path.read_bytes() if path.is_file() and not path.is_symlink() else b""
                    tree[str(path.relative_to(mnt))] = (st.st_mode, st.st_size, data)
            xattr = os.getxattr(d / "name-00007", "user.k")
            target = os.readlink(d / "sub" / "ln")
        finally:
            force_unmount(mnt)
            reap(proc)
    assert "d/name-00004" not in tree and "d/name-00002" not in tree
    assert tree["d/sub/moved"][2] == b"x" and tree["d/name-00005"][2] == b"Y"
    assert tree["d/made"][1] == 300_000 and tree["d/g"][1] == 1 << 20
    assert (xattr, target) == (b"v", "made")
    assert len(tree) == 300  # 295 names shown, made, g, sub, moved, ln, d
    text = log.read_text(errors="replace")
    assert "INIT: kernel 7." in text and "LOOKUP unique" in text
    assert " WARNING " not in text and " ERROR " not in text, text


def test_requests_wait_for_a_copy_up_holding_the_core(tmp_path: Path) -> None:
    """A copy-up whose lower blocks holds the core (in a worker thread); lookups, creates and
    listings that arrive meanwhile are served once it is done, with the right answers."""
    with gated_stack(tmp_path) as (mnt, upper, gate_fd, started_fd):
        writer = subprocess.Popen(
            [sys.executable, "-c", "import sys; open(sys.argv[1], 'r+b').write(b'W')", mnt / "slow"]
        )
        answers: dict[str, object] = {}

        def others() -> None:
            answers["stat"] = os.lstat(mnt / "other").st_size
            (mnt / "created").write_bytes(b"c")
            answers["list"] = sorted(os.listdir(mnt))

        try:
            _wait_byte(started_fd, MOUNT_TIMEOUT)  # the copy-up is reading the lower
            t = threading.Thread(target=others)
            t.start()
        finally:
            os.write(gate_fd, b"g" * 4096)
        t.join(MOUNT_TIMEOUT)
        assert not t.is_alive()
        assert writer.wait(MOUNT_TIMEOUT) == 0
        assert answers == {"stat": 5, "list": ["created", "other", "slow"]}
        out = subprocess.run(
            [sys.executable, "-c", READER, str(mnt / "slow")],
            capture_output=True,
            check=True,
            timeout=MOUNT_TIMEOUT,
        ).stdout
    assert out.split() == [b"1048576", b"1048575"]  # one "s" replaced by "W"
    assert (upper / "slow").read_bytes()[:2] == b"Ws"
