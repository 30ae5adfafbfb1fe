"""Permissions on an image mount shared with other users (allow_other): the image's modes and
owners are enforced for an unprivileged user, and setuid bits and device nodes are inert unless
the mount asks for `suid`/`dev`."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore.ocibuild import Img, M, d, f, layer_tar, write_oci
from tests.conftest import require_fuse, require_root, require_tool
from tests.image_fixtures import layerfs, layerfs_ok
from tests.mounting import force_unmount, is_mounted

pytestmark = pytest.mark.mount

NOBODY = 65534


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store with one image: a 0600 root file, a read-only root dir, a setuid-root copy of
    `id`, a world-writable /dev/null node and a file the user owns."""
    require_root()
    require_fuse()
    require_tool("setpriv")
    tmp = tmp_path_factory.mktemp("perm")
    id_binary = Path("/usr/bin/id").read_bytes()
    layer = layer_tar(
        [
            d("."),
            d("etc"),
            f("etc/shadow", b"root:secret\n", mode=0o600),
            d("srv", mode=0o755),
            f("srv/readme", b"public\n", mode=0o644),
            d("home/nobody", mode=0o755, uid=NOBODY, gid=NOBODY),
            f("home/nobody/mine", b"mine\n", mode=0o644, uid=NOBODY, gid=NOBODY),
            d("bin"),
            f("bin/suid-id", id_binary, mode=0o4755),
            d("dev"),
            M("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        ]
    )
    write_oci(tmp / "img", Img([layer], ref="v1"))
    root = tmp / "store"
    layerfs_ok(root, "import", f"oci:{tmp / 'img'}:v1", "--tag", "perm:1")
    return root


@contextlib.contextmanager
def mounted(store: Path, options: str) -> Iterator[Path]:
    """The image mounted where another user can reach it (pytest's tmp dirs are 0700)."""
    top = Path(tempfile.mkdtemp(prefix="layerfs-perm-", dir="/tmp"))
    os.chmod(top, 0o755)
    mnt = top / "mnt"
    mnt.mkdir()
    try:
        layerfs_ok(store, "mount", "perm:1", str(mnt), "-o", options)
        try:
            assert is_mounted(mnt)
            yield mnt
        finally:
            layerfs(store, "umount", str(mnt))
            force_unmount(mnt)
    finally:
        shutil.rmtree(top)


def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_the_images_modes_hold_for_another_user(store: Path) -> None:
    with mounted(store, "allow_other") as mnt:
        assert as_nobody("cat", str(mnt / "srv/readme")).stdout == "public\n"
        denied = as_nobody("cat", str(mnt / "etc/shadow"))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        for target in ("srv/new", "etc/new"):
            made = as_nobody("touch", str(mnt / target))
            assert made.returncode != 0 and "Permission denied" in made.stderr
        assert as_nobody("rm", "-f", str(mnt / "srv/readme")).returncode != 0
        assert as_nobody("chmod", "777", str(mnt / "etc/shadow")).returncode != 0
        # What the image gives the user is the user's to change.
        wrote = as_nobody("sh", "-c", f"echo changed > {mnt / 'home/nobody/mine'}")
        assert wrote.returncode == 0, wrote.stderr
        assert (mnt / "home/nobody/mine").read_text() == "changed\n"
        assert (mnt / "srv/readme").read_text() == "public\n"
        assert not (mnt / "srv/new").exists()


def test_setuid_and_devices_are_inert_by_default(store: Path) -> None:
    with mounted(store, "allow_other") as mnt:
        ran = as_nobody(str(mnt / "bin/suid-id"), "-u")
        assert ran.returncode == 0 and ran.stdout.strip() == str(NOBODY), ran.stderr
        with pytest.raises(PermissionError):
            (mnt / "dev/null").write_bytes(b"x")


def test_suid_and_dev_options_enable_them(store: Path) -> None:
    with mounted(store, "allow_other,suid,dev") as mnt:
        ran = as_nobody(str(mnt / "bin/suid-id"), "-u")
        assert ran.returncode == 0 and ran.stdout.strip() == "0", ran.stderr
        (mnt / "dev/null").write_bytes(b"x")  # the real /dev/null: accepted, discarded
