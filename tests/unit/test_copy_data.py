"""copyup.copy_data: every way it copies (reflink, splice through a big pipe,
copy_file_range, read and write) gives the same bytes, and it falls through to the next way
only when one is not available here."""

from __future__ import annotations

import errno
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from unionfs.core import copyup

SIZES = [1, 4095, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 12345]


def _copy(tmp_path: Path, size: int) -> bytes:
    data = random.Random(size).randbytes(size)
    (tmp_path / "src").write_bytes(data)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        copyup.copy_data(src, dst)
    finally:
        os.close(src)
        os.close(dst)
    got = (tmp_path / "dst").read_bytes()
    assert got == data
    return got


def _refuse(err: int, calls: list[str], name: str) -> Callable[..., Any]:
    def refuse(*_a: Any, **_k: Any) -> Any:
        calls.append(name)
        raise OSError(err, os.strerror(err))

    return refuse


@pytest.mark.parametrize("size", SIZES)
def test_copies_exactly(tmp_path: Path, size: int) -> None:
    _copy(tmp_path, size)


@pytest.mark.parametrize("refused", [("splice",), ("splice", "copy_file_range")])
@pytest.mark.parametrize("size", SIZES)
def test_falls_through_to_the_next_way(
    tmp_path: Path, size: int, refused: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without splice, copy_file_range copies; without that either, read and write do."""
    calls: list[str] = []
    errs = {"splice": errno.EINVAL, "copy_file_range": errno.EXDEV}
    for name in refused:
        monkeypatch.setattr(copyup.os, name, _refuse(errs[name], calls, name))
    _copy(tmp_path, size)
    assert calls == list(refused)


def test_without_a_big_pipe_copy_file_range_copies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real_fcntl = copyup.fcntl.fcntl

    def fcntl(fd: int, cmd: int, arg: int = 0) -> Any:
        if cmd == copyup.F_SETPIPE_SZ:
            return _refuse(errno.EPERM, calls, "setpipe")()
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(copyup.fcntl, "fcntl", fcntl)
    spliced: list[int] = []
    real_splice = os.splice
    monkeypatch.setattr(
        copyup.os, "splice", lambda *a, **k: spliced.append(1) or real_splice(*a, **k)
    )
    _copy(tmp_path, 3 * (1 << 20) + 7)
    assert calls == ["setpipe"] and not spliced


def test_a_real_error_is_raised_not_hidden(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(copyup.os, "splice", _refuse(errno.ENOSPC, calls, "splice"))
    with pytest.raises(OSError) as exc:
        _copy(tmp_path, 5000)
    assert exc.value.errno == errno.ENOSPC
