"""`layerfs export` to oci:, oci-archive: and docker-archive: is read back by skopeo, umoci and
our own import as the same image."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from layerstore import ocibuild as ob
from layerstore.store import Store
from tests import images
from tests.image_fixtures import BuiltImages, image_snapshot, layerfs, layerfs_ok
from tests.treecmp import compare

pytestmark = pytest.mark.tools


def image_id(store: Path, ref: str) -> str:
    with Store(store, readonly=True) as s:
        return s.resolve(ref)


def diff_ids(store: Path, ref: str) -> list[str]:
    layers: list[str] = json.loads(layerfs_ok(store, "inspect", ref).stdout)[0]["RootFS"]["Layers"]
    return layers


@pytest.mark.parametrize("fmt", ["oci", "docker-archive", "oci-zstd"])
def test_export_reads_back_as_the_same_image(
    built_images: BuiltImages,
    image_source: Callable[[images.Image, str], str],
    umoci_rootfs: Callable[[images.Image], Path],
    tmp_path: Path,
    fmt: str,
) -> None:
    store = tmp_path / "store"
    layerfs_ok(store, "import", image_source(built_images.app, fmt), "--tag", "t/app:1")
    want_id, want_diffs = image_id(store, "t/app:1"), diff_ids(store, "t/app:1")
    dests = {
        "oci": (f"oci:{tmp_path / 'layout'}:x", f"oci:{tmp_path / 'layout'}:x"),
        "oci-archive": (f"oci-archive:{tmp_path / 'a.tar'}:x", f"oci-archive:{tmp_path / 'a.tar'}"),
        "docker-archive": (
            f"docker-archive:{tmp_path / 'd.tar'}:re/app:2",
            f"docker-archive:{tmp_path / 'd.tar'}",
        ),
    }
    for i, (dest, source) in enumerate(dests.values()):
        layerfs_ok(store, "export", "t/app:1", dest)
        cfg = json.loads(images.run(["skopeo", "inspect", "--config", source]))
        assert cfg["rootfs"]["diff_ids"] == want_diffs, dest
        other = tmp_path / f"store{i}"
        layerfs_ok(other, "import", source, "--tag", "back:1")
        assert image_id(other, "back:1") == want_id, dest
    with tarfile.open(tmp_path / "d.tar") as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        assert json.loads(member.read())[0]["RepoTags"] == ["re/app:2"]
    # umoci opens the OCI layout and unpacks the tree the original gives (Debian's umoci
    # cannot read zstd layers at all: "blob is not correct mediatype").
    if fmt != "oci-zstd":
        rootfs = images.umoci_unpack(tmp_path / "layout", "x", tmp_path / "bundle")
        diffs = compare(image_snapshot(umoci_rootfs(built_images.app)), image_snapshot(rootfs))
        assert diffs == []
    # The layout's media types say what the blobs are.
    index = json.loads((tmp_path / "layout" / "index.json").read_bytes())
    mdig = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((tmp_path / "layout" / "blobs" / "sha256" / mdig).read_bytes())
    want = "+zstd" if fmt == "oci-zstd" else ("+gzip" if fmt == "oci" else "v1.tar")
    assert all(lay["mediaType"].endswith(want) for lay in manifest["layers"])


def test_uncompressed_oci_image_exports_its_manifest_as_imported(tmp_path: Path) -> None:
    layers = [ob.layer_tar([ob.d("a"), ob.f("a/x", b"x")]), ob.layer_tar([ob.wh("a/x")])]
    ob.write_oci(tmp_path / "src", ob.Img(layers, compression="none", ref="v1"))
    store = tmp_path / "store"
    layerfs_ok(store, "import", f"oci:{tmp_path / 'src'}:v1", "--tag", "plain:1")
    with Store(store, readonly=True) as s:
        manifest_digest = s.image_info(s.resolve("plain:1")).manifest_digest
    layerfs_ok(store, "export", "plain:1", f"oci:{tmp_path / 'out'}")
    index = json.loads((tmp_path / "out" / "index.json").read_bytes())
    [desc] = index["manifests"]
    assert desc["digest"] == manifest_digest
    assert desc["annotations"]["org.opencontainers.image.ref.name"] == "1"
    # A second export under another tag adds to the layout; the same tag replaces.
    layerfs_ok(store, "export", "plain:1", f"oci:{tmp_path / 'out'}:other")
    layerfs_ok(store, "export", "plain:1", f"oci:{tmp_path / 'out'}:other")
    index = json.loads((tmp_path / "out" / "index.json").read_bytes())
    assert len(index["manifests"]) == 2


def test_export_errors_are_one_line(tmp_path: Path) -> None:
    store = tmp_path / "store"
    layers = [ob.layer_tar([ob.f("x", b"x")])]
    ob.write_oci(tmp_path / "src", ob.Img(layers, ref="v1"))
    layerfs_ok(store, "import", f"oci:{tmp_path / 'src'}:v1", "--tag", "p:1")
    for args in (("p:1", "tar:/x"), ("nope:1", f"oci:{tmp_path / 'o'}"), ("p:1", "oci:")):
        proc = layerfs(store, "export", *args)
        assert proc.returncode == 1, args
        assert proc.stderr.startswith("layerfs: ") and len(proc.stderr.splitlines()) == 1, args


def test_a_layer_without_tar_split_is_re_tarred(tmp_path: Path) -> None:
    # A path twice with different contents: the store keeps no tar-split for the layer.
    first = [ob.d("d"), ob.f("d/x", b"first"), ob.f("d/x", b"second"), ob.f("h", b"h"),
             ob.hard("h2", "h"), ob.f("gone", b"g")]  # fmt: skip
    second = [ob.wh("gone"), ob.d("d"), ob.f("d/.wh..wh..opq"), ob.f("d/y", b"y")]
    ob.write_oci(tmp_path / "src", ob.Img([ob.layer_tar(first), ob.layer_tar(second)], ref="v1"))
    store = tmp_path / "store"
    layerfs_ok(store, "import", f"oci:{tmp_path / 'src'}:v1", "--tag", "dup:1")
    layerfs_ok(store, "unpack", "dup:1", str(tmp_path / "want"))
    for i, dest in enumerate(
        (f"oci:{tmp_path / 'out'}:v1", f"docker-archive:{tmp_path / 'd.tar'}")
    ):
        proc = layerfs_ok(store, "export", "dup:1", dest)
        assert "no tar-split" in proc.stderr and "new ID" in proc.stderr
        other = tmp_path / f"other{i}"
        layerfs_ok(other, "import", dest, "--tag", "back:1")
        layerfs_ok(other, "unpack", "back:1", str(tmp_path / f"got{i}"))
        got = image_snapshot(tmp_path / f"got{i}")
        assert compare(image_snapshot(tmp_path / "want"), got) == []
        assert diff_ids(other, "back:1")[1] == diff_ids(store, "dup:1")[1]  # exact one kept
        assert diff_ids(other, "back:1")[0] != diff_ids(store, "dup:1")[0]
