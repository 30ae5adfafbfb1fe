"""Stat-ahead (unionfs.core.statahead): bounded, leaks no descriptor, changes nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

from unionfs.core import statahead
from unionfs.core.layers import DirLayer
from unionfs.core.resolve import INDEX_AFTER, LowerIndex


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _drain(ahead: statahead.StatAhead) -> None:
    deadline = time.monotonic() + 30
    while ahead._jobs and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)  # the job taken last finishes and closes its descriptor


def test_jobs_are_bounded_and_close_their_descriptors(tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i}").write_bytes(b"")
    names = [f"f{i}".encode() for i in range(50)] + [b"missing"]
    ahead = statahead.StatAhead()
    dfd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    try:
        before = _fds()
        for _ in range(statahead.MAX_JOBS * 3):
            ahead.submit(dfd, names)
        assert len(ahead._jobs) <= statahead.MAX_JOBS
        ahead.submit(dfd, [b"x"] * (statahead.MAX_NAMES + 1))  # too big: not taken
        _drain(ahead)
        assert _fds() == before
    finally:
        os.close(dfd)


def test_lookups_in_a_lower_directory_start_it(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    for i in range(20):
        (tmp_path / "d" / f"f{i}").write_bytes(b"")
    layer = DirLayer(os.fsencode(tmp_path))
    calls: list[list[bytes]] = []

    class Spy(statahead.StatAhead):
        def submit(self, dir_fd: int, names: list[bytes]) -> None:  # type: ignore[override]
            calls.append(sorted(names))

    layer.statahead = Spy()
    index = LowerIndex([layer])
    for _ in range(INDEX_AFTER):
        index.get(((0, b"d"),))
    assert calls == [sorted(f"f{i}".encode() for i in range(20))]
    index.get(((0, b""),), build=True)  # a listing: it reads the entries itself
    assert len(calls) == 1
    layer.close()
