"""Prefetch (unionfs.core.prefetch): what the read-ahead process reads, and what it holds."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from unionfs.core import prefetch
from unionfs.core.fs import UnionFS
from unionfs.core.layers import DirLayer
from unionfs.core.types import Ino


def _tree(root: Path, dirs: list[str]) -> None:
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
        (root / d / "file").write_bytes(b"x")


def _run(walker: prefetch.Walker) -> list[tuple[int, bytes]]:
    """Step until the walker stops; the directories it read, in order."""
    order: list[tuple[int, bytes]] = []
    while walker.busy():
        top = walker.stack[-1]
        before = walker.read
        walker.step()
        if walker.read > before:
            order.append(top)
    return order


def test_messages_round_trip_whole_and_in_pieces() -> None:
    a = [(0, b"usr/lib"), (3, b""), (65535, b"x\nwith\0bytes")]
    b = [(1, b"etc")]
    wire = prefetch.encode(a) + prefetch.encode(b)  # type: ignore[operator]
    buf = bytearray()
    got: list[list[tuple[int, bytes]]] = []
    for i in range(0, len(wire), 5):  # a pipe may hand over any part of it
        buf += wire[i : i + 5]
        got += prefetch.decode(buf)
    assert got == [a, b]
    assert buf == b""


def test_a_message_larger_than_one_atomic_pipe_write_is_not_made() -> None:
    assert prefetch.encode([(0, b"d" * 2100), (1, b"e" * 2100)]) is None
    assert prefetch.encode([(0, b"d" * 2000)]) is not None


def test_reads_depth_first_from_the_newest_listing_within_its_credit(tmp_path: Path) -> None:
    _tree(tmp_path, ["a/a1/a11", "a/a2", "b/b1"])
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        walker = prefetch.Walker({0: fd}, credit=100)
        walker.listed([(0, b"")])
        order = _run(walker)
        assert order[0] == (0, b"")
        assert sorted(order) == sorted(
            (0, p) for p in [b"", b"a", b"a/a1", b"a/a1/a11", b"a/a2", b"b", b"b/b1"]
        )
        # depth first: a directory's subtree is read before its next sibling's
        pos = {p: i for i, (_, p) in enumerate(order)}
        first, second = sorted([b"a", b"b"], key=pos.__getitem__)
        assert all(pos[p] < pos[second] for p in pos if p.startswith(first + b"/"))
        assert not walker.busy()

        walker = prefetch.Walker({0: fd}, credit=2)
        walker.listed([(0, b"")])
        assert len(_run(walker)) == 2  # an `ls` reads only so far ahead
        walker.listed([(0, b"b")])  # the next listing allows more, from there
        assert _run(walker)[0] == (0, b"b")
    finally:
        os.close(fd)


def test_never_follows_a_symlink_nor_reads_another_layer(tmp_path: Path) -> None:
    layer, outside = tmp_path / "layer", tmp_path / "outside"
    _tree(layer, ["d"])
    _tree(outside, ["secret/deeper"])
    (layer / "d" / "link").symlink_to(outside)
    (layer / "top").symlink_to(outside / "secret")
    fd = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    try:
        walker = prefetch.Walker({0: fd}, credit=100)
        walker.listed([(0, b""), (7, b"")])  # layer 7 is not ours to read
        walker.listed([(0, b"top")])  # a symlink named as a directory: O_NOFOLLOW refuses it
        walker.listed([(0, b"missing")])
        assert _run(walker) == [(0, b""), (0, b"d")]
    finally:
        os.close(fd)


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out |= {int(c) for c in f.read().split()}
    return out


def _comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def _fd_targets(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
    return out


def test_the_process_holds_only_its_pipe_and_layer_roots_and_ends_with_the_daemon(
    tmp_path: Path,
) -> None:
    lower, other = tmp_path / "lower", tmp_path / "other"
    _tree(lower, ["d/e"])
    other.mkdir()
    fs = UnionFS([DirLayer(os.fsencode(lower))], None)
    held = os.open(other, os.O_PATH | os.O_DIRECTORY)  # stands for the daemon's other fds
    try:
        assert fs.start_prefetch()
        assert fs.prefetch is not None
        pid = fs.prefetch.pid
        assert pid is not None and pid in _children(os.getpid())
        deadline = time.monotonic() + 30
        while (len(fds := _fd_targets(pid)) > 5 or _comm(pid) != prefetch.COMM) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.01)  # the child closes what it inherited right after the fork
        assert {fds[0], fds[1], fds[2]} == {os.devnull}
        rest = {fd: t for fd, t in fds.items() if fd > 2}
        assert str(other) not in rest.values()
        assert str(lower) in rest.values() and len(rest) == 2  # the layer root, the pipe
        assert _comm(pid) == prefetch.COMM  # named apart from the daemon for ps and top
        fs.prefetch.listed([(0, b"")])  # a listing, then the daemon ends: the child too
        fs.stop_prefetch()
        assert fs.prefetch is None
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # ended and reaped by stop_prefetch
    finally:
        os.close(held)
        fs.close()


def test_mutable_layers_are_not_read_ahead(tmp_path: Path) -> None:
    _tree(tmp_path, ["d"])
    layer = DirLayer(os.fsencode(tmp_path))
    layer.immutable = False
    fs = UnionFS([layer], None)
    try:
        assert not fs.start_prefetch()
        assert fs.prefetch is None
    finally:
        fs.close()


def test_no_process_to_spare_means_no_read_ahead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    _tree(tmp_path, ["d"])
    fs = UnionFS([DirLayer(os.fsencode(tmp_path))], None)
    before = len(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(os, "fork", fail)
    try:
        assert not fs.start_prefetch()
        assert fs.prefetch is None
        assert len(os.listdir("/proc/self/fd")) == before  # the pipe was closed again
    finally:
        fs.close()


def test_the_process_ends_by_itself_when_the_daemons_end_of_the_pipe_closes(
    tmp_path: Path,
) -> None:
    _tree(tmp_path, ["d"])
    fs = UnionFS([DirLayer(os.fsencode(tmp_path))], None)
    try:
        assert fs.start_prefetch() and fs.prefetch is not None
        pid = fs.prefetch.pid
        assert pid is not None
        os.close(fs.prefetch._wfd)  # as when the daemon is killed: nobody ends the child
        fs.prefetch._wfd = -1
        deadline = time.monotonic() + 30
        while os.waitpid(pid, os.WNOHANG) == (0, 0):
            assert time.monotonic() < deadline, "the read-ahead process outlived its pipe"
            time.sleep(0.01)
        fs.prefetch.pid = None
    finally:
        fs.close()


class _Spy(prefetch.Prefetch):
    def __init__(self) -> None:
        super().__init__({})
        self.calls: list[list[tuple[int, bytes]]] = []

    def listed(self, sources: Sequence[tuple[int, bytes]]) -> None:
        self.calls.append(list(sources))


def test_each_first_read_of_a_lower_listing_is_told_whichever_way_it_is_read(
    tmp_path: Path,
) -> None:
    """The request loops read listings two ways (fs.listing, then readdir_iter; or
    readdir_iter alone): both tell the read-ahead, once per open directory."""
    top, bottom = tmp_path / "top", tmp_path / "bottom"
    _tree(top, ["d/x"])
    _tree(bottom, ["d/y", "e"])
    fs = UnionFS([DirLayer(os.fsencode(top)), DirLayer(os.fsencode(bottom))], None)
    spy = _Spy()
    fs.prefetch = spy
    try:
        d = fs.lookup(Ino(1), b"d").ino
        fh = fs.opendir(d)
        assert sorted(fs.listing(fh)) == [b"x", b"y"]
        assert [n for n, _a, _o in fs.readdir_iter(fh, 0)] == fs.listing(fh)
        fs.releasedir(fh)
        assert spy.calls == [[(0, b"d"), (1, b"d")]]
        fh = fs.opendir(Ino(1))
        assert sorted(n for n, _a, _o in fs.readdir_iter(fh, 0)) == [b"d", b"e"]
        fs.releasedir(fh)
        assert spy.calls[1:] == [[(0, b""), (1, b"")]]
    finally:
        fs.prefetch = None
        fs.close()


@pytest.mark.parametrize("openat2", [True, False])
def test_paths_open_beneath_the_layer_through_no_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, openat2: bool
) -> None:
    layer, outside = tmp_path / "layer", tmp_path / "outside"
    _tree(layer, ["a/b"])
    _tree(outside, ["sub"])
    (layer / "a" / "out").symlink_to(outside)
    (layer / "esc").symlink_to("a/b")
    if not openat2:  # as on a kernel without openat2: component by component
        monkeypatch.setattr(prefetch, "_have_openat2", False)
    root = os.open(layer, os.O_PATH | os.O_DIRECTORY)
    try:
        for ok in (b"", b"a", b"a/b"):
            fd = prefetch.open_beneath(root, ok)
            assert os.path.samestat(os.fstat(fd), os.stat(layer / os.fsdecode(ok)))
            os.close(fd)
        for bad in (b"a/out/sub", b"a/out", b"esc", b"../outside", b"a/../../outside"):
            with pytest.raises(OSError):
                os.close(prefetch.open_beneath(root, bad))
        walker = prefetch.Walker({0: root}, credit=100)
        walker.listed([(0, b"a/out/sub")])  # a layer changed behind the mount's back
        assert _run(walker) == []
    finally:
        os.close(root)
