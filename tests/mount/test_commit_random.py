"""Random changes through kernel overlayfs (redirect_dir=on) and layerfs over an unpacked image,
committed: the committed image unpacks to the changed mount's tree."""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerstore import ocibuild as ob
from layerstore.commit import commit_upper
from layerstore.ingest import import_source
from layerstore.sources import source_images
from layerstore.store import Store
from layerstore.unpack import unpack
from tests.conftest import require_fuse, require_kernel_overlay
from tests.image_fixtures import image_snapshot
from tests.mounting import overlay_mount
from tests.treecmp import compare

pytestmark = pytest.mark.mount

IMAGE = "rand/base:1"
PATHS = (b"d1", b"d1/f1", b"d1/sub", b"d1/sub/g1", b"d1/sub/sub2", b"d1/sub/sub2/h",
         b"d1/f3", b"d2", b"d2/y", b"d3", b"d3/z", b"top1", b"hl1", b"hl2", b"sym", b"new",
         b"d1/new", b"d2/new", b"d1/sub/new", b"newdir", b"newdir/n", b"d3/new")  # fmt: skip

Op = tuple[str, bytes, bytes]
OPS = st.tuples(
    st.sampled_from(["write", "rm", "mkdir", "rename", "chmod", "link", "symlink"]),
    st.sampled_from(PATHS),
    st.sampled_from(PATHS),
)


def apply(root: bytes, op: Op) -> None:
    """One change; errors (ENOENT, EEXIST, ENOTEMPTY, ...) are part of the game."""
    kind, a, b = op
    pa, pb = root + b"/" + a, root + b"/" + b
    try:
        if kind == "write":
            with open(pa, "ab") as f:
                f.write(b"+" + a)
        elif kind == "rm":
            if os.path.isdir(pa) and not os.path.islink(pa):
                shutil.rmtree(pa)
            else:
                os.unlink(pa)
        elif kind == "mkdir":
            os.mkdir(pa, 0o750)
        elif kind == "rename":
            os.rename(pa, pb)
        elif kind == "chmod":
            if not os.path.islink(pa):  # Linux cannot chmod a symlink itself
                os.chmod(pa, 0o700)
        elif kind == "link":
            os.link(pa, pb, follow_symlinks=False)
        else:
            os.symlink(a, pa)
    except OSError:
        pass


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, Path, Path]]:
    """(store holding IMAGE, its unpacked rootfs, a scratch dir)."""
    require_kernel_overlay()
    root = tmp_path_factory.mktemp("commit-random")
    l1 = [ob.d("d1"), ob.f("d1/f1", b"f1"), ob.d("d1/sub"), ob.f("d1/sub/g1", b"g1"),
          ob.d("d1/sub/sub2"), ob.f("d1/sub/sub2/h", b"h"), ob.d("d2"), ob.f("d2/x", b"x"),
          ob.f("top1", b"t"), ob.f("hl1", b"hl"), ob.hard("hl2", "hl1"), ob.sym("sym", "d1"),
          ob.d("d3"), ob.f("d3/old", b"old")]  # fmt: skip
    l2 = [ob.f("d1/f3", b"f3"), ob.wh("d2/x"), ob.f("d2/y", b"y"), ob.d("d3"),
          ob.f("d3/.wh..wh..opq"), ob.f("d3/z", b"z")]  # fmt: skip
    ob.write_oci(root / "src", ob.Img([ob.layer_tar(l1), ob.layer_tar(l2)], ref="v1"))
    with Store(root / "store") as store:
        import_source(store, source_images(f"oci:{root / 'src'}:v1"), [IMAGE])
        unpack(store, IMAGE, root / "lower", lambda msg: None)
        yield store, root / "lower", root


_n = itertools.count()


def check_round_trip(store: Store, lower: Path, scratch: Path, impl: str, ops: list[Op]) -> None:
    """Apply `ops` through an `impl` overlay of `lower`, commit its upper, unpack, compare."""
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        t = Path(tmp)
        upper, work, mnt, out = t / "upper", t / "work", t / "mnt", t / "out"
        for d in (upper, work):
            d.mkdir()
        opts = ("redirect_dir=on",) if impl == "kernel" else ()
        with overlay_mount(impl, [lower], mnt, upper, work, opts):
            for op in ops:
                apply(os.fsencode(mnt), op)
            expected = image_snapshot(mnt)
        name = f"rand/new:{next(_n)}"
        res = commit_upper(store, upper, IMAGE, name, allow_empty=True)
        assert res.image is not None
        unpack(store, name, out, lambda msg: None)
        diffs = [
            d for d in compare(expected, image_snapshot(out)) if not _stale_lower_nlink(d, upper)
        ]
        assert diffs == [], ops


@settings(deadline=None, max_examples=60)
@given(ops=st.lists(OPS, min_size=1, max_size=10))
def test_kernel_changes_committed_unpack_to_the_mount(
    base: tuple[Store, Path, Path], ops: list[Op]
) -> None:
    check_round_trip(*base, "kernel", ops)


@settings(deadline=None, max_examples=8)
@given(ops=st.lists(OPS, min_size=1, max_size=10))
def test_layerfs_changes_committed_unpack_to_the_mount(
    base: tuple[Store, Path, Path], ops: list[Op]
) -> None:
    require_fuse()
    check_round_trip(*base, "layerfs", ops)


def _stale_lower_nlink(diff: str, upper: Path) -> bool:
    """Link counts that cannot agree: without index=on the kernel breaks a lower hard link on
    copy-up but keeps reporting the lower inode's count for the names not copied up (in the
    image they are lone files); and the store keeps a hard link to a symlink as a copy."""
    path, sep, _ = diff.partition(": nlink ")
    return bool(sep) and (not os.path.lexists(upper / path) or os.path.islink(upper / path))
