"""Kernel overlayfs, mounting the test images' layers in its own format, shows umoci's tree.

This checks the image set against a second oracle: where umoci and the kernel agree, a
layerfs mount can be compared with either; where umoci is wrong (whiteouts behind
symlinks), the kernel gives the expected tree test_umoci_oracle writes by hand.
`images.native_layers` is also what a mounted-image test needs to run the kernel beside us.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest

from tests import images
from tests.conftest import require_kernel_overlay
from tests.image_fixtures import BuiltImages, image_snapshot
from tests.mounting import overlay_mount
from tests.treecmp import Node, compare

pytestmark = pytest.mark.tools

Tree = Mapping[bytes, Node]


def kernel_tree(img: images.Image, work: Path) -> tuple[Tree, set[frozenset[bytes]]]:
    """The tree and hard link groups of `img` as a read-only kernel overlay mount shows it."""
    require_kernel_overlay()
    layers = images.native_layers(img, work / "layers")
    with overlay_mount("kernel", list(reversed(layers)), work / "mnt") as mnt:
        return image_snapshot(mnt), images.hardlink_groups(mnt)


def kernel_diff(expected: Tree, kernel: Tree, root_mtime: bool) -> list[str]:
    diffs = []
    for line in compare(expected, kernel, ignore=()):
        if line.startswith(".: mtime_ns ") and not root_mtime:
            continue  # no layer defines the root's time (see test_umoci_oracle.oracle_diff)
        diffs.append(line)
    return diffs


@pytest.mark.parametrize("name", ["base", "app", "other", "buildah-amd64"])
def test_kernel_overlay_of_the_layers_equals_umoci(
    built_images: BuiltImages,
    umoci_rootfs: Callable[[images.Image], Path],
    tmp_path: Path,
    name: str,
) -> None:
    img = built_images.by_name(name)
    expected = dict(image_snapshot(umoci_rootfs(img)))
    kernel, groups = kernel_tree(img, tmp_path)
    assert kernel_diff(expected, kernel, images.has_root_entry(img)) == []
    assert groups == images.hardlink_groups(umoci_rootfs(img))


def test_kernel_keeps_what_a_whiteout_behind_a_symlink_names(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path], tmp_path: Path
) -> None:
    # The expected tree of test_umoci_oracle.test_whiteout_behind_a_symlink_hides_nothing.
    kernel, _ = kernel_tree(built_images.symwh, tmp_path)
    expected = dict(image_snapshot(umoci_rootfs(built_images.symwh_pre)))
    empty_dir = Node("dir", 0o755, 0, 0, None, None, None, None, (), None, 0)
    expected[b"link"] = dataclasses.replace(empty_dir, mtime_ns=kernel[b"link"].mtime_ns)
    assert kernel_diff(expected, kernel, images.has_root_entry(built_images.symwh)) == []


def test_kernel_keeps_what_a_whiteout_below_a_new_symlink_names(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path], tmp_path: Path
) -> None:
    # The expected tree of test_umoci_oracle.test_whiteout_below_a_new_symlink_hides_nothing.
    kernel, _ = kernel_tree(built_images.retype, tmp_path)
    expected = dict(image_snapshot(umoci_rootfs(built_images.retype)))
    before = image_snapshot(umoci_rootfs(built_images.retype_pre))
    expected[b"data/sub/child"] = before[b"data/sub/child"]
    assert kernel_diff(expected, kernel, images.has_root_entry(built_images.retype)) == []
