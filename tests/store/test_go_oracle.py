"""Layers read as Go's archive/tar reads them: a corpus of tars from real producers and
hand-damaged ones, compared member by member with a Go lister built from Debian's golang-go,
and as images (layerfs unpack and a read-only mount) with `umoci unpack`."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerstore.blobs import DecompressingReader, PeekReader
from layerstore.errors import LayerError
from layerstore.ocibuild import M, layer_tar
from layerstore.paths import normalize
from layerstore.tarreader import TarReader
from tests import images, tarcorpus
from tests.conftest import require_fuse, require_root, require_tool
from tests.image_fixtures import image_snapshot, layerfs, layerfs_ok
from tests.mount.test_image_mount import image_mount
from tests.store.test_umoci_oracle import oracle_diff
from tests.treecmp import Node

pytestmark = pytest.mark.tools

GOLISTER = Path(__file__).resolve().parents[1] / "support" / "golister" / "main.go"
Member = dict[str, Any]


@pytest.fixture(scope="session")
def golister(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Go lister, built once per session offline (standard library only)."""
    go = require_tool("go")
    work = tmp_path_factory.mktemp("golister")
    env = {
        **os.environ,
        "GOCACHE": str(work / "cache"),
        "GOPATH": str(work / "gopath"),
        "GOTOOLCHAIN": "local",
        "GOPROXY": "off",
        "GO111MODULE": "off",
        "GOFLAGS": "",
    }
    out = work / "golister"
    subprocess.run([go, "build", "-o", str(out), str(GOLISTER)], env=env, check=True, cwd=work)
    return out


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the corpus is built: its source trees are `common/` and `rich/` in there."""
    return tmp_path_factory.mktemp("tar-corpus")


@pytest.fixture(scope="session")
def corpus(corpus_dir: Path) -> dict[str, bytes]:
    require_root()  # the source trees hold devices, foreign owners and set-id files
    require_tool("tar")
    require_tool("bsdtar")
    cases = tarcorpus.corpus(corpus_dir)
    assert sorted(cases) == sorted(tarcorpus.CASES)
    return cases


def go_read(golister: Path, tar: bytes) -> tuple[list[Member], str | None]:
    """Go's reading: the members (each with the SHA-256 of its data) and the error, if any."""
    proc = subprocess.run([golister], input=tar, capture_output=True, check=True)
    members: list[Member] = []
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        if "end" in rec:
            return members, None
        if "error" in rec:
            return members, str(rec["error"])
        b64 = {k: base64.b64decode(rec[k] or "") for k in ("name", "linkname")}
        members.append(
            {
                **{k: rec[k] for k in ("size", "mode", "uid", "gid", "devmajor", "devminor")},
                **b64,
                "type": bytes([rec["type"]]),
                "mtime_ns": rec["mtime_s"] * 1_000_000_000 + rec["mtime_nsec"],
                "xattrs": [(base64.b64decode(k), base64.b64decode(v)) for k, v in rec["xattrs"]],
                "sha256": rec["sha256"],
            }
        )
    raise AssertionError(f"the Go lister ended without a verdict: {proc.stdout[-200:]!r}")


def our_read(tar: bytes) -> tuple[list[Member], str | None]:
    """layerstore.tarreader's reading, in the same shape."""
    reader = TarReader(io.BytesIO(tar))
    members: list[Member] = []
    try:
        while (m := reader.next()) is not None:
            rec: Member = {
                "type": m.type,
                "name": m.name,
                "linkname": m.linkname,
                "size": m.size,
                "mode": m.mode,
                "uid": m.uid,
                "gid": m.gid,
                "devmajor": m.devmajor,
                "devminor": m.devminor,
                "mtime_ns": m.mtime_ns,
                "xattrs": list(m.xattrs),
            }
            members.append(rec)
            h = hashlib.sha256()
            while chunk := reader.read(1 << 20):
                h.update(chunk)
            rec["sha256"] = h.hexdigest()
    except LayerError as exc:
        return members, str(exc)
    return members, None


# A global header: Go returns it with only its name (its PAX `path`) and records set.
_GLOBAL_FIELDS = ("type", "name", "xattrs")


def _comparable(members: list[Member], error: str | None) -> list[Member]:
    out = []
    for i, m in enumerate(members):
        if m["type"] == b"g":
            m = {k: m[k] for k in _GLOBAL_FIELDS}
        if error is not None and i == len(members) - 1:
            m = {k: v for k, v in m.items() if k != "sha256"}  # its data failed midway
        out.append(m)
    return out


@pytest.mark.parametrize("name", tarcorpus.CASES)
def test_reader_reads_every_member_as_go_does(
    golister: Path, corpus: dict[str, bytes], name: str
) -> None:
    tar = corpus[name]
    want, go_error = go_read(golister, tar)
    got, error = our_read(tar)
    assert (error is None) == (go_error is None), f"Go: {go_error!r}, layerfs: {error!r}"
    assert _comparable(got, error) == _comparable(want, go_error)
    if error is not None:
        assert "\n" not in error
    assert (name in tarcorpus.REFUSED) == (go_error is not None)  # the corpus means what it says


# ---- as images: layerfs unpack and mount vs umoci unpack ---------------------------------


def _layout(corpus: dict[str, bytes], work: Path, name: str) -> Path:
    """An OCI layout whose image `t` has the case's tar as its one layer, byte for byte."""
    layout = images.init_layout(work / "layout")
    images.run(["umoci", "new", "--image", f"{layout}:t"])
    tar = work / f"{name}.tar"
    tar.write_bytes(corpus[name])
    images.run(["umoci", "raw", "add-layer", "--no-history", "--image", f"{layout}:t", tar])
    return layout


_KINDS = {b"0": "file", b"7": "file", b"S": "file", b"5": "dir", b"2": "symlink"}
_KINDS |= {b"3": "char", b"4": "block", b"6": "fifo"}


def _tree_from_go(members: list[Member], ours: dict[bytes, Node]) -> dict[bytes, Node]:
    """The tree Go's reading of a layer makes, for layers umoci refuses to unpack (a member of
    type S, 7, g or an unknown one) although Go reads them: each member's metadata and data
    as Go gives them, a hard link as its target (no case using this repeats a path);
    directories only implied by a path take what our tree shows (their metadata is not in
    the image)."""
    tree: dict[bytes, Node] = {}
    links: dict[bytes, list[bytes]] = {}
    for m in members:
        if m["type"] not in _KINDS and m["type"] != b"1":
            continue  # g, and unknown types: skipped (with a warning for the latter)
        rel = normalize(m["name"]).lstrip(b"/") or b"."
        if m["type"] == b"1":
            target = normalize(m["linkname"]).lstrip(b"/")
            links.setdefault(target, [target]).append(rel)
            tree[rel] = tree[target]
            continue
        kind = _KINDS[m["type"]]
        tree[rel] = Node(
            kind,
            0o777 if kind == "symlink" else m["mode"] & 0o7777,
            m["uid"],
            m["gid"],
            m["size"] if kind == "file" else len(m["linkname"]) if kind == "symlink" else None,
            m["sha256"] if kind == "file" else None,
            m["linkname"] if kind == "symlink" else None,
            None if kind == "dir" else 1,
            tuple(m["xattrs"]),
            (m["devmajor"], m["devminor"]) if kind in ("char", "block") else None,
            m["mtime_ns"],
        )
    for group in links.values():
        for rel in group:
            tree[rel] = dataclasses.replace(tree[rel], nlink=len(group))
    for path in list(tree):
        while b"/" in path:
            path = path.rsplit(b"/", 1)[0]
            if path not in tree and path in ours:
                tree[path] = ours[path]
    if b"." not in tree:
        tree[b"."] = ours[b"."]
    return tree


# Mounted as well as unpacked (the mount shows what the index holds, as unpack does; a mount
# of every case would double this module's time): every producer, and the hand-made cases
# whose metadata the mount presents in its own way.
MOUNTED = (
    *tarcorpus.PRODUCERS, "unpadded-last-member", "pax-empty-values", "pax-overrides",
    "symlink-with-size", "same-path-twice", "parents-never-appear", "sparse-pax-1.0-by-hand",
)  # fmt: skip


@pytest.mark.mount
@pytest.mark.parametrize("name", tarcorpus.READABLE)
def test_unpack_and_mount_equal_umoci(
    golister: Path, corpus: dict[str, bytes], tmp_path: Path, name: str
) -> None:
    layout = _layout(corpus, tmp_path, name)
    store = tmp_path / "store"
    if name in MOUNTED:
        require_fuse()
        ours, mounted = _import_unpack_mount(store, f"oci:{layout}:t", tmp_path)
    else:
        layerfs_ok(store, "import", f"oci:{layout}:t", "--tag", "case:t")
        layerfs_ok(store, "unpack", "case:t", str(tmp_path / "rootfs"))
        ours = mounted = image_snapshot(tmp_path / "rootfs")
    members, go_error = go_read(golister, corpus[name])
    assert go_error is None
    has_root = any(normalize(m["name"]) == b"/" for m in members)
    if name in tarcorpus.UMOCI_REFUSES:
        # umoci (and docker, for S and 7) refuse the member type; Go's reader is the oracle.
        proc = subprocess.run(
            ["umoci", "unpack", "--image", f"{layout}:t", str(tmp_path / "bundle")],
            capture_output=True,
            check=False,
        )
        assert proc.returncode != 0, "umoci unpacks it now: compare with it instead"
        expected = _tree_from_go(members, ours)
    else:
        expected = image_snapshot(images.umoci_unpack(layout, "t", tmp_path / "bundle"))
        assert images.hardlink_groups(tmp_path / "rootfs") == images.hardlink_groups(
            tmp_path / "bundle" / "rootfs"
        )
    # A directory only implied by a member's path has no time in the image (umoci's is the
    # time of its unpack): every other field is compared.
    listed = {normalize(m["name"]).lstrip(b"/") or b"." for m in members}
    implied = [p.decode(errors="backslashreplace") for p in expected if p not in listed]
    mtimes = tuple(f"{p}: mtime_ns " for p in implied)
    assert [d for d in oracle_diff(expected, ours, has_root) if not d.startswith(mtimes)] == []
    assert [d for d in oracle_diff(expected, mounted, has_root) if not d.startswith(mtimes)] == []
    # A duplicated path with other contents leaves the earlier contents unreferenced: no split.
    _rebuilds(store, all_split=name != "same-path-twice")


@pytest.mark.parametrize("name", tarcorpus.REFUSED)
def test_what_go_refuses_is_refused_in_one_line(
    corpus: dict[str, bytes], tmp_path: Path, name: str
) -> None:
    layout = _layout(corpus, tmp_path, name)
    store = tmp_path / "store"
    layerfs_ok(store, "images")  # an empty store
    before = sorted(p.relative_to(store) for p in store.rglob("*") if "tmp" not in p.parts)
    proc = layerfs(store, "import", f"oci:{layout}:t", "--tag", "case:t")
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: layer sha256:"), proc.stderr
    assert layerfs_ok(store, "images", "--json").stdout.strip() in ("[]", "")
    after = sorted(p.relative_to(store) for p in store.rglob("*") if "tmp" not in p.parts)
    assert [p for p in after if p.parts[0] == "content"] == [
        p for p in before if p.parts[0] == "content"
    ]
    shutil.rmtree(store)


def _import_unpack_mount(
    store: Path, source: str, tmp_path: Path
) -> tuple[dict[bytes, Node], dict[bytes, Node]]:
    """`layerfs import` of `source`, then its unpacked tree and its read-only mount's tree."""
    layerfs_ok(store, "import", source, "--tag", "case:t")
    layerfs_ok(store, "unpack", "case:t", str(tmp_path / "rootfs"))
    with image_mount(store, "case:t", tmp_path / "mnt", "--ro"):
        mounted = image_snapshot(tmp_path / "mnt")
    return image_snapshot(tmp_path / "rootfs"), mounted


def _rebuilds(store: Path, all_split: bool = True) -> None:
    """Every layer has a tar-split (unless not `all_split`), and each rebuilds to its DiffID."""
    with sqlite3.connect(store / "index.db") as conn:
        splits = [r[0] for r in conn.execute("SELECT tarsplit FROM layers")]
    conn.close()
    assert splits and (all(splits) or not all_split)
    out = layerfs_ok(store, "fsck", "--full").stdout.strip()
    assert out == "store is consistent (all contents re-hashed)"


def _index(layout: Path) -> dict[str, Any]:
    """The one manifest descriptor of an OCI layout's index."""
    (desc,) = json.loads((layout / "index.json").read_text())["manifests"]
    assert isinstance(desc, dict)
    return desc


def _json_blob(layout: Path, digest: str) -> dict[str, Any]:
    out = json.loads((layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).read_bytes())
    assert isinstance(out, dict)
    return out


def _put_blob(layout: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest.removeprefix("sha256:")).write_bytes(data)
    return digest, len(data)


def _fix_diff_ids(layout: Path, write: bool = False) -> bool:
    """Whether some config DiffID is not the digest of its layer's uncompressed stream; with
    `write`, correct the config (and so the manifest and the index) as a fixed skopeo would."""
    desc = _index(layout)
    man = _json_blob(layout, desc["digest"])
    cfg = _json_blob(layout, man["config"]["digest"])
    real = []
    for layer in man["layers"]:
        blob = layout / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
        with open(blob, "rb") as fh:
            reader = DecompressingReader(PeekReader(fh), "zstd", "layer")
            h = hashlib.sha256()
            while chunk := reader.read(1 << 20):
                h.update(chunk)
        real.append("sha256:" + h.hexdigest())
    if real == cfg["rootfs"]["diff_ids"]:
        return False
    if write:
        cfg["rootfs"]["diff_ids"] = real
        man["config"]["digest"], man["config"]["size"] = _put_blob(layout, json.dumps(cfg).encode())
        desc["digest"], desc["size"] = _put_blob(layout, json.dumps(man).encode())
        (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [desc]}))
    return True


ZSTD_CHUNKED = ("gnutar-posix", "gnutar-posix-sparse-1.0", "bsdtar-pax", "python-gnu")
# This skopeo writes a sparse file's PAX sparse records but not its map into a zstd:chunked
# layer: Go's reader fails on such a layer (unexpected EOF), so must we.
CHUNKED_BROKEN = ("gnutar-posix-sparse-1.0", "bsdtar-pax")


@pytest.mark.mount
@pytest.mark.parametrize("name", ZSTD_CHUNKED)
def test_zstd_chunked_layers_equal_umoci(
    golister: Path, corpus: dict[str, bytes], tmp_path: Path, name: str
) -> None:
    # skopeo re-tars each layer into zstd:chunked (a TOC in skippable frames); umoci cannot
    # read zstd, so the oracle is its unpack of the source image.
    require_fuse()
    layout = _layout(corpus, tmp_path, name)
    chunked = tmp_path / "chunked"
    images.skopeo_copy(
        f"oci:{layout}:t", f"oci:{chunked}:t",
        "--dest-compress", "--dest-compress-format", "zstd:chunked",
    )  # fmt: skip
    layer = _json_blob(chunked, _index(chunked)["digest"])["layers"][0]
    assert "io.containers.zstd-chunked.manifest-checksum" in layer["annotations"]
    blob = chunked / "blobs" / "sha256" / layer["digest"].removeprefix("sha256:")
    _, go_error = go_read(golister, images.run_bytes(["zstd", "-dcq", blob]))
    assert (go_error is not None) == (name in CHUNKED_BROKEN), go_error
    store = tmp_path / "store"
    if go_error is None:
        # This skopeo also keeps the source's DiffID for the tar it rewrote (containers/storage
        # #1771): podman refuses such an image, and so do we.
        assert _fix_diff_ids(chunked)
        proc = layerfs(store, "import", f"oci:{chunked}:t", "--tag", "case:t")
        assert proc.returncode != 0 and "DiffID mismatch" in proc.stderr
    _fix_diff_ids(chunked, write=True)
    if go_error is not None:
        proc = layerfs(store, "import", f"oci:{chunked}:t", "--tag", "case:t")
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode != 0 and len(lines) == 1 and "sparse" in lines[0], proc.stderr
        return
    ours, mounted = _import_unpack_mount(store, f"oci:{chunked}:t", tmp_path)
    expected = image_snapshot(images.umoci_unpack(layout, "t", tmp_path / "bundle"))
    assert oracle_diff(expected, ours) == []
    assert oracle_diff(expected, mounted) == []
    _rebuilds(store)


@pytest.mark.mount
def test_umoci_insert_layers_equal_umoci(
    corpus: dict[str, bytes], corpus_dir: Path, tmp_path: Path
) -> None:
    # umoci insert writes each layer itself (Go's tar writer, its own whiteouts and opaque
    # markers): a tree, a single file, a whiteout and an opaque directory, over a GNU tar layer.
    require_fuse()
    layout = _layout(corpus, tmp_path, "gnutar-posix")
    ref = f"{layout}:t"
    images.run(["umoci", "insert", "--image", ref, corpus_dir / "common", "/inserted"])
    images.run(["umoci", "insert", "--image", ref, corpus_dir / "rich" / "xattrs", "/etc/x"])
    images.run(["umoci", "insert", "--image", ref, "--whiteout", "/etc/motd.sym"])
    images.run(["umoci", "insert", "--image", ref, "--opaque", corpus_dir / "common/bin", "/bin"])
    store = tmp_path / "store"
    ours, mounted = _import_unpack_mount(store, f"oci:{ref}", tmp_path)
    expected = image_snapshot(images.umoci_unpack(layout, "t", tmp_path / "bundle"))
    assert b"etc/motd.sym" not in expected and b"bin/suid" in expected
    assert oracle_diff(expected, ours) == []
    assert oracle_diff(expected, mounted) == []
    _rebuilds(store)


# ---- random tars, randomly damaged -------------------------------------------------------

_names = st.lists(
    st.binary(min_size=1, max_size=70).filter(lambda b: b"\0" not in b and b"/" not in b),
    min_size=1,
    max_size=4,
).map(b"/".join)
_pax_keys = st.sampled_from(
    ["path", "linkpath", "uid", "gid", "size", "mtime", "atime", "SCHILY.xattr.user.a",
     "SCHILY.xattr.user.b", "LIBARCHIVE.xattr.user.c", "comment", "GNU.sparse.major"]
)  # fmt: skip
_pax_values = st.one_of(
    st.just(""),
    st.from_regex(r"-?[0-9]{1,12}(\.[0-9]{0,12})?", fullmatch=True),
    st.text(max_size=20),
)
_members = st.lists(
    st.builds(
        M,
        name=_names,
        type=st.sampled_from([b"0", b"5", b"2", b"1", b"3", b"6", b"7", b"V"]),
        data=st.binary(max_size=1200),
        mode=st.integers(0, 0o7777),
        uid=st.integers(0, 2**21 - 1),
        gid=st.integers(0, 2**21 - 1),
        mtime=st.integers(0, 2**33 - 1),
        linkname=_names,
        pax=st.dictionaries(_pax_keys, _pax_values, max_size=3),
    ),
    max_size=5,
)


@st.composite
def _damaged_tars(draw: st.DrawFn) -> bytes:
    members = draw(_members)
    fmt = draw(st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    if fmt != tarfile.PAX_FORMAT:
        members = [dataclasses.replace(m, pax={}) for m in members]
    tar = bytearray(layer_tar(members, fmt=fmt, eof_marker=draw(st.booleans())))
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["cut", "flip", "zero", "append"]))
        at = draw(st.integers(0, max(len(tar) - 1, 0)))
        if how == "cut":
            del tar[at:]
        elif how == "flip" and tar:
            tar[at] ^= 1 << draw(st.integers(0, 7))
        elif how == "zero":
            tar[at : at + 512] = bytes(len(tar[at : at + 512]))
        else:
            tar += draw(st.binary(max_size=1100))
    return bytes(tar)


@settings(max_examples=150)
@given(tar=_damaged_tars())
def test_random_damaged_tars_read_as_go_reads_them(golister: Path, tar: bytes) -> None:
    want, go_error = go_read(golister, tar)
    got, error = our_read(tar)
    assert (error is None) == (go_error is None), f"Go: {go_error!r}, layerfs: {error!r}"
    assert _comparable(got, error) == _comparable(want, go_error)


# Real producers' sparse maps, PAX bodies and GNU headers, damaged: a damaged header block
# gets its checksum fixed half of the time, so that parsing goes past the checksum.
SPARSE_PRODUCERS = (
    "gnutar-gnu", "gnutar-oldgnu", "gnutar-posix-sparse-0.0", "gnutar-posix-sparse-0.1",
    "gnutar-posix-sparse-1.0", "bsdtar-pax", "sparse-pax-1.0-by-hand",
)  # fmt: skip


@settings(max_examples=150)
@given(data=st.data())
def test_damaged_producer_tars_read_as_go_reads_them(
    golister: Path, corpus: dict[str, bytes], data: st.DataObject
) -> None:
    tar = bytearray(corpus[data.draw(st.sampled_from(SPARSE_PRODUCERS))])
    for _ in range(data.draw(st.integers(1, 3))):
        if not tar:
            break
        at = data.draw(st.integers(0, len(tar) - 1))
        how = data.draw(st.sampled_from(["cut", "flip", "byte"]))
        if how == "cut":
            del tar[at:]
        elif how == "flip":
            tar[at] ^= 1 << data.draw(st.integers(0, 7))
        else:
            tar[at] = data.draw(st.sampled_from(b"0123456789\n\0 ,.-"))
        start = at - at % 512
        block = tar[start : start + 512]
        if len(block) == 512 and block[257:262] == b"ustar" and data.draw(st.booleans()):
            block[148:156] = b" " * 8
            block[148:156] = b"%06o\0 " % sum(block)
            tar[start : start + 512] = block
    want, go_error = go_read(golister, bytes(tar))
    got, error = our_read(bytes(tar))
    assert (error is None) == (go_error is None), f"Go: {go_error!r}, layerfs: {error!r}"
    assert _comparable(got, error) == _comparable(want, go_error)
