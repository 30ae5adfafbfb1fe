"""Hostile-input fuzzing of the import path: mutated layers, manifests, indexes and configs.

Every input either imports (and then unpacks inside its rootfs only) or fails with the store's
domain error (`StoreError`, one line); never another exception, never a file outside the store.
The fixed refusal cases already in tests/store/test_hostile.py are not repeated here.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerstore.errors import StoreError
from layerstore.ingest import import_source
from layerstore.model import EntryKind
from layerstore.ocibuild import (
    LAYER_MT,
    Img,
    M,
    compress,
    d,
    f,
    hard,
    layer_tar,
    sym,
    wh,
    write_docker_archive,
)
from layerstore.sources import source_images
from layerstore.store import Store
from layerstore.unpack import unpack
from tests.store.test_import import cli

STRESS = bool(os.environ.get("LAYERFS_STRESS"))
BOMB = 200_000 if STRESS else 20_000  # repeated JSON items in the count bombs
EVIL = "lfz-evil"  # every escaping name carries this marker: it must appear nowhere outside

LOWER = layer_tar([d("etc"), f("gone", b"x"), sym("up", "../../.."), f("etc/passwd", b"root\n")])
TOP = layer_tar(
    [
        d("etc"),
        f("etc/os-release", b"ID=t\n"),
        f("etc/big", bytes(range(256)) * 20),
        sym("lnk", "etc/os-release"),
        hard("etc/hl", "etc/os-release"),
        f("bin/sh", b"\x7fELF" * 50, mode=0o4755, pax={"SCHILY.xattr.user.k": "v"}),
        wh("gone"),
        d("opq"),
        f("opq/.wh..wh..opq"),
        f("n\xe9/\udcff" + "x" * 120, b"long non-utf8 name"),
    ]
)


def _sha(b: bytes) -> str:
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Src:
    """An OCI layout written by hand so any level (index, manifest, config, blob) can be bent,
    with the digests above it recomputed: the mutation reaches the parser, not only a digest
    check."""

    def __init__(self, layers: list[bytes], comp: list[str]) -> None:
        self.layers = layers
        self.comp = comp
        self.blobs = [compress(t, c) for t, c in zip(layers, comp, strict=True)]
        self.config: dict[str, Any] = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": [_sha(t) for t in layers]},
            "history": [{"created_by": "x"} for _ in layers],
        }
        self.config_bytes: bytes | None = None
        self.manifest: dict[str, Any] = {}
        self.manifest_bytes: bytes | None = None
        self.index: dict[str, Any] = {}
        self.index_bytes: bytes | None = None

    def build_manifest(self) -> None:
        cb = (
            self.config_bytes if self.config_bytes is not None else json.dumps(self.config).encode()
        )
        self.config_bytes = cb
        self.manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": _sha(cb),
                "size": len(cb),
            },
            "layers": [
                {"mediaType": LAYER_MT[c], "digest": _sha(b), "size": len(b)}
                for b, c in zip(self.blobs, self.comp, strict=True)
            ],
        }

    def build_index(self) -> None:
        mb = (
            self.manifest_bytes
            if self.manifest_bytes is not None
            else json.dumps(self.manifest).encode()
        )
        self.manifest_bytes = mb
        self.index = {
            "schemaVersion": 2,
            "manifests": [
                {
                    "mediaType": "application/vnd.oci.image.manifest.v1+json",
                    "digest": _sha(mb),
                    "size": len(mb),
                    "platform": {"os": "linux", "architecture": "amd64"},
                    "annotations": {"org.opencontainers.image.ref.name": "fz"},
                }
            ],
        }

    def write(self, root: Path) -> None:
        if not self.manifest:
            self.build_manifest()
        if not self.index:
            self.build_index()
        ib = self.index_bytes if self.index_bytes is not None else json.dumps(self.index).encode()
        bd = root / "blobs" / "sha256"
        bd.mkdir(parents=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        assert self.config_bytes is not None and self.manifest_bytes is not None
        for b in [*self.blobs, self.config_bytes, self.manifest_bytes]:
            (bd / hashlib.sha256(b).hexdigest()).write_bytes(b)
        (root / "index.json").write_bytes(ib)


def _listing(top: Path, skip: set[Path]) -> dict[str, tuple[int, int, str]]:
    out: dict[str, tuple[int, int, str]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = [n for n in dirnames if Path(dirpath, n) not in skip]
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st_ = os.lstat(p)
            h = ""
            if os.path.isfile(p) and not os.path.islink(p):
                h = hashlib.sha256(Path(p).read_bytes()).hexdigest()
            out[os.path.relpath(p, top)] = (st_.st_mode, st_.st_size, h)
    return out


def _no_evil_outside(top: Path) -> None:
    """The escape marker exists nowhere in the usual escape targets."""
    for base in {top.parent, top.parent.parent, Path("/"), Path("/etc"), Path("/tmp")}:
        names = os.listdir(base)
        assert not [n for n in names if EVIL in n], (base, names)


def attempt(src: Src) -> tuple[bool, str]:
    """Import `src` in a fresh temp store; (imported?, error line). Checks the invariants."""
    with tempfile.TemporaryDirectory(prefix="lfz-") as t:
        top = Path(t)
        (top / "src").mkdir()
        src.write(top / "src")
        (top / "outside").mkdir()
        (top / "outside" / "keep").write_bytes(b"keep")
        store_dir, rootfs = top / "store", top / "rootfs"
        before = _listing(top, set())
        store = Store(store_dir)
        try:
            try:
                res = import_source(store, source_images(f"oci:{top / 'src'}"), [])
            except StoreError as exc:
                msg = str(exc)
                assert msg and "\n" not in msg, repr(msg)
                ok, err = False, msg
            else:
                ok, err = True, ""
                ((image, _names),) = res.images
                for layer in store.image_layers(image):
                    for e in store.layer_entries(layer.id):
                        path = e.parent.rstrip(b"/") + b"/" + e.name
                        assert e.parent.startswith(b"/") or e.parent == b"", e
                        assert b"/../" not in path + b"/" and b"/./" not in path + b"/", e
                        if e.kind == EntryKind.HARDLINK:
                            link = e.link or b""
                            assert link.startswith(b"/") and b"/../" not in link + b"/", e
                unpack(store, image, rootfs, lambda _m: None)
            assert store.fsck() == [], store.fsck()
        finally:
            store.close()
        after = _listing(top, {store_dir, rootfs})
        assert after == before, set(after.items()) ^ set(before.items())
        _no_evil_outside(top)
    return ok, err


# --- mutations ---------------------------------------------------------------------------

HEADER_FIELDS = {  # name: (offset, length) in a ustar header block
    "name": (0, 100),
    "mode": (100, 8),
    "uid": (108, 8),
    "size": (124, 12),
    "mtime": (136, 12),
    "typeflag": (156, 1),
    "linkname": (157, 100),
    "magic": (257, 8),
    "prefix": (345, 155),
}


def _header_offsets(tar: bytes) -> list[int]:
    offs = []
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        for ti in tf:
            offs.append(ti.offset)
            # the real ustar header follows any PAX/GNU extension headers
            if ti.offset_data - 512 != ti.offset:
                offs.append(ti.offset_data - 512)
    return offs


def _fix_checksum(block: bytearray, at: int) -> None:
    block[at + 148 : at + 156] = b" " * 8
    chk = sum(block[at : at + 512])
    block[at + 148 : at + 156] = b"%06o\0 " % (chk & 0o777777)


@st.composite
def tar_mutation(draw: st.DrawFn) -> bytes:
    """TOP bent: byte flips, truncation, header field edits (checksum fixed or not)."""
    data = bytearray(TOP)
    how = draw(st.sampled_from(["flip", "truncate", "field", "splice"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= draw(st.integers(1, 255))
    elif how == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif how == "splice":  # a member header block duplicated elsewhere: duplicate entries
        offs = _header_offsets(TOP)
        src_at, dst_at = draw(st.sampled_from(offs)), draw(st.sampled_from(offs))
        data[dst_at:dst_at] = TOP[src_at : src_at + 1024]
    else:
        at = draw(st.sampled_from(_header_offsets(TOP)))
        field = draw(st.sampled_from(sorted(HEADER_FIELDS)))
        off, n = HEADER_FIELDS[field]
        value = draw(
            st.one_of(
                st.binary(min_size=n, max_size=n),
                st.sampled_from(
                    [
                        b"../../" + EVIL.encode(),
                        b"/" + EVIL.encode(),
                        b"up/" + EVIL.encode(),
                        b"lnk/" + EVIL.encode(),
                        b"77777777777",  # 8 GiB declared size
                        b"\x80" + b"\xff" * 11,  # base-256 huge size
                        b"\xff" * 12,  # base-256 negative
                        b"1",
                        b"2",
                        b"5",
                        b"g",
                        b"x",
                        b"S",
                        b"etc/os-release",
                        b"",
                    ]
                ),
            )
        )
        data[at + off : at + off + n] = value[:n].ljust(n, b"\0")
        if draw(st.booleans()):
            _fix_checksum(data, at)
    return bytes(data)


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(1 << 70), 1 << 70),
    st.text(max_size=20),
    st.sampled_from(
        [
            "sha256:" + "0" * 64,
            "sha256:../../" + EVIL,
            "sha512:" + "a" * 128,
            "../../" + EVIL,
            "/etc/passwd",
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.oci.image.layer.v1.tar+gzip",
            "application/vnd.docker.distribution.manifest.list.v2+json",
            1 << 62,
            -1,
        ]
    ),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    if not path:
        return value
    cur = obj
    for k in path[:-1]:
        cur = cur[k]
    if delete:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return obj


@st.composite
def source(draw: st.DrawFn) -> Src:
    """A two-layer image with one part bent."""
    target = draw(st.sampled_from(["tar", "blob", "config", "manifest", "index", "json-bytes"]))
    comp = [draw(st.sampled_from(["none", "gzip", "zstd"])) for _ in range(2)]
    layers = [LOWER, TOP]
    if target == "tar":
        layers[1] = draw(tar_mutation())
    s = Src(layers, comp)
    if target == "blob":
        b = bytearray(s.blobs[1])
        if draw(st.booleans()):
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(b) - 1))
                b[i] ^= draw(st.integers(1, 255))
        else:
            b = b[: draw(st.integers(0, len(b) - 1))]
        s.blobs[1] = bytes(b)
    elif target in ("config", "manifest", "index"):
        if target == "manifest":
            s.build_manifest()
        elif target == "index":
            s.build_manifest()
            s.build_index()
        obj = {"config": s.config, "manifest": s.manifest, "index": s.index}[target]
        path = draw(st.sampled_from(_paths(obj)))
        delete = bool(path) and draw(st.booleans())
        obj = _set(obj, path, draw(JSON_VALUES), delete)
        setattr(s, target, obj)
        if target == "config":
            s.config_bytes = json.dumps(obj).encode()
        elif target == "manifest":
            s.manifest_bytes = json.dumps(obj).encode()
        else:
            s.index_bytes = json.dumps(obj).encode()
    elif target == "json-bytes":
        which = draw(st.sampled_from(["config", "manifest", "index"]))
        s.build_manifest()
        s.build_index()
        raw = {
            "config": s.config_bytes,
            "manifest": s.manifest_bytes,
            "index": json.dumps(s.index).encode(),
        }[which]
        assert raw is not None
        b = bytearray(raw)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(b) - 1))
            b[i] = draw(st.sampled_from(b'{}[]",:0-e\\\xff\x00 '))
        if which == "config":
            s.config_bytes = bytes(b)
            s.build_manifest()
            s.manifest_bytes = None
            s.build_index()
        elif which == "manifest":
            s.manifest_bytes = bytes(b)
            s.build_index()
        else:
            s.index_bytes = bytes(b)
    return s


def test_unbent_source_imports() -> None:
    """The fuzz seed itself is a valid image (else every example would test only refusals)."""
    ok, err = attempt(Src([LOWER, TOP], ["gzip", "zstd"]))
    assert ok, err


@settings(
    deadline=None,
    max_examples=5000 if STRESS else 300,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(source())
def test_mutated_sources_import_or_fail_cleanly(src: Src) -> None:
    attempt(src)


COMPONENTS = ["a", "b", "..", ".", "", EVIL, ".wh.a", ".wh..wh..opq", ".wh.b", "\udcff"]


@st.composite
def member(draw: st.DrawFn) -> M:
    comps = draw(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4))
    name = ("/" if draw(st.integers(0, 9)) == 0 else "") + "/".join(comps)
    kind = draw(st.sampled_from(["file", "dir", "sym", "hard"]))
    target = ("/" if draw(st.booleans()) else "") + "/".join(
        draw(st.lists(st.sampled_from(COMPONENTS), min_size=1, max_size=4))
    )
    if kind == "file":
        return f(name, draw(st.sampled_from([b"", b"x", b"y" * 3000])))
    if kind == "dir":
        return d(name)
    if kind == "sym":
        return sym(name, target)
    return hard(name, target)


@settings(
    deadline=None,
    max_examples=3000 if STRESS else 150,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(st.lists(member(), min_size=1, max_size=8), min_size=1, max_size=2))
def test_generated_layers_with_hostile_names(layers: list[list[M]]) -> None:
    """Layers built from `..`, `.`, empty, absolute, whiteout and marker components, symlinks
    and hard links to such paths, in one or two layers: import or refuse, never escape."""
    try:
        tars = [layer_tar(m) for m in layers]
    except (ValueError, tarfile.TarError, UnicodeError):
        return  # tarfile itself cannot write this member list
    attempt(Src(tars, ["gzip"] * len(tars)))


# --- explicit hostile cases not in tests/store/test_hostile.py -----------------------------


def _img(*layers: list[M]) -> Src:
    return Src([layer_tar(m) for m in layers], ["gzip"] * len(layers))


E = EVIL
TRAVERSAL: dict[str, tuple[Src, bool | None]] = {
    # (source, expected outcome: True imported / False refused / None either, invariants hold)
    "file-through-lower-symlink": (_img([sym("etc", "/")], [f(f"etc/{E}", b"x")]), None),
    "dir-through-lower-symlink": (
        _img([sym("a", "../../..")], [d("a"), d("a/b"), f(f"a/b/{E}", b"x")]),
        None,
    ),
    "file-through-lower-dotdot-symlink": (_img([sym("u", "..")], [f(f"u/{E}", b"x")]), None),
    "whiteout-through-lower-symlink": (_img([sym("s", "/etc")], [wh("s/passwd")]), None),
    "hardlink-through-own-symlink": (
        _img([sym("s", "/etc"), hard(f"{E}", "s/passwd")]),
        False,
    ),
    "hardlink-through-lower-symlink": (_img([sym("s", "/etc")], [hard(E, "s/passwd")]), False),
    "hardlink-absolute-target": (_img([hard(E, "/etc/passwd")]), False),
    "hardlink-then-overwrite": (
        _img([f("a", b"1"), hard(E, "a"), f(E, b"overwritten")]),
        None,
    ),
    "symlink-then-file-same-name": (
        _img([sym(E, "/etc/passwd"), f(E, b"replaced, not written through")]),
        None,
    ),
    "symlink-chain-escape": (
        _img([sym("a", "b"), sym("b", "../.."), f(f"a/{E}", b"x")]),
        False,
    ),
    "dotdot-in-middle-staying-inside": (
        _img([d("a"), d("b"), f(f"a/../b/{E}", b"inside")]),
        True,
    ),
    "dot-slash-prefixed": (_img([d("./x"), f(f"./x/./{E}", b"inside")]), True),
    "symlink-to-outside-is-just-data": (_img([sym(E, "../../../../etc/shadow")]), True),
    "duplicate-files": (_img([f("a", b"1"), f("a", b"22"), f("a", b"333")]), True),
    "duplicate-dir-then-file": (_img([d("a"), f("a/x"), f("a", b"file now")]), None),
    "duplicate-file-then-dir": (_img([f("a", b"1"), d("a"), f("a/x", b"2")]), None),
    "duplicate-whiteout-and-file": (_img([f("g", b"low")], [wh("g"), f("g", b"new")]), True),
    "pax-path-escape": (
        _img([M(f"ok-{E}", pax={"path": f"../../{E}"}, data=b"x")]),
        False,
    ),
    "pax-linkpath-escape": (
        _img([M("h", type=tarfile.LNKTYPE, pax={"linkpath": "../../etc/passwd"})]),
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(TRAVERSAL))
def test_traversal_forms(case: str) -> None:
    src, expect = TRAVERSAL[case]
    ok, err = attempt(src)
    if expect is not None:
        assert ok == expect, err


def test_duplicate_file_last_one_wins() -> None:
    with tempfile.TemporaryDirectory() as t:
        top = Path(t)
        _img([f("a", b"1"), f("a", b"22")]).write(top / "src")
        store = Store(top / "store")
        try:
            res = import_source(store, source_images(f"oci:{top / 'src'}"), [])
            (layer,) = store.image_layers(res.images[0][0])
            e = store.layer_lookup(layer.id, b"/", b"a")
            assert e is not None and e.content is not None
            assert store.content_path(e.content).read_bytes() == b"22"
        finally:
            store.close()


def _raw_member(header_edits: dict[str, bytes], data: bytes = b"") -> bytes:
    """One ustar member 'big' with raw header fields (checksum fixed), data, no end marker."""
    block = bytearray(layer_tar([f("big", b"")])[:512])
    for field, value in header_edits.items():
        off, n = HEADER_FIELDS[field]
        block[off : off + n] = value.ljust(n, b"\0")
    _fix_checksum(block, 0)
    return bytes(block) + data + b"\0" * (-len(data) % 512)


def _sparse(realsize: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        ti = tarfile.TarInfo("sp")
        ti.size = 5
        ti.pax_headers = {
            "GNU.sparse.size": str(realsize),
            "GNU.sparse.numblocks": "1",
            "GNU.sparse.offset": "0",
            "GNU.sparse.numbytes": "5",
            "GNU.sparse.name": "sp",
        }
        tf.addfile(ti, io.BytesIO(b"hello"))
    return buf.getvalue()


def _pax_bomb(n: int) -> bytes:
    return layer_tar([f("p", b"x", pax={f"LFZ.k{i}": "v" * 64 for i in range(n)})])


HUGE: dict[str, Callable[[], Src]] = {
    "size-8GiB-octal": lambda: Src([_raw_member({"size": b"77777777777"}, b"x" * 600)], ["gzip"]),
    "size-base256-2^88": lambda: Src(
        [_raw_member({"size": b"\x80" + b"\xff" * 11}, b"x" * 600)], ["zstd"]
    ),
    "size-negative": lambda: Src([_raw_member({"size": b"\xff" * 12}, b"x" * 600)], ["none"]),
    "pax-size-1TiB": lambda: Src(
        [layer_tar([f("p", b"x" * 10, pax={"size": str(1 << 40)})])], ["gzip"]
    ),
    "sparse-1TiB": lambda: Src([_sparse(1 << 40)], ["gzip"]),
    "sparse-small-ok": lambda: Src([_sparse(4096)], ["gzip"]),
    "pax-many-xattrs": lambda: Src([_pax_bomb(2000)], ["gzip"]),
    "gnu-longname-32MiB": lambda: Src(
        [_raw_member({"typeflag": b"L", "size": b"%011o" % (32 << 20)}, b"a" * 1024)], ["gzip"]
    ),
}


@pytest.mark.parametrize("case", sorted(HUGE))
def test_huge_declared_sizes_bounded(case: str) -> None:
    """Refused (or imported when honest) without reading/allocating what the header claims."""
    src = HUGE[case]()
    tracemalloc.start()
    try:
        ok, err = attempt(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"peak {peak} bytes"
    if case.endswith("-ok") or case == "pax-many-xattrs":
        assert ok, err
    else:
        assert not ok and err


def _json_count_bomb(what: str) -> Src:
    s = Src([TOP], ["gzip"])
    if what == "diff_ids":
        s.config["rootfs"]["diff_ids"] = [_sha(TOP)] * BOMB
    elif what == "layers":
        s.build_manifest()
        s.manifest["layers"] = s.manifest["layers"] * BOMB
    elif what == "manifests":
        s.build_manifest()
        s.build_index()
        s.index["manifests"] = s.index["manifests"] * BOMB
    elif what == "desc-size":
        s.build_manifest()
        s.manifest["layers"][0]["size"] = 1 << 62
    elif what == "deep-nesting":
        s.config_bytes = b"[" * BOMB + b"]" * BOMB
    return s


@pytest.mark.parametrize("what", ["diff_ids", "layers", "manifests", "desc-size", "deep-nesting"])
def test_huge_counts_in_json(what: str) -> None:
    """Counts far beyond any real image: a clear refusal (or an honest import), bounded memory."""
    src = _json_count_bomb(what)
    tracemalloc.start()
    try:
        ok, err = attempt(src)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 512 << 20, f"peak {peak} bytes"
    if what in ("diff_ids", "layers", "desc-size", "deep-nesting"):
        assert not ok and err


# --- regressions found by the fuzzer (fixed in layerstore/sources.py) ----------------------


@pytest.mark.parametrize("value", [True, 3, "x", ["a"]])
def test_index_annotations_not_an_object(value: object) -> None:
    """Found by the fuzzer: `annotations: true` in index.json raised AttributeError."""
    s = Src([TOP], ["gzip"])
    s.build_manifest()
    s.build_index()
    s.index["manifests"][0]["annotations"] = value
    ok, err = attempt(s)
    assert ok, err


@pytest.mark.parametrize("value", [7, True, {"a": 1}])
def test_docker_archive_repotags_not_a_list(tmp_path: Path, value: object) -> None:
    """`RepoTags: 7` in a docker-archive's manifest.json raised TypeError."""
    arch = tmp_path / "d.tar"
    write_docker_archive(arch, [(Img([TOP]), ["fz:1"])], new_style=True)
    with tarfile.open(arch) as tf:
        members = [(ti, tf.extractfile(ti)) for ti in tf.getmembers()]
        files = {ti.name: (ti, fo.read() if fo else b"") for ti, fo in members}
    man = json.loads(files["manifest.json"][1])
    man[0]["RepoTags"] = value
    files["manifest.json"] = (files["manifest.json"][0], json.dumps(man).encode())
    with tarfile.open(arch, "w") as tf:
        for ti, data in files.values():
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    # Through the CLI: an archive source keeps its tar open until exit (no close API yet).
    p = cli(tmp_path / "store", "import", f"docker-archive:{arch}", check=False)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


@pytest.mark.parametrize("where", ["config", "layer"])
def test_docker_dir_source_cannot_read_outside(tmp_path: Path, where: str) -> None:
    """A docker-save directory whose manifest.json names `../` files: refused, not read."""
    arch = tmp_path / "d.tar"
    write_docker_archive(arch, [(Img([TOP]), ["fz:1"])], new_style=False)
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(arch) as tf:
        tf.extractall(src, filter="data")
    man = json.loads((src / "manifest.json").read_bytes())
    outside = tmp_path / "outside"
    outside.mkdir()
    key = "Config" if where == "config" else "Layers"
    orig = man[0][key] if where == "config" else man[0][key][0]
    (outside / "f").write_bytes((src / orig).read_bytes())  # a valid file, but outside
    if where == "config":
        man[0][key] = "../outside/f"
    else:
        man[0][key] = ["../outside/f"]
    (src / "manifest.json").write_text(json.dumps(man))
    store = Store(tmp_path / "store")
    try:
        with pytest.raises(StoreError, match="outside the source"):
            import_source(store, source_images(str(src)), [])
        assert store.image_ids() == []
    finally:
        store.close()
