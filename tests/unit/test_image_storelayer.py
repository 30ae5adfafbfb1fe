"""StoreLayer without a mount: entries from the index as the engine sees them, the merged view
through UnionFS, and index access handed to the main thread from a worker thread."""

from __future__ import annotations

import dataclasses
import os
import queue
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from layerstore.ingest import import_source
from layerstore.ocibuild import Img, M, d, f, hard, layer_tar, sym, wh, write_oci
from layerstore.sources import source_images
from layerstore.store import Store
from tests.unit.test_merge_oracle import observe
from unionfs.core.errors import FsError
from unionfs.core.fs import UnionFS
from unionfs.core.storelayer import StoreView
from unionfs.core.types import ROOT_INO, Kind

BASE = layer_tar(
    [
        d(".", mode=0o750, uid=7, mtime=1_500_000_000),
        d("etc", mode=0o711, uid=3, gid=4, mtime=1_500_000_001),
        f("etc/passwd", b"root\n"),
        f("etc/gone", b"deleted above\n"),
        d("opq"),
        f("opq/old", b"hidden by opaque\n"),
        f("a", b"hard linked\n", mode=0o600),
        hard("b", "a"),
        sym("s", "etc/passwd"),
        M("null", b"3", mode=0o666, devmajor=1, devminor=3),
        f("x", b"with xattr", pax={"SCHILY.xattr.user.k": "v"}),
    ]
)
TOP = layer_tar(
    [
        wh("etc/gone"),
        f("etc/passwd", b"root v2\n"),  # etc has no entry here: implicit, lower metadata
        f("opq/.wh..wh..opq"),
        f("opq/new", b"new\n"),
    ]
)


@pytest.fixture
def view(tmp_path: Path) -> Any:
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="v1"))
    with Store(tmp_path / "store") as store:
        import_source(store, source_images(f"oci:{tmp_path / 'img'}:v1"), ["t:v1"])
        ids = [layer.id for layer in reversed(store.image_layers("t:v1"))]
        v = StoreView.prepare(store, ids)
    yield v
    v.close()


def test_entries_as_the_engine_sees_them(view: StoreView) -> None:
    top, base = view.layers
    assert top.lookup(b"etc", b"gone") is not None
    assert top.lookup(b"etc", b"gone").kind is Kind.WHITEOUT  # type: ignore[union-attr]
    assert top.names(b"etc") == {b"gone": True, b"passwd": False}
    assert top.names(b"opq") == {b"new": False}
    opq = top.lookup(b"", b"opq")
    assert opq is not None and opq.opaque
    # An implicit directory takes the lower directory's attributes (as umoci keeps them).
    etc = top.lookup(b"", b"etc")
    assert etc is not None and etc.st is not None
    assert (stat.S_IMODE(etc.st.mode), etc.st.uid, etc.st.gid) == (0o711, 3, 4)
    assert etc.st.mtime_ns == 1_500_000_001 * 10**9
    a, b = base.lookup(b"", b"a"), base.lookup(b"", b"b")
    assert a is not None and b is not None and a.st is not None and b.st is not None
    assert a.st.host_ino == b.st.host_ino and a.st.nlink == b.st.nlink == 2
    assert sorted(base.hardlinks(a.st.host_ino)) == [b"a", b"b"]
    null = base.lookup(b"", b"null")
    assert null is not None and null.st is not None and null.kind is Kind.CHAR
    assert null.st.rdev == os.makedev(1, 3)
    assert base.readlink(b"s") == b"etc/passwd"
    assert base.listxattr(b"x") == [b"user.k"] and base.getxattr(b"x", b"user.k") == b"v"
    with pytest.raises(FsError):
        base.getxattr(b"x", b"user.none")
    fd = top.open(b"etc/passwd", os.O_RDONLY)
    try:
        assert os.pread(fd, 100, 0) == b"root v2\n"
    finally:
        os.close(fd)


def test_merged_view(view: StoreView) -> None:
    fs = UnionFS(view.layers, None)
    root = fs.getattr(ROOT_INO)
    assert (stat.S_IMODE(root.st.mode), root.st.uid) == (0o750, 7)
    etc = fs.lookup(ROOT_INO, b"etc").ino
    with pytest.raises(FsError):
        fs.lookup(etc, b"gone")
    opq = fs.lookup(ROOT_INO, b"opq").ino
    fh = fs.opendir(opq)
    assert [n for n, _, _ in fs.readdir(fh, 0)] == [b"new"]
    fs.releasedir(fh)
    assert fs.lookup(ROOT_INO, b"a").ino == fs.lookup(ROOT_INO, b"b").ino


def test_a_worker_thread_reaches_the_index_through_dispatch(tmp_path: Path) -> None:
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="v1"))
    with Store(tmp_path / "store") as store:
        import_source(store, source_images(f"oci:{tmp_path / 'img'}:v1"), ["t:v1"])
        ids = [layer.id for layer in reversed(store.image_layers("t:v1"))]
        jobs: queue.Queue[tuple[Callable[[], Any], queue.Queue[Any]]] = queue.Queue()

        def dispatch(fn: Callable[[], Any]) -> Any:
            reply: queue.Queue[Any] = queue.Queue()
            jobs.put((fn, reply))
            return reply.get()

        v = StoreView.prepare(store, ids, dispatch=dispatch)
    try:
        v.layers[0].lookup(b"", b"etc")  # the connection is opened here, on this thread
        out: list[Any] = []
        worker = threading.Thread(target=lambda: out.append(v.layers[1].lookup(b"", b"x")))
        worker.start()
        fn, reply = jobs.get(timeout=30)  # served here, where the connection lives
        reply.put(fn())
        worker.join(timeout=30)
        assert out and out[0] is not None and out[0].kind is Kind.FILE
        assert jobs.empty()
    finally:
        v.close()


def test_container_records_and_targets(tmp_path: Path) -> None:
    from layerstore import containers

    with pytest.raises(containers.ContainerError):
        containers.check_name("../x")
    c = containers.create(tmp_path, "c1", "sha256:" + "a" * 64, "t:v1")
    assert c.upper.is_dir() and c.work.is_dir()
    with pytest.raises(containers.ContainerError):
        containers.create(tmp_path, "c1", "sha256:" + "a" * 64, "t:v1")
    assert [x.name for x in containers.all_containers(tmp_path)] == ["c1"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    rec = containers.MountRecord(str(mnt), os.getpid(), c.image, "c1", str(c.upper), None, False)
    containers.write_record(tmp_path, rec)
    assert containers.read_record(tmp_path, str(mnt)) == rec
    assert containers.resolve_target(tmp_path, str(mnt)) == (c, rec)
    # A live process's registration counts before its mount is up (a second mount of c1 is
    # refused, gc keeps its layers); one whose pid now belongs to another process does not.
    assert containers.resolve_target(tmp_path, "c1") == (c, rec)
    containers.write_record(tmp_path, dataclasses.replace(rec, started=1))
    assert containers.resolve_target(tmp_path, "c1") == (c, None)
    containers.write_record(tmp_path, rec)
    with pytest.raises(containers.ContainerError):
        containers.resolve_target(tmp_path, "nope")
    containers.remove_record(tmp_path, str(mnt), pid=os.getpid() + 1)  # not its record
    assert containers.read_record(tmp_path, str(mnt)) == rec
    containers.remove_record(tmp_path, str(mnt), pid=os.getpid())
    assert containers.read_record(tmp_path, str(mnt)) is None


def test_a_layer_listed_twice_counts_at_both_positions(tmp_path: Path) -> None:
    write_oci(tmp_path / "img", Img([BASE, TOP, BASE], ref="v1"))
    with Store(tmp_path / "store") as store:
        import_source(store, source_images(f"oci:{tmp_path / 'img'}:v1"), ["t:v1"])
        ids = [layer.id for layer in reversed(store.image_layers("t:v1"))]
        assert ids[0] == ids[2]
        v = StoreView.prepare(store, ids)
    try:
        fs = UnionFS(v.layers, None)
        etc = fs.lookup(ROOT_INO, b"etc").ino
        assert fs.lookup(etc, b"gone").st.size == len(b"deleted above\n")  # made again on top
        opq = fs.lookup(ROOT_INO, b"opq").ino
        fh = fs.opendir(opq)
        assert sorted(n for n, _, _ in fs.readdir(fh, 0)) == [b"new", b"old"]
        fs.releasedir(fh)
    finally:
        v.close()


def test_rows_of_a_listed_directory_answer_lookups(tmp_path: Path) -> None:
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="v1"))
    with Store(tmp_path / "store") as store:
        import_source(store, source_images(f"oci:{tmp_path / 'img'}:v1"), ["t:v1"])
        ids = [layer.id for layer in reversed(store.image_layers("t:v1"))]
        asked, listed = StoreView.prepare(store, ids), StoreView.prepare(store, ids)
    try:
        for parent in (b"/", b"/etc", b"/opq", b"/none"):
            listed.listing(0, parent)
        queries: list[bytes] = []
        real = listed.store

        def counting() -> Store:
            queries.append(b"q")
            return real()

        listed.store = counting  # type: ignore[method-assign]
        for parent, name in [(b"/", b"a"), (b"/", b"etc"), (b"/etc", b"gone"),
                             (b"/etc", b"passwd"), (b"/opq", b"old"), (b"/opq", b"x"),
                             (b"/none", b"y"), (b"/", b"missing")]:  # fmt: skip
            assert listed.entries(parent, name) == asked.entries(parent, name), (parent, name)
            for li in range(2):
                assert listed.entry(li, parent, name) == asked.entry(li, parent, name)
        assert queries == [], "a listed directory answers without a query"
        assert asked.entries(b"/etc", b"gone").keys() == {0, 1}
    finally:
        asked.close()
        listed.close()


def test_inode_numbers_survive_hash_collisions(
    view: StoreView, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("unionfs.core.storelayer._INO_MASK", 7)  # 7 numbers: collisions
    names = [b"/p%d" % i for i in range(7)]
    first = [view.ino(0, n) for n in names]
    assert sorted(first) == list(range(1, 8)), "distinct numbers while there are free ones"
    assert [view.ino(0, n) for n in reversed(names)] == first[::-1], "stable when asked again"
    assert view.ino(1, names[0]) == view.ino(1, names[0]), "per layer"


def test_caches_stay_bounded_and_evicting_changes_no_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 30 directories of 20 names in two layers (the upper one replacing, deleting and adding
    # names), walked once with the caches' usual bounds and once with tiny ones.
    low, up = [d(".")], []
    for i in range(30):
        low += [d(f"d{i}"), *(f(f"d{i}/n{j}", b"low %d %d\n" % (i, j)) for j in range(20))]
        up += [f(f"d{i}/n0", b"up %d\n" % i), wh(f"d{i}/n1"), f(f"d{i}/new", b"new\n")]
    write_oci(tmp_path / "img", Img([layer_tar(low), layer_tar(up)], ref="v1"))
    with Store(tmp_path / "store") as store:
        import_source(store, source_images(f"oci:{tmp_path / 'img'}:v1"), ["t:v1"])
        ids = [layer.id for layer in reversed(store.image_layers("t:v1"))]
        roomy = StoreView.prepare(store, ids)
        tight = StoreView.prepare(store, ids)
    try:
        fs_roomy = UnionFS(roomy.layers, None)
        want = observe(fs_roomy)
        assert len(want) == 30 + 30 * 20 and want[b"d3/n0"] == b"up 3\n"
        assert b"d3/n1" not in want and want[b"d3/n2"] == b"low 3 2\n"
        bounds = {"LOOKUP_CACHE": 8, "CONVERTED_CACHE": 8, "LISTING_CACHE": 4, "LISTED_NAMES": 30}
        for name, value in bounds.items():
            monkeypatch.setattr(f"unionfs.core.storelayer.{name}", value)
        fs = UnionFS(tight.layers, None)
        fs.lower_index.size = 3
        assert observe(fs) == want
        # Names looked up one by one, outside any listing, in every directory: the same
        # attributes and inode numbers as with roomy caches.
        for i in range(30):
            got, exp = (
                x.lookup(x.lookup(ROOT_INO, b"d%d" % i).ino, b"n5").st for x in (fs, fs_roomy)
            )
            assert (got.mode, got.size, got.host_ino) == (exp.mode, exp.size, exp.host_ino)
        assert len(tight._lookups) <= 8 and len(tight._converted) <= 8
        assert len(tight._listings) <= 4
        assert tight._listed_names <= 30 + 2 * 21 and len(tight._listed) <= 2
        assert len(fs.lower_index._dirs) <= 3
    finally:
        roomy.close()
        tight.close()
