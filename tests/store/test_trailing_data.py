"""Bytes after a layer's end-of-archive marker are hashed and recorded, never held in memory."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
from pathlib import Path

import zstandard

from layerstore.ocibuild import Img, d, f, layer_tar, write_oci
from tests.image_fixtures import layerfs_ok
from tests.mounting import LAYERFS

TRAILING = 2 << 30  # zeros after the end-of-archive marker
PEAK_RSS_LIMIT = 300 << 20


def _blob_with_trailing_zeros(tar: bytes) -> tuple[bytes, str]:
    """zstd(tar + TRAILING zeros) and the DiffID of the uncompressed stream, made in chunks."""
    comp = zstandard.ZstdCompressor(level=1).compressobj()
    h = hashlib.sha256(tar)
    parts = [comp.compress(tar)]
    chunk = bytes(1 << 20)
    for _ in range(TRAILING // len(chunk)):
        h.update(chunk)
        parts.append(comp.compress(chunk))
    parts.append(comp.flush())
    return b"".join(parts), "sha256:" + h.hexdigest()


def test_gigabytes_after_the_end_marker_import_in_bounded_memory(tmp_path: Path) -> None:
    tar = layer_tar([d("etc"), f("etc/motd", b"small layer\n" * 100)])
    blob, diff_id = _blob_with_trailing_zeros(tar)
    assert len(blob) < 1 << 20  # a small blob that expands to gigabytes
    img = Img([tar], compression="zstd", blobs=[blob], diff_ids=[diff_id], ref="big")
    write_oci(tmp_path / "oci", img)
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [*LAYERFS, "import", "--store", str(store), f"oci:{tmp_path / 'oci'}:big", "--tag", "t"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    # wait4 gives this child's own peak RSS (RUSAGE_CHILDREN would mix in every child so far).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode(errors="replace")
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    assert peak < PEAK_RSS_LIMIT, f"import peaked at {peak >> 20} MiB"
    with sqlite3.connect(store / "index.db") as conn:
        (row,) = conn.execute("SELECT diff_id, tar_size, tarsplit FROM layers").fetchall()
    conn.close()
    assert row == (diff_id, len(tar) + TRAILING, 1)
    # The tar-split holds the trailing bytes too: the rebuilt tar has the DiffID.
    out = layerfs_ok(store, "fsck", "--full")
    assert out.stdout.strip() == "store is consistent (all contents re-hashed)"
    assert os.path.getsize(store / "tarsplit" / diff_id.removeprefix("sha256:")) < 1 << 20
