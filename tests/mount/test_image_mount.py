"""`layerfs mount` of store images: equals umoci and kernel overlayfs; named uppers persist;
`ps`, `umount` (also of a dead daemon's mount), `which`, and one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from tests import images
from tests.conftest import require_fuse, require_kernel_overlay
from tests.image_fixtures import BuiltImages, image_snapshot, layerfs, layerfs_ok
from tests.mounting import force_unmount, is_mounted, overlay_mount
from tests.treecmp import Node, compare

pytestmark = [pytest.mark.tools, pytest.mark.mount]

Tree = Mapping[bytes, Node]
IMAGES = ("base", "app", "other", "retype", "symwh", "buildah-amd64")


@pytest.fixture(scope="module")
def store(built_images: BuiltImages, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store holding the test images, tagged `t/NAME`."""
    require_fuse()
    root = tmp_path_factory.mktemp("image-mount") / "store"
    for name in IMAGES:
        img = built_images.by_name(name)
        layerfs_ok(root, "import", img.source, "--tag", f"t/{name}")
    return root


def _daemon_pid(store: Path, mnt: Path) -> int | None:
    out = layerfs(store, "ps", "--json", "--all")
    for rec in json.loads(out.stdout or "[]"):
        if rec["Mountpoint"] == os.path.realpath(mnt):
            return int(rec["Pid"])
    return None


@contextlib.contextmanager
def image_mount(store: Path, image: str, mnt: Path, *opts: str) -> Iterator[str]:
    """`layerfs mount` (daemonized); yields its stdout; always unmounted afterwards, and the
    daemon this mount started killed if it outlives its mount."""
    mnt.mkdir(exist_ok=True)
    proc = layerfs_ok(store, "mount", image, str(mnt), *opts)
    pid = _daemon_pid(store, mnt)
    try:
        assert is_mounted(mnt)
        yield proc.stdout
    finally:
        layerfs(store, "umount", str(mnt))
        force_unmount(mnt)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def expected_tree(
    built: BuiltImages, umoci_rootfs: Callable[[images.Image], Path], name: str
) -> dict[bytes, Node]:
    """umoci's rootfs, corrected where umoci follows symlinks on whiteouts (as in
    tests/store/test_umoci_oracle.py); `link` of symwh is fixed up by the caller."""
    img = built.by_name(name)
    if name == "symwh":
        return dict(image_snapshot(umoci_rootfs(built.symwh_pre)))
    expected = dict(image_snapshot(umoci_rootfs(img)))
    if name == "retype":
        before = image_snapshot(umoci_rootfs(built.retype_pre))
        expected[b"data/sub/child"] = before[b"data/sub/child"]
    return expected


def diff_trees(expected: Tree, ours: Tree, root_mtime: bool) -> list[str]:
    diffs = compare(expected, ours, ignore=())
    return [d for d in diffs if root_mtime or not d.startswith(".: mtime_ns ")]


def _fix_symwh(expected: dict[bytes, Node], ours: Tree) -> None:
    empty_dir = Node("dir", 0o755, 0, 0, None, None, None, None, (), None, 0)
    expected[b"link"] = dataclasses.replace(empty_dir, mtime_ns=ours[b"link"].mtime_ns)


@pytest.mark.parametrize("mode", ["ro", "upper"])
@pytest.mark.parametrize("name", IMAGES)
def test_mounted_image_equals_umoci(
    built_images: BuiltImages,
    umoci_rootfs: Callable[[images.Image], Path],
    store: Path,
    tmp_path: Path,
    name: str,
    mode: str,
) -> None:
    img = built_images.by_name(name)
    opts = ("--ro",) if mode == "ro" else ("--name", f"eq-{name}")
    with image_mount(store, f"t/{name}", tmp_path / "mnt", *opts) as _:
        ours = image_snapshot(tmp_path / "mnt")
        groups = images.hardlink_groups(tmp_path / "mnt")
    expected = expected_tree(built_images, umoci_rootfs, name)
    if name == "symwh":
        _fix_symwh(expected, ours)
        assert ours[b"real/f"].sha256 == hashlib.sha256(images.SYMWH_REAL_F).hexdigest()
    assert diff_trees(expected, ours, images.has_root_entry(img)) == []
    assert groups == images.hardlink_groups(umoci_rootfs(img))


@pytest.mark.parametrize("name", ["app", "retype", "symwh"])
def test_mounted_image_equals_kernel_overlay(
    built_images: BuiltImages, store: Path, tmp_path: Path, name: str
) -> None:
    require_kernel_overlay()
    img = built_images.by_name(name)
    layers = images.native_layers(img, tmp_path / "layers")
    with overlay_mount("kernel", list(reversed(layers)), tmp_path / "kmnt") as kmnt:
        kernel = image_snapshot(kmnt)
        kgroups = images.hardlink_groups(kmnt)
    with image_mount(store, f"t/{name}", tmp_path / "mnt", "--ro"):
        ours = image_snapshot(tmp_path / "mnt")
        groups = images.hardlink_groups(tmp_path / "mnt")
    diffs = diff_trees(kernel, ours, images.has_root_entry(img))
    if name == "symwh":
        # `link` is a directory no tar entry describes: its time is when it was made.
        diffs = [d for d in diffs if not d.startswith("link: mtime_ns ")]
    assert diffs == []
    assert groups == kgroups


def test_writes_copy_up_into_the_named_upper_and_persist(store: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with image_mount(store, "t/app", mnt, "--name", "keep"):
        (mnt / "data" / "new-file").write_bytes(b"written through the mount\n")
        with open(mnt / "etc" / "motd", "ab") as f:
            f.write(b"appended\n")
        os.unlink(mnt / "data" / "hello.link")
        os.chmod(mnt / "data" / "hello", 0o600)
        assert b"keep" in layerfs_ok(store, "ps").stdout.encode()
    upper = store / "containers" / "keep" / "upper"
    assert (upper / "data" / "new-file").read_bytes() == b"written through the mount\n"
    assert (upper / "etc" / "motd").read_bytes() == images.MOTD + b"appended\n"
    wh = os.lstat(upper / "data" / "hello.link")  # a native whiteout (we are root)
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    config = json.loads((store / "containers" / "keep" / "config.json").read_text())
    assert config["name"] == "keep" and config["image"].startswith("sha256:")
    assert not list((store / "mounts").glob("*.json"))
    with image_mount(store, "t/app", mnt, "--name", "keep"):
        assert (mnt / "data" / "new-file").read_bytes() == b"written through the mount\n"
        assert (mnt / "etc" / "motd").read_bytes() == images.MOTD + b"appended\n"
        assert not os.path.lexists(mnt / "data" / "hello.link")
        assert stat.S_IMODE(os.stat(mnt / "data" / "hello").st_mode) == 0o600
        assert os.stat(mnt / "data" / "hello").st_nlink == 1
    # Read-only view of the container: the same tree.
    with image_mount(store, "t/app", mnt, "--name", "keep", "--ro"):
        assert (mnt / "data" / "new-file").read_bytes() == b"written through the mount\n"
        assert not os.path.lexists(mnt / "data" / "hello.link")
        with pytest.raises(OSError):
            (mnt / "data" / "x").write_bytes(b"")


def test_fresh_upper_name_is_printed(store: Path, tmp_path: Path) -> None:
    with image_mount(store, "t/base", tmp_path / "mnt") as out:
        name = out.strip()
        assert (store / "containers" / name / "upper").is_dir()
        (tmp_path / "mnt" / "etc" / "x").write_bytes(b"x")
    assert (store / "containers" / name / "upper" / "etc" / "x").read_bytes() == b"x"


def test_explicit_upper_and_work(store: Path, tmp_path: Path) -> None:
    upper, work = tmp_path / "u", tmp_path / "w"
    upper.mkdir()
    work.mkdir()
    mnt = tmp_path / "mnt"
    with image_mount(store, "t/base", mnt, "--upper", str(upper), "--work", str(work)):
        (mnt / "root" / "note").write_bytes(b"n")
        # The daemon does not hold the store's lock (gc and fsck never wait for a mount): its
        # registration pins its layers instead (tests/mount/test_cli_mounts.py).
        with open(store / "lock", "rb") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert (upper / "root" / "note").read_bytes() == b"n"


def test_ps_notices_a_killed_daemon_and_umount_cleans_it(store: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with image_mount(store, "t/base", mnt, "--ro"):
        pid = _daemon_pid(store, mnt)
        assert pid is not None
        rows = json.loads(layerfs_ok(store, "ps", "--json").stdout)
        assert [r["Status"] for r in rows if r["Pid"] == pid] == ["running"]
        os.kill(pid, signal.SIGKILL)  # the daemon this test's mount started
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        rows = json.loads(layerfs_ok(store, "ps", "--json").stdout)
        assert [r["Status"] for r in rows if r["Pid"] == pid] == ["dead"]
        assert "dead" in layerfs_ok(store, "ps").stdout
        layerfs_ok(store, "umount", str(mnt))
        assert not is_mounted(mnt)
        rows = json.loads(layerfs_ok(store, "ps", "--json", "--all").stdout)
        assert [r for r in rows if r["Pid"] == pid or r["Mountpoint"] == str(mnt)] == []


def _one_line_error(proc: object, *words: str) -> None:
    assert isinstance(proc, subprocess.CompletedProcess)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("layerfs: ")
    for w in words:
        assert w in lines[0]


def test_errors_are_one_line(store: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    _one_line_error(layerfs(store, "mount", "t/nope", str(mnt)), "no such image")
    _one_line_error(layerfs(store, "mount", "t/base", str(mnt), "--name", "bad/name"), "name")
    _one_line_error(layerfs(store, "mount", "t/base", str(tmp_path / "absent")), "not exist")
    _one_line_error(layerfs(store, "umount", str(mnt)), "not mounted")
    (store / "containers").mkdir(exist_ok=True)
    before = sorted((store / "containers").iterdir())
    bad = layerfs(store, "mount", "t/base", str(mnt), "-o", "ro,no_such_fuse_option")
    _one_line_error(bad, "unknown mount option 'no_such_fuse_option'")
    _one_line_error(layerfs(store, "mount", "t/base", str(mnt), "-o", "index=off"), "not supported")
    # Refused by the kernel in the daemon: its own reason, in one line.
    failed = layerfs(store, "mount", "t/base", str(mnt), "-o", "context=no_such_label")
    _one_line_error(failed, f"cannot mount {mnt}")
    assert sorted((store / "containers").iterdir()) == before  # no container left behind
    assert list((store / "mounts").glob("*")) == []  # no record, no log
    assert not is_mounted(mnt)
    with image_mount(store, "t/base", mnt, "--name", "busy"):
        other = tmp_path / "other"
        other.mkdir()
        _one_line_error(layerfs(store, "mount", "t/base", str(mnt), "--ro"), "busy")
        _one_line_error(
            layerfs(store, "mount", "t/base", str(other), "--name", "busy"), "already mounted"
        )
    _one_line_error(
        layerfs(store, "mount", "t/other", str(mnt), "--name", "busy"), "belongs to image"
    )
    assert not is_mounted(mnt)
    # Not ours: `layerfs umount` leaves a mount it did not make alone.
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], check=True)
    try:
        _one_line_error(layerfs(store, "umount", str(mnt)), "not a layerfs mount")
        assert is_mounted(mnt)
    finally:
        force_unmount(mnt)


def test_which_names_the_layer_and_what_it_shadows(store: Path) -> None:
    diff_ids = json.loads(layerfs_ok(store, "inspect", "t/app").stdout)
    if isinstance(diff_ids, list):
        diff_ids = diff_ids[0]
    layers = diff_ids.get("Layers") or diff_ids["RootFS"]["Layers"]  # bottom first
    out = layerfs_ok(store, "which", "t/app", "/data/sub/deep/file").stdout.splitlines()
    # Changed in layer 3 (deletions), first written in layer 2 (features).
    assert out[0].startswith(layers[2]) and "provides" in out[0]
    assert out[1].startswith(layers[1]) and "shadowed" in out[1]
    out = layerfs_ok(store, "which", "t/app", "bin/busybox").stdout.splitlines()
    assert len(out) == 1 and out[0].startswith(layers[0])
    _one_line_error(layerfs(store, "which", "t/app", "data/gone.txt"), "not in image")


def test_rm_removes_a_container_but_not_a_mounted_one(store: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with image_mount(store, "t/base", mnt, "--name", "gone-soon"):
        (mnt / "root" / "note").write_bytes(b"n")
        busy = layerfs(store, "rm", "gone-soon")
        assert busy.returncode != 0 and busy.stderr.count("\n") == 1
        assert "umount it first" in busy.stderr
        assert (store / "containers" / "gone-soon" / "upper" / "root" / "note").exists()
    assert layerfs_ok(store, "rm", "gone-soon").stdout == "gone-soon\n"
    assert not (store / "containers" / "gone-soon").exists()
    missing = layerfs(store, "rm", "gone-soon")
    assert missing.returncode != 0 and "no such container" in missing.stderr
