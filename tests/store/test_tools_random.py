"""Random layer stacks written by umoci (and GNU tar): `layerfs unpack` equals `umoci unpack`."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import images
from tests.conftest import require_kernel_overlay, require_root, require_tool
from tests.image_fixtures import image_snapshot, layerfs_ok
from tests.mounting import overlay_mount
from tests.treecmp import compare

pytestmark = pytest.mark.tools

# A tiny namespace, so that operations collide: the same names as files, directories and
# symlinks in different layers, at several depths. One name is not UTF-8.
NAMES = (b"a", b"b", b"\xe9")
CONTENTS = (b"", b"one\n", b"two\n", b"x" * 5000)
FILE_MODES = (0o644, 0o600, 0o755, 0o4755, 0o2711)
DIR_MODES = (0o755, 0o700, 0o1777, 0o2775)
IDS = ((0, 0), (1234, 5678), (65534, 65534))
# Symlink targets never resolve inside the tree: umoci follows symlinks when it applies a
# whiteout below one (umoci writes `dir -> target` plus `dir/.wh.child` when a directory
# becomes a symlink), which the kernel and layerfs do not; with targets that resolve nowhere
# the two agree, and that divergence is tested on its own (test_umoci_oracle, symwh).
TARGETS = (b"zz", b"../zz/a", b"/zz/b", b"zz/" + b"t" * 120)

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map(b"/".join)
ops = st.one_of(
    st.tuples(st.just("write"), paths, st.sampled_from(CONTENTS), st.sampled_from(FILE_MODES)),
    st.tuples(st.just("mkdir"), paths, st.sampled_from(DIR_MODES)),
    st.tuples(st.just("symlink"), paths, st.sampled_from(TARGETS)),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("remove"), paths),
    st.tuples(st.just("chmod"), paths, st.sampled_from(FILE_MODES)),
    st.tuples(st.just("chown"), paths, st.sampled_from(IDS)),
    st.tuples(st.just("xattr"), paths, st.sampled_from((b"v1", b"\x00\xff"))),
    st.tuples(st.just("fifo"), paths),
)
# A layer is either operations on an unpacked rootfs, repacked by umoci (which writes
# whiteouts for what disappeared), or a GNU tar layer making a directory opaque.
layers = st.one_of(
    st.lists(ops, min_size=1, max_size=8),
    st.tuples(st.just("opaque"), paths),
)
stacks = st.lists(layers, min_size=1, max_size=4)


def _kind(path: bytes) -> int | None:
    try:
        return stat.S_IFMT(os.lstat(path).st_mode)
    except FileNotFoundError:
        return None


def _parent_ready(root: bytes, rel: bytes) -> bool:
    """Make `rel`'s missing parents as directories; False if one is not a directory."""
    parts = rel.split(b"/")[:-1]
    here = root
    for part in parts:
        here = os.path.join(here, part)
        kind = _kind(here)
        if kind is None:
            os.mkdir(here, 0o755)
        elif kind != stat.S_IFDIR:
            return False  # never write through a symlink or below a file
    return True


def _remove(path: bytes) -> None:
    if _kind(path) == stat.S_IFDIR:
        shutil.rmtree(path)
    elif _kind(path) is not None:
        os.unlink(path)


def apply_op(root: bytes, op: tuple[Any, ...]) -> None:
    """Apply one operation to an unpacked rootfs, or skip it where it makes no sense."""
    name, rel = op[0], op[1]
    path = os.path.join(root, rel)
    if not _parent_ready(root, rel):
        return
    kind = _kind(path)
    if name == "write":
        if kind not in (None, stat.S_IFREG):
            _remove(path)
        with open(path, "wb") as f:  # in place: a hard-linked partner changes too
            f.write(op[2])
        os.chmod(path, op[3])
    elif name == "mkdir":
        if kind != stat.S_IFDIR:
            _remove(path)
            os.mkdir(path)
        os.chmod(path, op[2])
    elif name == "symlink":
        _remove(path)
        os.symlink(op[2], path)
    elif name == "fifo":
        _remove(path)
        os.mkfifo(path, 0o644)
    elif name == "link":
        dst = os.path.join(root, op[2])
        if kind != stat.S_IFREG or dst == path or not _parent_ready(root, op[2]):
            return
        _remove(dst)
        if _kind(path) == stat.S_IFREG:  # removing dst may have removed an ancestor of path
            os.link(path, dst)
    elif name == "remove":
        _remove(path)
    elif kind is None or kind == stat.S_IFLNK:
        return
    elif name == "chmod":
        os.chmod(path, op[2] | (0o700 if kind == stat.S_IFDIR else 0))
    elif name == "chown":
        os.chown(path, *op[2], follow_symlinks=False)
    elif name == "xattr" and kind in (stat.S_IFREG, stat.S_IFDIR):  # user.* only there
        os.setxattr(path, b"user.random", op[2], follow_symlinks=False)


def _opaque_layer(work: Path, rootfs: bytes, rel: bytes) -> Path | None:
    """A GNU tar layer making `rel` an opaque directory with one new child, or None when
    `rel`'s parents are not all directories in the image (umoci would follow a symlink)."""
    here = rootfs
    for part in rel.split(b"/")[:-1]:
        here = os.path.join(here, part)
        if _kind(here) != stat.S_IFDIR:
            return None
    if _kind(os.path.join(rootfs, rel)) not in (None, stat.S_IFDIR, stat.S_IFREG):
        return None
    staging = os.fsencode(work / "staging")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(os.path.join(staging, rel))
    open(os.path.join(staging, rel, b".wh..wh..opq"), "wb").close()
    with open(os.path.join(staging, rel, b"new"), "wb") as f:
        f.write(b"in an opaque dir\n")
    members = [rel, rel + b"/.wh..wh..opq", rel + b"/new"]
    tar = work / "opaque.tar"
    images.run(
        [
            "tar",
            "--format=posix",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "-C",
            os.fsdecode(staging),
            "--no-recursion",
            "-cf",
            tar,
            *(os.fsdecode(m) for m in members),
        ]
    )
    return tar


def build_stack(work: Path, stack: Sequence[Any]) -> Path:
    """An OCI layout holding tag `t` with one layer per element of `stack`."""
    layout = images.init_layout(work / "layout")
    images.run(["umoci", "new", "--image", f"{layout}:t"])
    bundle = work / "bundle"
    for layer in stack:
        rootfs = os.fsencode(images.umoci_unpack(layout, "t", bundle))
        if isinstance(layer, tuple):
            tar = _opaque_layer(work, rootfs, layer[1])
            shutil.rmtree(bundle)
            if tar is not None:
                images.run(["umoci", "raw", "add-layer", "--image", f"{layout}:t", tar])
        else:
            for op in layer:
                apply_op(rootfs, op)
            images.run(["umoci", "repack", "--image", f"{layout}:t", bundle])
            shutil.rmtree(bundle)
    return layout


@settings(deadline=None, max_examples=20)
@given(stack=stacks)
def test_random_layer_stacks_unpack_as_umoci_does(stack: list[Any]) -> None:
    require_root()
    require_tool("umoci")
    require_tool("tar")
    with tempfile.TemporaryDirectory(prefix="layerfs-random-") as tmp:
        work = Path(tmp)
        problem = images.unsupported_here(work)
        if problem:
            pytest.skip(f"cannot build images in {tmp}: {problem}")
        layout = build_stack(work, stack)
        expected = image_snapshot(images.umoci_unpack(layout, "t", work / "umoci"))
        store = work / "store"
        layerfs_ok(store, "import", f"oci:{layout}:t", "--tag", "random:t")
        layerfs_ok(store, "unpack", "random:t", str(work / "ours"))
        ours = image_snapshot(work / "ours")
        # The root directory's time: umoci new's image has no layer, and umoci repack writes
        # "." only when the root changed; an unpack makes the root at its own time otherwise.
        diffs = compare(expected, ours, ignore=())
        if not images.has_root_entry(images.Image("t", layout, "t")):
            diffs = [d for d in diffs if not d.startswith(".: mtime_ns ")]
        assert diffs == []
        assert images.hardlink_groups(work / "ours") == images.hardlink_groups(
            work / "umoci" / "rootfs"
        )


@settings(deadline=None, max_examples=10)
@given(stack=stacks)
def test_random_layer_stacks_mount_in_the_kernel_as_umoci_unpacks_them(stack: list[Any]) -> None:
    # images.native_layers is how mounted-image tests run the kernel beside layerfs: on
    # random stacks too, the kernel's view of those directories is umoci's tree.
    require_kernel_overlay()
    require_tool("umoci")
    require_tool("tar")
    with tempfile.TemporaryDirectory(prefix="layerfs-random-") as tmp:
        work = Path(tmp)
        problem = images.unsupported_here(work)
        if problem:
            pytest.skip(f"cannot build images in {tmp}: {problem}")
        layout = build_stack(work, stack)
        img = images.Image("t", layout, "t")
        expected = image_snapshot(images.umoci_unpack(layout, "t", work / "umoci"))
        layers = images.native_layers(img, work / "layers")
        if not layers:
            return  # umoci new's image has no layer, and overlayfs needs one
        with overlay_mount("kernel", list(reversed(layers)), work / "mnt") as mnt:
            kernel = image_snapshot(mnt)
            groups = images.hardlink_groups(mnt)
        diffs = compare(expected, kernel, ignore=())
        if not images.has_root_entry(img):
            diffs = [d for d in diffs if not d.startswith(".: mtime_ns ")]
        assert diffs == []
        assert groups == images.hardlink_groups(work / "umoci" / "rootfs")
