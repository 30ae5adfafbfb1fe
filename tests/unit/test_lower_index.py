"""The lower-directory index answers exactly what asking every layer answers."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from unionfs.core.layers import DirLayer
from unionfs.core.resolve import (
    LowerIndex,
    Resolved,
    Source,
    lower_positive,
    merged_names,
    resolve_child,
)


def _files(root: Path, *paths: str) -> None:
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(p.encode())


@pytest.fixture
def lowers(tmp_path: Path) -> Iterator[list[DirLayer]]:
    l0, l1, l2, l3 = (tmp_path / f"l{i}" for i in range(4))
    # l0 (top): a dir redirected to another name in the same parent, one redirected to an
    # absolute path, both spellings of whiteouts and of opaque directories.
    _files(l0, "d/top", "d/shadow", "ren/own", "abs/own", "op/x", "op2/x")
    (l0 / "d" / ".wh.gone").write_bytes(b"")
    os.mknod(l0 / "d" / "gone2", stat.S_IFCHR, os.makedev(0, 0))
    os.setxattr(l0 / "ren", b"user.overlay.redirect", b"orig")
    os.setxattr(l0 / "abs", b"user.overlay.redirect", b"/far/away")
    os.setxattr(l0 / "op", b"user.overlay.opaque", b"y")
    (l0 / "op2" / ".wh..wh..opq").write_bytes(b"")
    # l1, l2, l3: the same directories again, each with names of its own.
    _files(l1, "d/shadow", "d/gone", "d/gone2", "d/mid", "orig/m1", "far/away/f1", "op/hidden")
    _files(l1, "op2/hidden", "ren/not-merged", "d/sub/s1", "file-then-dir")
    _files(l2, "d/low", "d/sub/s2", "orig/m2", "far/away/f2", "d/mid/not-a-dir-above")
    (l2 / "file-then-dir").mkdir()
    _files(l3, "d/bottom", "d/sub/s3", "orig/m3", "abs/x", "only3/deep/f")
    layers = [DirLayer(os.fsencode(p)) for p in (l0, l1, l2, l3)]
    try:
        yield layers
    finally:
        for layer in layers:
            layer.close()


def _walk(
    lowers: list[DirLayer], index: LowerIndex | None, sources: tuple[Source, ...], path: bytes
) -> Iterator[tuple[bytes, Resolved | None, list[bytes], bool]]:
    names = merged_names(None, lowers, None, sources, index)
    for name in sorted({*names, b"gone", b"gone2", b"missing", b"file-then-dir"}):
        res = resolve_child(None, lowers, None, sources, name, index)
        positive = lower_positive(lowers, sources, name, index)
        yield path + b"/" + name, res, names, positive
        if res is not None and res.is_dir and res.lower:
            yield from _walk(lowers, index, res.lower, path + b"/" + name)


@pytest.mark.parametrize("after", [1, 2, 100])
def test_index_agrees_with_asking_every_layer(
    lowers: list[DirLayer], after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # after=1: every directory indexed at once; 100: only through merged_names (readdir)
    monkeypatch.setattr("unionfs.core.resolve.INDEX_AFTER", after)
    root = tuple((i, b"") for i in range(len(lowers)))
    plain = list(_walk(lowers, None, root, b""))
    indexed = list(_walk(lowers, LowerIndex(lowers), root, b""))
    assert indexed == plain
    by_path = {p: (r, pos) for p, r, _, pos in plain}
    # The walk saw what the fixture is about (so the comparison is not vacuous).
    assert by_path[b"/d/gone"] == (None, False)
    assert by_path[b"/d/gone2"] == (None, False)
    assert by_path[b"/d/shadow"][0] is not None and by_path[b"/d/shadow"][0].lower[0][0] == 0
    ren = by_path[b"/ren"][0]
    assert ren is not None and [li for li, _ in ren.lower] == [0, 1, 2, 3]
    assert [p for _, p in ren.lower] == [b"ren", b"orig", b"orig", b"orig"]
    abs_ = by_path[b"/abs"][0]
    assert abs_ is not None and [p for _, p in abs_.lower] == [b"abs", b"far/away", b"far/away"]
    assert by_path[b"/op"][0] is not None and by_path[b"/op"][0].lower == ((0, b"op"),)
    assert by_path[b"/op2"][0] is not None and by_path[b"/op2"][0].lower == ((0, b"op2"),)
    assert by_path[b"/d/sub"][0] is not None and len(by_path[b"/d/sub"][0].lower) == 3
    assert by_path[b"/d/mid"][0] is not None and not by_path[b"/d/mid"][0].is_dir
    assert by_path[b"/d/mid"][1] and not by_path[b"/d/missing"][1]
    ftd = by_path[b"/file-then-dir"][0]
    assert ftd is not None and not ftd.is_dir and ftd.lower == ((1, b"file-then-dir"),)
    assert b"/only3/deep/f" in by_path


def test_index_is_bounded(lowers: list[DirLayer]) -> None:
    index = LowerIndex(lowers, size=2)
    dirs = [((1, b"d"),), ((2, b"d"),), ((3, b"d"),)]
    for sources in dirs:
        assert index.get(sources, build=True) is not None
    assert index.get(dirs[0]) is None, "the least recently used directory was dropped"
    idx = index.get(dirs[2])
    assert idx is not None and set(idx.positions) == {b"bottom", b"sub"}
