"""diff and commit of hand-made uppers (both whiteout spellings) over a small image, no mount."""

from __future__ import annotations

import errno
import io
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore import ocibuild as ob
from layerstore.commit import commit_upper, iter_diff
from layerstore.ingest import import_source
from layerstore.sources import source_images
from layerstore.store import Store
from layerstore.unpack import unpack
from tests.conftest import require_root

IMAGE = "t/small:1"

EXPECTED_DIFF = [
    "D /a",
    "C /b",
    "A /c",
    "A /c/sub",
    "A /c/sub/y",
    "A /c/w",
    "A /c/x",
    "C /dd",
    "A /dd/n",
    "D /dd/q",
    "D /del",
    "A /newf",
]

# The layer's members in order: depth first, names sorted, a whiteout where its name sorts.
EXPECTED_MEMBERS = [
    ".wh.a",
    "b",
    "c",
    "c/sub",
    "c/sub/y",
    "c/w",
    "c/x",
    "dd",
    "dd/.wh..wh..opq",
    "dd/n",
    ".wh.del",
    "newf",
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    lower = [ob.d("a"), ob.f("a/x", b"x"), ob.d("a/sub"), ob.f("a/sub/y", b"y"), ob.d("b"),
             ob.f("b/z", b"z"), ob.f("del", b"d"), ob.d("dd"), ob.f("dd/q", b"q")]  # fmt: skip
    top = [ob.f("a/w", b"w"), ob.f("keep", b"k")]
    ob.write_oci(tmp_path / "src", ob.Img([ob.layer_tar(lower), ob.layer_tar(top)], ref="v1"))
    with Store(tmp_path / "store") as s:
        import_source(s, source_images(f"oci:{tmp_path / 'src'}:v1"), [IMAGE])
        yield s


def _upper(root: Path, native: bool) -> Path:
    """The upper a kernel overlay leaves after: rm -r a's old name (renamed to c, where x is
    changed and w is new), rm del, rm -r dd + mkdir dd + new n, chmod b, new file newf, and a
    whiteout of a name the image does not have (ghost)."""
    up = root / ("upper-native" if native else "upper-wh")
    up.mkdir()

    def whiteout(d: Path, name: str) -> None:
        if native:
            os.mknod(d / name, stat.S_IFCHR | 0o600, 0)
        else:
            (d / f".wh.{name}").write_bytes(b"")

    (up / "b").mkdir(mode=0o700)
    (up / "c").mkdir()
    (up / "c" / "x").write_bytes(b"x changed")
    (up / "c" / "w").write_bytes(b"w")
    (up / "dd").mkdir()
    (up / "dd" / "n").write_bytes(b"n")
    (up / "newf").write_bytes(b"new")
    for name in ("a", "del", "ghost"):
        whiteout(up, name)
    prefix = b"trusted.overlay." if native else b"user.overlay."
    try:
        os.setxattr(up / "c", prefix + b"redirect", b"a")
        if native:
            os.setxattr(up / "dd", prefix + b"opaque", b"y")
            os.setxattr(up / "c", prefix + b"origin", b"\x00private")
        else:
            (up / "dd" / ".wh..wh..opq").write_bytes(b"")
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            pytest.skip(f"cannot set {prefix.decode()}* xattrs in {root}: {exc.strerror}")
        raise
    return up


@pytest.mark.parametrize("native", [True, False], ids=["native", "wh-spelling"])
def test_diff_and_commit_of_a_hand_made_upper(store: Store, tmp_path: Path, native: bool) -> None:
    if native:
        require_root()  # char 0/0 whiteouts and trusted.* xattrs
    upper = _upper(tmp_path, native)
    assert list(iter_diff(store, upper, IMAGE)) == EXPECTED_DIFF
    res = commit_upper(store, upper, IMAGE, "new:1", message="m")
    assert res.image is not None and res.names == ["new:1"]
    top = store.image_layers("new:1")[-1]
    assert top.media_type.endswith("+gzip") and top.diff_id == res.diff_id
    data = b"".join(store.layer_tar(top.id))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == EXPECTED_MEMBERS
    assert all(not m.pax_headers for m in members)  # no overlay xattrs committed
    # c is the renamed a: its content is the image's a (incl. a/w of the top layer) + changes.
    with Store(store.root, readonly=True) as s:
        c_x = s.layer_lookup(top.id, b"/c", b"x")
        assert c_x is not None and c_x.content is not None
        assert s.content_path(c_x.content).read_bytes() == b"x changed"
    # A second commit of the same upper gives the same layer (deterministic tar and gzip).
    again = commit_upper(store, upper, IMAGE, "new:2", compression="gzip")
    assert again.diff_id == res.diff_id and again.digest == res.digest


def test_names_only_in_the_upper_get_no_whiteouts(store: Store, tmp_path: Path) -> None:
    up = tmp_path / "up"
    (up / "newdir" / "sub").mkdir(parents=True)
    (up / "newdir" / ".wh.was-never-there").write_bytes(b"")
    (up / "newdir" / "sub" / ".wh..wh..opq").write_bytes(b"")
    (up / "newdir" / "sub" / "f").write_bytes(b"f")
    assert list(iter_diff(store, up, IMAGE)) == ["A /newdir", "A /newdir/sub", "A /newdir/sub/f"]
    res = commit_upper(store, up, IMAGE, "n:1")
    data = b"".join(store.layer_tar(store.image_layers("n:1")[-1].id))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["newdir", "newdir/sub", "newdir/sub/f"]
    assert res.image is not None


def test_the_roots_attributes_are_committed_when_changed(store: Store, tmp_path: Path) -> None:
    up = tmp_path / "up"
    up.mkdir()
    up.chmod(0o755)
    res = commit_upper(store, up, IMAGE, "same:1")
    assert res.image is None  # the same attributes as the image's root: nothing to commit
    up.chmod(0o700)
    assert list(iter_diff(store, up, IMAGE)) == []  # docker diff never lists the root
    commit_upper(store, up, IMAGE, "root:1")
    data = b"".join(store.layer_tar(store.image_layers("root:1")[-1].id))
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        [member] = tar.getmembers()
    assert member.name in (".", "./") and member.isdir() and member.mode == 0o700
    unpack(store, "root:1", tmp_path / "out", lambda msg: None)
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o700
