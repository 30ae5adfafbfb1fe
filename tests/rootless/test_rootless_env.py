"""The rootless fixtures themselves: the user is really unprivileged, and mounts as itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.mounting import is_mounted
from tests.rootless.conftest import Rootless

pytestmark = pytest.mark.mount


def test_user_is_unprivileged_and_sees_its_home(rootless: Rootless, home: Path) -> None:
    out = rootless.sh(
        'id -u; id -g; echo "$HOME"; touch "$HOME/x"; touch /root/x', home, check=False
    )
    lines = out.stdout.split()
    assert lines[:3] == [str(rootless.uid), str(rootless.gid), str(home)]
    assert rootless.uid != 0
    assert (home / "x").stat().st_uid == rootless.uid
    assert "Permission denied" in out.stderr  # /root is not the user's


def test_overlay_mount_as_user_and_cleanup(rootless: Rootless, home: Path) -> None:
    lower, upper, work, mnt = (home / n for n in ("lower", "upper", "work", "mnt"))
    rootless.sh(f"mkdir {lower} {upper} {work} {mnt} && echo hi > {lower}/f", home)
    opts = f"lowerdir={lower},upperdir={upper},workdir={work}"
    with rootless.mounted(["layerfs", "overlay", "-f", "-o", opts, str(mnt)], mnt, home):
        rootless.sh(f"echo new > {mnt}/g && rm {mnt}/f", home)
        assert rootless.sh(f"ls {mnt}", home).stdout.split() == ["g"]
    assert not is_mounted(mnt)
    assert (upper / "g").read_bytes() == b"new\n"
    assert (upper / ".wh.f").is_file()  # the rootless whiteout spelling
