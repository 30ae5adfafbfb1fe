"""`layerfs import` + `layerfs unpack` of real images equals `umoci unpack`, entry by entry."""

from __future__ import annotations

import dataclasses
import hashlib
import platform
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests import images
from tests.image_fixtures import (
    FORMATS,
    BuiltImages,
    image_snapshot,
    layerfs_ok,
    require_builders,
)
from tests.treecmp import Node, compare

pytestmark = pytest.mark.tools

Tree = Mapping[bytes, Node]


def oracle_diff(expected: Tree, ours: Tree, root_mtime: bool = True) -> list[str]:
    """Differences between umoci's rootfs and ours: [] when they agree.

    Everything treecmp records is compared, for every path including the root: kind, mode
    (with setuid/setgid/sticky), uid, gid, size, content hash, symlink target, hard link count,
    xattrs (file capabilities and trusted.* included; only host labels and overlay-private
    ones are left out, see conftest.HOST_XATTRS), device numbers and mtime
    in nanoseconds (umoci applies PAX sub-second times, to symlinks too, and restores a
    directory's time after a later layer adds or removes children in it, so every time in
    its rootfs comes from the image).

    The one exception, `root_mtime=False`: when no layer has an entry for the root directory,
    its time in umoci's rootfs is the time of the unpack, which the image does not define.
    """
    diffs = compare(expected, ours, ignore=())
    if not root_mtime:
        diffs = [d for d in diffs if not d.startswith(".: mtime_ns ")]
    return diffs


def import_and_unpack(store: Path, source: str, dest: Path, *import_opts: str) -> Tree:
    """`layerfs import SOURCE --tag T` into `store`, `layerfs unpack T DEST`; DEST's tree."""
    tag = "layerfs-test/oracle:latest"
    layerfs_ok(store, "import", source, "--tag", tag, *import_opts)
    layerfs_ok(store, "unpack", tag, str(dest))
    return image_snapshot(dest)


# Every format for the richest image; a cheaper cross-section for the others.
CASES = [
    *(("app", fmt) for fmt in FORMATS),
    ("base", "oci"),
    ("base", "docker-archive"),
    ("other", "oci"),
    ("other", "oci-archive"),
    ("buildah-amd64", "oci"),  # uncompressed layers, written by buildah
    ("buildah-amd64", "oci-gzip"),  # the same, gzipped by skopeo
    ("buildah-arm64", "docker-archive"),
]


@pytest.mark.parametrize(("name", "fmt"), CASES, ids=[f"{n}-{f}" for n, f in CASES])
def test_unpack_equals_umoci(
    built_images: BuiltImages,
    umoci_rootfs: Callable[[images.Image], Path],
    image_source: Callable[[images.Image, str], str],
    tmp_path: Path,
    name: str,
    fmt: str,
) -> None:
    img = built_images.by_name(name)
    expected = image_snapshot(umoci_rootfs(img))
    ours = import_and_unpack(tmp_path / "store", image_source(img, fmt), tmp_path / "rootfs")
    assert oracle_diff(expected, ours, images.has_root_entry(img)) == []
    # Equal link counts could still pair the wrong names: the hard link groups must agree.
    assert images.hardlink_groups(tmp_path / "rootfs") == images.hardlink_groups(umoci_rootfs(img))


@pytest.mark.parametrize("fmt", ["oci", "oci-zstd"])
def test_whiteout_behind_a_symlink_hides_nothing(
    built_images: BuiltImages,
    umoci_rootfs: Callable[[images.Image], Path],
    image_source: Callable[[images.Image, str], str],
    tmp_path: Path,
    fmt: str,
) -> None:
    # The top layer holds only `link/.wh.f`, and `link` is a symlink to `real` below it.
    # umoci follows the symlink and deletes real/f (test_tools_images shows it); the kernel's
    # overlayfs never follows a symlink while resolving a layer path, and neither do we
    # (DESIGN §2): real/f stays. So the expected tree is umoci's unpack of the image without
    # that layer, except for `link` itself: the layer has no entry for it, but its path makes
    # `link` a directory of that layer, which hides the lower symlink. Docker's overlay2
    # driver shows the same (it creates the missing parent as a 0755 root directory in the
    # layer's own directory, and the kernel then merges nothing below a non-directory):
    # `link` is an empty directory. Its mtime is not in the image, so it is not compared.
    expected = dict(image_snapshot(umoci_rootfs(built_images.symwh_pre)))
    source = image_source(built_images.symwh, fmt)
    ours = import_and_unpack(tmp_path / "store", source, tmp_path / "rootfs")
    assert ours[b"real/f"].sha256 == hashlib.sha256(images.SYMWH_REAL_F).hexdigest()
    empty_dir = Node("dir", 0o755, 0, 0, None, None, None, None, (), None, 0)
    expected[b"link"] = dataclasses.replace(empty_dir, mtime_ns=ours[b"link"].mtime_ns)
    assert oracle_diff(expected, ours, images.has_root_entry(built_images.symwh)) == []


@pytest.mark.parametrize("fmt", ["oci", "docker-archive"])
def test_whiteout_below_a_new_symlink_hides_nothing(
    built_images: BuiltImages,
    umoci_rootfs: Callable[[images.Image], Path],
    image_source: Callable[[images.Image, str], str],
    tmp_path: Path,
    fmt: str,
) -> None:
    # umoci turned the directory data/wasdir into a symlink to sub and wrote, in that same
    # layer, `data/wasdir -> sub` then `data/wasdir/.wh.child`. The symlink already hides
    # everything below the old directory, so the whiteout means nothing; but umoci's unpack
    # follows the symlink and deletes data/sub/child, a file the image never deleted. The
    # expected tree is umoci's with that file back, as the layer below had it.
    img = built_images.retype
    expected = dict(image_snapshot(umoci_rootfs(img)))
    before = image_snapshot(umoci_rootfs(built_images.retype_pre))
    assert b"data/sub/child" not in expected
    expected[b"data/sub/child"] = before[b"data/sub/child"]
    ours = import_and_unpack(tmp_path / "store", image_source(img, fmt), tmp_path / "rootfs")
    assert oracle_diff(expected, ours, images.has_root_entry(img)) == []
    assert ours[b"data/wasdir"].target == b"sub"


def _this_platform_arch() -> str | None:
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )


def test_index_default_platform_is_this_machine(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path], tmp_path: Path
) -> None:
    arch = _this_platform_arch()
    if arch is None:
        pytest.skip(f"the test index has linux/amd64 and linux/arm64, not {platform.machine()}")
    chosen = built_images.by_name(f"buildah-{arch}")
    ours = import_and_unpack(tmp_path / "store", built_images.buildah_index.source, tmp_path / "r")
    assert (
        oracle_diff(image_snapshot(umoci_rootfs(chosen)), ours, images.has_root_entry(chosen)) == []
    )


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_index_platform_option_chooses_the_image(
    built_images: BuiltImages,
    umoci_rootfs: Callable[[images.Image], Path],
    tmp_path: Path,
    arch: str,
) -> None:
    chosen = built_images.by_name(f"buildah-{arch}")
    source = built_images.buildah_index.source
    ours = import_and_unpack(
        tmp_path / "store", source, tmp_path / "rootfs", "--platform", f"linux/{arch}"
    )
    assert (
        oracle_diff(image_snapshot(umoci_rootfs(chosen)), ours, images.has_root_entry(chosen)) == []
    )
    assert f"srv/motd-{arch}".encode() in ours


SAMPLE_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make-sample-image.sh"


def test_sample_image_of_make_demo_equals_umoci(tmp_path: Path) -> None:
    # scripts/make-sample-image.sh builds the image `make demo` shows; it must import exactly.
    require_builders()
    layout = tmp_path / "sample"
    images.run(["bash", SAMPLE_SCRIPT, layout, "demo"])
    expected = image_snapshot(images.umoci_unpack(layout, "demo", tmp_path / "bundle"))
    assert expected[b"bin/busybox"].size == images.BUSYBOX.stat().st_size
    assert expected[b"www"].target == b"/srv/www"
    ours = import_and_unpack(tmp_path / "store", f"oci:{layout}:demo", tmp_path / "rootfs")
    assert oracle_diff(expected, ours) == []


def test_index_in_an_oci_archive(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path], tmp_path: Path
) -> None:
    source = images.index_to_oci_archive(built_images.buildah_index, tmp_path / "index.tar")
    chosen = built_images.buildah_arm64
    ours = import_and_unpack(
        tmp_path / "store", source, tmp_path / "rootfs", "--platform", "linux/arm64"
    )
    expected = image_snapshot(umoci_rootfs(chosen))
    assert oracle_diff(expected, ours, images.has_root_entry(chosen)) == []
