"""The overlay command line without a mount: option parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from unionfs.fuse.policy import Policy
from unionfs.mount_options import FUSE_DEFAULTS
from unionfs.overlay_cli import UsageError, parse_options


def test_options_split_layers_and_pass_fuse_options() -> None:
    o = parse_options([r"lowerdir=/a\:b:/c,upperdir=/u,workdir=/w,allow_other", "ro,index=on"])
    assert o.lowers == [Path("/a:b"), Path("/c")]
    assert (o.upper, o.work) == (Path("/u"), Path("/w"))
    assert o.shared.fuse == [*FUSE_DEFAULTS, "allow_other", "ro"]


@pytest.mark.parametrize(
    ("opts", "message"),
    [
        (["lowerdir=/a,bogus"], "unknown mount option"),
        (["allow_other=1,lowerdir=/a"], "unknown mount option"),
        (["upperdir=/u,workdir=/w"], "lowerdir"),
        (["lowerdir=/a,upperdir=/u"], "go together"),
        (["lowerdir="], "at least one"),
    ],
)
def test_bad_options_are_refused(opts: list[str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_options(opts)


def test_fuse_overlayfs_options_are_honoured() -> None:
    o = parse_options(
        ["lowerdir=/a,static_nlink,noxattrs=1,fsync=0,timeout=2.5,noacl,redirect_dir=on"]
    )
    assert o.shared.policy() == Policy(timeout=2.5, xattrs=False, static_nlink=True, fsync=False)
    o = parse_options(["lowerdir=/a,noxattrs=0,volatile,index=on,metacopy=off,xino=auto"])
    assert o.shared.policy() == Policy(xattrs=True, fsync=False)
    assert o.shared.fuse == list(FUSE_DEFAULTS)
    o = parse_options(["lowerdir=/a,fsname=mine,subtype=x"])
    assert o.shared.fuse == ["default_permissions", "fsname=mine", "subtype=x"]


@pytest.mark.parametrize(
    ("opt", "message"),
    [
        ("index=off", "not supported: layerfs keeps lower hard links together"),
        ("redirect_dir=off", "not supported"),
        ("metacopy=on", "not supported"),
        ("userxattr", "not supported"),
        ("writeback=1", "not supported"),
        ("threaded=1", "not supported"),
        ("uuid=null", "not supported"),
        ("noxattrs", "unknown mount option 'noxattrs'"),  # fuse-overlayfs wants a value
        ("noxattrs=yes", "a number expected"),
        ("timeout=soon", "a number of seconds"),
        ("nonempty", "unknown mount option"),  # libfuse 2's, refused by libfuse 3 too
    ],
)
def test_options_not_honoured_are_refused(opt: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_options([f"lowerdir=/a,{opt}"])
