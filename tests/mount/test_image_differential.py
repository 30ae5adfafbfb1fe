"""Differential runs on a mounted image: the engine's operations, applied to `layerfs mount` of
the `app` test image and to kernel overlayfs over the same layers extracted natively (each
with a fresh empty upper), give the same outcomes and the same trees."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings

from tests import images
from tests.conftest import require_fuse, require_kernel_overlay
from tests.difftest.ops import RENAME_NOREPLACE, Op, apply, close_all
from tests.difftest.runner import KERNEL_OPTS, compare_states, tree_state
from tests.difftest.strategies import op_sequences
from tests.image_fixtures import BuiltImages, layerfs_ok
from tests.mount.test_image_mount import image_mount
from tests.mounting import overlay_mount

pytestmark = [pytest.mark.tools, pytest.mark.mount]

# Paths of the app image: lower files with hard links and xattrs, an opaque directory, a
# directory re-made over a whiteout, implied parents, symlinks, devices, new names.
PATHS: tuple[bytes, ...] = (
    b"data/hello",
    b"data/hello.link",
    b"data/opq/new",
    b"data/opq/old1",
    b"data/gonedir/reborn",
    b"data/gone.txt",
    b"etc/motd",
    b"srv/sticky/no-parent-entries",
    b"data/dirlink",
    b"data/dirlink/deep",
    b"usr/bin/sgid",
    b"dev/null",
    b"dev/fifo",
    b"data/new",
    b"newfile",
    b"data/sub/deep/file",
)
DIRS: tuple[bytes, ...] = (
    b"data",
    b"data/opq",
    b"data/gonedir",
    b"data/sub",
    b"srv/sticky",
    b"etc",
    b"newdir",
)

SCENARIO = [
    Op("write", (b"data/hello", 0, 5, 1, False)),
    Op("lstat", (b"data/hello.link",)),
    Op("unlink", (b"data/opq/new",)),
    Op("listdir", (b"data/opq",)),
    Op("rmdir", (b"data/gonedir",)),
    Op("mkdir", (b"data/gonedir", 0o700)),
    Op("rename", (b"data/sub", b"data/moved", 0)),
    Op("rename", (b"etc/motd", b"srv/sticky/motd", RENAME_NOREPLACE)),
    Op("chmod", (b"srv/sticky", 0o755)),
    Op("link", (b"usr/bin/ping", b"usr/bin/ping2")),
    Op("setxattr", (b"data/hello", b"user.comment", b"changed", 0, True)),
    Op("listdir", (b"data",)),
]


@pytest.fixture(scope="module")
def app_store(built_images: BuiltImages, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_fuse()
    require_kernel_overlay()
    root = tmp_path_factory.mktemp("image-diff")
    layerfs_ok(root / "store", "import", built_images.app.source, "--tag", "t/app")
    images.native_layers(built_images.app, root / "layers")
    return root


def run_both(root: Path, ops: Sequence[Op], work: Path) -> list[str]:
    """Apply `ops` to the kernel and to our mount of the image; the problems found."""
    layers = sorted((root / "layers").iterdir(), key=lambda p: p.name, reverse=True)
    for d in ("ku", "kw", "ou", "ow", "kmnt", "omnt"):
        (work / d).mkdir(parents=True)
    problems: list[str] = []
    kfds: dict[int, int] = {}
    ofds: dict[int, int] = {}
    opts = ("--upper", str(work / "ou"), "--work", str(work / "ow"))
    with (
        overlay_mount("kernel", layers, work / "kmnt", work / "ku", work / "kw", KERNEL_OPTS) as k,
        image_mount(root / "store", "t/app", work / "omnt", *opts),
    ):
        o = work / "omnt"
        try:
            for i, op in enumerate(ops):
                ko = apply(op, os.fsencode(k), kfds)
                oo = apply(op, os.fsencode(o), ofds)
                if ko != oo:
                    problems.append(f"op {i} {op!r}: kernel {ko}, layerfs {oo}")
                    break
        finally:
            close_all(kfds)
            close_all(ofds)
        if not problems:
            problems = compare_states(tree_state(k), tree_state(o), "layerfs")
    return problems


def test_scenario_on_a_mounted_image(app_store: Path, tmp_path: Path) -> None:
    assert run_both(app_store, SCENARIO, tmp_path) == []


def test_truncate_of_a_file_with_capabilities(app_store: Path, tmp_path: Path) -> None:
    assert run_both(app_store, [Op("truncate", (b"usr/bin/ping", 0))], tmp_path) == []


@settings(deadline=None, max_examples=6)
@given(ops=op_sequences(8, PATHS, DIRS))
def test_random_sequences_on_a_mounted_image(app_store: Path, ops: list[Op]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="layerfs-imgdiff-") as work:
        problems = run_both(app_store, ops, Path(work))
    assert problems == [], "\n".join(["ops:", *map(repr, ops), *problems])
