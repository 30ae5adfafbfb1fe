"""The import's worker threads (read-ahead, content writers, parallel links) and what the
import does with their results: same bytes, errors raised in the caller, store reuse counted."""

from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path

import pytest

from layerstore.ingest import import_source
from layerstore.ocibuild import Img, d, f, layer_tar, write_oci
from layerstore.pipeline import PARALLEL_MIN, ContentWriter, ReadAhead, link_all
from layerstore.sources import source_images
from layerstore.store import Store

DATA = os.urandom(3 << 20) + b"tail"


class _Failing:
    """A source giving `good` bytes, then raising."""

    def __init__(self, good: bytes, exc: Exception) -> None:
        self._src = io.BytesIO(good)
        self._exc = exc

    def read(self, n: int = -1, /) -> bytes:
        data = self._src.read(n)
        if not data:
            raise self._exc
        return data


def _worker_threads() -> set[str]:
    return {t.name for t in threading.enumerate() if t.name.startswith("layerfs-")}


@pytest.mark.parametrize("n", [1, 511, 10240, 1 << 20, -1])
def test_read_ahead_gives_the_stream_unchanged_and_reports_progress(n: int) -> None:
    src = io.BytesIO(DATA)
    ticks: list[int] = []
    r = ReadAhead(src, src.tell, ticks.append)
    out = bytearray()
    limit = 20_000 if n == 1 else len(DATA)  # one-byte reads: a prefix is enough
    while len(out) < limit and (chunk := r.read(n)):
        assert n < 0 or len(chunk) <= n
        out += chunk
    if n == 1:
        assert bytes(out) == DATA[: len(out)]
    else:
        assert bytes(out) == DATA and r.read(n) == b""
        assert sum(ticks) == len(DATA)
    r.close()
    assert "layerfs-read" not in _worker_threads()


def test_read_ahead_raises_the_source_error_after_the_bytes_before_it() -> None:
    r = ReadAhead(_Failing(b"x" * 100, OSError(5, "boom")))
    assert r.read(1000) == b"x" * 100
    with pytest.raises(OSError, match="boom"):
        r.read(1000)
    r.close()


def test_read_ahead_closed_early_stops_its_worker() -> None:
    r = ReadAhead(io.BytesIO(DATA * 8))  # more than it may read ahead
    assert r.read(10) == DATA[:10]
    r.close()
    assert "layerfs-read" not in _worker_threads()
    assert r.read(10) == b""


def test_content_writer_creates_read_only_files_or_finds_them(tmp_path: Path) -> None:
    have = tmp_path / "have"
    have.write_bytes(b"same")
    w = ContentWriter()
    w.write("k1", str(tmp_path / "a"), b"same", str(have))  # in `have`: not written
    w.write("k2", str(tmp_path / "b"), b"other", str(have))  # differs: written
    w.write("k3", str(tmp_path / "c"), b"", str(tmp_path / "missing"))
    w.close()
    assert w.found == {"k1"}
    assert not (tmp_path / "a").exists()
    assert (tmp_path / "b").read_bytes() == b"other"
    assert (tmp_path / "c").read_bytes() == b""
    assert stat.S_IMODE((tmp_path / "b").stat().st_mode) == 0o444
    assert w.pending(str(tmp_path / "b")) is None
    assert not any(n.startswith("layerfs-write") for n in _worker_threads())


def test_content_writer_error_is_raised_by_the_caller(tmp_path: Path) -> None:
    w = ContentWriter()
    w.write("k", str(tmp_path / "no-such-dir" / "x"), b"data", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError):
        w.close()
    w.abort()  # after close: nothing left to stop


def test_content_writer_abort_drops_what_is_queued(tmp_path: Path) -> None:
    w = ContentWriter()
    (tmp_path / "d").mkdir()
    for i in range(500):
        w.write(f"k{i}", str(tmp_path / "d" / str(i)), b"x" * 100, str(tmp_path / "none"))
    w.abort()
    assert not any(n.startswith("layerfs-write") for n in _worker_threads())
    assert len(os.listdir(tmp_path / "d")) <= 500
    w.check()  # no error: dropped jobs are not failures


@pytest.mark.parametrize("count", [3, PARALLEL_MIN + 5])
def test_link_all_tries_every_pair_and_reports_each(tmp_path: Path, count: int) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    pairs = []
    for i in range(count):
        (src / str(i)).write_bytes(b"%d" % i)
        pairs.append((str(src / str(i)), str(dst / str(i))))
    (dst / "1").write_bytes(b"taken")
    pairs.append((str(src / "missing"), str(dst / "m")))
    res = link_all(pairs)
    assert len(res) == len(pairs)
    assert isinstance(res[1], FileExistsError)
    assert isinstance(res[-1], FileNotFoundError)
    assert all(r is None for i, r in enumerate(res[:-1]) if i != 1)
    assert (dst / "0").stat().st_ino == (src / "0").stat().st_ino
    assert (dst / "1").read_bytes() == b"taken"


def test_store_contents_found_by_the_writer_are_reused_and_counted(tmp_path: Path) -> None:
    shared = {f"s{i}": os.urandom(300 + i) for i in range(40)}
    one = layer_tar([d("a")] + [f(f"a/{n}", b) for n, b in shared.items()])
    new = os.urandom(5000)
    # Another layer (other DiffID) with the same bytes under other names, one new file, and
    # one content twice (the second copy is compared with the first, found in the store).
    two = layer_tar(
        [d("b")]
        + [f(f"b/{n}", b) for n, b in shared.items()]
        + [f("b/new", new), f("b/again", shared["s7"])]
    )
    write_oci(tmp_path / "img", Img([one], ref="one"), Img([two], ref="two"))
    with Store(tmp_path / "store") as st:
        for ref in ("one", "two"):
            import_source(st, source_images(f"oci:{tmp_path / 'img'}:{ref}"), [])
        (l1,) = st.image_layers("img:one")
        (l2,) = st.image_layers("img:two")
        assert l1.new_bytes == sum(len(b) for b in shared.values())
        assert l2.new_bytes == len(new)
        assert st.df()["stored_bytes"] == l1.new_bytes + len(new)
        for n in ("s0", "s7", "s39"):
            e1 = st.layer_lookup(l1.id, b"/a", n.encode())
            e2 = st.layer_lookup(l2.id, b"/b", n.encode())
            assert e1 is not None and e2 is not None and e1.content == e2.content
        again = st.layer_lookup(l2.id, b"/b", b"again")
        assert (
            again is not None
            and st.content_path(again.content or "").read_bytes() == (shared["s7"])
        )
        assert st.fsck(full=True) == []
        assert list((tmp_path / "store" / "tmp").iterdir()) == []
