"""commit of a rootless upper (hand-made, as an unprivileged daemon leaves it): owners, modes,
types and device numbers from the override_stat xattr, privileged xattrs from their
`user.layerfs.xattr.` copies, `.wh.` whiteouts and `user.overlay.opaque`; nothing private
enters the layer. Plus the override value's parser."""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerstore import ocibuild as ob
from layerstore import override
from layerstore.commit import commit_upper, iter_diff
from layerstore.ingest import import_source
from layerstore.sources import source_images
from layerstore.store import Store
from tests.conftest import require_root

IMAGE = "t/rootless:1"
USER_UID = 4242  # the "user" owning the hand-made upper on disk
OV = override.OVERRIDE_XATTR


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    lower = [ob.d("etc"), ob.f("etc/passwd", b"root:x:0:0::/:/bin/sh\n"), ob.d("dev"),
             ob.d("www"), ob.f("www/index", b"hi", uid=33, gid=33), ob.d("gone"),
             ob.f("gone/x", b"x"), ob.d("opq"), ob.f("opq/old", b"old")]  # fmt: skip
    ob.write_oci(tmp_path / "src", ob.Img([ob.layer_tar(lower)], ref="v1"))
    with Store(tmp_path / "store") as s:
        import_source(s, source_images(f"oci:{tmp_path / 'src'}:v1"), [IMAGE])
        yield s


def _set(path: Path, name: bytes, value: bytes) -> None:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            pytest.skip(f"cannot set {name.decode()} in {path.parent}: {exc.strerror}")
        raise


def _file(path: Path, data: bytes = b"", ov: bytes | None = None, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    os.chown(path, USER_UID, USER_UID)
    if ov is not None:
        _set(path, OV, ov)
    return path


def _dir(path: Path, ov: bytes | None = None) -> Path:
    path.mkdir()
    path.chmod(0o700)
    os.chown(path, USER_UID, USER_UID)
    if ov is not None:
        _set(path, OV, ov)
    return path


def rootless_upper(root: Path) -> Path:
    """What a rootless mount leaves after: chown/chmod of files and dirs, two devices made as
    placeholders, a fifo, privileged xattrs, rm of a file and a directory, an opaque dir."""
    require_root()  # the hand-made upper is owned by another uid, like the user's would be
    up = _dir(root / "upper", b"0:0:0755:dir")  # the root: the image's attributes
    _dir(up / "dev", b"0:0:0755:dir")
    _file(up / "dev" / "zero", ov=b"0:0:0666:char-1-5")
    _file(up / "dev" / "loop1", ov=b"0:6:0660:block-7-1")
    os.mkfifo(up / "dev" / "pipe", 0o620)  # made for real; user.* xattrs are refused on fifos
    os.chown(up / "dev" / "pipe", USER_UID, USER_UID)
    os.chmod(up / "dev" / "pipe", 0o620)
    # A fifo and a symlink owned by someone else: the engine's stand-ins, regular files with
    # the override (a symlink's holds its target).
    _file(up / "dev" / "pipe2", ov=b"0:5:0620:pipe")
    _dir(up / "www", b"33:33:02775:dir")
    _file(up / "www" / "link", b"../etc/passwd", ov=b"33:33:0777:symlink")
    su = _file(up / "www" / "su", b"#!/bin/sh\n", ov=b"0:0:04755:file")
    _set(su, b"user.layerfs.xattr.trusted.origin", b"from the mount")
    _set(su, b"user.layerfs.xattr.security.capability", b"\x01\x00\x00\x02")
    _set(su, b"user.comment", b"a plain user xattr")
    _set(su, b"user.overlay.origin", b"private")
    _set(su, b"user.layerfs.other", b"private")
    _file(up / "www" / "mine", b"no override: the user's own file\n", mode=0o644)
    _file(up / "www" / ".wh.index")  # rm www/index
    _file(up / ".wh.gone")  # rm -r gone
    opq = _dir(up / "opq", b"0:0:0755:dir")
    _set(opq, b"user.overlay.opaque", b"y")
    _file(opq / "new", b"new\n", ov=b"1000:1000:0640:file")
    return up


def layer_members(store: Store, ref: str) -> dict[str, tarfile.TarInfo]:
    data = b"".join(store.layer_tar(store.image_layers(ref)[-1].id))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: m for m in tar.getmembers()}


def test_commit_takes_owner_mode_type_and_devices_from_the_override(
    store: Store, tmp_path: Path
) -> None:
    up = rootless_upper(tmp_path)
    res = commit_upper(store, up, IMAGE, "new:1")
    assert res.image is not None and res.warnings == []
    m = layer_members(store, "new:1")
    assert list(m) == [
        "dev", "dev/loop1", "dev/pipe", "dev/pipe2", "dev/zero", ".wh.gone", "opq",
        "opq/.wh..wh..opq", "opq/new", "www", "www/.wh.index", "www/link", "www/mine", "www/su",
    ]  # fmt: skip
    # The root is not committed: with its override it equals the image's (0:0 0755).
    zero, loop1 = m["dev/zero"], m["dev/loop1"]
    assert zero.ischr() and (zero.devmajor, zero.devminor) == (1, 5)
    assert (zero.uid, zero.gid, zero.mode, zero.size) == (0, 0, 0o666, 0)
    assert loop1.isblk() and (loop1.devmajor, loop1.devminor) == (7, 1)
    assert (loop1.uid, loop1.gid, loop1.mode) == (0, 6, 0o660)
    pipe, pipe2, link = m["dev/pipe"], m["dev/pipe2"], m["www/link"]
    assert pipe.isfifo() and (pipe.uid, pipe.mode) == (USER_UID, 0o620)
    assert pipe2.isfifo() and (pipe2.uid, pipe2.gid, pipe2.mode, pipe2.size) == (0, 5, 0o620, 0)
    assert link.issym() and link.linkname == "../etc/passwd" and (link.uid, link.gid) == (33, 33)
    assert m["www"].isdir() and (m["www"].uid, m["www"].gid, m["www"].mode) == (33, 33, 0o2775)
    su = m["www/su"]
    assert su.isreg() and (su.uid, su.gid, su.mode, su.size) == (0, 0, 0o4755, 10)
    assert su.pax_headers == {
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
        "SCHILY.xattr.trusted.origin": "from the mount",
        "SCHILY.xattr.user.comment": "a plain user xattr",
    }
    mine = m["www/mine"]
    assert (mine.uid, mine.gid, mine.mode) == (USER_UID, USER_UID, 0o644)
    new = m["opq/new"]
    assert (new.uid, new.gid, new.mode) == (1000, 1000, 0o640)
    for name, ti in m.items():
        if name not in ("www/su",):
            assert not ti.pax_headers, name  # no override or overlay xattr leaked
    # The store's index of the new layer says the same (what a mount of it will show).
    top = store.image_layers("new:1")[-1].id
    e = store.layer_lookup(top, b"/dev", b"zero")
    assert e is not None and e.rdev == (1, 5) and (e.uid, e.mode) == (0, 0o666)
    assert list(iter_diff(store, up, IMAGE)) == [
        "C /dev", "A /dev/loop1", "A /dev/pipe", "A /dev/pipe2", "A /dev/zero", "D /gone",
        "C /opq", "A /opq/new", "D /opq/old", "C /www", "D /www/index", "A /www/link",
        "A /www/mine", "A /www/su",
    ]  # fmt: skip


def test_the_roots_override_decides_whether_the_root_is_committed(
    store: Store, tmp_path: Path
) -> None:
    require_root()
    up = _dir(tmp_path / "up")  # owned by the user, 0700 on disk: no override
    _file(up / "f", b"f")
    names = list(layer_members(store, commit_upper(store, up, IMAGE, "a:1").names[0]))
    assert names == [".", "f"]  # the root shows as the user's: committed as such
    _set(up, OV, b"0:0:0755:dir")
    assert list(layer_members(store, commit_upper(store, up, IMAGE, "b:1").names[0])) == ["f"]


def test_fuse_overlayfs_spellings_are_read(store: Store, tmp_path: Path) -> None:
    require_root()
    up = _dir(tmp_path / "up", b"0:0:0755:dir")
    d = _dir(up / "d")
    _set(d, override.FUSEOVERLAYFS_XATTR, b"1000:1000:40750")  # st_mode with type bits
    f = _file(d / "f", b"x")
    _set(f, b"user.containers.override_security.capability", b"cap")
    _set(f, b"user.fuseoverlayfs.origin", b"private")
    m = layer_members(store, commit_upper(store, up, IMAGE, "fo:1").names[0])
    assert m["d"].isdir() and (m["d"].uid, m["d"].gid, m["d"].mode) == (1000, 1000, 0o750)
    assert m["d/f"].pax_headers == {"SCHILY.xattr.security.capability": "cap"}


def test_a_malformed_override_is_ignored_with_a_warning(store: Store, tmp_path: Path) -> None:
    require_root()
    up = _dir(tmp_path / "up", b"0:0:0755:dir")
    _file(up / "f", b"x", ov=b"zero:0:0644", mode=0o640)
    res = commit_upper(store, up, IMAGE, "bad:1")
    assert len(res.warnings) == 1 and "bad override_stat value" in res.warnings[0]
    f = layer_members(store, "bad:1")["f"]
    assert (f.uid, f.mode) == (USER_UID, 0o640)  # what the mount shows: the file's own


def test_commit_by_root_and_by_the_owner_give_the_same_layer(store: Store, tmp_path: Path) -> None:
    """The layer depends on the upper only, not on who commits (user.* xattrs are readable by
    both); checked here twice as root, and as the real user in tests/rootless."""
    up = rootless_upper(tmp_path)
    a = commit_upper(store, up, IMAGE, "x:1")
    b = commit_upper(store, up, IMAGE, "x:2")
    assert a.diff_id == b.diff_id and a.digest == b.digest


# ---- the value's parser ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (b"0:0:0755:dir", override.Override(0, 0, 0o755, stat.S_IFDIR)),
        (b"33:44:04755:file", override.Override(33, 44, 0o4755, stat.S_IFREG)),
        (b"1:2:0644", override.Override(1, 2, 0o644, None)),
        (b"1:2:100644", override.Override(1, 2, 0o644, None)),  # type bits ignored
        (b"0:6:0660:block-7-1", override.Override(0, 6, 0o660, stat.S_IFBLK, os.makedev(7, 1))),
        (b"0:0:0666:char-1-5\0", override.Override(0, 0, 0o666, stat.S_IFCHR, os.makedev(1, 5))),
        (b"0:0:0600:pipe", override.Override(0, 0, 0o600, stat.S_IFIFO)),
        (b"0:0:0777:symlink", override.Override(0, 0, 0o777, stat.S_IFLNK)),
        (b"0:0:0755:socket", override.Override(0, 0, 0o755, stat.S_IFSOCK)),
    ],
)
def test_parse(value: bytes, want: override.Override) -> None:
    assert override.parse(value) == want


@pytest.mark.parametrize(
    "value", [b"", b"0:0", b"a:0:0644", b"0:0:0999", b"0:0:0644:tape", b"0:0:0644:char-1",
              b"-1:0:0644", b"0:0:0644:dir:x", b"0:0:0644:char-x-1"],
)  # fmt: skip
def test_parse_refuses(value: bytes) -> None:
    with pytest.raises(override.OverrideError):
        override.parse(value)


@settings(deadline=None, max_examples=200)
@given(
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    mode=st.integers(0, 0o7777),
    kind=st.sampled_from(
        [
            None,
            stat.S_IFREG,
            stat.S_IFDIR,
            stat.S_IFLNK,
            stat.S_IFIFO,
            stat.S_IFSOCK,
            stat.S_IFCHR,
            stat.S_IFBLK,
        ]
    ),  # fmt: skip
    major=st.integers(0, 4095),
    minor=st.integers(0, 2**20 - 1),
)
def test_encode_parse_round_trip(
    uid: int, gid: int, mode: int, kind: int | None, major: int, minor: int
) -> None:
    rdev = os.makedev(major, minor) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
    ov = override.Override(uid, gid, mode, kind, rdev)
    assert override.parse(ov.encode()) == ov


@pytest.mark.parametrize(
    ("name", "want"),
    [
        (b"user.layerfs.xattr.trusted.x", b"trusted.x"),
        (b"user.layerfs.xattr.security.capability", b"security.capability"),
        (b"user.containers.override_security.ima", b"security.ima"),
        (b"user.comment", b"user.comment"),
        (b"security.capability", b"security.capability"),
        (b"trusted.x", b"trusted.x"),
        (b"user.containers.override_stat", None),
        (b"user.fuseoverlayfs.override_stat", None),
        (b"user.overlay.opaque", None),
        (b"trusted.overlay.redirect", None),
        (b"user.layerfs.anything", None),
        (b"user.layerfs.xattr.user.overlay.opaque", None),  # no smuggling behind the prefix
        (b"user.layerfs.xattr.", None),
        (b"security.selinux", None),
    ],
)
def test_real_xattr_name(name: bytes, want: bytes | None) -> None:
    assert override.real_xattr_name(name) == want


def test_a_value_set_through_the_mount_wins_over_a_real_xattr() -> None:
    stored = [(b"trusted.x", b"old"), (b"user.layerfs.xattr.trusted.x", b"new"), (b"user.a", b"")]
    assert override.real_xattrs(stored) == [(b"trusted.x", b"new"), (b"user.a", b"")]
    assert override.real_xattrs(list(reversed(stored))) == [
        (b"trusted.x", b"new"),
        (b"user.a", b""),
    ]
