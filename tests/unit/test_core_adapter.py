"""The overlay command line without a mount: option parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

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
