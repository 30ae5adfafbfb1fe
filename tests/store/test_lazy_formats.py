"""Lazy layer formats: our eStargz and zstd:chunked writers, both TOC readers, chunk checks.

The oracle for the TOC is the tar itself: the entries read from a verified TOC must equal
what tarstream.read_layer gives for the blob's decompressed tar, and every file's chunks,
fetched and verified, must give the file's bytes. The outputs must be ordinary gzip/zstd
tars: Python's tarfile and `umoci unpack` read them to the tree of the source layer.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import xxhash
import zstandard

from layerstore.errors import LayerError
from layerstore.lazy import estargz, zstdchunked
from layerstore.lazy.fetch import ChunkError, ChunkFetcher, ContentSink, FileSource
from layerstore.lazy.model import (
    ESTARGZ,
    ZSTD_CHUNKED,
    LazyLayer,
    build_layer,
    format_time,
    parse_time,
)
from layerstore.lazy.write import Written, convert, walk
from layerstore.model import Entry, EntryKind
from layerstore.ocibuild import M, d, f, hard, layer_tar, sym, wh
from layerstore.store import Store
from layerstore.tarstream import read_layer
from tests.conftest import require_tool

FORMATS = (ESTARGZ, ZSTD_CHUNKED)
CHUNK = 3000  # small chunks, so that files of a few KiB are split


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sample_members() -> list[M]:
    return [
        d("etc", mtime=1_600_000_000),
        f("etc/os-release", b"NAME=lazy\n", mode=0o644),
        f("etc/empty"),
        f("etc/big", _rand(10_000, 1), uid=1000, gid=1000, pax={"mtime": "1600000000.123456789"}),
        f("etc/exact", _rand(2 * CHUNK, 2)),
        f("etc/zeros", bytes(7000)),
        hard("etc/big-link", "etc/big"),
        sym("etc/l", "os-release"),
        d("usr"),
        d("usr/bin", mode=0o750),
        f("usr/bin/tool", _rand(500, 3), mode=0o4755, pax={"SCHILY.xattr.user.k": "v\x01"}),
        wh("usr/gone"),
        f("usr/.wh..wh..opq"),
        M("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3),
        M("fifo", tarfile.FIFOTYPE),
        f("utf8-\u00e9t\u00e9", b"accents"),
    ]


def written(
    tmp: Path, fmt: str, members: list[M] | None = None, **kw: Any
) -> tuple[bytes, Path, Written]:
    """(source tar, blob path, result) of converting the sample layer."""
    tar = layer_tar(members or sample_members())
    blob = tmp / f"blob-{fmt.replace(':', '-')}"
    with open(blob, "wb") as out:
        w = convert(io.BytesIO(tar), out, fmt, chunk_size=CHUNK, **kw)
    return tar, blob, w


def open_lazy(blob: Path, w: Written, fmt: str) -> LazyLayer:
    src = FileSource(blob)
    mod = estargz if fmt == ESTARGZ else zstdchunked
    return mod.read_toc(w.annotations, w.digest, blob.stat().st_size, src.read_at)


def decompressed(blob: bytes, fmt: str) -> bytes:
    if fmt == ESTARGZ:
        return gzip.decompress(blob)
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True)
    return reader.read()


def entries_of(tar: bytes) -> list[Entry]:
    out = []
    for e, fobj in read_layer(io.BytesIO(tar)):
        if fobj is not None:
            fobj.read()
        out.append(e)
    return out


def files_of(tar: bytes) -> dict[bytes, bytes]:
    out = {}
    for e, fobj in read_layer(io.BytesIO(tar)):
        if e.kind == EntryKind.FILE:
            assert fobj is not None
            out[e.path] = fobj.read()
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_written_blob_is_a_plain_tar_with_a_verified_toc(tmp_path: Path, fmt: str) -> None:
    tar, blob, w = written(tmp_path, fmt)
    data = blob.read_bytes()
    assert w.digest == "sha256:" + hashlib.sha256(data).hexdigest() and w.size == len(data)
    plain = decompressed(data, fmt)
    assert w.diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    if fmt == ZSTD_CHUNKED:
        assert plain == tar  # headers copied byte for byte: the DiffID is kept
    if fmt == ESTARGZ:  # Python's tarfile reads gzip itself
        with (
            tarfile.open(fileobj=io.BytesIO(data)) as tf,
            tarfile.open(fileobj=io.BytesIO(tar)) as st,
        ):
            names = tf.getnames()
            assert names == [estargz.NO_PREFETCH_LANDMARK, *st.getnames(), estargz.TOC_NAME]

    lazy = open_lazy(blob, w, fmt)
    assert lazy.toc_digest == w.toc_digest and lazy.prefetch == ()
    # The TOC describes exactly the tar that a full pull reads.
    assert list(lazy.entries) == entries_of(plain)
    # Every file's chunks, fetched and verified, give its bytes, stored under the usual key.
    want = files_of(plain)
    if fmt == ESTARGZ:
        toc_path = b"/" + estargz.TOC_NAME.encode()
        assert lazy.inline == {toc_path: want.pop(toc_path)}
    with Store(tmp_path / "store") as st:
        with ContentSink(st) as sink:
            fetcher = ChunkFetcher(lazy, FileSource(blob), sink)
            got = fetch_all(fetcher, lazy, want)
        assert len(lazy.files[b"/etc/big"].chunks) == 4
        assert [c.zeros for c in lazy.files[b"/etc/zeros"].chunks] == [False] * 3
        keys = {r[0] for r in st.conn.execute("SELECT key FROM contents WHERE refs = 0")}
        assert keys == got  # the two 3000-byte runs of zeros are one content
        assert st.fsck(full=True) == []  # (the sink, closed, no longer holds the lock)
        assert not list(st.tmp_dir.iterdir())


def fetch_all(fetcher: ChunkFetcher, lazy: LazyLayer, want: dict[bytes, bytes]) -> set[str]:
    """Read every file through the fetcher, check its bytes and keys; return the keys."""
    got: set[str] = set()
    for path, body in want.items():
        lf = lazy.files[path]
        assert lf.size == len(body)
        assert fetcher.read(lf, 0, lf.size) == body
        assert fetcher.read(lf, 2999, 2) == body[2999:3001]
        for c in lf.chunks:
            key = fetcher.fetch(c)
            piece = body[c.file_offset : c.file_offset + c.size]
            assert key == f"{xxhash.xxh3_128_hexdigest(piece)}-{len(piece)}"
            got.add(key)
    return got


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefetch_files_lead_and_are_marked(tmp_path: Path, fmt: str) -> None:
    prio = [b"/usr/bin/tool", b"/etc/big-link", b"/etc/os-release"]
    tar, blob, w = written(tmp_path, fmt, prefetch=prio)
    lazy = open_lazy(blob, w, fmt)
    names = [e.path for e in lazy.entries]
    # parents first, a hard link after its target, then the files in the order asked
    lead = [b"/usr", b"/usr/bin", b"/usr/bin/tool", b"/etc", b"/etc/big", b"/etc/big-link",
            b"/etc/os-release"]  # fmt: skip
    if fmt == ESTARGZ:
        assert names[: len(lead) + 1] == [*lead, b"/" + estargz.PREFETCH_LANDMARK.encode()]
        assert lazy.prefetch == (b"/usr/bin/tool", b"/etc/big", b"/etc/os-release")
    else:
        assert names[: len(lead)] == lead
        assert lazy.prefetch == (b"/usr/bin/tool", b"/etc/big", b"/etc/os-release")
    # Reordered, the tar still unpacks to the same files.
    plain = decompressed(blob.read_bytes(), fmt)
    got = files_of(plain)
    for path, body in files_of(tar).items():
        assert got[path] == body
    # The prioritized files' data lie together at the front of the blob.
    spans = [c.end for p in lazy.prefetch for c in lazy.files[p].chunks]
    rest = [c.offset for p, lf in lazy.files.items() if p not in lazy.prefetch for c in lf.chunks]
    assert max(spans) <= min(rest)


@pytest.mark.parametrize("fmt", FORMATS)
def test_flipped_byte_in_a_chunk_fails_its_digest_and_keeps_nothing(
    tmp_path: Path, fmt: str
) -> None:
    _, blob, w = written(tmp_path, fmt)
    lazy = open_lazy(blob, w, fmt)
    c = lazy.files[b"/etc/os-release"].chunks[0]
    data = bytearray(blob.read_bytes())
    # Every byte of the chunk's range flipped in turn: the fetch either fails and keeps
    # nothing, or gives the right bytes (a flip in a gzip header's mtime, or in the next
    # entries' headers that eStargz ranges include, changes no byte of the file).
    failed = []
    for pos in range(c.offset, min(c.end, c.offset + 40)):
        bad = bytearray(data)
        bad[pos] ^= 0x01
        (tmp_path / "bad").write_bytes(bad)
        with Store(tmp_path / f"store-{pos}") as st, ContentSink(st) as sink:
            fetcher = ChunkFetcher(lazy, FileSource(tmp_path / "bad"), sink)
            try:
                key = fetcher.fetch(c, "etc/os-release")
            except ChunkError as exc:
                assert "\n" not in str(exc)
                failed.append(pos)
                assert st.conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0] == 0
                assert not [p for p in (st.root / "content").rglob("*") if p.is_file()]
                assert not list(st.tmp_dir.iterdir())
            else:
                assert st.content_path(key).read_bytes() == b"NAME=lazy\n"
    # The magic number, and a byte of the compressed data (past a 10-byte gzip header, or a
    # zstd frame header and block header).
    assert c.offset in failed and c.offset + 12 in failed
    # The intact blob still verifies (the failures cached nothing).
    with Store(tmp_path / "store") as st, ContentSink(st) as sink:
        fetcher = ChunkFetcher(lazy, FileSource(blob), sink)
        assert fetcher.read(lazy.files[b"/etc/os-release"], 0, 100) == b"NAME=lazy\n"


@pytest.mark.parametrize("fmt", FORMATS)
def test_toc_digest_mismatch_is_refused(tmp_path: Path, fmt: str) -> None:
    _, blob, w = written(tmp_path, fmt)
    ann = dict(w.annotations)
    other = "sha256:" + "0" * 64
    for k in ann:
        if k.endswith(("manifest-checksum", "toc.digest")):
            ann[k] = other
    mod = estargz if fmt == ESTARGZ else zstdchunked
    with pytest.raises(LayerError) as exc:
        mod.read_toc(ann, w.digest, w.size, FileSource(blob).read_at)
    msg = str(exc.value)
    assert "\n" not in msg and "does not match its annotation" in msg and other in msg
    # A TOC changed in the blob, with the annotation kept, is refused too.
    lazy = open_lazy(blob, w, fmt)
    data = bytearray(blob.read_bytes())
    toc_at = max(c.end for lf in lazy.files.values() for c in lf.chunks)
    data[toc_at + 40] ^= 0x10
    (tmp_path / "bad").write_bytes(data)
    with pytest.raises(LayerError, match="does not match|corrupt|not JSON|no eStargz"):
        mod.read_toc(w.annotations, w.digest, w.size, FileSource(tmp_path / "bad").read_at)


def test_annotations_of_both_spellings_and_garbage(tmp_path: Path) -> None:
    _, blob, w = written(tmp_path, ZSTD_CHUNKED)
    read = FileSource(blob).read_at
    for prefix in zstdchunked.PREFIXES:
        only = {k: v for k, v in w.annotations.items() if k.startswith(prefix)}
        assert zstdchunked.read_toc(only, w.digest, w.size, read).entries
    pos_key = zstdchunked.PREFIXES[0] + zstdchunked.POSITION
    for bad in ("1:2:3", "x:1:1:1", f"{w.size}:10:10:1", "8:999999999999:1:1", "8:10:10:2"):
        ann = dict(w.annotations)
        ann[pos_key] = bad
        ann.pop(zstdchunked.PREFIXES[1] + zstdchunked.POSITION)
        with pytest.raises(LayerError) as exc:
            zstdchunked.read_toc(ann, w.digest, w.size, read)
        assert "\n" not in str(exc.value)


def _toc(entries: list[dict[str, Any]]) -> LazyLayer:
    return build_layer(
        {"version": 1, "entries": entries}, fmt=ZSTD_CHUNKED, compression="zstd",
        blob_digest="sha256:" + "1" * 64, blob_size=1000, toc_digest="sha256:" + "2" * 64,
        payload_end=900,
    )  # fmt: skip


DG = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("entries", "why"),
    [
        (
            [{"type": "reg", "name": "f", "size": 5, "offset": 10, "endOffset": 950, "digest": DG}],
            "outside the blob",
        ),
        (
            [{"type": "reg", "name": "f", "size": 5, "offset": 10, "endOffset": 20}],
            "without a digest",
        ),
        (
            [
                {
                    "type": "reg",
                    "name": "f",
                    "size": 10,
                    "offset": 10,
                    "endOffset": 30,
                    "digest": DG,
                    "chunkSize": 4,
                    "chunkDigest": DG,
                },
                {
                    "type": "chunk",
                    "name": "f",
                    "offset": 20,
                    "chunkOffset": 5,
                    "chunkSize": 5,
                    "chunkDigest": DG,
                },
            ],
            "do not tile",
        ),
        ([{"type": "chunk", "name": "f", "offset": 20}], "does not follow"),
        ([{"type": "reg", "name": "../x"}], "escapes"),
        ([{"type": "reg", "name": "/abs"}], "absolute"),
        ([{"type": "dir", "name": "d", "uid": 1 << 32}], "out of range"),
        ([{"type": "socket", "name": "s"}], "unknown type"),
        ([{"type": "hardlink", "name": "h", "linkName": "h"}], "itself"),
        ([{"type": "reg", "name": "f", "modtime": "yesterday"}], "bad modtime"),
        ([{"type": "reg", "name": "f", "xattrs": {"user.a": "!!"}}], "base64"),
        ([{"type": "reg", "name": "f", "size": "5"}], "not an integer"),
    ],  # fmt: skip
)
def test_hostile_toc_is_refused(entries: list[dict[str, Any]], why: str) -> None:
    with pytest.raises(LayerError, match=why):
        _toc(entries)


def test_toc_whiteouts_and_times_convert_like_tar_headers() -> None:
    lazy = _toc(
        [
            {"type": "reg", "name": "a/.wh.b", "modtime": "2020-09-13T12:26:40Z"},
            {"type": "reg", "name": "a/.wh..wh..opq"},
            {"type": "reg", "name": "a/.wh..wh.plnk"},
            {"type": "dir", "name": "./", "modtime": "0001-01-01T00:00:00Z"},
        ]
    )
    assert [(e.path, e.kind, e.opaque, e.mtime_ns) for e in lazy.entries] == [
        (b"/a/b", EntryKind.WHITEOUT, False, 1_600_000_000 * 10**9),
        (b"/a", EntryKind.DIR, True, 0),
        (b"/", EntryKind.DIR, False, 0),
    ]
    for ns in (0, 1, 1_600_000_000_123_456_789, -5 * 10**9, 9_000_000_000 * 10**9 + 7):
        assert parse_time(format_time(ns), "t") == ns
    assert parse_time("2020-09-13T14:26:40.5+02:00", "t") == 1_600_000_000_500_000_000


def test_convert_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    for members, why in (
        ([f(estargz.TOC_NAME, b"{}")], "reserved"),
        ([f(b"bad-\xff", b"x")], "not UTF-8"),
    ):
        with pytest.raises(LayerError, match=why):
            convert(io.BytesIO(layer_tar(members)), io.BytesIO(), ESTARGZ)


# ---- real tools -----------------------------------------------------------------------------


def _layout(root: Path, blob: bytes, desc: dict[str, Any], diff_id: str) -> None:
    """An OCI layout with one image of one layer (`blob`, described by `desc`)."""
    (root / "blobs" / "sha256").mkdir(parents=True)

    def put(data: bytes) -> str:
        dg = "sha256:" + hashlib.sha256(data).hexdigest()
        (root / "blobs" / "sha256" / dg[7:]).write_bytes(data)
        return dg

    cfg = json.dumps(
        {"architecture": "amd64", "os": "linux", "config": {},
         "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    ).encode()  # fmt: skip
    man = json.dumps(
        {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": put(cfg), "size": len(cfg)},
         "layers": [dict(desc, digest=put(blob), size=len(blob))]}
    ).encode()  # fmt: skip
    ref = {"org.opencontainers.image.ref.name": "v1"}
    idx = {"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": put(man),
         "size": len(man), "annotations": ref}]}  # fmt: skip
    (root / "index.json").write_text(json.dumps(idx))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def _tree(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(dirpath) / n
            st = p.lstat()
            body = (
                p.read_bytes()
                if p.is_file() and not p.is_symlink()
                else os.readlink(p).encode()
                if p.is_symlink()
                else b""
            )
            out[str(p.relative_to(root))] = (st.st_mode, st.st_uid, body)
    return out


@pytest.mark.tools
@pytest.mark.parametrize("fmt", FORMATS)
def test_umoci_unpacks_our_blobs_to_the_source_tree(tmp_path: Path, fmt: str) -> None:
    """umoci (Go's archive/tar, gzip; skopeo's zstd) unpacks our blob to the source's tree."""
    require_tool("umoci")
    if os.geteuid() != 0:
        pytest.skip("umoci unpack of device files needs root")
    members = [m for m in sample_members() if not m.name.startswith(("usr/.wh", "usr/bin/tool"))]
    tar, blob, w = written(tmp_path, fmt, members, prefetch=[b"/etc/os-release"])
    trees = []
    for name, data, desc, diff in (
        ("src", gzip.compress(tar, mtime=0),
         {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"},
         "sha256:" + hashlib.sha256(tar).hexdigest()),
        ("lazy", blob.read_bytes(), {"mediaType": w.media_type, "annotations": w.annotations},
         w.diff_id),
    ):  # fmt: skip
        _layout(tmp_path / name, data, desc, diff)
        image = f"{tmp_path / name}:v1"
        if desc["mediaType"].endswith("zstd"):
            # umoci 0.4 reads no zstd: Go's zstd decoder (skopeo's) turns ours into gzip.
            require_tool("skopeo")
            subprocess.run(
                ["skopeo", "copy", "--dest-compress-format", "gzip", f"oci:{image}",
                 f"oci:{tmp_path / 'gz'}:v1"], check=True, capture_output=True,
            )  # fmt: skip
            image = f"{tmp_path / 'gz'}:v1"
        subprocess.run(
            ["umoci", "unpack", "--image", image, str(tmp_path / f"b-{name}")],
            check=True, capture_output=True,
        )  # fmt: skip
        trees.append(_tree(tmp_path / f"b-{name}" / "rootfs"))
    src, lazy = trees
    if fmt == ESTARGZ:  # the two files every eStargz blob adds
        for extra in (estargz.TOC_NAME, estargz.PREFETCH_LANDMARK):
            assert lazy.pop(extra)[2] != b""
    assert lazy == src


def _skopeo_layer(tmp_path: Path, tar: bytes) -> tuple[bytes, dict[str, Any]]:
    """Our layer converted by `skopeo copy --dest-compress-format zstd:chunked`."""
    require_tool("skopeo")
    _layout(
        tmp_path / "src", gzip.compress(tar, mtime=0),
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"},
        "sha256:" + hashlib.sha256(tar).hexdigest(),
    )  # fmt: skip
    subprocess.run(
        ["skopeo", "copy", "--dest-compress-format", "zstd:chunked",
         f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:v1"],
        check=True, capture_output=True,
    )  # fmt: skip
    idx = json.loads((tmp_path / "dst" / "index.json").read_text())
    blobs = tmp_path / "dst" / "blobs" / "sha256"
    man = json.loads((blobs / idx["manifests"][0]["digest"][7:]).read_bytes())
    desc = man["layers"][0]
    return (blobs / desc["digest"][7:]).read_bytes(), desc


@pytest.mark.tools
def test_skopeo_zstd_chunked_layer_reads_lazily(tmp_path: Path) -> None:
    tar = layer_tar(sample_members() + [f(f"many/{i}", _rand(300, i)) for i in range(50)])
    data, desc = _skopeo_layer(tmp_path, tar)
    assert zstdchunked.is_zstd_chunked(desc["annotations"])
    (tmp_path / "blob").write_bytes(data)
    src = FileSource(tmp_path / "blob")
    lazy = zstdchunked.read_toc(desc["annotations"], desc["digest"], len(data), src.read_at)
    assert list(lazy.entries) == entries_of(tar)
    with Store(tmp_path / "store") as st, ContentSink(st) as sink:
        fetcher = ChunkFetcher(lazy, src, sink)
        for path, body in files_of(tar).items():
            assert fetcher.read(lazy.files[path], 0, len(body) + 1) == body
        # A byte flipped in one file's frame: that file fails, the others still read.
        c = lazy.files[b"/many/7"].chunks[0]
        bad = bytearray(data)
        bad[(c.offset + c.end) // 2] ^= 0xFF
        (tmp_path / "bad").write_bytes(bad)
        before = st.conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0]
        broken = ChunkFetcher(lazy, FileSource(tmp_path / "bad"), sink)
        with pytest.raises(ChunkError):
            broken.read(lazy.files[b"/many/7"], 0, 1)
        assert st.conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0] == before
        assert broken.read(lazy.files[b"/many/8"], 0, 300) == files_of(tar)[b"/many/8"]


def test_fetcher_single_flight(tmp_path: Path) -> None:
    """Threads reading one chunk at once cause one read of the source."""
    import threading

    _, blob, w = written(tmp_path, ZSTD_CHUNKED)
    lazy = open_lazy(blob, w, ZSTD_CHUNKED)
    gate = threading.Event()
    opened: list[int] = []

    class Slow(FileSource):
        def open_range(self, offset: int, end: int) -> Any:
            opened.append(offset)
            gate.wait(10)
            return super().open_range(offset, end)

    with Store(tmp_path / "store") as st, ContentSink(st) as sink:
        fetcher = ChunkFetcher(lazy, Slow(blob), sink)
        c = lazy.files[b"/etc/os-release"].chunks[0]
        keys: list[str] = []
        threads = [threading.Thread(target=lambda: keys.append(fetcher.fetch(c))) for _ in range(8)]
        for t in threads:
            t.start()
        while not opened:
            gate.wait(0.01)
        gate.set()
        for t in threads:
            t.join(10)
        assert len(keys) == 8 and len(set(keys)) == 1
        assert opened == [c.offset] and fetcher.fetches == 1


def _with_tar_split(
    blob: bytes, w: Written, tar: bytes, corrupt: bool = False
) -> tuple[bytes, dict[str, str]]:
    """Our zstd:chunked blob given a tar-split (as current containers/storage writes one):
    JSON lines of raw segments and file records, zstd-compressed in a skippable frame after
    the TOC, its digest in the TOC, its place in an annotation."""
    members, _ = walk(io.BytesIO(tar))
    lines, cur = [], 0
    for m in members:
        if m.size:
            seg = tar[cur : m.data]
            lines.append(
                {"type": 2, "payload": base64.b64encode(seg).decode(), "position": len(lines)}
            )
            lines.append(
                {
                    "type": 1,
                    "name": m.info.name.decode(),
                    "size": m.size,
                    "payload": "",
                    "position": len(lines),
                }
            )
            cur = m.data + m.size
    lines.append(
        {"type": 2, "payload": base64.b64encode(tar[cur:]).decode(), "position": len(lines)}
    )
    split = b"".join(json.dumps(x).encode() + b"\n" for x in lines)
    packed_split = zstandard.ZstdCompressor().compress(split)
    pos = w.annotations[zstdchunked.PREFIXES[0] + zstdchunked.POSITION]
    off, length, ulen, _ = (int(x) for x in pos.split(":"))
    toc = json.loads(
        zstandard.ZstdDecompressor().decompress(blob[off : off + length], max_output_size=ulen)
    )
    toc["tarSplitDigest"] = "sha256:" + hashlib.sha256(packed_split).hexdigest()
    if corrupt:
        packed_split = zstandard.ZstdCompressor(level=1).compress(split + b"\n")
    plain = json.dumps(toc).encode()
    packed = zstandard.ZstdCompressor().compress(plain)
    out = bytearray(blob[: off - 8])
    toc_off = len(out) + 8
    out += zstdchunked.skippable(packed)
    split_off = len(out) + 8
    out += zstdchunked.skippable(packed_split)
    out += zstdchunked.footer(toc_off, len(packed), len(plain))
    p = zstdchunked.PREFIXES[0]
    ann = {
        p + zstdchunked.POSITION: f"{toc_off}:{len(packed)}:{len(plain)}:1",
        p + zstdchunked.CHECKSUM: "sha256:" + hashlib.sha256(packed).hexdigest(),
        p + zstdchunked.TARSPLIT: f"{split_off}:{len(packed_split)}:{len(split)}",
    }
    return bytes(out), ann


def test_zstd_chunked_tar_split_is_verified_and_rebuilds_the_tar(tmp_path: Path) -> None:
    tar, blob, w = written(tmp_path, ZSTD_CHUNKED)
    data, ann = _with_tar_split(blob.read_bytes(), w, tar)
    (tmp_path / "ts").write_bytes(data)
    read = FileSource(tmp_path / "ts").read_at
    lazy = zstdchunked.read_toc(ann, "sha256:" + "3" * 64, len(data), read)
    assert lazy.tar_split is not None
    files = files_of(tar)
    rebuilt = b"".join(
        r.data if r.kind == zstdchunked.SPLIT_SEGMENT else files[b"/" + r.name.rstrip(b"/")]
        for r in zstdchunked.split_records(lazy.tar_split)
    )
    assert rebuilt == tar
    # The blob stays an ordinary zstd tar (skippable frames are skipped).
    assert decompressed(data, ZSTD_CHUNKED) == tar
    bad, ann = _with_tar_split(blob.read_bytes(), w, tar, corrupt=True)
    (tmp_path / "bad").write_bytes(bad)
    with pytest.raises(LayerError, match="tar-split digest does not match"):
        zstdchunked.read_toc(ann, w.digest, len(bad), FileSource(tmp_path / "bad").read_at)
    with pytest.raises(LayerError, match="bad type or position"):
        zstdchunked.split_records(b'{"type": 2, "payload": "", "position": 5}\n')
