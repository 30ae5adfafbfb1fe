"""layerstore.mountinfo: the one reader of /proc/self/mountinfo."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from layerstore.mountinfo import Mount, is_mount_point, mount_at, mount_points, parse_line
from tests.conftest import require_root


def _dev(m: Mount | None) -> tuple[int, int, str] | None:
    return None if m is None else (m.major, m.minor, m.fstype)


def test_a_mount_is_found_with_its_device_and_type(tmp_path: Path) -> None:
    require_root()
    where = tmp_path / "a dir\twith odd\\names"  # mountinfo escapes these as \040 \011 \134
    where.mkdir()
    assert mount_at(where) is None and not is_mount_point(where)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)], check=True)
    try:
        dev = os.stat(where).st_dev
        assert _dev(mount_at(where)) == (os.major(dev), os.minor(dev), "tmpfs")
        assert os.fsencode(where) in mount_points()
        assert mount_at(os.path.realpath(where), resolved=True) == mount_at(where)
        via_link = tmp_path / "link"
        via_link.symlink_to(where)
        assert mount_at(via_link) == mount_at(where)  # resolved first unless told it is
        assert mount_at(via_link, resolved=True) is None
        found = mount_at(where)
        assert found is not None and b"size=1024k" in found.super_options
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(where)], check=True)
        try:
            top = os.stat(where).st_dev
            assert top != dev
            assert _dev(mount_at(where)) == (os.major(top), os.minor(top), "tmpfs")  # the top
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        subprocess.run(["umount", str(where)], check=True)
    assert mount_at(where) is None


def test_a_line_is_parsed_field_by_field() -> None:
    line = (
        b"36 35 98:0 /mnt1 /mnt\\040two rw,noatime master:1 shared:2 - ext3 /dev/root "
        b"rw,errors=continue\n"
    )
    assert parse_line(line) == Mount(
        mount_id=36,
        parent_id=35,
        major=98,
        minor=0,
        root=b"/mnt1",
        point=b"/mnt two",
        options=b"rw,noatime",
        fstype="ext3",
        source=b"/dev/root",
        super_options=b"rw,errors=continue",
    )
    assert parse_line(b"garbage\n") is None
    assert parse_line(b"1 2 x:y / / rw - t s o\n") is None
