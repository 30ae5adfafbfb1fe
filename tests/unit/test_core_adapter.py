"""The edges without a mount: overlay option parsing and the one error translation."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pyfuse3
import pytest

from unionfs.core.errors import FsError
from unionfs.fuse_ops import to_fuse_error
from unionfs.overlay_cli import UsageError, parse_options


def test_options_split_layers_and_pass_fuse_options() -> None:
    o = parse_options([r"lowerdir=/a\:b:/c,upperdir=/u,workdir=/w,allow_other", "ro,index=on"])
    assert o.lowers == [Path("/a:b"), Path("/c")]
    assert (o.upper, o.work) == (Path("/u"), Path("/w"))
    assert o.fuse == ["allow_other", "ro"]


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


def test_errors_become_fuse_errors(caplog: pytest.LogCaptureFixture) -> None:
    assert to_fuse_error(FsError(errno.ENOTEMPTY)).errno == errno.ENOTEMPTY
    assert to_fuse_error(PermissionError(errno.EPERM, "x")).errno == errno.EPERM
    same = pyfuse3.FUSEError(errno.EXDEV)
    assert to_fuse_error(same) is same
    with caplog.at_level(logging.ERROR, logger="layerfs"):
        try:
            raise KeyError("bug")
        except KeyError as exc:
            assert to_fuse_error(exc).errno == errno.EIO
    assert any(r.exc_info for r in caplog.records), "an unexpected error is logged with traceback"
