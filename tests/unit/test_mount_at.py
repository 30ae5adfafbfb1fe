"""containers.mount_at: the mount on top at a path, from /proc/self/mountinfo."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from layerstore.containers import is_mount_point, mount_at
from tests.conftest import require_root


def test_a_mount_is_found_with_its_device_and_type(tmp_path: Path) -> None:
    require_root()
    where = tmp_path / "a dir\twith odd\\names"  # mountinfo escapes these as \040 \011 \134
    where.mkdir()
    assert mount_at(where) is None and not is_mount_point(where)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True)
    try:
        dev = os.stat(where).st_dev
        assert mount_at(where) == (os.major(dev), os.minor(dev), "tmpfs")
        assert mount_at(os.path.realpath(where), resolved=True) == mount_at(where)
        via_link = tmp_path / "link"
        via_link.symlink_to(where)
        assert mount_at(via_link) == mount_at(where)  # resolved first unless told it is
        assert mount_at(via_link, resolved=True) is None
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True)
        try:
            top = os.stat(where).st_dev
            assert top != dev
            assert mount_at(where) == (os.major(top), os.minor(top), "tmpfs")  # the top one
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert mount_at(where) is None
