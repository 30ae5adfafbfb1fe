"""A named upper (container) pins its image: rmi refuses, --force only untags, gc keeps layers."""

from __future__ import annotations

from pathlib import Path

from layerstore import containers
from layerstore.ocibuild import Img, write_oci
from layerstore.store import Store
from tests.store.test_import import BASE, TOP, cli, fingerprint


def test_rmi_of_an_image_a_container_uses(tmp_path: Path) -> None:
    store_dir = tmp_path / "store"
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="v1"))
    cli(store_dir, "import", f"oci:{tmp_path / 'img'}:v1", "--tag", "pinned:1")
    with Store(store_dir) as store:
        image = store.resolve("pinned:1")
        layers = [li.diff_id for li in store.image_layers(image)]
    containers.create(store_dir, "box", image, "pinned:1")

    # The layout's own name goes; removing the last name would delete the image.
    cli(store_dir, "rmi", "img:v1")
    before = fingerprint(store_dir)
    refused = cli(store_dir, "rmi", "pinned:1", check=False)
    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1 and "used by container(s) box" in refused.stderr
    assert fingerprint(store_dir) == before

    forced = cli(store_dir, "rmi", "--force", "pinned:1")
    assert "Untagged: pinned:1" in forced.stdout and "Deleted" not in forced.stdout
    assert cli(store_dir, "images", "--json").stdout.count("pinned") == 0
    cli(store_dir, "gc")
    with Store(store_dir) as store:
        assert [li.diff_id for li in store.image_layers(image)] == layers
        assert not store.fsck(full=True)

    # Once the container is gone the image can be removed and collected as usual.
    containers.remove(store_dir, "box")
    cli(store_dir, "rmi", image)
    cli(store_dir, "gc")
    with Store(store_dir) as store:
        assert store.all_layers() == []
