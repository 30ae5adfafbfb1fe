"""The store as an unprivileged user: import of every source kind, pull, export and unpack
work in the user's XDG store (or fail with one `layerfs: ` line), and the index keeps the
image's owners and devices that the user could not create."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from layerstore import containers
from layerstore import ocibuild as ob
from layerstore.store import Store
from tests import images
from tests.image_fixtures import FORMATS, BuiltImages
from tests.mounting import LAYERFS
from tests.registry.server import running_registry
from tests.rootless.conftest import Rootless
from tests.treecmp import compare, snapshot

pytestmark = pytest.mark.tools

SourceOf = Callable[[images.Image, str], str]


def _shared_source(rootless: Rootless, source: str) -> str:
    """`source` (transport:PATH[:REF]) with PATH copied where the user can read it."""
    transport, _, rest = source.partition(":")
    path, sep, ref = rest.partition(":") if transport == "oci" else (rest, "", "")
    return f"{transport}:{rootless.share(Path(path))}{sep}{ref}"


def _image_id(inspect_json: str) -> str:
    """The image ID from `layerfs inspect REF` output."""
    [record] = json.loads(inspect_json)
    image: str = record["Id"]
    return image


def _owned_by(root: Path, uid: int) -> list[str]:
    """Paths below `root` (itself included) NOT owned by `uid`."""
    bad = [] if root.lstat().st_uid == uid else [str(root)]
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            if os.lstat(p).st_uid != uid:
                bad.append(p)
    return bad


def test_user_imports_every_source_kind_into_its_xdg_store(
    rootless: Rootless, home: Path, built_images: BuiltImages, image_source: SourceOf
) -> None:
    ids = set()
    for fmt in FORMATS:
        src = _shared_source(rootless, image_source(built_images.app, fmt))
        rootless.run_as_user(["layerfs", "import", "-q", src, "--tag", f"app:{fmt}"], home)
        inspect = rootless.run_as_user(["layerfs", "inspect", f"app:{fmt}"], home).stdout
        ids.add(_image_id(inspect))
    assert len(ids) == 1  # every kind gives the same image
    store = home / ".local" / "share" / "layerfs"
    fsck = rootless.run_as_user(["layerfs", "fsck", "--full"], home)
    assert "store is consistent" in fsck.stdout
    assert _owned_by(store, rootless.uid) == []
    # The index keeps what the user could not make on disk: owners, devices, set-id bits.
    with Store(store, readonly=True) as s:
        top_first = [lay.id for lay in reversed(s.image_layers("app:oci"))]
        found = {}
        for path in (b"/dev/null", b"/dev/loop0", b"/data/hello", b"/usr/bin/suid"):
            parent, name = path.rsplit(b"/", 1)
            entries = [s.layer_lookup(lid, parent, name) for lid in top_first]
            found[path] = next(e for e in entries if e is not None)
    assert found[b"/dev/null"].rdev == (1, 3)
    assert (found[b"/dev/loop0"].rdev, found[b"/dev/loop0"].gid) == ((7, 0), 6)
    assert (found[b"/data/hello"].uid, found[b"/data/hello"].gid) == (1234, 5678)
    assert found[b"/usr/bin/suid"].mode == 0o4755
    # Root reading the index (a read-only open) changed nothing the user owns; root importing
    # into the user's store gives the user what it added, so the user can gc it later.
    assert _owned_by(store, rootless.uid) == []
    src = image_source(built_images.other, "oci")
    by_root = subprocess.run(
        [*LAYERFS, "import", "-q", "--store", str(store), src, "--tag", "other:root"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert by_root.returncode == 0, by_root.stderr
    assert _owned_by(store, rootless.uid) == []
    other = _image_id(rootless.run_as_user(["layerfs", "inspect", "other:root"], home).stdout)
    rootless.run_as_user(["layerfs", "rmi", "--force", other], home)
    assert "Removed 1 layers" in rootless.run_as_user(["layerfs", "gc"], home).stdout
    assert "store is consistent" in rootless.run_as_user(["layerfs", "fsck"], home).stdout


def test_user_pulls_exports_and_unpacks(
    rootless: Rootless,
    home: Path,
    built_images: BuiltImages,
    image_source: SourceOf,
    umoci_rootfs: Callable[[images.Image], Path],
    tmp_path: Path,
) -> None:
    with running_registry(tmp_path / "registry") as reg:
        reg.push(image_source(built_images.app, "oci"), "rootless/app")
        ref = reg.ref("rootless/app")
        rootless.run_as_user(["layerfs", "pull", ref], home)
        image = _image_id(rootless.run_as_user(["layerfs", "inspect", ref], home).stdout)
        # push back under another name, and pull that into a second store of the user
        back = reg.ref("rootless/back")
        rootless.run_as_user(["layerfs", "push", ref, back], home)
        second = ["--store", str(home / "second")]
        rootless.run_as_user(["layerfs", "pull", *second, back], home)
        again = rootless.run_as_user(["layerfs", "inspect", *second, back], home).stdout
        assert _image_id(again) == image
    out = home / "app.oci.tar"
    rootless.run_as_user(["layerfs", "export", ref, f"oci-archive:{out}"], home)
    # The archive the user wrote imports (as root, elsewhere) as the same image.
    for args in (["import", f"oci-archive:{out}", "--tag", "back"], ["inspect", "back"]):
        proc = subprocess.run(
            [*LAYERFS, args[0], "--store", str(tmp_path / "s"), *args[1:]],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    assert _image_id(proc.stdout) == image
    # unpack as the user works: what it cannot do (owners, devices, privileged xattrs) is
    # said in warnings, one line each, and the owners in one line for the whole tree.
    dest = home / "rootfs"
    res = rootless.run_as_user(["layerfs", "unpack", ref, str(dest)], home)
    warnings = res.stderr.splitlines()
    assert all(w.startswith("layerfs: warning: ") for w in warnings), warnings
    assert sum("do not have the owners the image gives them" in w for w in warnings) == 1
    assert sorted(w for w in warnings if "device node skipped" in w) == [
        "layerfs: warning: /dev/loop0: device node skipped (needs root)",
        "layerfs: warning: /dev/null: device node skipped (needs root)",
    ]
    hidden = (b"trusted.", b"security.", b"user.overlay.")  # only root may set these
    oracle = umoci_rootfs(built_images.app)
    assert (
        compare(
            snapshot(oracle, hidden),
            snapshot(dest, hidden),
            ignore=("uid", "gid", "mtime_ns"),
            ignore_paths=[b"dev/null", b"dev/loop0"],
        )
        == []
    )
    assert _owned_by(dest, rootless.uid) == []


def test_unpack_as_user_of_directories_without_owner_write(rootless: Rootless, home: Path) -> None:
    """A read-only directory with children: root ignores the bits, the user must not."""
    src = home / "src"
    ob.write_oci(
        src,
        ob.Img(
            [
                ob.layer_tar(
                    [
                        ob.d("ro", mode=0o555),
                        ob.f("ro/f", b"f"),
                        ob.d("ro/sub", mode=0o500),
                        ob.f("ro/sub/g", b"g", mode=0o400),
                    ]
                )
            ],  # fmt: skip
            ref="v1",
        ),
    )
    for dirpath, _, filenames in os.walk(src):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    rootless.run_as_user(["layerfs", "import", "-q", f"oci:{src}:v1", "--tag", "ro:1"], home)
    dest = home / "out"
    rootless.run_as_user(["layerfs", "unpack", "ro:1", str(dest)], home)
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert stat.S_IMODE((dest / "ro" / "sub").stat().st_mode) == 0o500
    assert (dest / "ro" / "sub" / "g").read_bytes() == b"g"


def test_failures_as_user_are_one_clear_line(
    rootless: Rootless, home: Path, built_images: BuiltImages
) -> None:
    # A store root made (0755, readable by all): the user may not use it, and is told so.
    theirs = rootless.scratch / "root-store"
    src = rootless.scratch / "root-src"
    ob.write_oci(src, ob.Img([ob.layer_tar([ob.f("a", b"a")])], ref="v1"))
    made = subprocess.run(
        [*LAYERFS, "import", "-q", "--store", str(theirs), f"oci:{src}:v1", "--tag", "x:1"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    mnt = home / "mnt"
    mnt.mkdir()
    os.chown(mnt, rootless.uid, rootless.gid)
    # A container whose upper holds a directory the user cannot empty (as a daemon that ran
    # as root of a user namespace leaves ids of its namespace): rm says so in one line.
    mine = home / "store"
    stuck = containers.create(mine, "stuck", "sha256:" + "0" * 64, "x:1")
    (stuck.upper / "d").mkdir()
    (stuck.upper / "d" / "f").write_bytes(b"")
    for dirpath, _, filenames in os.walk(mine):
        for p in [dirpath, *(os.path.join(dirpath, f) for f in filenames)]:
            if not p.startswith(str(stuck.upper / "d")):
                os.chown(p, rootless.uid, rootless.gid)
    not_yours = "not writable by you"
    cases = [
        (["rm", "--store", str(mine), "stuck"], "cannot remove container stuck: Permission"),
        (["images", "--store", str(theirs)], not_yours),
        (["unpack", "--store", str(theirs), "x:1", str(home / "y")], not_yours),
        (["mount", "--store", str(theirs), "--ro", "x:1", str(mnt)], not_yours),
        # root's pytest tmp dir (0700): the user cannot read the source
        (["import", f"oci:{built_images.layout}:app"], "Permission denied"),
        # a store where the user may not write
        (["images", "--store", "/root/layerfs-store"], "Permission denied"),
        (["unpack", "nosuch", str(home / "x")], "no such image"),
    ]
    for args, needle in cases:
        proc = rootless.run_as_user(["layerfs", *args], home, check=False)
        lines = proc.stderr.splitlines()
        assert proc.returncode != 0 and len(lines) == 1, (args, proc.stderr)
        assert lines[0].startswith("layerfs: ") and needle in lines[0], (args, lines)
