"""Issue 8 end to end, all as a real unprivileged user: import an image with root- and
other-owned files, set-id bits, devices and a fifo into the user's own store; mount it and see
it as the image says; write through the mount; commit; the committed layer carries the right
owners, modes and device numbers; `layerfs unpack` as root of the committed image equals the
changed mount."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import images
from tests.image_fixtures import require_builders
from tests.mounting import LAYERFS
from tests.rootless.conftest import Rootless, load_snapshot
from tests.treecmp import compare, snapshot

pytestmark = [pytest.mark.mount, pytest.mark.tools]

REF = "e2e"
OVERRIDE = "user.containers.override_stat"


@dataclass(frozen=True)
class E2EImage:
    layout: Path  # a copy the user can read
    oracle: Path  # `umoci unpack` of it, as root: what the mount must show


def _file(root: Path, rel: str, data: bytes, mode: int, uid: int = 0, gid: int = 0) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    os.chown(p, uid, gid)
    os.chmod(p, mode)  # after chown, which clears set-id bits
    return p


def _dir(root: Path, rel: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Path:
    p = root / rel
    p.mkdir(parents=True, exist_ok=True)
    os.chown(p, uid, gid)
    os.chmod(p, mode)
    return p


def populate(rootfs: Path, user_uid: int, user_gid: int) -> None:
    """Everything is readable by anyone (the user snapshots its mount), but owned by root, by
    www-data (33), by uid 1000 and by the test user (its /work, where it may write)."""
    _dir(rootfs, "bin")
    tool = _file(rootfs, "bin/tool", b"#!/bin/sh\necho tool\n", 0o755)
    os.link(tool, rootfs / "bin" / "tool2")
    os.symlink("tool", rootfs / "bin" / "sh")
    _dir(rootfs, "etc")
    _file(rootfs, "etc/passwd", b"root:x:0:0::/root:/bin/sh\nwww-data:x:33:33::/var/www:\n", 0o644)
    motd = _file(rootfs, "etc/motd", b"hello\n", 0o644)
    os.setxattr(motd, b"user.comment", b"an image xattr")
    _dir(rootfs, "var/www", 0o755, 33, 33)
    _file(rootfs, "var/www/index.html", b"<p>hi</p>\n", 0o644, 33, 33)
    _dir(rootfs, "home/alice", 0o755, 1000, 1000)
    _file(rootfs, "home/alice/notes", b"alice's\n", 0o644, 1000, 1000)
    _dir(rootfs, "usr/bin")
    _file(rootfs, "usr/bin/passwd", b"#!/bin/sh\n", 0o4755)
    _file(rootfs, "usr/bin/wall", b"#!/bin/sh\n", 0o2755, 0, 5)
    _dir(rootfs, "dev")
    os.mknod(rootfs / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(rootfs / "dev" / "null", 0o666)
    os.mknod(rootfs / "dev" / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.chown(rootfs / "dev" / "sda", 0, 6)
    os.mkfifo(rootfs / "dev" / "initctl")
    os.chmod(rootfs / "dev" / "initctl", 0o644)
    _dir(rootfs, "tmp", 0o1777)
    _dir(rootfs, "work", 0o755, user_uid, user_gid)
    for name in ("keep", "gone", "sub/a", "sub/b"):
        _file(rootfs, f"work/{name}", f"{name}\n".encode(), 0o644, user_uid, user_gid)
    os.chown(rootfs / "work" / "sub", user_uid, user_gid)


@pytest.fixture(scope="module")
def e2e_image(rootless: Rootless, tmp_path_factory: pytest.TempPathFactory) -> E2EImage:
    work = tmp_path_factory.mktemp("e2e-image")
    require_builders(work)
    layout = images.init_layout(work / "layout")
    images.run(["umoci", "new", "--image", f"{layout}:{REF}"])
    bundle = work / "bundle"
    populate(images.umoci_unpack(layout, REF, bundle), rootless.uid, rootless.gid)
    images.run(["umoci", "repack", "--image", f"{layout}:{REF}", bundle])
    shutil.rmtree(bundle)
    oracle = images.umoci_unpack(layout, REF, work / "oracle")
    return E2EImage(rootless.share(layout), oracle)


@pytest.fixture
def imported(rootless: Rootless, home: Path, e2e_image: E2EImage) -> Iterator[Path]:
    """The image imported by the user into its default store; yields the store."""
    rootless.run_as_user(["layerfs", "import", f"oci:{e2e_image.layout}:{REF}", "--tag", REF], home)
    store = home / ".local" / "share" / "layerfs"  # the XDG default, no --store given
    assert (store / "index.db").stat().st_uid == rootless.uid
    yield store


def _members(blob: bytes) -> dict[str, tarfile.TarInfo]:
    """A layer's members by name (gzip or plain tar: tarfile detects which)."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        return {m.name.removeprefix("./"): m for m in tar.getmembers()}


def _top_layer(oci_dir: Path, tag: str) -> bytes:
    """The last layer blob of image `tag` in an OCI layout (compressed as stored)."""
    index = json.loads((oci_dir / "index.json").read_text())
    ref = "org.opencontainers.image.ref.name"
    [desc] = [m for m in index["manifests"] if m.get("annotations", {}).get(ref) == tag]
    blobs = oci_dir / "blobs" / "sha256"
    manifest = json.loads((blobs / desc["digest"].removeprefix("sha256:")).read_text())
    top: str = manifest["layers"][-1]["digest"]
    return (blobs / top.removeprefix("sha256:")).read_bytes()


def test_user_imports_mounts_writes_commits_and_root_unpacks_the_same_tree(
    rootless: Rootless, home: Path, e2e_image: E2EImage, imported: Path, tmp_path: Path
) -> None:
    store = imported
    mnt = home / "mnt"
    rootless.sh(f"mkdir {mnt}", home)
    mount = ["layerfs", "mount", "-f", REF, str(mnt), "--name", "c1"]
    upper = store / "containers" / "c1" / "upper"

    # 1. The mount shows the image as it is: owners, set-id bits, devices, fifo, xattrs.
    with rootless.mounted(mount, mnt, home):
        seen = rootless.snapshot(mnt, home)
        assert compare(seen, snapshot(e2e_image.oracle), ignore_paths=[b"."]) == []
        assert seen[b"dev/sda"].rdev == (8, 0) and seen[b"dev/sda"].gid == 6
        assert seen[b"usr/bin/passwd"].mode == 0o4755
        # 2. Writes as the user, with the image's permissions enforced.
        rootless.sh(
            f"cd {mnt}/work && echo new > new && echo more >> keep && rm gone && mkdir dir && "
            "mkfifo dir/fifo && ln -s ../keep dir/link && ln keep keep.link && chmod 4750 new && "
            "rm -r sub && mkdir sub && echo c > sub/c",
            home,
        )
        denied = rootless.sh(f"echo x > {mnt}/etc/x", home, check=False)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        # The kernel refuses mknod of a device to an unprivileged process (CAP_MKNOD) before
        # FUSE sees it: a rootless tool records the device in the upper instead (below).
        refused = rootless.sh(f"mknod {mnt}/work/zero c 1 5", home, check=False)
        assert refused.returncode != 0 and "Operation not permitted" in refused.stderr

    # 3. A device as a rootless upper holds it: an empty file with the override_stat.
    rootless.sh(
        f"cd {upper}/work && : > zero && chmod 600 zero && "
        f"setfattr -n {OVERRIDE} -v 0:0:0666:char-1-5 zero",
        home,
    )
    with rootless.mounted(mount, mnt, home):
        changed = rootless.snapshot(mnt, home)
    zero = changed[b"work/zero"]
    assert (zero.kind, zero.rdev, zero.uid, zero.gid, zero.mode) == ("char", (1, 5), 0, 0, 0o666)
    assert changed[b"work/new"].mode == 0o4750 and b"work/gone" not in changed

    # 4. diff and commit as the user, into its store.
    diff = rootless.run_as_user(["layerfs", "diff", "c1"], home).stdout.splitlines()
    assert diff == [
        "C /work", "A /work/dir", "A /work/dir/fifo", "A /work/dir/link", "D /work/gone",
        "C /work/keep", "A /work/keep.link", "A /work/new", "C /work/sub", "D /work/sub/a",
        "D /work/sub/b", "A /work/sub/c", "A /work/zero",
    ]  # fmt: skip
    rootless.run_as_user(["layerfs", "commit", "c1", "e2e-changed"], home)

    # 5. The committed layer, exported by the user, says who owns what.
    out = home / "out"
    rootless.run_as_user(["layerfs", "export", "e2e-changed", f"oci:{out}:v1"], home)
    layer = _members(_top_layer(out, "v1"))
    zero_m = layer["work/zero"]
    assert zero_m.ischr() and (zero_m.devmajor, zero_m.devminor) == (1, 5)
    assert (zero_m.uid, zero_m.gid, zero_m.mode) == (0, 0, 0o666)
    new_m = layer["work/new"]
    assert (new_m.uid, new_m.gid, new_m.mode) == (rootless.uid, rootless.gid, 0o4750)
    assert layer["work/dir/fifo"].isfifo() and layer["work/.wh.gone"].isreg()
    # rm -r + mkdir of an image directory: opaque in the upper (user.overlay.opaque), so
    # the layer hides the image's children.
    assert sorted(n for n in layer if n.startswith("work/sub/")) == [
        "work/sub/.wh..wh..opq",
        "work/sub/c",
    ]
    assert not any(
        k.startswith(("SCHILY.xattr.user.overlay", "SCHILY.xattr.user.containers"))
        for m in layer.values()
        for k in m.pax_headers
    )

    # 6. As root: unpack of the committed image from the user's store equals the mount.
    dest = tmp_path / "unpacked"
    unpack = subprocess.run(
        [*LAYERFS, "unpack", "--store", str(store), "e2e-changed", str(dest)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert unpack.returncode == 0, unpack.stderr
    assert compare(changed, snapshot(dest)) == []
    # Root's visit left nothing in the user's store that the user could not change.
    for dirpath, dirnames, filenames in os.walk(store):
        for n in dirnames + filenames:
            assert os.lstat(os.path.join(dirpath, n)).st_uid == rootless.uid, n

    # 7. Root committing the same upper gets the same layer as the user did.
    root_store = tmp_path / "root-store"
    for args in (
        ["import", "--store", str(root_store), f"oci:{e2e_image.layout}:{REF}", "--tag", REF],
        ["commit", "--store", str(root_store), "--upper", str(upper), "--image", REF, "byroot"],
    ):
        proc = subprocess.run([*LAYERFS, *args], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, proc.stderr
    inspect = [*LAYERFS, "inspect", "--store"]
    ours = subprocess.run([*inspect, str(root_store), "byroot"], capture_output=True, text=True)
    theirs = subprocess.run([*inspect, str(store), "e2e-changed"], capture_output=True, text=True)
    diff_ids = [json.loads(p.stdout)[0]["RootFS"]["Layers"][-1] for p in (ours, theirs)]
    assert diff_ids[0] == diff_ids[1]

    # 8. The user cleans up: the container, then what no image uses; the store stays sound.
    rootless.run_as_user(["layerfs", "rm", "c1"], home)
    rootless.run_as_user(["layerfs", "rmi", "e2e-changed"], home)
    gc = rootless.run_as_user(["layerfs", "gc"], home).stdout
    assert "Removed 1 layers" in gc
    assert "store is consistent" in rootless.run_as_user(["layerfs", "fsck"], home).stdout


# The rootless-container way (podman, buildah): the user is root of its own user namespace
# with 65536 subordinate ids and runs the daemon there. There the kernel lets chown through to
# the daemon (CAP_CHOWN in the namespace, ids mapped), which keeps the owners in the override.
USERNS_SCRIPT = r"""
set -eu
M=$HOME/nsmnt
mkdir -p "$M"
"$PY" -m unionfs mount -f {ref} "$M" --name ns 2>"$HOME/ns-daemon.log" &
pid=$!
trap 'fusermount3 -u "$M" 2>/dev/null || true; wait $pid || true' EXIT
i=0
until grep -q " $M " /proc/self/mountinfo; do  # bounded poll for the mount
  i=$((i + 1)); [ $i -le 1500 ] && kill -0 $pid || {{ cat "$HOME/ns-daemon.log"; exit 3; }}
  sleep 0.02
done
cd "$M"
echo new > work/new
chown 33:33 work/new
chmod 4755 work/new
chown 1000:1000 work/keep
chown -h 33:0 bin/sh
chown 0:5 etc/motd
mkfifo work/fifo && chown 33:33 work/fifo
if mknod work/zero c 1 5 2>/dev/null; then echo "mknod: made"; else echo "mknod: refused"; fi
cd /
{snapshot} > "$HOME/ns.snapshot"
fusermount3 -u "$M"
trap - EXIT
wait $pid
cat "$HOME/ns-daemon.log" >&2
"$PY" -m unionfs commit ns e2e-ns
"$PY" -m unionfs export e2e-ns "oci:$HOME/ns-out:v1"
"""


def test_chown_in_a_user_namespace_is_kept_and_committed(
    rootless: Rootless, home: Path, e2e_image: E2EImage, imported: Path, tmp_path: Path
) -> None:
    snap_cmd = " ".join(f"'{a}'" for a in rootless.snapshot_argv("$M")).replace("'$M'", '"$M"')
    script = USERNS_SCRIPT.format(ref=REF, snapshot=snap_cmd)
    proc = rootless.run_in_userns(script, home)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr  # the daemon's log included
    # mknod of a device stays refused: CAP_MKNOD counts in the initial namespace only.
    assert "mknod: refused" in proc.stdout
    seen = load_snapshot((home / "ns.snapshot").read_bytes())
    new, keep, sh, motd, fifo = (
        seen[p] for p in (b"work/new", b"work/keep", b"bin/sh", b"etc/motd", b"work/fifo")
    )
    assert (new.uid, new.gid, new.mode) == (33, 33, 0o4755)
    assert (keep.uid, keep.gid) == (1000, 1000)
    assert (sh.kind, sh.uid, sh.gid, sh.target) == ("symlink", 33, 0, b"tool")
    assert (motd.uid, motd.gid, motd.xattrs) == (0, 5, ((b"user.comment", b"an image xattr"),))
    assert (fifo.kind, fifo.uid) == ("fifo", 33)
    # The commit (in the namespace, into the user's XDG store) wrote the owners.
    layer = _members(_top_layer(home / "ns-out", "v1"))
    got = {n: (m.type, m.uid, m.gid, m.mode) for n, m in layer.items() if "/" in n}
    assert got == {
        "bin/sh": (tarfile.SYMTYPE, 33, 0, 0o777),
        "etc/motd": (tarfile.REGTYPE, 0, 5, 0o644),
        "work/fifo": (tarfile.FIFOTYPE, 33, 33, 0o644),
        "work/keep": (tarfile.REGTYPE, 1000, 1000, 0o644),
        "work/new": (tarfile.REGTYPE, 33, 33, 0o4755),
    }
    # Root's unpack of it equals what the namespace saw.
    dest = tmp_path / "ns-unpacked"
    unpack = subprocess.run(
        [*LAYERFS, "unpack", "--store", str(imported), "e2e-ns", str(dest)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert unpack.returncode == 0, unpack.stderr
    assert compare(seen, snapshot(dest)) == []
