"""The store's verbs on real images: layer and file dedup, inspect, images, history."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests import images
from tests.image_fixtures import BuiltImages, image_snapshot, layerfs_ok
from tests.treecmp import compare

pytestmark = pytest.mark.tools

APP_TAG = "layerfs-test/app:latest"
OTHER_TAG = "layerfs-test/other:latest"


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


def _already_exists_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "Already exists" in line]


def _mentions_layer(line: str, diff_id: str, blob: str) -> bool:
    """Docker names a layer by its short compressed digest; the DiffID is as good a name."""
    return _short(diff_id) in line or _short(blob) in line


def test_importing_twice_says_already_exists_for_each_layer(
    built_images: BuiltImages, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    src = built_images.app.source
    layers = list(zip(images.config_diff_ids(src), images.manifest_layers(src), strict=True))
    first = layerfs_ok(store, "import", src, "--tag", APP_TAG)
    assert _already_exists_lines(first.stdout + first.stderr) == []
    second = layerfs_ok(store, "import", src, "--tag", APP_TAG)
    lines = _already_exists_lines(second.stdout + second.stderr)
    assert len(lines) == len(layers), second.stdout + second.stderr
    for diff_id, blob in layers:
        assert any(_mentions_layer(line, diff_id, blob) for line in lines), (diff_id, lines)
    # Nothing was extracted again: busybox's bytes are still stored once.
    assert len(_files_with_content(store, images.BUSYBOX.read_bytes())) == 1


def _files_with_content(root: Path, content: bytes) -> list[Path]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath, name)
            if (
                not path.is_symlink()
                and path.stat().st_size == len(content)
                and path.read_bytes() == content
            ):
                found.append(path)
    return found


def test_images_sharing_a_base_layer_store_it_once(
    built_images: BuiltImages, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    app, other = built_images.app.source, built_images.other.source
    base_diff_id = images.config_diff_ids(built_images.base.source)[0]
    base_blob = images.manifest_layers(built_images.base.source)[0]
    layerfs_ok(store, "import", app, "--tag", APP_TAG)
    second = layerfs_ok(store, "import", other, "--tag", OTHER_TAG)
    lines = _already_exists_lines(second.stdout + second.stderr)
    assert len(lines) == 1 and _mentions_layer(lines[0], base_diff_id, base_blob), lines

    # `layers` lists the shared layer once, used by both images; each image's listing has it.
    listing = layerfs_ok(store, "layers").stdout
    rows = [line.split() for line in listing.splitlines() if _short(base_diff_id) in line]
    assert len(rows) == 1, listing
    assert listing.splitlines()[0].split()[-1] == "IMAGES", listing
    assert rows[0][-1] == "2", listing
    for tag in (APP_TAG, OTHER_TAG):
        assert _short(base_diff_id) in layerfs_ok(store, "layers", tag).stdout
    all_ids = set(images.config_diff_ids(app)) | set(images.config_diff_ids(other))
    assert sum(_short(d) in listing for d in all_ids) == len(all_ids) == 5

    # busybox is one file of the shared layer: its bytes are in the store exactly once.
    busybox = images.BUSYBOX.read_bytes()
    assert len(_files_with_content(store, busybox)) == 1

    # `df` counts the shared layer as saved by layer dedup: at least busybox's size.
    df = layerfs_ok(store, "df").stdout
    saved = [line for line in df.splitlines() if line.startswith("Saved by layer dedup:")]
    assert len(saved) == 1, df
    assert _parse_size(saved[0].split(":", 1)[1]) >= len(busybox) * 0.95, df


UNITS = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}


def _parse_size(text: str) -> float:
    """A human-readable size as docker prints it (`2.0MB`, `19B`) in bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kMGT]?B)\s*", text)
    assert match, f"not a size: {text!r}"
    return float(match[1]) * UNITS[match[2]]


def _inspect(store: Path, ref: str) -> dict[str, Any]:
    out = json.loads(layerfs_ok(store, "inspect", ref).stdout)
    if isinstance(out, list):  # docker inspect prints a list of one object per argument
        assert len(out) == 1
        out = out[0]
    assert isinstance(out, dict)
    return out


@pytest.mark.parametrize("fmt", ["oci", "docker-archive", "oci-zstd"])
def test_inspect_reports_the_diff_ids_skopeo_reports(
    built_images: BuiltImages,
    image_source: Callable[[images.Image, str], str],
    tmp_path: Path,
    fmt: str,
) -> None:
    store = tmp_path / "store"
    src = image_source(built_images.app, fmt)
    layerfs_ok(store, "import", src, "--tag", APP_TAG)
    info = _inspect(store, APP_TAG)
    assert info["RootFS"]["Layers"] == images.config_diff_ids(src)
    # The image ID is the config's digest, whatever container the image came in.
    raw_config = images.run_bytes(["skopeo", "inspect", "--raw", "--config", src])
    assert info["Id"] == images.sha256_digest(raw_config)
    assert APP_TAG in info["RepoTags"] or f"docker.io/{APP_TAG}" in info["RepoTags"]
    assert info["Config"]["Cmd"] == ["/bin/sh"]
    assert info["Size"] > images.BUSYBOX.stat().st_size


def test_inspect_by_digest(built_images: BuiltImages, tmp_path: Path) -> None:
    store = tmp_path / "store"
    src = built_images.other.source
    layerfs_ok(store, "import", src, "--tag", OTHER_TAG)
    manifest_digest = images.sha256_digest(images.run_bytes(["skopeo", "inspect", "--raw", src]))
    by_tag = _inspect(store, OTHER_TAG)
    by_digest = _inspect(store, f"layerfs-test/other@{manifest_digest}")
    assert by_digest["Id"] == by_tag["Id"]
    assert any(d.endswith("@" + manifest_digest) for d in by_tag["RepoDigests"])


def test_images_json_lists_every_image_with_its_tags(
    built_images: BuiltImages, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    layerfs_ok(store, "import", built_images.app.source, "--tag", APP_TAG)
    layerfs_ok(store, "import", built_images.other.source, "--tag", OTHER_TAG)
    records = json.loads(layerfs_ok(store, "images", "--json").stdout)
    assert isinstance(records, list) and len(records) == 2, records
    by_id = {r["Id"]: r for r in records}
    for tag in (APP_TAG, OTHER_TAG):
        info = _inspect(store, tag)
        record = by_id[info["Id"]]
        assert tag in record["RepoTags"]
        assert record["RepoTags"] == info["RepoTags"]
        assert record["Size"] == info["Size"]


def _config_digest(source: str) -> str:
    return images.sha256_digest(
        images.run_bytes(["skopeo", "inspect", "--raw", "--config", source])
    )


def test_a_layout_with_several_images_imports_them_all(
    built_images: BuiltImages,
    umoci_rootfs: Callable[[images.Image], Path],
    tmp_path: Path,
) -> None:
    # A layout skopeo wrote with three tags, two of them the same image; given as a plain
    # path (auto-detected) with no reference, every image in it is imported.
    layout = tmp_path / "several"
    wanted = (built_images.base, built_images.other, built_images.app)
    for img in wanted:
        images.skopeo_copy(img.source, f"oci:{layout}:{img.ref}")
    images.skopeo_copy(built_images.other.source, f"oci:{layout}:other-again")
    store = tmp_path / "store"
    out = layerfs_ok(store, "import", str(layout))
    # Each layer is extracted once, in whatever order the images come: of the 9 layer
    # references (base 1, other 2, app 4, other-again 2), 5 are distinct layers.
    assert len(_already_exists_lines(out.stdout + out.stderr)) == 9 - 5, out.stdout
    records = json.loads(layerfs_ok(store, "images", "--json").stdout)
    by_id = {r["Id"]: r for r in records}
    assert set(by_id) == {_config_digest(img.source) for img in wanted}
    assert len(by_id[_config_digest(built_images.other.source)]["RepoTags"]) == 2
    for img in wanted:
        name = by_id[_config_digest(img.source)]["RepoTags"][0]
        dest = tmp_path / f"rootfs-{img.ref}"
        layerfs_ok(store, "unpack", name, str(dest))
        assert compare(image_snapshot(umoci_rootfs(img)), image_snapshot(dest), ignore=()) == []


@pytest.mark.parametrize("fmt", ["oci-archive", "docker-archive", "docker-blobs"])
def test_a_plain_archive_path_is_detected(
    built_images: BuiltImages,
    image_source: Callable[[images.Image, str], str],
    tmp_path: Path,
    fmt: str,
) -> None:
    source = image_source(built_images.other, fmt)
    path = source.split(":", 1)[1]
    store = tmp_path / "store"
    layerfs_ok(store, "import", path, "--tag", OTHER_TAG)
    assert _inspect(store, OTHER_TAG)["Id"] == _config_digest(built_images.other.source)


def test_history_lists_every_step_newest_first(built_images: BuiltImages, tmp_path: Path) -> None:
    store = tmp_path / "store"
    src = built_images.app.source
    layerfs_ok(store, "import", src, "--tag", APP_TAG)
    config = json.loads(images.run(["skopeo", "inspect", "--config", src]))
    steps = [h["created_by"] for h in config["history"]]
    rows = layerfs_ok(store, "history", "--no-trunc", APP_TAG).stdout.splitlines()[1:]
    assert len(rows) == len(steps), rows
    for row, created_by in zip(rows, reversed(steps), strict=True):
        assert created_by in row
    # The opaque layer's step was created in 2001, written with 8 fraction digits as Go
    # writes them: shown as an age like every other step, not as the raw timestamp.
    (opaque,) = [row for row in rows if "opaque dir" in row]
    assert images.ODD_PRECISION_TIME not in opaque and " years ago" in opaque, opaque
