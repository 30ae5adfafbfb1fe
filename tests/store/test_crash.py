"""Crash safety (kill -9 at named points of an import or gc), concurrent imports, fsck and gc."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from layerstore.ocibuild import Img, d, f, layer_tar, write_oci
from tests.store.test_import import LAYERFS, cli, fingerprint

SHARED = layer_tar([d("base")] + [f(f"base/f{i}", b"shared %d\n" % i * 50) for i in range(150)])


def _image(tag: str, n: int = 140) -> Img:
    mid = layer_tar(
        [d(tag)] + [f(f"{tag}/m{i}", f"{tag} mid {i}\n".encode() * 40) for i in range(n)]
    )
    top = layer_tar([f(f"{tag}/top", tag.encode())])
    return Img([SHARED, mid, top], ref=tag)


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("crash") / "img"
    write_oci(root, _image("one"), _image("two"))
    return root


def _import(store: Path, src: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*LAYERFS, "import", "--store", str(store), src],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


POINTS = [
    "file-64",
    "file-128",
    "layer-staged",
    "before-commit",
    "placed-64",
    "placed-128",
    "placed",
    "in-transaction",
    "after-commit",
]


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_during_import_then_fsck_and_reimport(
    point: str, layout: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    cli(store, "import", f"oci:{layout}:two")  # a store with content to share and to keep
    p = _import(store, f"oci:{layout}:one", {"LAYERFS_TEST_CRASH": point})
    p.communicate(timeout=120)
    assert p.returncode == -9, f"crash point {point} was not reached"
    fsck = cli(store, "fsck", "--full", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert list((store / "tmp").iterdir()) == []
    cli(store, "import", f"oci:{layout}:one")
    assert cli(store, "fsck", "--full").returncode == 0
    out = tmp_path / "rootfs"
    cli(store, "unpack", "img:one", str(out))
    assert (out / "one/m139").read_bytes() == b"one mid 139\n" * 40
    assert (out / "base/f149").read_bytes() == b"shared 149\n" * 50


def test_kill_9_during_gc(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli(store, "import", f"oci:{layout}")
    cli(store, "rmi", "img:one")
    p = subprocess.run(
        [*LAYERFS, "gc", "--store", str(store)],
        env={**os.environ, "LAYERFS_TEST_CRASH": "gc-committed"},
        capture_output=True,
        timeout=120,
    )
    assert p.returncode == -9
    assert cli(store, "fsck", "--full").returncode == 0
    assert "Removed 0 layers" in cli(store, "gc").stdout


def test_concurrent_imports_share_layers(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli(store, "images")  # create the store first, so both importers race only on content
    procs = [_import(store, f"oci:{layout}:one"), _import(store, f"oci:{layout}:two")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert cli(store, "fsck", "--full").returncode == 0
    layers = cli(store, "layers").stdout.splitlines()
    assert len(layers) == 1 + 5  # header + shared base + 2 x (mid, top)
    for tag in ("one", "two"):
        rootfs = tmp_path / tag
        cli(store, "unpack", f"img:{tag}", str(rootfs))
        assert (rootfs / tag / "top").read_bytes() == tag.encode()


def test_same_image_imported_twice_at_once(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli(store, "images")
    procs = [_import(store, f"oci:{layout}:one") for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert cli(store, "fsck", "--full").returncode == 0
    assert len(cli(store, "layers").stdout.splitlines()) == 1 + 3


def test_fsck_finds_damage_and_gc_repairs_orphans(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli(store, "import", f"oci:{layout}:one")
    files = sorted(p for p in (store / "content").rglob("*") if p.is_file())
    victim, changed = files[0], files[1]
    # same size, other bytes: only --full notices
    data = changed.read_bytes()
    os.chmod(changed, 0o644)
    changed.write_bytes(bytes([data[0] ^ 1]) + data[1:])
    assert cli(store, "fsck").returncode == 0
    p = cli(store, "fsck", "--full", check=False)
    assert p.returncode == 1 and f"content {changed.name}: data does not match" in p.stdout
    changed.write_bytes(data)
    victim.rename(tmp_path / "saved")
    p = cli(store, "fsck", check=False)
    assert p.returncode == 1 and f"content {victim.name}: missing file" in p.stdout
    assert p.stderr.startswith("layerfs: fsck found 1 problems")
    (tmp_path / "saved").rename(victim)
    orphan = store / "content" / "ab" / "abcd-1"
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"x")
    p = cli(store, "fsck", check=False)
    assert p.returncode == 1 and "orphan content file content/ab/abcd-1" in p.stdout
    before = fingerprint(store)
    assert "1 orphan files" in cli(store, "gc", "--dry-run").stdout
    assert fingerprint(store) == before
    assert "1 orphan files" in cli(store, "gc").stdout
    assert cli(store, "fsck", "--full").returncode == 0


def test_failure_inside_the_commit_leaves_the_store_as_it_was(
    layout: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from layerstore.ingest import Importer, import_source
    from layerstore.sources import source_images
    from layerstore.store import Store

    store = tmp_path / "store"
    cli(store, "import", f"oci:{layout}:two")
    before = fingerprint(store)

    def boom(*_a: object) -> None:
        raise RuntimeError("injected failure after contents were placed")

    monkeypatch.setattr(Importer, "_commit_rows", boom)
    with Store(store) as s, pytest.raises(RuntimeError, match="injected"):
        import_source(s, source_images(f"oci:{layout}:one"), [])
    assert fingerprint(store) == before


def test_gc_and_rmi_racing_imports(layout: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    cli(store, "import", f"oci:{layout}:two")
    cli(store, "rmi", "img:two")  # its layers are now garbage, but `one` shares the base
    procs = [
        _import(store, f"oci:{layout}:one"),
        subprocess.Popen(
            [*LAYERFS, "gc", "--store", str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        ),
        _import(store, f"oci:{layout}:two"),
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert cli(store, "fsck", "--full").returncode == 0
    for tag in ("one", "two"):
        rootfs = tmp_path / tag
        cli(store, "unpack", f"img:{tag}", str(rootfs))
        assert (rootfs / "base/f0").read_bytes() == b"shared 0\n" * 50
        assert (rootfs / tag / "top").read_bytes() == tag.encode()
