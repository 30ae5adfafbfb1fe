"""Maintenance beside live mounts: fsck and gc never wait for a mount, gc keeps (and names) what
a mount uses, a dead daemon pins nothing; `ps -a` shows every upper, `mount --rm`, `rmi` of a
mounted image, and a failed mount option is one line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore.ocibuild import Img, write_oci
from layerstore.store import Store
from tests.conftest import require_fuse
from tests.mounting import force_unmount, is_mounted
from tests.store.test_import import BASE, TOP, cli

pytestmark = pytest.mark.mount


@pytest.fixture
def store(tmp_path: Path) -> Path:
    require_fuse()
    root = tmp_path / "store"
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="v1"))
    cli(root, "import", f"oci:{tmp_path / 'img'}:v1", "--tag", "app:1")
    return root


def _pid(store: Path, mnt: Path) -> int:
    rows = json.loads(cli(store, "ps", "--json").stdout)
    (pid,) = [r["Pid"] for r in rows if r["Mountpoint"] == os.path.realpath(mnt)]
    return int(pid)


@contextlib.contextmanager
def mounted(store: Path, mnt: Path, *args: str) -> Iterator[str]:
    """`layerfs mount ARGS IMAGE MNT` (IMAGE in args); unmounted and its daemon gone after."""
    mnt.mkdir(exist_ok=True)
    out = cli(store, "mount", *args, str(mnt)).stdout.strip()
    pid = _pid(store, mnt)
    try:
        yield out
    finally:
        cli(store, "umount", str(mnt), check=False)
        force_unmount(mnt)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_fsck_and_gc_run_while_mounted_and_gc_keeps_what_a_mount_uses(
    store: Path, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    with mounted(store, mnt, "--ro", "app:1"):
        # Before: both waited ("waiting for running imports or mounts") as long as mounted.
        assert "store is consistent" in cli(store, "fsck", "--timeout", "10").stdout
        assert cli(store, "gc", "-n", "--timeout", "10").stdout.startswith("Would remove 0")
        # rmi of a read-only mounted image: refused, then forced.
        cli(store, "rmi", "img:v1")  # one of two names: untagging it is fine
        refused = cli(store, "rmi", "app:1", check=False)
        assert refused.returncode == 1 and refused.stderr.count("\n") == 1
        assert f"is mounted at {mnt.resolve()}" in refused.stderr
        forced = cli(store, "rmi", "-f", "app:1").stdout
        assert "Deleted: sha256:" in forced
        dry = cli(store, "gc", "-n").stdout
        real = cli(store, "gc").stdout
        assert dry.replace("Would remove", "Removed") == real
        kept = [line for line in real.splitlines() if line.startswith("Kept layer")]
        assert len(kept) == 2 and all(f"mounted at {mnt.resolve()} (pid" in k for k in kept)
        assert real.splitlines()[-1].startswith("Removed 0 layers")
        # The mount still reads its (image-less) layers.
        assert (mnt / "new" / "deep" / "file").read_bytes() == b"deep"
        with Store(store) as s:
            assert len(s.all_layers()) == 2 and s.fsck(full=True) == []
    # Once the mount is gone, gc takes the layers.
    assert "Removed 2 layers" in cli(store, "gc").stdout
    with Store(store) as s:
        assert s.all_layers() == [] and s.fsck(full=True) == []


def test_a_dead_daemon_pins_nothing(store: Path, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with mounted(store, mnt, "--ro", "app:1"):
        pid = _pid(store, mnt)
        cli(store, "rmi", "-f", "app:1", "img:v1")
        os.kill(pid, signal.SIGKILL)  # the daemon this test's mount started
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        rows = json.loads(cli(store, "ps", "--json").stdout)
        assert [r["Status"] for r in rows if r["Pid"] == pid] == ["dead"]
        assert "Removed 2 layers" in cli(store, "gc").stdout
        cli(store, "umount", str(mnt))
        assert not is_mounted(mnt)


def test_ps_all_lists_every_upper_and_mount_rm_removes_it(store: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    with mounted(store, a, "app:1") as anon, mounted(store, b, "--rm", "app:1") as temp:
        (a / "newfile").write_bytes(b"x" * 1000)
        rows = {r["Name"]: r for r in json.loads(cli(store, "ps", "--json").stdout)}
        assert rows[anon]["Status"] == "running" and rows[anon]["Mountpoint"] == str(a.resolve())
        assert rows[anon]["Size"] >= 1000 and rows[anon]["Created"]
        assert rows[temp]["Rm"] is True
    # Unmounted: the anonymous upper is still listed by ps -a (not by ps); the --rm one is gone.
    assert cli(store, "ps", "--format", "{{.Name}}").stdout == ""
    table = cli(store, "ps", "-a").stdout
    assert anon in table and "unmounted" in table and temp not in table
    assert not (store / "containers" / temp).exists()
    (row,) = json.loads(cli(store, "ps", "-a", "--json").stdout)
    assert row["Name"] == anon and row["Status"] == "unmounted" and row["Size"] == 1000
    assert row["Image"] == "app:1" and row["ImageId"].startswith("sha256:")


def test_mount_rm_without_umount_is_removed_when_the_daemon_ends(
    store: Path, tmp_path: Path
) -> None:
    """`fusermount3 -u` instead of `layerfs umount`: the daemon itself removes the upper."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    name = cli(store, "mount", "--rm", "app:1", str(mnt)).stdout.strip()
    pid = _pid(store, mnt)
    try:
        assert (store / "containers" / name).is_dir()
        force_unmount(mnt)
        deadline = time.monotonic() + 30
        while (store / "containers" / name).exists() and time.monotonic() < deadline:
            time.sleep(0.02)  # bounded poll for the daemon to finish
        assert not (store / "containers" / name).exists()
    finally:
        force_unmount(mnt)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_mount_that_fails_is_one_line_and_leaves_nothing(store: Path, tmp_path: Path) -> None:
    """An unknown -o option (the daemon's own check or the kernel's): one line, and no fresh
    upper, registration or log left behind."""
    mnt = tmp_path / "m"
    mnt.mkdir()
    (store / "containers").mkdir(exist_ok=True)
    (store / "mounts").mkdir(exist_ok=True)
    for args in (["-o", "bogus"], ["--ro", "-o", "bogus"], ["-o", "allow_other,nosuchopt=1"]):
        p = cli(store, "mount", *args, "app:1", str(mnt), check=False)
        lines = p.stderr.splitlines()
        assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("layerfs: "), p
        assert not is_mounted(mnt)
        assert list((store / "containers").glob("*")) == []
        assert list((store / "mounts").glob("*.json")) == []
    assert cli(store, "ps", "-a", "--json").stdout.strip() == "[]"
