"""Directory listings the kernel caches (and layerfs' own caches) follow every change."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import require_fuse
from tests.mounting import overlay_mount

pytestmark = pytest.mark.mount


def listing(path: Path) -> list[str]:
    """The listing, read twice: the second read is the one the kernel may serve from its
    cache, and both must agree."""
    first = sorted(os.listdir(path))
    assert sorted(os.listdir(path)) == first
    return first


def test_listings_follow_changes(tmp_path: Path) -> None:
    require_fuse()
    l0, l1 = tmp_path / "l0", tmp_path / "l1"
    upper, work, mnt = tmp_path / "u", tmp_path / "w", tmp_path / "m"
    for d in (l0 / "d", l1 / "d" / "sub", l1 / "e", l1 / "x" / "y", upper, work):
        d.mkdir(parents=True)
    (l0 / "d" / "a").write_bytes(b"a")
    (l1 / "d" / "b").write_bytes(b"b")
    (l1 / "d" / "a").write_bytes(b"lower a")  # shadowed by l0's a
    (l1 / "d" / "sub" / "s").write_bytes(b"s")
    (l1 / "e" / "f").write_bytes(b"f")
    (l1 / "x" / "y" / "z").write_bytes(b"z")
    with overlay_mount("layerfs", [l0, l1], mnt, upper, work) as m:
        d, e = m / "d", m / "e"
        assert listing(d) == ["a", "b", "sub"]
        assert listing(e) == ["f"]
        (d / "c").write_bytes(b"c")
        assert listing(d) == ["a", "b", "c", "sub"]
        os.unlink(d / "a")
        assert listing(d) == ["b", "c", "sub"]
        os.rename(d / "b", d / "b2")
        assert listing(d) == ["b2", "c", "sub"]
        os.rename(d / "c", e / "c")
        assert listing(d) == ["b2", "sub"]
        assert listing(e) == ["c", "f"]
        os.mkdir(d / "n")
        os.symlink("b2", d / "ln")
        os.link(d / "b2", d / "hard")
        os.mkfifo(d / "fifo")
        assert listing(d) == ["b2", "fifo", "hard", "ln", "n", "sub"]
        os.rmdir(d / "n")
        for name in ("ln", "hard", "fifo"):
            os.unlink(d / name)
        assert listing(d) == ["b2", "sub"]
        assert listing(d / "sub") == ["s"]
        os.rename(d / "sub", e / "moved")
        assert listing(d) == ["b2"]
        assert listing(e) == ["c", "f", "moved"]
        assert listing(e / "moved") == ["s"]
        (e / "moved" / "t").write_bytes(b"t")
        assert listing(e / "moved") == ["s", "t"]
        os.rename(e / "moved", d / "sub")
        assert listing(d / "sub") == ["s", "t"]
        # A lower directory removed and made again is a new, empty (opaque) directory.
        assert listing(m / "x") == ["y"]
        assert listing(m / "x" / "y") == ["z"]
        shutil.rmtree(m / "x")
        os.makedirs(m / "x" / "y")
        assert listing(m / "x") == ["y"]
        assert listing(m / "x" / "y") == []
        # A listing kept open while the directory changes still reads to the end once.
        with os.scandir(d) as it:
            first = next(it).name
            (d / "late").write_bytes(b"late")
            rest = [entry.name for entry in it]
        assert len({first, *rest} & {"b2", "sub"}) == 2
        assert listing(d) == ["b2", "late", "sub"]
    with overlay_mount("layerfs", [l0, l1], mnt, upper, work) as m:
        assert listing(m / "d") == ["b2", "late", "sub"]
        assert listing(m / "d" / "sub") == ["s", "t"]
        assert listing(m / "e") == ["c", "f"]


def test_large_merged_listing_across_many_replies(tmp_path: Path) -> None:
    # 3,000 names do not fit one READDIRPLUS reply: entries are made one at a time and
    # the listing resumes at the offset the kernel hands back, whatever the reply size.
    require_fuse()
    lowers = [tmp_path / f"l{i}" for i in range(3)]
    upper, work, mnt = tmp_path / "u", tmp_path / "w", tmp_path / "m"
    for d in (*[lo / "big" for lo in lowers], upper, work):
        d.mkdir(parents=True)
    want = set()
    for i in range(3000):
        name = f"n{i:04d}"
        (lowers[i % 3] / "big" / name).write_bytes(b"")
        want.add(name)
        if i % 7 == 0:  # the same name in the top layer too: listed once
            (lowers[0] / "big" / name).write_bytes(b"top")
        if i % 11 == 0 and i % 3 != 0 and i % 7 != 0:  # deleted by the top layer
            os.mknod(lowers[0] / "big" / name, 0o020000, os.makedev(0, 0))
            want.discard(name)
    with overlay_mount("layerfs", lowers, mnt, upper, work) as m:
        with os.scandir(m / "big") as it:
            seen = [(e.name, e.inode()) for e in it]
        assert len(seen) == len({n for n, _ in seen}), "no name twice"
        assert {n for n, _ in seen} == want
        for name, ino in seen[:: len(seen) // 50]:
            assert os.lstat(m / "big" / name).st_ino == ino
        (m / "big" / "new").write_bytes(b"")
        os.unlink(m / "big" / "n0001")
        assert set(listing(m / "big")) == (want | {"new"}) - {"n0001"}
