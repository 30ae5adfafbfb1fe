"""Layers written by real tools (umoci, skopeo, buildah) are rebuilt byte for byte."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests import images
from tests.image_fixtures import BuiltImages
from tests.store.test_import import cli

pytestmark = pytest.mark.tools


@pytest.mark.parametrize("fmt", ["oci", "oci-zstd", "docker-legacy", "docker-blobs"])
def test_real_layers_rebuild_to_their_diff_ids(
    built_images: BuiltImages,
    image_source: Callable[[images.Image, str], str],
    tmp_path: Path,
    fmt: str,
) -> None:
    store = tmp_path / "store"
    for img in (built_images.app, built_images.retype, built_images.buildah_amd64):
        cli(store, "import", image_source(img, fmt), "--tag", f"t/{img.ref}:x")
    with sqlite3.connect(store / "index.db") as conn:
        splits = [r[0] for r in conn.execute("SELECT tarsplit FROM layers")]
    conn.close()
    assert splits and all(splits)
    # fsck --full rebuilds every layer's tar from the store and checks its SHA-256 (DiffID)
    p = cli(store, "fsck", "--full")
    assert p.stdout.strip() == "store is consistent (all contents re-hashed)"
