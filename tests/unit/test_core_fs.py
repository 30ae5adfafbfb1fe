"""UnionFS without a mount: copy-up, whiteouts, opaque dirs, redirects, links, inode numbers."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs.core import upper as upper_mod
from unionfs.core.errors import FsError
from unionfs.core.fs import UnionFS
from unionfs.core.layers import DirLayer
from unionfs.core.types import ROOT_INO, Ino
from unionfs.core.upper import RENAME_EXCHANGE, RENAME_NOREPLACE, UpperLayer

ROOT = os.geteuid() == 0
XPREFIX = b"trusted.overlay." if ROOT else b"user.overlay."


class Stack:
    def __init__(self, base: Path, nlowers: int = 2) -> None:
        self.lowers = [base / f"l{i}" for i in range(nlowers)]
        self.upper = base / "u"
        self.work = base / "w"
        for d in (*self.lowers, self.upper, self.work):
            d.mkdir()
        self.fs: UnionFS | None = None

    def mount(self, writable: bool = True) -> UnionFS:
        self.unmount()
        upper = (
            UpperLayer(os.fsencode(self.upper), os.fsencode(self.work), ROOT) if writable else None
        )
        self.fs = UnionFS([DirLayer(os.fsencode(p)) for p in self.lowers], upper)
        return self.fs

    def unmount(self) -> None:
        if self.fs is not None:
            self.fs.close()
            for layer in self.fs.lowers:
                assert isinstance(layer, DirLayer)
                layer.close()
            if self.fs.upper is not None:
                self.fs.upper.close()
            self.fs = None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = Stack(tmp_path)
    try:
        yield s
    finally:
        s.unmount()


def walk(fs: UnionFS, path: bytes) -> Ino:
    ino = ROOT_INO
    for comp in path.split(b"/") if path else []:
        ino = fs.lookup(ino, comp).ino
    return ino


def names(fs: UnionFS, path: bytes) -> list[bytes]:
    fh = fs.opendir(walk(fs, path))
    try:
        return sorted(n for n, _, _ in fs.readdir(fh, 0))
    finally:
        fs.releasedir(fh)


def read(fs: UnionFS, path: bytes) -> bytes:
    fh, _ = fs.open(walk(fs, path), os.O_RDONLY)
    try:
        return os.pread(fs.read_fd(fh), 1 << 20, 0)
    finally:
        fs.release(fh)


def write(fs: UnionFS, path: bytes, data: bytes, off: int = 0) -> None:
    fh, _ = fs.open(walk(fs, path), os.O_WRONLY)
    try:
        os.pwrite(fs.write_fd(fh), data, off)
    finally:
        fs.release(fh)


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(FsError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno


def test_copy_up_keeps_metadata_and_inode(stack: Stack) -> None:
    d = stack.lowers[1] / "d"
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"hello")
    os.setxattr(f, b"user.k", b"v")
    os.chmod(f, 0o640)
    if ROOT:
        os.chown(f, 1234, 567)
    os.utime(f, ns=(10**18, 10**18))
    os.utime(d, ns=(2 * 10**18, 2 * 10**18))
    fs = stack.mount()
    ino = walk(fs, b"d/f")
    before = fs.getattr(ino)
    assert before.immutable
    write(fs, b"d/f", b"J")
    after = fs.getattr(ino)
    assert after.ino == ino and not after.immutable
    assert read(fs, b"d/f") == b"Jello"
    assert f.read_bytes() == b"hello", "the lower layer must not change"
    up = stack.upper / "d" / "f"
    ust = os.lstat(up)
    assert stat.S_IMODE(ust.st_mode) == 0o640
    if ROOT:
        assert (ust.st_uid, ust.st_gid) == (1234, 567)
    assert os.getxattr(up, b"user.k") == b"v"
    assert os.lstat(stack.upper / "d").st_mtime_ns == 2 * 10**18, "parent times kept"
    assert fs.listxattr(ino) == [b"user.k"]
    stack.unmount()
    fs = stack.mount()
    assert walk(fs, b"d/f") == ino, "st_ino survives a remount"


def test_truncating_open_skips_data_and_setattr_copies_up(stack: Stack) -> None:
    (stack.lowers[0] / "big").write_bytes(b"x" * 100000)
    (stack.lowers[0] / "m").write_bytes(b"m")
    fs = stack.mount()
    fh, _ = fs.open(walk(fs, b"big"), os.O_WRONLY | os.O_TRUNC)
    fs.release(fh)
    assert (stack.upper / "big").read_bytes() == b""
    ino = walk(fs, b"m")
    a = fs.setattr(ino, mode=0o600, mtime_ns=5 * 10**17)
    assert stat.S_IMODE(a.st.mode) == 0o600 and a.st.mtime_ns == 5 * 10**17
    assert (stack.upper / "m").read_bytes() == b"m"


def test_unlink_whiteouts_only_where_a_lower_has_the_name(stack: Stack) -> None:
    (stack.lowers[0] / "low").write_bytes(b"1")
    fs = stack.mount()
    fh, _ = fs.create(ROOT_INO, b"new", 0o644, os.O_WRONLY, 0, 0)
    fs.release(fh)
    fs.unlink(ROOT_INO, b"new")
    assert os.listdir(stack.upper) == []
    fs.unlink(ROOT_INO, b"low")
    if ROOT:
        st = os.lstat(stack.upper / "low")
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    else:
        assert (stack.upper / ".wh.low").exists()
    assert names(fs, b"") == []
    assert errno_of(fs.lookup, ROOT_INO, b"low") == errno.ENOENT


def _whiteout_inodes(stack: Stack, names: list[str]) -> list[int]:
    """The host inode of each name's whiteout in the upper root (checked to be one)."""
    out = []
    for n in names:
        if ROOT:
            st = os.lstat(stack.upper / n)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, n
        else:
            st = os.lstat(stack.upper / f".wh.{n}")
            assert stat.S_ISREG(st.st_mode) and st.st_size == 0, n
        out.append(st.st_ino)
    return out


def _lower_files(stack: Stack, n: int) -> list[str]:
    names = [f"f{i}" for i in range(n)]
    for name in names:
        (stack.lowers[1] / name).write_bytes(b"x")
    return names


def test_whiteouts_are_links_of_one_whiteout_as_the_kernel_makes_them(stack: Stack) -> None:
    names = _lower_files(stack, 5)
    (stack.lowers[1] / "d").mkdir()
    (stack.lowers[0] / "g").write_bytes(b"g")
    fs = stack.mount()
    for name in names:
        fs.unlink(ROOT_INO, name.encode())
    fs.rmdir(ROOT_INO, b"d")
    fs.rename(ROOT_INO, b"g", ROOT_INO, b"h", 0)  # leaves a whiteout at g
    inos = _whiteout_inodes(stack, [*names, "d", "g"])
    assert len(set(inos)) == 1
    assert names_of(fs) == ["h"]
    work = stack.work / "work"
    assert [os.lstat(work / n).st_ino for n in os.listdir(work)] == inos[:1]
    stack.unmount()
    assert os.listdir(work) == []  # the shared one goes with the mount; the whiteouts stay
    assert len(set(_whiteout_inodes(stack, [*names, "d", "g"]))) == 1
    fs = stack.mount()
    assert names_of(fs) == ["h"]
    fs.mknod(ROOT_INO, b"f0", stat.S_IFIFO | 0o644, 0, 0, 0)  # over a linked whiteout
    assert stat.S_ISFIFO(os.lstat(stack.upper / "f0").st_mode)
    assert names_of(fs) == ["f0", "h"]


def test_a_shared_whiteout_is_replaced_when_full_or_gone(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(upper_mod, "WHITEOUT_LINKS", 2)
    names = _lower_files(stack, 7)
    fs = stack.mount()
    for name in names[:5]:
        fs.unlink(ROOT_INO, name.encode())
    inos = _whiteout_inodes(stack, names[:5])
    assert [inos.index(i) for i in inos] == [0, 0, 2, 2, 4]  # two links each
    work = stack.work / "work"
    assert len(os.listdir(work)) == 1  # a full one leaves the work directory
    for n in os.listdir(work):
        os.unlink(work / n)  # removed behind the mount's back
    fs.unlink(ROOT_INO, names[5].encode())
    fs.unlink(ROOT_INO, names[6].encode())
    inos = _whiteout_inodes(stack, names)
    assert inos[5] == inos[6] and inos[5] not in inos[:5]
    assert names_of(fs) == []


def test_whiteouts_made_one_by_one_where_links_fail(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    tried: list[object] = []

    def no_link(*args: object, **kw: object) -> None:
        tried.append(args)
        raise OSError(errno.EPERM, "no hard links here")

    monkeypatch.setattr(os, "link", no_link)
    names = _lower_files(stack, 3)
    fs = stack.mount()
    for name in names:
        fs.unlink(ROOT_INO, name.encode())
    assert len(tried) == 1  # not tried again on this mount
    assert len(set(_whiteout_inodes(stack, names))) == 3
    assert names_of(fs) == []


def names_of(fs: UnionFS) -> list[str]:
    return [n.decode() for n in names(fs, b"")]


def test_mkdir_over_removed_lower_dir_is_opaque(stack: Stack) -> None:
    (stack.lowers[1] / "d").mkdir()
    (stack.lowers[1] / "d" / "old").write_bytes(b"")
    fs = stack.mount()
    assert errno_of(fs.rmdir, ROOT_INO, b"d") == errno.ENOTEMPTY
    fs.unlink(walk(fs, b"d"), b"old")
    fs.rmdir(ROOT_INO, b"d")
    fs.mkdir(ROOT_INO, b"d", 0o755, 0, 0)
    assert names(fs, b"d") == []
    if ROOT:
        assert os.getxattr(stack.upper / "d", b"trusted.overlay.opaque") == b"y"


def test_rename_lower_dir_records_a_redirect(stack: Stack) -> None:
    (stack.lowers[1] / "a" / "sub").mkdir(parents=True)
    (stack.lowers[1] / "a" / "sub" / "f").write_bytes(b"deep")
    (stack.lowers[0] / "other").mkdir()
    fs = stack.mount()
    ino = walk(fs, b"a")
    fs.rename(ROOT_INO, b"a", ROOT_INO, b"b")
    assert walk(fs, b"b") == ino
    assert read(fs, b"b/sub/f") == b"deep"
    assert errno_of(fs.lookup, ROOT_INO, b"a") == errno.ENOENT
    assert os.getxattr(stack.upper / "b", XPREFIX + b"redirect") == b"a"
    fs.rename(ROOT_INO, b"b", walk(fs, b"other"), b"c")
    assert os.getxattr(stack.upper / "other" / "c", XPREFIX + b"redirect") == b"/a"
    assert read(fs, b"other/c/sub/f") == b"deep"
    stack.unmount()
    fs = stack.mount()
    assert read(fs, b"other/c/sub/f") == b"deep"
    assert walk(fs, b"other/c") == ino
    assert sorted(names(fs, b"")) == [b"other"]


def test_rename_flags(stack: Stack) -> None:
    (stack.lowers[0] / "x").write_bytes(b"X")
    (stack.lowers[0] / "y").write_bytes(b"Y")
    fs = stack.mount()
    assert errno_of(fs.rename, ROOT_INO, b"x", ROOT_INO, b"y", RENAME_NOREPLACE) == errno.EEXIST
    fs.rename(ROOT_INO, b"x", ROOT_INO, b"y", RENAME_EXCHANGE)
    assert read(fs, b"x") == b"Y" and read(fs, b"y") == b"X"
    assert errno_of(fs.rename, ROOT_INO, b"x", ROOT_INO, b"z", RENAME_EXCHANGE) == errno.ENOENT
    fs.rename(ROOT_INO, b"x", ROOT_INO, b"z", RENAME_NOREPLACE)
    assert names(fs, b"") == [b"y", b"z"]


def test_lower_hard_links_stay_linked_after_copy_up(stack: Stack) -> None:
    (stack.lowers[0] / "d").mkdir()
    (stack.lowers[0] / "h1").write_bytes(b"same")
    os.link(stack.lowers[0] / "h1", stack.lowers[0] / "d" / "h2")
    fs = stack.mount()
    a, b = walk(fs, b"h1"), walk(fs, b"d/h2")
    assert a == b and fs.getattr(a).st.nlink == 2
    write(fs, b"h1", b"SAME")
    assert read(fs, b"d/h2") == b"SAME"
    assert walk(fs, b"d/h2") == a and fs.getattr(a).st.nlink == 2
    fs.unlink(walk(fs, b"d"), b"h2")
    assert fs.getattr(a).st.nlink == 1


def test_unlinked_while_open_keeps_working(stack: Stack) -> None:
    (stack.lowers[0] / "f").write_bytes(b"data")
    fs = stack.mount()
    ino = walk(fs, b"f")
    fh, _ = fs.open(ino, os.O_RDWR)
    fs.unlink(ROOT_INO, b"f")
    assert fs.getattr(ino).st.nlink == 0
    os.pwrite(fs.write_fd(fh), b"D", 0)
    assert os.pread(fs.read_fd(fh), 10, 0) == b"Data"
    fs.release(fh)


def test_names_and_read_only(stack: Stack) -> None:
    (stack.lowers[0] / "f").write_bytes(b"")
    fs = stack.mount()
    assert errno_of(fs.lookup, ROOT_INO, b"n" * 256) == errno.ENAMETOOLONG
    assert errno_of(fs.mkdir, ROOT_INO, b"n" * 256, 0o755, 0, 0) == errno.ENAMETOOLONG
    fs.mkdir(ROOT_INO, b"n" * 255, 0o755, 0, 0)
    fs = stack.mount(writable=False)
    assert errno_of(fs.unlink, ROOT_INO, b"f") == errno.EROFS
    assert errno_of(fs.open, walk(fs, b"f"), os.O_WRONLY) == errno.EROFS
    assert errno_of(fs.getxattr, walk(fs, b"f"), b"trusted.overlay.opaque") == errno.ENODATA


def test_paths_longer_than_path_max(stack: Stack) -> None:
    comp = b"d" * 200
    depth = 25  # about 5000 bytes below the layer root
    fd = os.open(stack.lowers[1], os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir(comp, dir_fd=fd)
            nfd = os.open(comp, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open(b"leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "wb") as f:
            f.write(b"deep")
    finally:
        os.close(fd)
    fs = stack.mount()
    deep = b"/".join([comp] * depth)
    assert read(fs, deep + b"/leaf") == b"deep"
    write(fs, deep + b"/leaf", b"D")
    assert read(fs, deep + b"/leaf") == b"Deep"
    fs.rename(walk(fs, deep), b"leaf", walk(fs, deep), b"leaf2")
    assert names(fs, deep) == [b"leaf2"]


def test_unprivileged_spelling(tmp_path: Path) -> None:
    """Without privileges the upper uses `.wh.` whiteouts, `.wh..wh..opq` and user.overlay.*."""
    s = Stack(tmp_path)
    (s.lowers[0] / "d").mkdir()
    (s.lowers[0] / "d" / "f").write_bytes(b"")
    (s.lowers[0] / "e").mkdir()
    upper = UpperLayer(os.fsencode(s.upper), os.fsencode(s.work), native=False)
    fs = UnionFS([DirLayer(os.fsencode(p)) for p in s.lowers], upper)
    s.fs = fs
    fs.unlink(walk(fs, b"d"), b"f")
    assert (s.upper / "d" / ".wh.f").is_file()
    fs.rmdir(ROOT_INO, b"d")
    fs.mkdir(ROOT_INO, b"d", 0o755, os.getuid(), os.getgid())
    assert (s.upper / "d" / ".wh..wh..opq").is_file()
    assert names(fs, b"d") == [] and names(fs, b"") == [b"d", b"e"]
    fs.rename(ROOT_INO, b"e", walk(fs, b"d"), b"e2")
    assert os.getxattr(s.upper / "d" / "e2", b"user.overlay.redirect") == b"/e"
    assert fs.listxattr(walk(fs, b"d/e2")) == []
    s.unmount()
    fs = s.mount()
    assert names(fs, b"") == [b"d"] and names(fs, b"d") == [b"e2"]


def test_one_directory_in_two_places_keeps_the_tree_a_tree(stack: Stack) -> None:
    """Two places showing the same directory identity (here an upper dir and its own child
    recorded as copies of one lower dir) get a node each: paths stay finite."""
    (stack.lowers[0] / "a" / "x").mkdir(parents=True)
    origin = b"1:%d" % os.lstat(stack.lowers[0] / "a").st_ino
    (stack.upper / "a" / "sub").mkdir(parents=True)
    for d in (stack.upper / "a", stack.upper / "a" / "sub"):
        os.setxattr(d, XPREFIX + b"layerfs.origin", origin)
    fs = stack.mount()
    outer, inner = walk(fs, b"a"), walk(fs, b"a/sub")
    assert outer != inner
    assert names(fs, b"a") == [b"sub", b"x"]
    fs.mkdir(inner, b"new", 0o755, 0, 0)
    assert (stack.upper / "a" / "sub" / "new").is_dir()
    assert names(fs, b"a/sub") == [b"new"]
    assert walk(fs, b"a") == outer and walk(fs, b"a/sub") == inner


def test_open_after_the_name_is_gone(stack: Stack) -> None:
    """The kernel may open an inode whose name was unlinked since its lookup: never open
    what the name leads to now (a whiteout: ENXIO, or another file)."""
    (stack.lowers[0] / "f").write_bytes(b"low")
    fs = stack.mount()
    ino = walk(fs, b"f")
    write(fs, b"f", b"up!")
    held, _ = fs.open(ino, os.O_RDONLY)
    fs.unlink(ROOT_INO, b"f")
    fh, _ = fs.open(ino, os.O_RDONLY)
    assert os.pread(fs.read_fd(fh), 10, 0) == b"up!"
    fs.release(fh)
    fs.release(held)
    assert errno_of(fs.open, ino, os.O_RDONLY) == errno.ENOENT
    with pytest.raises(FsError) as info:
        fs.setattr(ino, mode=0o600)
    assert info.value.errno == errno.ENOENT
    assert errno_of(fs.getxattr, ino, b"user.x") == errno.ENOENT
