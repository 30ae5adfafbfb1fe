"""Operations through a real layerfs mount, and the kernel reading the upper it leaves."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import mmap
import os
import stat
import struct
import subprocess
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from tests.conftest import require_fuse, require_kernel_overlay, require_root
from tests.mounting import overlay_mount
from tests.treecmp import compare, snapshot

pytestmark = pytest.mark.mount

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(src: Path, dst: Path, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(src), -100, os.fsencode(dst), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


@pytest.fixture(autouse=True)
def _fuse() -> None:
    require_fuse()


class Stack:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.l0, self.l1 = base / "l0", base / "l1"
        self.upper, self.work, self.mnt = base / "u", base / "w", base / "m"
        for d in (self.l0, self.l1, self.upper, self.work, self.mnt):
            d.mkdir()
        (self.l1 / "dir" / "sub").mkdir(parents=True)
        (self.l1 / "dir" / "sub" / "deep").write_bytes(b"deep")
        (self.l1 / "dir" / "gone").write_bytes(b"gone")
        (self.l0 / "dir").mkdir()
        (self.l0 / "dir" / "top").write_bytes(b"top")
        (self.l1 / "file").write_bytes(b"0123456789")
        os.link(self.l1 / "file", self.l1 / "dir" / "alias")
        (self.l0 / "link").symlink_to("file")
        os.setxattr(self.l1 / "file", b"user.k", b"v")

    def mount(self) -> AbstractContextManager[Path]:
        return overlay_mount("layerfs", [self.l0, self.l1], self.mnt, self.upper, self.work)

    def kernel_mount(self, base: Path) -> AbstractContextManager[Path]:
        """Kernel overlayfs over the same lowers, with its own upper below `base`."""
        upper, work, mnt = (base / d for d in ("u", "w", "m"))
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        return overlay_mount("kernel", [self.l0, self.l1], mnt, upper, work)


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(tmp_path)


def test_merged_view_and_copy_up(stack: Stack) -> None:
    with stack.mount() as m:
        assert sorted(os.listdir(m / "dir")) == ["alias", "gone", "sub", "top"]
        st_file, st_alias = os.lstat(m / "file"), os.lstat(m / "dir" / "alias")
        assert st_file.st_ino == st_alias.st_ino and st_file.st_nlink == 2
        assert os.readlink(m / "link") == "file"
        with open(m / "file", "r+b") as f:
            f.seek(2)
            f.write(b"AB")
        assert (m / "dir" / "alias").read_bytes() == b"01AB456789"
        assert os.lstat(m / "file").st_ino == st_file.st_ino
        assert os.lstat(m / "dir" / "alias").st_nlink == 2
        assert os.getxattr(m / "file", b"user.k") == b"v"
        assert (stack.l1 / "file").read_bytes() == b"0123456789"
        devs = {os.lstat(m / p).st_dev for p in ("", "file", "dir", "dir/sub", "link")}
        assert len(devs) == 1
        os.unlink(m / "dir" / "gone")
        assert "gone" not in os.listdir(m / "dir")
        with pytest.raises(OSError) as info:
            os.rmdir(m / "dir")
        assert info.value.errno == errno.ENOTEMPTY
        with pytest.raises(OSError) as info:
            os.lstat(m / ("n" * 256))
        assert info.value.errno == errno.ENAMETOOLONG


def test_rename_directories_and_flags(stack: Stack) -> None:
    with stack.mount() as m:
        ino = os.lstat(m / "dir").st_ino
        os.mkdir(m / "new")
        os.rename(m / "dir", m / "new" / "moved")
        assert (m / "new" / "moved" / "sub" / "deep").read_bytes() == b"deep"
        assert os.lstat(m / "new" / "moved").st_ino == ino
        assert not (m / "dir").exists()
        (m / "a").write_bytes(b"A")
        with pytest.raises(OSError) as info:
            renameat2(m / "a", m / "file", RENAME_NOREPLACE)
        assert info.value.errno == errno.EEXIST
        renameat2(m / "a", m / "file", RENAME_EXCHANGE)
        assert (m / "a").read_bytes() == b"0123456789" and (m / "file").read_bytes() == b"A"
    with stack.mount() as m:
        assert os.lstat(m / "new" / "moved").st_ino == ino, "st_ino survives a remount"
        assert (m / "new" / "moved" / "top").read_bytes() == b"top"


def test_unlinked_while_open_and_mmap(stack: Stack) -> None:
    with stack.mount() as m:
        fd = os.open(m / "dir" / "top", os.O_RDWR)
        try:
            os.unlink(m / "dir" / "top")
            assert os.fstat(fd).st_nlink == 0
            os.pwrite(fd, b"T", 0)
            assert os.pread(fd, 10, 0) == b"Top"
        finally:
            os.close(fd)
        with open(m / "file", "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
            assert mm[:4] == b"0123"
            mm[0:2] = b"MM"
            mm.flush()
        assert (m / "file").read_bytes().startswith(b"MM23")
        assert (stack.upper / "file").read_bytes().startswith(b"MM23")


def test_metadata_ops(stack: Stack) -> None:
    with stack.mount() as m:
        f = m / "file"
        os.utime(f, ns=(10**18, 2 * 10**18))
        subprocess.run(["touch", "-m", "-d", "@1500000000", str(f)], check=True)
        st = os.lstat(f)
        assert st.st_atime_ns == 10**18, "UTIME_OMIT leaves atime"
        assert st.st_mtime_ns == 1500000000 * 10**9
        os.chmod(f, 0o600)
        assert stat.S_IMODE(os.lstat(f).st_mode) == 0o600
        os.truncate(f, 3)
        assert f.read_bytes() == b"012"
        os.setxattr(m / "dir", b"user.x", b"1")
        assert os.getxattr(m / "dir", b"user.x") == b"1"
        os.removexattr(f, b"user.k")
        assert b"user.k" not in [os.fsencode(x) for x in os.listxattr(f)]
        os.symlink("target", m / "sym")
        os.link(m / "dir" / "top", m / "hard")
        assert os.lstat(m / "hard").st_nlink == 2
        os.mkfifo(m / "fifo")
        assert stat.S_ISFIFO(os.lstat(m / "fifo").st_mode)
        assert os.statvfs(m).f_namemax == 255


def root_metadata_changes(root: Path) -> list[object]:
    """chmod, chown and utime of the mount's root, and what each left."""
    out: list[object] = []
    os.chmod(root, 0o1777)
    out.append(stat.S_IMODE(os.lstat(root).st_mode))
    os.chown(root, 1234, 4321)
    out.append((os.lstat(root).st_uid, os.lstat(root).st_gid))
    os.utime(root, ns=(10**18, 2 * 10**18))
    out.append((os.lstat(root).st_atime_ns, os.lstat(root).st_mtime_ns))
    os.chmod(root, 0o755)
    out.append(stat.S_IMODE(os.lstat(root).st_mode))
    return out


def test_metadata_of_the_root(stack: Stack, tmp_path: Path) -> None:
    """The root directory (an O_PATH fd in the upper: fchmod refused it with EBADF once)."""
    require_root()
    require_kernel_overlay()
    with stack.mount() as m:
        ours = root_metadata_changes(m)
    with stack.kernel_mount(tmp_path / "k") as km:
        assert ours == root_metadata_changes(km)
    up = os.lstat(stack.upper)
    assert (stat.S_IMODE(up.st_mode), up.st_uid, up.st_gid) == (0o755, 1234, 4321)


def as_nobody(root: Path) -> list[str]:
    """In a forked child running as 65534:65534 with no groups, below `root` (reached
    through an fd opened before dropping privileges: the test's own directories are
    root's): read a 0644 file, append to it, append to a 06777 file, list the root."""

    def t(f: Callable[[], object]) -> str:
        try:
            return repr(f())
        except OSError as e:
            return errno.errorcode[e.errno or 0]

    def append(dfd: int, name: str, data: bytes) -> int:
        fd = os.open(name, os.O_WRONLY | os.O_APPEND, dir_fd=dfd)
        try:
            return os.write(fd, data)
        finally:
            os.close(fd)

    def read(dfd: int, name: str) -> bytes:
        fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
        try:
            return os.read(fd, 100)
        finally:
            os.close(fd)

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(r)
            dfd = os.open(root, os.O_PATH | os.O_DIRECTORY)
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            lines = [
                t(lambda: read(dfd, "mine")),
                t(lambda: append(dfd, "mine", b"no")),
                t(lambda: append(dfd, "suid", b"more")),
                t(lambda: sorted(os.listdir(os.open(".", os.O_RDONLY, dir_fd=dfd)))),
            ]
            os.write(w, "\n".join(lines).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return out.splitlines()


def other_user_view(root: Path) -> list[object]:
    """What another user can do on a mount made with no allow_* option."""
    os.chmod(root, 0o777)
    (root / "mine").write_bytes(b"root's file")
    os.chmod(root / "mine", 0o644)
    (root / "suid").write_bytes(b"x")
    os.chmod(root / "suid", 0o6777)
    out: list[object] = list(as_nobody(root))
    st = os.lstat(root / "suid")
    out.append((stat.S_IMODE(st.st_mode), st.st_size))
    return out


def test_other_users_reach_a_root_mount_as_modes_allow(stack: Stack, tmp_path: Path) -> None:
    """As kernel overlayfs: a mount made by root with no allow_* option is open to other
    users within the modes (layerfs adds allow_other; default_permissions checks), and a
    write by a user without CAP_FSETID clears set-id bits (through passthrough too)."""
    require_root()
    require_kernel_overlay()
    with stack.mount() as m:
        ours = other_user_view(m)
    with stack.kernel_mount(tmp_path / "k") as km:
        theirs = other_user_view(km)
    assert ours == theirs
    assert ours[:3] == [repr(b"root's file"), "EACCES", "4"]
    assert ours[-1] == (0o777, 5)


# The modes FUSE passes on (fs/fuse/file.c refuses collapse and insert range itself).
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 0x01, 0x02, 0x10


def fallocate_steps(root: Path) -> list[object]:
    """fallocate(2) with each mode on a lower file (copied up by the write open) and a new
    one; each step's errno or the file's size and digest after it."""
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    out: list[object] = []

    def step(fd: int, mode: int, off: int, length: int) -> None:
        if _libc.fallocate(fd, mode, off, length) != 0:
            out.append(errno.errorcode[ctypes.get_errno()])
        else:
            st = os.fstat(fd)
            data = os.pread(fd, st.st_size + 1, 0)
            out.append((st.st_size, hashlib.sha256(data).hexdigest()[:16]))

    ro = os.open(root / "big", os.O_RDONLY)
    step(ro, 0, 0, 4096)  # not open for writing: EBADF, before any copy-up
    os.close(ro)
    for name in ("big", "new"):
        fd = os.open(root / name, os.O_RDWR | os.O_CREAT, 0o644)
        if name == "new":
            os.write(fd, bytes(range(256)) * 64)
        step(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 8192)
        step(fd, FALLOC_FL_PUNCH_HOLE, 0, 4096)  # punch needs keep_size: EOPNOTSUPP
        step(fd, FALLOC_FL_ZERO_RANGE, 100, 300)
        step(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 1 << 19, 4096)
        step(fd, 0, 0, 1 << 20)  # grows the file
        step(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 21)
        os.close(fd)
    return out


def test_fallocate_matches_kernel(tmp_path: Path) -> None:
    """Every fallocate mode through the mount as through kernel overlayfs."""
    require_root()
    require_kernel_overlay()
    lower = tmp_path / "l"
    lower.mkdir()
    (lower / "big").write_bytes(bytes(range(251)) * 200)
    results = []
    for impl in ("kernel", "layerfs"):
        dirs = [tmp_path / impl / d for d in ("u", "w", "m")]
        for d in dirs:
            d.mkdir(parents=True)
        with overlay_mount(impl, [lower], dirs[2], dirs[0], dirs[1]) as m:
            results.append(fallocate_steps(m))
    assert results[1] == results[0]
    assert "EOPNOTSUPP" not in results[1][2:4], results[1]
    assert (lower / "big").read_bytes() == bytes(range(251)) * 200


CAPS = b"security.capability"
NET_BIND = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # v2, effective, one cap


def capability_steps(root: Path) -> list[object]:
    """security.capability of a file made through the mount: none, set, killed by a write."""

    def caps(path: Path) -> object:
        try:
            return os.getxattr(path, CAPS)
        except OSError as exc:
            return errno.errorcode[exc.errno or 0]

    f = root / "tool"
    out: list[object] = []
    with open(f, "wb") as w:
        w.write(b"#!/bin/sh\n")
        out.append(caps(f))
    os.setxattr(f, CAPS, NET_BIND)
    out.append(caps(f))
    with open(f, "ab") as w:
        w.write(b"exit 0\n")  # a write drops file capabilities (even root's)
    out.append(caps(f))
    os.setxattr(f, CAPS, NET_BIND)
    os.link(f, root / "tool2")
    out.append(caps(root / "tool2"))
    return out


def test_file_capabilities_match_kernel(stack: Stack, tmp_path: Path) -> None:
    """A file made through the mount answers "no capability" without asking the host, until
    it is given one (then every name of it shows it) — as kernel overlayfs."""
    require_root()
    require_kernel_overlay()
    with stack.mount() as m:
        ours = capability_steps(m)
    with stack.kernel_mount(tmp_path / "k") as km:
        assert ours == capability_steps(km)
    assert ours == ["ENODATA", NET_BIND, "ENODATA", NET_BIND]


def test_paths_beyond_path_max(stack: Stack) -> None:
    comp = "d" * 250
    with stack.mount() as m:
        fd = os.open(m, os.O_RDONLY)
        try:
            for _ in range(20):  # 5000 bytes: longer than PATH_MAX
                os.mkdir(comp, dir_fd=fd)
                nfd = os.open(comp, os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = nfd
            wfd = os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd)
            os.write(wfd, b"deep")
            os.close(wfd)
            os.rename("leaf", "leaf2", src_dir_fd=fd, dst_dir_fd=fd)
            rfd = os.open("leaf2", os.O_RDONLY, dir_fd=fd)
            assert os.read(rfd, 10) == b"deep"
            os.close(rfd)
        finally:
            os.close(fd)


def test_kernel_mounts_our_upper_as_the_same_tree(stack: Stack, tmp_path: Path) -> None:
    require_root()
    require_kernel_overlay()
    with stack.mount() as m:
        (m / "file").write_bytes(b"rewritten")
        os.unlink(m / "dir" / "gone")
        os.rename(m / "dir" / "sub", m / "sub2")
        os.mkdir(m / "fresh")
        os.rename(m / "dir", m / "fresh" / "dir2")
        os.mkdir(m / "dir")
        (m / "dir" / "again").write_bytes(b"again")
        os.setxattr(m / "sub2", b"user.y", b"2")
        ours = snapshot(m)
    work2 = tmp_path / "w2"
    work2.mkdir()
    kmnt = tmp_path / "k"
    with overlay_mount(
        "kernel", [stack.l0, stack.l1], kmnt, stack.upper, work2, opts=("redirect_dir=on",)
    ) as km:
        theirs = snapshot(km)
    assert compare(ours, theirs, ignore=("mtime_ns",)) == []


def empty_chown_steps(root: Path, upper: Path) -> list[object]:
    """chown(f, -1, -1) of a lower file (copied up by it), a file made through the mount, a
    lower directory and a symlink: whether each one's ctime moved on, and its owner after.
    The upper copy's ctime is read on the host first: the kernel then gives the next change
    a fine-grained ctime (multigrain timestamps), so a change always shows."""
    (root / "made").write_bytes(b"m")
    out: list[object] = []
    for name in ("file", "made", "dir", "link"):
        before = os.lstat(root / name)
        if os.path.lexists(upper / name):
            os.lstat(upper / name)
        os.chown(root / name, -1, -1, follow_symlinks=False)
        after = os.lstat(root / name)
        out.append((name, after.st_ctime_ns > before.st_ctime_ns, after.st_uid, after.st_gid))
    return out


def test_an_empty_chown_changes_ctime_as_the_kernel(stack: Stack, tmp_path: Path) -> None:
    require_root()
    require_kernel_overlay()
    with stack.mount() as m:
        ours = empty_chown_steps(m, stack.upper)
    with stack.kernel_mount(tmp_path / "k") as km:
        theirs = empty_chown_steps(km, tmp_path / "k" / "u")
    assert ours == theirs
    assert all(moved for _name, moved, _u, _g in theirs), theirs
