"""Rootless engine without a mount: override values, recording them on upper objects, id maps
and squashing, and the union core over a rootless (non-native) upper."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from unionfs.core import override
from unionfs.core.errors import FsError
from unionfs.core.fs import UnionFS
from unionfs.core.idmap import OVERFLOW_ID, IdMap, IdMapError, Presentation, parse_ranges
from unionfs.core.layers import DirLayer
from unionfs.core.override import Override
from unionfs.core.types import ROOT_INO, Stat
from unionfs.core.upper import UpperLayer

# -- override values -------------------------------------------------------------------

_FMTS = [
    stat.S_IFREG,
    stat.S_IFDIR,
    stat.S_IFLNK,
    stat.S_IFIFO,
    stat.S_IFSOCK,
    stat.S_IFCHR,
    stat.S_IFBLK,
]


@st.composite
def overrides(draw: st.DrawFn) -> Override:
    fmt = draw(st.sampled_from(_FMTS))
    rdev = 0
    if fmt in (stat.S_IFCHR, stat.S_IFBLK):
        rdev = os.makedev(draw(st.integers(0, 4095)), draw(st.integers(0, 1 << 20)))
    return Override(
        draw(st.integers(0, (1 << 32) - 1)),
        draw(st.integers(0, (1 << 32) - 1)),
        draw(st.integers(0, 0o7777)),
        fmt,
        rdev,
    )


@settings(deadline=None, max_examples=200)
@given(overrides())
def test_format_then_parse_gives_the_override_back(ov: Override) -> None:
    assert override.parse(override.format_override(ov, stat.S_IFREG)) == ov


def test_written_form_is_containers_storage_s() -> None:
    ov = Override(0, 42, 0o4755, stat.S_IFREG)
    assert override.format_override(ov, stat.S_IFREG) == b"0:42:04755:file"
    dev = Override(0, 0, 0o666, stat.S_IFCHR, os.makedev(1, 3))
    assert override.format_override(dev, stat.S_IFREG) == b"0:0:0666:char-1-3"
    blk = Override(7, 6, 0o660, stat.S_IFBLK, os.makedev(8, 1))
    assert override.format_override(blk, stat.S_IFREG) == b"7:6:0660:block-8-1"
    keep = Override(1, 2, 0o755)
    assert override.format_override(keep, stat.S_IFDIR) == b"1:2:0755:dir"


def test_three_field_form_keeps_the_object_s_type_and_drops_type_bits() -> None:
    assert override.parse(b"0:0:40755") == Override(0, 0, 0o755, None)
    assert override.parse(b"1000:1000:0100600\0") == Override(1000, 1000, 0o600, None)
    base = Stat(stat.S_IFDIR | 0o700, 2, 999, 999, 0, 4096, 8, 1, 2, 3, 77)
    shown = override.apply(base, Override(0, 0, 0o755))
    assert (shown.mode, shown.uid, shown.gid) == (stat.S_IFDIR | 0o755, 0, 0)
    assert replace(shown, mode=base.mode, uid=999, gid=999) == base


@pytest.mark.parametrize(
    "value",
    [b"", b"0:0", b"a:0:0755", b"0:0:9", b"0:0:0755:chair", b"0:0:0755:char-1", b"-1:0:0755",
     b"0:0:0755:block-x-1", b"1:2:3:4:5"],
)  # fmt: skip
def test_damaged_values_are_ignored(value: bytes) -> None:
    assert override.parse(value) is None


def test_apply_replaces_type_and_rdev_of_a_stand_in() -> None:
    disk = Stat(stat.S_IFREG | 0o600, 1, 999, 999, 0, 0, 0, 1, 2, 3, 9)
    shown = override.apply(disk, Override(0, 0, 0o620, stat.S_IFCHR, os.makedev(4, 5)))
    assert stat.S_ISCHR(shown.mode) and stat.S_IMODE(shown.mode) == 0o620
    assert shown.rdev == os.makedev(4, 5)
    fifo = override.apply(disk, Override(0, 0, 0o644, stat.S_IFIFO, 123))
    assert stat.S_ISFIFO(fifo.mode) and fifo.rdev == 0


def test_stored_xattr_names() -> None:
    assert override.stored_xattr(b"trusted.x") == b"user.layerfs.xattr.trusted.x"
    assert override.shown_xattr(b"user.layerfs.xattr.trusted.x") == b"trusted.x"
    assert override.shown_xattr(b"user.containers.override_security.ima") == b"security.ima"
    assert override.shown_xattr(b"user.containers.override_stat") is None
    assert override.shown_xattr(b"user.plain") is None
    assert override.privileged_xattr(b"trusted.x") and not override.privileged_xattr(b"user.x")


# -- recording on upper objects ----------------------------------------------------------


def _dir(path: Path) -> int:
    return os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def test_record_keeps_the_owner_usable_on_disk_and_the_asked_bits_in_the_xattr(
    tmp_path: Path,
) -> None:
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "d").mkdir()
    dfd = _dir(tmp_path)
    try:
        me = os.stat(tmp_path / "f")
        override.record(dfd, b"f", Override(me.st_uid + 1, 5, 0o4000))
        override.record(dfd, b"d", Override(me.st_uid, me.st_gid, 0o000))
        assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o600
        assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o700
        assert override.read(os.fsencode(tmp_path / "f")) == Override(
            me.st_uid + 1, 5, 0o4000, stat.S_IFREG
        )
        assert override.read(os.fsencode(tmp_path / "d")) == Override(
            me.st_uid, me.st_gid, 0, stat.S_IFDIR
        )
        # Back to what the disk shows by itself: the xattr goes away.
        override.record(dfd, b"f", Override(me.st_uid, me.st_gid, 0o644))
        assert override.read(os.fsencode(tmp_path / "f")) is None
        assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == 0o644
    finally:
        os.close(dfd)


def test_record_on_a_symlink_makes_a_stand_in_holding_the_target(tmp_path: Path) -> None:
    os.symlink(b"../some/where", tmp_path / "l")
    os.mkfifo(tmp_path / "p")
    (tmp_path / "work").mkdir()
    dfd, wfd = _dir(tmp_path), _dir(tmp_path / "work")
    try:
        me = os.lstat(tmp_path / "l")
        # Nothing to record: the link stays a link.
        override.record(dfd, b"l", Override(me.st_uid, me.st_gid, 0o777), wfd, b"t1")
        assert os.path.islink(tmp_path / "l")
        override.record(dfd, b"l", Override(me.st_uid + 3, 4, 0o777), wfd, b"t2")
        assert not os.path.islink(tmp_path / "l")
        assert (tmp_path / "l").read_bytes() == b"../some/where"
        assert stat.S_IMODE(os.stat(tmp_path / "l").st_mode) == 0o600
        assert override.read(os.fsencode(tmp_path / "l")) == Override(
            me.st_uid + 3, 4, 0o777, stat.S_IFLNK
        )
        override.record(dfd, b"p", Override(me.st_uid + 3, 4, 0o640), wfd, b"t3")
        assert stat.S_ISREG(os.lstat(tmp_path / "p").st_mode)
        assert override.read(os.fsencode(tmp_path / "p")) == Override(
            me.st_uid + 3, 4, 0o640, stat.S_IFIFO
        )
        assert os.listdir(tmp_path / "work") == []
    finally:
        os.close(dfd)
        os.close(wfd)


# -- id maps and squashing ----------------------------------------------------------------


def test_parse_ranges_and_errors() -> None:
    assert IdMap.parse(["0:1000:1:1:100000:65536"]).ranges == parse_ranges(
        "0:1000:1,1:100000:65536"
    )
    for bad in ("", "0:1000", "0:1000:0", "a:1:1", "0:-1:1", "0:4294967295:2"):
        with pytest.raises(IdMapError):
            parse_ranges(bad)
    with pytest.raises(IdMapError, match="overlap"):
        IdMap.parse(["0:1000:10", "5:2000:10"])
    with pytest.raises(IdMapError, match="overlap"):
        IdMap.parse(["0:1000:10", "100:1005:10"])


@settings(deadline=None, max_examples=100)
@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(1, 5)), min_size=1, max_size=4),
    st.integers(0, 400),
)
def test_maps_are_inverse_where_mapped_and_overflow_elsewhere(
    spans: list[tuple[int, int]], cid: int
) -> None:
    # Disjoint container ranges at 100*i + start, host ranges at 1000*i + 7.
    texts = [f"{100 * i + s}:{1000 * i + 7}:{n}" for i, (s, n) in enumerate(spans)]
    m = IdMap.parse(texts)
    host = m.to_host(cid)
    mapped = any(100 * i + s <= cid < 100 * i + s + n for i, (s, n) in enumerate(spans))
    if mapped:
        assert host != OVERFLOW_ID and m.to_container(host) == cid
    else:
        assert host == OVERFLOW_ID


def test_presentation_shows_squashed_or_mapped_ids_and_stores_container_ids() -> None:
    base = Stat(stat.S_IFREG | 0o644, 1, 0, 5, 0, 0, 0, 1, 2, 3, 9)
    squash = Presentation(squash_uid=1000, squash_gid=1001)
    assert (squash.show(base).uid, squash.show(base).gid) == (1000, 1001)
    assert squash.store_uid(42) == 42
    mapped = Presentation(uids=IdMap.parse(["0:1000:1"]), gids=IdMap.parse(["0:2000:10"]))
    shown = mapped.show(base)
    assert (shown.uid, shown.gid) == (1000, 2005)
    assert mapped.store_uid(1000) == 0 and mapped.store_uid(1001) is None
    assert mapped.store_gid(2009) == 9
    assert Presentation().identity and Presentation().show(base) is base


# -- the union core over a rootless upper -------------------------------------------------


def _rootless_fs(tmp_path: Path, presentation: Presentation | None = None) -> UnionFS:
    lower = tmp_path / "lower"
    (lower / "etc").mkdir(parents=True)
    (lower / "etc" / "passwd").write_bytes(b"root:x:0:0\n")
    for p in ("upper", "work"):
        (tmp_path / p).mkdir()
    upper = UpperLayer(os.fsencode(tmp_path / "upper"), os.fsencode(tmp_path / "work"), False)
    return UnionFS([DirLayer(os.fsencode(lower))], upper, presentation)


def test_chown_chmod_mknod_in_a_rootless_upper_are_shown_and_kept(tmp_path: Path) -> None:
    fs = _rootless_fs(tmp_path)
    try:
        etc = fs.lookup(ROOT_INO, b"etc")
        pw = fs.lookup(etc.ino, b"passwd")
        fs.setattr(pw.ino, uid=4242, gid=4343, mode=0o4750)
        a = fs.getattr(pw.ino).st
        assert (a.uid, a.gid, a.mode) == (4242, 4343, stat.S_IFREG | 0o4750)
        on_disk = tmp_path / "upper" / "etc" / "passwd"
        assert override.read(os.fsencode(on_disk)) == Override(4242, 4343, 0o4750, stat.S_IFREG)
        assert on_disk.read_bytes() == b"root:x:0:0\n"
        # The override is private: neither listed nor readable nor settable.
        assert override.OVERRIDE_XATTR not in fs.listxattr(pw.ino)
        with pytest.raises(FsError) as exc:
            fs.getxattr(pw.ino, override.OVERRIDE_XATTR)
        assert exc.value.errno == errno.ENODATA
        with pytest.raises(FsError):
            fs.setxattr(pw.ino, override.OVERRIDE_XATTR, b"0:0:0777:file")
        # trusted.* is kept under user.layerfs.xattr. and shown by its name.
        fs.setxattr(pw.ino, b"trusted.t", b"v")
        assert fs.getxattr(pw.ino, b"trusted.t") == b"v"
        assert b"trusted.t" in fs.listxattr(pw.ino)
        assert os.getxattr(on_disk, b"user.layerfs.xattr.trusted.t") == b"v"
        with pytest.raises(OSError):
            os.getxattr(on_disk, b"trusted.t")
        fs.removexattr(pw.ino, b"trusted.t")
        assert b"trusted.t" not in fs.listxattr(pw.ino)
        # A symlink given another owner becomes a stand-in; readlink still answers.
        ln = fs.symlink(ROOT_INO, b"ln", b"etc/passwd", os.getuid(), os.getgid())
        fs.setattr(ln.ino, uid=7, gid=8)
        assert stat.S_ISLNK(fs.getattr(ln.ino).st.mode) and fs.getattr(ln.ino).st.uid == 7
        assert fs.readlink(ln.ino) == b"etc/passwd"
        assert stat.S_ISREG(os.lstat(tmp_path / "upper" / "ln").st_mode)
    finally:
        fs.close()


def test_presentation_maps_shown_ids_and_chown_maps_back(tmp_path: Path) -> None:
    me = os.getuid()
    pres = Presentation(uids=IdMap.parse([f"0:{me + 1000}:1"]), gids=IdMap.parse(["0:3000:5"]))
    fs = _rootless_fs(tmp_path, pres)
    try:
        etc = fs.lookup(ROOT_INO, b"etc")
        pw = fs.lookup(etc.ino, b"passwd")
        owner = os.stat(tmp_path / "lower" / "etc" / "passwd")
        assert fs.getattr(pw.ino).st.uid == pres.show(Stat.of(owner)).uid
        fs.setattr(pw.ino, uid=me + 1000, gid=3004)
        assert (fs.getattr(pw.ino).st.uid, fs.getattr(pw.ino).st.gid) == (me + 1000, 3004)
        on_disk = os.fsencode(tmp_path / "upper" / "etc" / "passwd")
        stored = override.read(on_disk)
        assert stored is not None and (stored.uid, stored.gid) == (0, 4)
        with pytest.raises(FsError) as exc:
            fs.setattr(pw.ino, uid=12345)  # no range maps it
        assert exc.value.errno == errno.EINVAL
    finally:
        fs.close()


def test_chown_of_an_open_unlinked_file_in_a_rootless_upper(tmp_path: Path) -> None:
    fs = _rootless_fs(tmp_path)
    try:
        fh, a = fs.create(ROOT_INO, b"tmpf", stat.S_IFREG | 0o600, os.O_RDWR, 0, 0)
        fs.lookup(ROOT_INO, b"tmpf")
        fs.unlink(ROOT_INO, b"tmpf")
        fs.setattr(a.ino, uid=321, gid=654, mode=0o640)
        shown = fs.getattr(a.ino).st
        assert (shown.uid, shown.gid, stat.S_IMODE(shown.mode), shown.nlink) == (321, 654, 0o640, 0)
        fs.release(fh)
    finally:
        fs.close()


def test_overlay_options_parse_fuse_overlayfs_presentation_syntax() -> None:
    from unionfs.overlay_cli import UsageError, parse_options

    opts = parse_options(
        ["lowerdir=/a,uidmapping=0:1000:1,1:100000:65536,gidmapping=0:1000:1:1:100000:65536"]
    )
    pres = opts.presentation()
    assert pres.uids is not None and pres.gids is not None
    assert pres.uids.ranges == pres.gids.ranges
    assert pres.uids.to_host(5) == 100004 and pres.uids.to_host(0) == 1000
    root = parse_options(["lowerdir=/a,squash_to_root"]).presentation()
    assert (root.squash_uid, root.squash_gid) == (0, 0)
    sq = parse_options(["lowerdir=/a,squash_to_uid=7", "squash_to_gid=8"]).presentation()
    assert (sq.squash_uid, sq.squash_gid) == (7, 8)
    for bad in ("squash_to_uid=x", "squash_to_gid=-1", "uidmapping=0:1", "squash_to_root=1"):
        with pytest.raises(UsageError):
            parse_options([f"lowerdir=/a,{bad}"]).presentation()


@pytest.mark.parametrize("native", [True, False])
def test_xattrs_of_the_merged_root(tmp_path: Path, native: bool) -> None:
    """The root's upper copy is reached through its directory fd: xattr calls on it must not
    act on the /proc magic link (they failed with EPERM)."""
    lower, upper, work = (tmp_path / n for n in ("lower", "upper", "work"))
    for p in (lower, upper, work):
        p.mkdir()
    os.setxattr(lower, b"user.low", b"2")
    layer = DirLayer(os.fsencode(lower))
    ro = UnionFS([layer], None)
    try:
        assert b"user.low" in ro.listxattr(ROOT_INO)
        assert ro.getxattr(ROOT_INO, b"user.low") == b"2"
    finally:
        ro.close()
    fs = UnionFS(
        [DirLayer(os.fsencode(lower))], UpperLayer(os.fsencode(upper), os.fsencode(work), native)
    )
    try:
        fs.setxattr(ROOT_INO, b"user.x", b"1")
        assert fs.getxattr(ROOT_INO, b"user.x") == b"1"
        assert b"user.x" in fs.listxattr(ROOT_INO)
        assert os.getxattr(upper, b"user.x") == b"1"
        fs.removexattr(ROOT_INO, b"user.x")
        assert b"user.x" not in fs.listxattr(ROOT_INO)
    finally:
        fs.close()
