"""The test images hold what the oracle tests rely on, as `umoci unpack` and skopeo see it."""

from __future__ import annotations

import json
import os
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import images
from tests.image_fixtures import FORMATS, BuiltImages, image_snapshot
from tests.treecmp import compare

pytestmark = pytest.mark.tools


def test_app_image_has_every_feature(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path]
) -> None:
    tree = image_snapshot(umoci_rootfs(built_images.app))
    hello = tree[b"data/hello"]
    assert (hello.uid, hello.gid, hello.mode) == (1234, 5678, 0o640)
    assert hello.nlink == 2 and tree[b"data/hello.link"].sha256 == hello.sha256
    assert dict(hello.xattrs) == {b"user.binary": b"\x00\xff\x01", b"user.comment": b"greeting"}
    assert dict(tree[b"usr/bin/ping"].xattrs) == {
        b"security.capability": images.CAP_NET_RAW,
        b"trusted.layerfs-test": b"a trusted.* xattr",
    }
    assert dict(tree[b"data/xattr-dir"].xattrs) == {b"user.dir": b"on a directory"}
    assert dict(tree[b"data/opq/new"].xattrs) == {b"user.from": b"gnu tar"}
    assert (tree[b"srv/nobody"].uid, tree[b"srv/nobody"].gid) == (65534, 65534)
    assert tree[b"data/dirlink"].target == b"sub" and tree[b"data/sub"].kind == "dir"
    assert tree[b"data/dangling"].target == b"/does/not/exist"
    assert tree[b"data/dangling"].uid == 1234  # lchown'd symlink
    assert tree[b"data/longlink"].target == images.LONG_TARGET
    assert tree[b"dev/null"].kind == "char" and tree[b"dev/null"].rdev == (1, 3)
    assert tree[b"dev/loop0"].kind == "block" and tree[b"dev/loop0"].rdev == (7, 0)
    assert tree[b"dev/fifo"].kind == "fifo"
    assert tree[b"usr/bin/suid"].mode & stat.S_ISUID
    assert tree[b"usr/bin/sgid"].mode & stat.S_ISGID
    assert tree[b"srv/shared"].mode == 0o2775 and tree[b"srv/sticky"].mode == 0o1733
    assert tree[b"srv/sticky/no-parent-entries"].kind == "file"
    assert tree[b"tmp"].mode == 0o1777
    for name in images.NON_UTF8:
        assert tree[b"data/" + name].kind == "file"
    assert tree[b"data/" + images.LONG_NAME].kind == "file"
    assert tree[b"data/" + images.LONG_DIR + b"/leaf-in-a-long-path"].kind == "file"
    assert tree[b"data/empty2"].size == 0 and tree[b"etc/empty"].size == 0
    motd = tree[b"etc/motd"].sha256
    assert tree[b"data/motd-copy"].sha256 == motd == tree[b"etc/motd-again"].sha256
    assert tree[b"bin/busybox"].size == images.BUSYBOX.stat().st_size
    assert tree[b"bin/sh"].target == b"busybox"


def test_app_image_whiteouts_and_opaque_dir_applied_by_umoci(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path]
) -> None:
    tree = image_snapshot(umoci_rootfs(built_images.app))
    for gone in (b"data/gone.txt", b"data/gonedir/a", b"data/hl2", b"data/opq/old1"):
        assert gone not in tree
    assert [p for p in tree if p.startswith(b"data/gonedir/")] == [b"data/gonedir/reborn"]
    assert [p for p in tree if p.startswith(b"data/opq/")] == [b"data/opq/new"]
    assert tree[b"data/opq"].mode == 0o751
    assert tree[b"data/hl1"].nlink == 1  # its hard link partner was whited out
    assert tree[b"data/chmodded"].mode == 0o600
    assert images.hardlink_groups(umoci_rootfs(built_images.app)) == {
        frozenset({b"data/hello", b"data/hello.link"}),
        frozenset({b"data/same-a", b"data/same-a.link"}),
    }
    for name in (b"data/empty1", b"data/nobody"):  # same-layer whiteouts hide the lower file
        assert tree[name].size == len(images.SAME_LAYER_CONTENT)
        assert (tree[name].uid, tree[name].mode) == (0, 0o644)


def test_retype_image(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path]
) -> None:
    tree = image_snapshot(umoci_rootfs(built_images.retype))
    assert tree[b"data/replaced"].kind == "dir" and b"data/replaced/now-a-dir" in tree
    assert tree[b"data/wasdir"].kind == "symlink" and b"data/wasdir/child" not in tree
    assert tree[b"data/waslink"].kind == "file"
    assert tree[b"data/sub/kept"].kind == "file"
    top = [m.name for m in images.layer_members(built_images.retype)[2]]
    assert top.index("data/wasdir") < top.index("data/wasdir/.wh.child")
    # umoci's unpack followed the new symlink wasdir -> sub and deleted sub/child, which the
    # image never deleted (test_umoci_oracle expects it kept).
    assert b"data/sub/child" not in tree
    before = image_snapshot(umoci_rootfs(built_images.retype_pre))
    assert before[b"data/sub/child"].size == len(images.RETYPE_SUB_CHILD)


def test_app_layers_spell_whiteouts_as_oci_does(built_images: BuiltImages) -> None:
    app = built_images.app
    deletions = {m.name for m in images.layer_members(app)[2]}
    assert {"data/.wh.gone.txt", "data/.wh.gonedir", "data/.wh.hl2"} <= deletions
    opaque = [m.name for m in images.layer_members(app)[3]]
    assert opaque[0] == "data/opq/.wh..wh..opq"  # the marker precedes its directory
    assert "data/opq" in opaque


def test_symlink_whiteout_image(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path]
) -> None:
    img = built_images.symwh
    assert [m.name for m in images.layer_members(img)[2]] == ["link/.wh.f"]
    rootfs = umoci_rootfs(img)
    assert os.readlink(rootfs / "link") == "real"
    # umoci followed the symlink and deleted real/f; layerfs must not (test_umoci_oracle).
    assert not (rootfs / "real" / "f").exists()
    assert (rootfs / "real" / "g").read_bytes() == b"untouched\n"
    # Without that last layer the tree differs from umoci's only by real/f (umoci restores
    # the time of the directory it deleted it from).
    before = image_snapshot(umoci_rootfs(built_images.symwh_pre))
    assert compare(before, image_snapshot(rootfs), ignore=()) == ["only in first: real/f (file)"]


def test_images_share_the_base_layer(built_images: BuiltImages) -> None:
    diff_ids = {
        img.name: images.config_diff_ids(img.source)
        for img in (
            built_images.base,
            built_images.app,
            built_images.other,
            built_images.buildah_amd64,
            built_images.buildah_arm64,
        )
    }
    base = diff_ids.pop("base")
    assert len(base) == 1
    for name, ids in diff_ids.items():
        assert ids[0] == base[0], name
    assert len(diff_ids["app"]) == 4 and len(diff_ids["other"]) == 2


def test_buildah_index_has_two_platforms(
    built_images: BuiltImages, umoci_rootfs: Callable[[images.Image], Path]
) -> None:
    raw = json.loads(images.run(["skopeo", "inspect", "--raw", built_images.buildah_index.source]))
    assert raw["mediaType"] == "application/vnd.oci.image.index.v1+json"
    platforms = {(m["platform"]["os"], m["platform"]["architecture"]) for m in raw["manifests"]}
    assert platforms == {("linux", "amd64"), ("linux", "arm64")}
    tree = image_snapshot(umoci_rootfs(built_images.buildah_arm64))
    assert (tree[b"srv/hello"].uid, tree[b"srv/hello"].mode) == (65534, 0o640)
    assert b"srv/motd-arm64" in tree and b"srv/motd-amd64" not in tree
    assert tree[b"srv/tree/inner/leaf"].kind == "file"


LAYER_TYPES = {
    "oci-zstd": {"application/vnd.oci.image.layer.v1.tar+zstd"},
    "oci-gzip": {"application/vnd.oci.image.layer.v1.tar+gzip"},
}


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f not in ("oci", "oci-v2s2")])
def test_conversions_keep_the_diff_ids(
    built_images: BuiltImages, image_source: Callable[[images.Image, str], str], fmt: str
) -> None:
    img = built_images.buildah_amd64 if fmt == "oci-gzip" else built_images.app
    converted = image_source(img, fmt)
    assert images.config_diff_ids(converted) == images.config_diff_ids(img.source)
    if fmt in LAYER_TYPES:
        raw = json.loads(images.run(["skopeo", "inspect", "--raw", converted]))
        assert {layer["mediaType"] for layer in raw["layers"]} == LAYER_TYPES[fmt]


def test_v2s2_layout_has_docker_media_types(
    built_images: BuiltImages, image_source: Callable[[images.Image, str], str]
) -> None:
    # skopeo writes this layout but cannot read it back: read its files directly.
    layout = Path(image_source(built_images.app, "oci-v2s2").split(":")[1])
    (desc,) = json.loads((layout / "index.json").read_bytes())["manifests"]
    assert desc["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    blobs = layout / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"].removeprefix("sha256:")).read_bytes())
    assert manifest["config"]["mediaType"] == "application/vnd.docker.container.image.v1+json"
    assert {layer["mediaType"] for layer in manifest["layers"]} == {
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    }
    config = json.loads((blobs / manifest["config"]["digest"].removeprefix("sha256:")).read_bytes())
    assert config["rootfs"]["diff_ids"] == images.config_diff_ids(built_images.app.source)


def test_docker_archive_has_the_legacy_docker_save_layout(
    built_images: BuiltImages, image_source: Callable[[images.Image, str], str]
) -> None:
    path = image_source(built_images.app, "docker-archive").removeprefix("docker-archive:")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert "repositories" in names
    assert sum(name.endswith("/layer.tar") for name in names) == 4
    assert manifest[0]["RepoTags"] == ["docker.io/layerfs-test/app:latest"]


def test_docker_legacy_archive_has_layers_only_in_id_dirs(
    built_images: BuiltImages, image_source: Callable[[images.Image, str], str]
) -> None:
    path = image_source(built_images.app, "docker-legacy").removeprefix("docker-archive:")
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        layer_members = [m for m in tar.getmembers() if m.name.endswith(".tar")]
    assert [m.name for m in layer_members] == manifest[0]["Layers"]
    assert all(m.isfile() and m.name.endswith("/layer.tar") for m in layer_members)


def test_docker_blobs_archive_is_read_by_skopeo(
    built_images: BuiltImages, image_source: Callable[[images.Image, str], str]
) -> None:
    path = image_source(built_images.app, "docker-blobs").removeprefix("docker-archive:")
    with tarfile.open(path) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        names = set(tar.getnames())
    assert all(layer.startswith("blobs/sha256/") for layer in manifest[0]["Layers"])
    assert set(manifest[0]["Layers"]) <= names and "index.json" in names
