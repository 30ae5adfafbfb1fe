"""A layer's directory fds: the cache (and its memo of the last directory asked for) never
hands out an fd it closed or one naming a directory that was renamed away."""

from __future__ import annotations

import os
from pathlib import Path

from unionfs.core.layers import DirLayer


def test_forgotten_directory_is_opened_again(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_bytes(b"")
    layer = DirLayer(os.fsencode(tmp_path))
    path = b"d"
    try:
        first = layer.dirfd(path)
        assert layer.dirfd(path) == first  # the memo
        os.stat("old", dir_fd=first)
        os.rename(tmp_path / "d", tmp_path / "was-d")
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "new").write_bytes(b"")
        layer.forget_prefix(path)  # what a rename through the mount calls
        again = layer.dirfd(path)  # the same bytes object as before
        os.stat("new", dir_fd=again)
        assert layer.lookup(b"d", b"old") is None
    finally:
        layer.close()


def test_evicted_directories_are_opened_again(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / f"in-{name}").write_bytes(b"")
    layer = DirLayer(os.fsencode(tmp_path), cache_size=1)
    a, b, c = b"a", b"b", b"c"
    try:
        for path in (a, b, a, c, c, b, a):
            fd = layer.dirfd(path)
            os.stat(b"in-" + path, dir_fd=fd)  # valid, and the right directory
        assert layer._dirfd_or_none(b"missing") is None
        assert layer._dirfd_or_none(a) is not None
    finally:
        layer.close()
