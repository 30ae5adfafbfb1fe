"""Faults under a live image mount: the daemon answers the broken call with EIO, says why in
its log, and keeps serving everything else."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import images
from tests.conftest import require_fuse
from tests.image_fixtures import BuiltImages, layerfs, layerfs_ok
from tests.mounting import force_unmount, is_mounted

pytestmark = [pytest.mark.tools, pytest.mark.mount]


@contextlib.contextmanager
def mounted(store: Path, image: str, mnt: Path, cwd: Path | None = None) -> Iterator[int]:
    """`layerfs mount --ro`; yields the daemon's pid; unmounted (and that daemon killed if it
    outlives its mount) afterwards."""
    mnt.mkdir(exist_ok=True)
    abs_store = (cwd or Path.cwd()) / store
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        layerfs_ok(store, "mount", "--ro", image, str(mnt))
    finally:
        os.chdir(old)
    pid = 0
    try:
        out = layerfs_ok(abs_store, "ps", "--json", "--all").stdout
        for rec in json.loads(out or "[]"):
            if rec["Mountpoint"] == os.path.realpath(mnt):
                pid = int(rec["Pid"])
        assert pid, f"no daemon recorded for {mnt}: {out}"
        yield pid
    finally:
        layerfs(abs_store, "umount", str(mnt))
        force_unmount(mnt)
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _logs(store: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (store / "mounts").glob("*.log"))


@pytest.fixture
def base_store(built_images: BuiltImages, tmp_path: Path) -> Path:
    require_fuse()
    store = tmp_path / "store"
    layerfs_ok(store, "import", built_images.by_name("base").source, "--tag", "t/base")
    return store


def test_relative_store_path_mounts(base_store: Path, tmp_path: Path) -> None:
    """`--store st` relative to the caller's directory: the daemon (which leaves that
    directory) still finds its store — every lookup used to fail with EIO."""
    with mounted(Path("store"), "t/base", tmp_path / "m", cwd=tmp_path):
        assert (tmp_path / "m" / "etc" / "motd").read_bytes() == images.MOTD


def test_missing_content_gives_eio_and_the_rest_is_served(base_store: Path, tmp_path: Path) -> None:
    """A content file removed from the store under a live mount (disk trouble, a careless
    rm): opening that file gets EIO (not ENOENT: the name exists), the log names the missing
    content and `layerfs fsck`, and the daemon keeps serving other files."""
    key_suffix = f"-{len(images.MOTD)}"
    found = [
        p
        for p in (base_store / "content").glob(f"*/*{key_suffix}")
        if p.read_bytes() == images.MOTD
    ]
    assert len(found) == 1, found
    content = found[0]
    mnt = tmp_path / "m"
    with mounted(base_store, "t/base", mnt) as pid:
        assert (mnt / "etc" / "motd").stat().st_size == len(images.MOTD)
        content.rename(tmp_path / "saved")
        try:
            with pytest.raises(OSError) as exc:
                (mnt / "etc" / "motd").read_bytes()
            assert exc.value.errno == errno.EIO
            # Everything else still works, the daemon is alive and still mounted.
            assert (mnt / "etc" / "passwd").read_bytes().startswith(b"root:x:0:0:")
            assert sorted(os.listdir(mnt / "etc")) == ["empty", "group", "motd", "passwd"]
            assert _alive(pid) and is_mounted(mnt)
            log = _logs(base_store)
            assert content.name in log and "layerfs fsck" in log, log
        finally:
            (tmp_path / "saved").rename(content)
        # Put back, the file reads again (nothing was cached as broken).
        assert (mnt / "etc" / "motd").read_bytes() == images.MOTD
