"""fuse-overlayfs' own options through a real mount, with fuse-overlayfs (Debian's 1.10) as
the oracle: what each shows must be the same."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import require_fuse, require_tool
from tests.mounting import overlay_mount

pytestmark = pytest.mark.mount

IMPLS = ("fuse-overlayfs", "layerfs")


def _lower(base: Path) -> Path:
    lower = base / "l"
    (lower / "d" / "s1").mkdir(parents=True)
    (lower / "d" / "s2").mkdir()
    (lower / "f").write_bytes(b"f")
    # fuse-overlayfs' bookkeeping on a lower file, e.g. a layer it wrote: hidden by it.
    os.setxattr(lower / "f", b"user.fuseoverlayfs.origin", b"elsewhere")
    os.setxattr(lower / "f", b"user.fuseoverlayfs.override_stat", b"0:0:0644")
    os.setxattr(lower / "f", b"user.shown", b"yes")
    return lower


def _errno(call: Callable[[], object]) -> object:
    try:
        return call()
    except OSError as exc:
        return errno.errorcode[exc.errno or 0]


def _observe(m: Path) -> list[object]:
    # Not compared: the root's st_nlink (a merged directory: 1 as on the kernel's overlay,
    # which is our oracle there) and removexattr (fuse-overlayfs 1.10 serves it even with
    # noxattrs=1; we refuse it like the other three xattr calls).
    return [
        os.lstat(m / "d").st_nlink,
        _errno(lambda: sorted(os.listxattr(m / "f"))),
        _errno(lambda: os.getxattr(m / "f", b"user.fuseoverlayfs.origin")),
        _errno(lambda: os.getxattr(m / "f", b"user.shown")),
        _errno(lambda: os.setxattr(m / "f", b"user.new", b"1")),
        _errno(lambda: sorted(os.listxattr(m / "f"))),
    ]


def _both(tmp_path: Path, opts: tuple[str, ...]) -> list[list[object]]:
    require_fuse()
    require_tool("fuse-overlayfs")
    lower = _lower(tmp_path)
    seen = []
    for impl in IMPLS:
        upper, work, mnt = (tmp_path / impl / d for d in ("u", "w", "m"))
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        with overlay_mount(impl, [lower], mnt, upper, work, opts=opts) as m:
            seen.append(_observe(m))
    return seen


def test_xattrs_of_fuse_overlayfs_are_hidden(tmp_path: Path) -> None:
    fo, ours = _both(tmp_path, ())
    assert ours == fo
    assert ours == [4, ["user.shown"], "ENODATA", b"yes", None, ["user.new", "user.shown"]]


def test_static_nlink_and_noxattrs(tmp_path: Path) -> None:
    fo, ours = _both(tmp_path, ("static_nlink", "noxattrs=1"))
    assert ours == fo
    assert ours[0] == 1
    assert set(ours[1:]) == {errno.errorcode[errno.EOPNOTSUPP]}
