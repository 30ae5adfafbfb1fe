"""Hostile and broken inputs: one clear `layerfs: ` line, non-zero exit, store unchanged."""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from layerstore.ocibuild import Img, M, compress, d, digest, f, hard, layer_tar, sym, write_oci
from tests.store.test_import import cli, fingerprint

GOOD = layer_tar([d("etc"), f("etc/os-release", b"ID=test\n"), f("etc/big", b"q" * 70000)])


def _bad_layer(members: list[M]) -> Callable[[Path], object]:
    def build(root: Path) -> None:
        write_oci(root, Img([GOOD, layer_tar(members)], ref="bad"))

    return build


def _raw_blob(blob: bytes, diff_of: bytes) -> Callable[[Path], None]:
    """An image whose second layer is `blob` (digest matching it), DiffID that of `diff_of`."""

    def build(root: Path) -> None:
        write_oci(root, Img([GOOD, diff_of], blobs=[compress(GOOD, "gzip"), blob], ref="bad"))

    return build


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0x55
    return bytes(b)


BIG = layer_tar([f(f"f{i}", bytes([i]) * 3000 + b"tail" * i) for i in range(40)])


def _tamper_blob(which: str) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        lay = write_oci(root, Img([GOOD, BIG], ref="bad"))
        man = json.loads(lay.blobs[lay.index[0]["digest"]])
        if which == "layer-truncated":
            ldig = man["layers"][1]["digest"]
            p = root / "blobs/sha256" / ldig[7:]
            p.write_bytes(p.read_bytes()[:-100])
        elif which == "layer-replaced":
            ldig = man["layers"][1]["digest"]
            (root / "blobs/sha256" / ldig[7:]).write_bytes(compress(GOOD, "gzip"))
        elif which == "manifest-modified":
            p = root / "blobs/sha256" / lay.index[0]["digest"][7:]
            p.write_bytes(p.read_bytes().replace(b'"schemaVersion": 2', b'"schemaVersion": 3'))
        elif which == "config-missing":
            (root / "blobs/sha256" / man["config"]["digest"][7:]).unlink()
        elif which == "index-broken":
            (root / "index.json").write_text('{"manifests": [')
        elif which == "index-not-list":
            (root / "index.json").write_text('{"manifests": 3}')

    return build


def _manifest_not_json(root: Path) -> None:
    lay = write_oci(root)
    dg = lay.blob(b"this is not json")
    lay.index.append(
        {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": dg,
            "size": 16,
            "annotations": {"org.opencontainers.image.ref.name": "bad"},
        }
    )
    lay.save()


CASES: dict[str, tuple[Callable[[Path], object], str]] = {
    "dotdot": (_bad_layer([f("../evil", b"x")]), "entry ../evil: path escapes the layer root"),
    "nested-dotdot": (_bad_layer([d("a"), f("a/../../evil", b"x")]), "escapes the layer root"),
    "absolute": (_bad_layer([f("/etc/evil", b"x")]), "entry /etc/evil: absolute path refused"),
    "hardlink-escape": (_bad_layer([hard("x", "../../etc/shadow")]), "escapes"),
    "hardlink-missing": (
        _bad_layer([hard("x", "etc/os-release")]),
        "links may not leave the layer",
    ),
    "hardlink-to-dir": (_bad_layer([d("dd"), hard("x", "dd")]), "links may not leave the layer"),
    # A name with a line break and terminal escapes: shown escaped, the message one line.
    "hardlink-control-chars": (
        _bad_layer([hard("x", "etc/\x01\n\x1b[2Jevil")]),
        "hard link to /etc/\\x01\\x0a\\x1b[2Jevil which is not a file",
    ),
    "through-symlink": (
        _bad_layer([sym("etc", "/etc"), f("etc/passwd", b"x")]),
        "its parent is a symlink in this layer",
    ),
    "corrupt-gzip": (
        _raw_blob(_flip(compress(BIG, "gzip"), 200), BIG),
        "corrupt gzip data",
    ),
    "corrupt-zstd": (_raw_blob(_flip(compress(BIG, "zstd"), 60), BIG), "zstd"),
    "truncated-gzip": (_raw_blob(compress(BIG, "gzip")[:-40], BIG), "truncated gzip stream"),
    "truncated-zstd": (_raw_blob(compress(BIG, "zstd")[:-20], BIG), "truncated zstd stream"),
    "truncated-tar": (_raw_blob(BIG[: len(BIG) // 2 + 7], BIG), "layer sha256:"),
    "not-a-tar": (_raw_blob(b"\x00garbage" * 100, BIG), "layer sha256:"),
    "gzip-garbage": (_raw_blob(gzip.compress(b"not a tar at all" * 64), BIG), "layer sha256:"),
    "wrong-diffid": (
        lambda root: write_oci(root, Img([GOOD, BIG], diff_ids=[digest(GOOD), digest(b"other")])),
        "DiffID mismatch",
    ),
    "blob-truncated": (_tamper_blob("layer-truncated"), "layer sha256:"),
    "blob-replaced": (_tamper_blob("layer-replaced"), "blob digest mismatch"),
    "manifest-modified": (_tamper_blob("manifest-modified"), "does not match its digest"),
    "config-missing": (_tamper_blob("config-missing"), "cannot open blobs/sha256/"),
    "index-broken": (_tamper_blob("index-broken"), "index.json: invalid JSON"),
    "index-not-list": (_tamper_blob("index-not-list"), "'manifests' is not a list"),
    "manifest-not-json": (_manifest_not_json, "invalid JSON"),
}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding one good image (sharing GOOD with every hostile image)."""
    base = tmp_path_factory.mktemp("seed")
    write_oci(base / "good", Img([GOOD], ref="good"))
    cli(base / "store", "import", f"oci:{base / 'good'}")
    return base / "store"


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_and_store_unchanged(case: str, seeded: Path, tmp_path: Path) -> None:
    build, needle = CASES[case]
    build(tmp_path / "img")
    before = fingerprint(seeded)
    p = cli(seeded, "import", f"oci:{tmp_path / 'img'}", check=False)
    assert p.returncode == 1, p.stdout
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), p.stderr
    assert "Traceback" not in p.stderr
    assert needle in lines[0]
    assert fingerprint(seeded) == before
    assert cli(seeded, "fsck").returncode == 0
