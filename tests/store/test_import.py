"""Import of hand-built images into the store: index contents, dedup, unpack, CLI verbs."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore.ingest import import_source
from layerstore.model import EntryKind
from layerstore.ocibuild import (
    Img,
    Layout,
    M,
    d,
    f,
    hard,
    layer_tar,
    sym,
    tar_dir,
    wh,
    write_docker_archive,
    write_oci,
)
from layerstore.sources import source_images
from layerstore.store import Store

LAYERFS = [sys.executable, "-m", "unionfs"]


def cli(store: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `layerfs VERB --store STORE ARGS` as a subprocess."""
    verb, *rest = args
    p = subprocess.run(
        [*LAYERFS, verb, "--store", str(store), *rest],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert p.returncode == 0, p.stderr
    return p


def fingerprint(root: Path) -> dict[str, str]:
    """Every path under `root` with its type and content hash (byte-for-byte comparison)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as fh:
                    out[rel] = "file " + hashlib.sha256(fh.read()).hexdigest()
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = "link " + os.readlink(p)
            else:
                out[rel] = f"mode {stat.S_IFMT(st.st_mode):o}"
    return out


def do_import(store: Store, spec: str, tags: list[str] | None = None) -> list[str]:
    res = import_source(store, source_images(spec), tags or [])
    return [i for i, _ in res.images]


BASE = layer_tar(
    [
        d("."),
        d("bin"),
        f("bin/busybox", b"\x7fELF" + b"b" * 5000, mode=0o755),
        hard("bin/sh", "bin/busybox"),
        hard("bin/ls", "bin/busybox"),
        sym("bin/vi", "busybox"),
        d("etc"),
        f("etc/passwd", b"root:x:0:0\n"),
        f("etc/shadow", b"secret\n", mode=0o640, gid=42),
        f("etc/same1", b"same content"),
        d("etc/conf.d"),
        f("etc/conf.d/a", b"a"),
        f("etc/conf.d/b", b"b"),
        d("usr/share", mode=0o700),  # /usr is a missing parent
        f("usr/share/su", b"s", mode=0o4755),
        M("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
        M("run/fifo", tarfile.FIFOTYPE, mode=0o600),
        f("x", b"xx", pax={"SCHILY.xattr.user.note": "n1"}),
        f(b"caf\xe9", b"latin-1 name"),
    ]
)
TOP = layer_tar(
    [
        wh("etc/passwd"),
        f("etc/conf.d/.wh..wh..opq"),  # opaque marker before its directory
        d("etc/conf.d", mode=0o750),
        f("etc/conf.d/c", b"c"),
        f("etc/same2", b"same content"),  # identical to a file of the base layer
        f("new/deep/file", b"deep"),  # no parent entries at all
        wh("run"),
    ]
)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    yield s
    s.close()


def test_index_read_api(store: Store, tmp_path: Path) -> None:
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="v1"))
    (image,) = do_import(store, f"oci:{tmp_path / 'img'}:v1")
    layers = store.image_layers("img:v1")
    assert [la.diff_id for la in layers] == json.loads(
        bytes(store.conn.execute("SELECT config FROM images").fetchone()[0])
    )["rootfs"]["diff_ids"]
    base, top = layers[0].id, layers[1].id  # bottom first
    assert store.image_layers(image) == layers
    bb = store.layer_lookup(base, b"/bin", b"busybox")
    sh = store.layer_lookup(base, b"/bin", b"sh")
    assert bb is not None and sh is not None
    assert bb.kind == EntryKind.FILE and bb.nlink == 3 and bb.mode == 0o755
    assert sh.kind == EntryKind.HARDLINK and sh.link == b"/bin/busybox" and sh.nlink == 3
    assert sh.content == bb.content and sh.size == bb.size
    assert store.content_path(bb.content or "").read_bytes() == b"\x7fELF" + b"b" * 5000
    assert store.layer_hardlinks(base, b"/bin/sh") == [b"/bin/busybox", b"/bin/ls", b"/bin/sh"]
    assert store.layer_hardlinks(base, b"/bin/busybox") == store.layer_hardlinks(base, b"/bin/ls")
    assert store.layer_hardlinks(base, b"/etc/passwd") == [b"/etc/passwd"]
    assert store.layer_hardlinks(base, b"/nothing") == []
    names = [e.name for e in store.layer_listdir(base, b"/bin")]
    assert names == [b"busybox", b"ls", b"sh", b"vi"]
    usr = store.layer_lookup(base, b"/", b"usr")
    assert usr is not None and usr.implicit and usr.kind == EntryKind.DIR and usr.mode == 0o755
    share = store.layer_lookup(base, b"/usr", b"share")
    assert share is not None and not share.implicit and share.mode == 0o700
    assert store.layer_lookup(base, b"/dev", b"null").rdev == (1, 3)  # type: ignore[union-attr]
    x = store.layer_lookup(base, b"/", b"x")
    assert x is not None and x.xattrs == ((b"user.note", b"n1"),)
    assert store.layer_lookup(base, b"/", b"caf\xe9") is not None
    root = store.layer_lookup(base, b"", b"")
    assert root is not None and root.kind == EntryKind.DIR
    # top layer: whiteouts, opaque dir (marker came before the dir), implicit parents
    pw = store.layer_lookup(top, b"/etc", b"passwd")
    assert pw is not None and pw.kind == EntryKind.WHITEOUT
    conf = store.layer_lookup(top, b"/etc", b"conf.d")
    assert conf is not None and conf.opaque and conf.mode == 0o750 and not conf.implicit
    etc = store.layer_lookup(top, b"/", b"etc")
    assert etc is not None and etc.implicit and not etc.opaque
    assert store.layer_lookup(top, b"/new/deep", b"file") is not None
    assert store.layer_lookup(top, b"/etc", b"nothere") is None
    # identical contents in different layers are stored once
    s1 = store.layer_lookup(base, b"/etc", b"same1")
    s2 = store.layer_lookup(top, b"/etc", b"same2")
    assert s1 is not None and s2 is not None and s1.content == s2.content
    assert store.fsck(full=True) == []


def test_unpack_applies_whiteouts_and_opaque_dirs(store: Store, tmp_path: Path) -> None:
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="v1"))
    do_import(store, f"oci:{tmp_path / 'img'}")
    out = tmp_path / "rootfs"
    cli(store.root, "unpack", "img:v1", str(out))
    assert not (out / "etc/passwd").exists()
    assert sorted(os.listdir(out / "etc/conf.d")) == ["c"]
    assert not (out / "run").exists()
    assert (out / "new/deep/file").read_bytes() == b"deep"
    assert os.readlink(out / "bin/vi") == "busybox"
    st = os.lstat(out / "bin/sh")
    assert st.st_ino == os.lstat(out / "bin/busybox").st_ino and st.st_nlink == 3
    assert stat.S_IMODE(os.lstat(out / "usr/share/su").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(out / "etc/conf.d").st_mode) == 0o750
    assert (out / os.fsdecode(b"caf\xe9")).read_bytes() == b"latin-1 name"
    if os.geteuid() == 0:
        assert os.lstat(out / "etc/shadow").st_gid == 42
        assert stat.S_ISCHR(os.lstat(out / "dev/null").st_mode)
        assert os.getxattr(out / "x", "user.note") == b"n1"


def test_whiteout_never_follows_a_symlink(store: Store, tmp_path: Path) -> None:
    lower = layer_tar([d("real"), f("real/keep", b"k"), sym("link", "real")])
    upper = layer_tar([wh("link/keep")])
    write_oci(tmp_path / "img", Img([lower, upper], ref="s"))
    do_import(store, f"oci:{tmp_path / 'img'}")
    out = tmp_path / "rootfs"
    cli(store.root, "unpack", "img:s", str(out))
    assert (out / "real/keep").read_bytes() == b"k"


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_compressions(store: Store, tmp_path: Path, compression: str) -> None:
    write_oci(tmp_path / "img", Img([BASE], compression=compression, ref="c"))
    (image,) = do_import(store, f"oci:{tmp_path / 'img'}")
    (layer,) = store.image_layers(image)
    assert layer.files == 22  # 19 members + implicit /usr /dev /run
    assert store.layer_lookup(layer.id, b"/etc", b"passwd") is not None


def test_layer_dedup_across_images_and_sources(store: Store, tmp_path: Path) -> None:
    a = Img([BASE], ref="a")
    b = Img([BASE, TOP], compression="zstd", ref="b")  # same DiffID, other blob
    write_oci(tmp_path / "img", a, b)
    cli(store.root, "import", f"oci:{tmp_path / 'img'}:a")
    p = cli(store.root, "import", f"oci:{tmp_path / 'img'}:b")
    assert "Already exists" in p.stdout
    assert "Pull complete" in p.stdout
    store2 = Store(store.root)
    assert store2.conn.execute("SELECT COUNT(*) FROM layers").fetchone()[0] == 2
    df = json.loads(cli(store.root, "df", "--json").stdout)
    assert df["SavedByLayerDedup"] > 0 and df["SavedByFileDedup"] > 0
    layers = json.loads(cli(store.root, "layers", "--json").stdout)
    assert sorted(len(la["Images"]) for la in layers) == [1, 2]
    store2.close()


def test_all_images_of_a_layout_and_multiarch(store: Store, tmp_path: Path) -> None:
    lay = Layout(tmp_path / "img")
    lay.add(Img([BASE], ref="one"))
    arm = layer_tar([f("arch", b"arm64")])
    amd = layer_tar([f("arch", b"amd64")])
    lay.add_multiarch([Img([amd], arch="amd64"), Img([arm], arch="arm64")], "multi")
    cli(store.root, "import", f"oci:{tmp_path / 'img'}")
    cli(store.root, "import", f"oci:{tmp_path / 'img'}:multi", "--platform", "linux/arm64",
        "--tag", "multi:arm")  # fmt: skip
    out = tmp_path / "arm"
    cli(store.root, "unpack", "multi:arm", str(out))
    assert (out / "arch").read_bytes() == b"arm64"
    images = json.loads(cli(store.root, "images", "--json").stdout)
    tags = sorted(t for i in images for t in i["RepoTags"])
    assert tags == ["img:multi", "img:one", "multi:arm"]
    p = cli(store.root, "import", f"oci:{tmp_path / 'img'}:multi", "--platform", "linux/s390x",
            check=False)  # fmt: skip
    assert p.returncode != 0 and "no image for platform linux/s390x" in p.stderr


@pytest.mark.parametrize("new_style", [False, True])
def test_docker_archive(store: Store, tmp_path: Path, new_style: bool) -> None:
    arch = tmp_path / "save.tar"
    write_docker_archive(
        arch, [(Img([BASE, TOP]), ["demo:1", "demo:latest"]), (Img([BASE]), ["base:1"])],
        new_style,
    )  # fmt: skip
    cli(store.root, "import", f"docker-archive:{arch}:demo:1", "--tag", "extra:x")
    cli(store.root, "import", str(arch))  # auto-detected, every image
    images = json.loads(cli(store.root, "images", "--json").stdout)
    assert sorted(t for i in images for t in i["RepoTags"]) == [
        "base:1", "demo:1", "demo:latest", "extra:x",
    ]  # fmt: skip


def test_oci_archive_and_inspect_history_tag_rmi(store: Store, tmp_path: Path) -> None:
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="v2"))
    tar_dir(tmp_path / "img", tmp_path / "img.tar")
    cli(store.root, "import", f"oci-archive:{tmp_path / 'img.tar'}:v2", "--tag", "app:2")
    (info,) = json.loads(cli(store.root, "inspect", "app:2").stdout)
    assert info["Id"].startswith("sha256:") and len(info["RootFS"]["Layers"]) == 2
    assert info["RepoTags"] == ["app:2", "img:v2"]
    assert info["Config"]["Cmd"] == ["/bin/sh"]
    (digest_ref,) = info["RepoDigests"]
    assert digest_ref.startswith("img@sha256:")
    (by_digest,) = json.loads(cli(store.root, "inspect", digest_ref).stdout)
    assert by_digest["Id"] == info["Id"]
    (by_id,) = json.loads(cli(store.root, "inspect", info["Id"][7:19]).stdout)
    assert by_id["Id"] == info["Id"]
    hist = cli(store.root, "history", "app:2").stdout
    assert "step 1" in hist and "step 0" in hist
    cli(store.root, "tag", "app:2", "app")
    assert "app:latest" in json.loads(cli(store.root, "inspect", "app").stdout)[0]["RepoTags"]
    assert cli(store.root, "rmi", "app:2").stdout.strip() == "Untagged: app:2"
    p = cli(store.root, "rmi", info["Id"], check=False)
    assert p.returncode == 1 and p.stderr.startswith("layerfs: ") and "several tags" in p.stderr
    out = cli(store.root, "rmi", "-f", info["Id"]).stdout
    assert f"Deleted: {info['Id']}" in out
    p = cli(store.root, "inspect", "app", check=False)
    assert p.returncode == 1 and p.stderr == "layerfs: no such image: app\n"
    assert "Would remove 2 layers" in cli(store.root, "gc", "--dry-run").stdout
    cli(store.root, "gc")
    assert list((store.root / "content").rglob("*-*")) == []
    assert cli(store.root, "fsck", "--full").returncode == 0


def test_same_layer_oddities(store: Store, tmp_path: Path) -> None:
    lower = layer_tar([d("keep"), f("keep/old", b"o"), d("gone"), f("gone/x", b"x"), d("sub")])
    upper = layer_tar(
        [
            sym("keep", "sub"),  # a directory becomes a symlink ...
            wh("keep/old"),  # ... and umoci writes a whiteout under it: hides nothing
            wh("gone"),
            d("gone"),  # whiteout + directory in one layer: an opaque directory
            f("gone/new", b"n"),
            f("dup", b"first"),
            f("dup", b"second"),  # the later member wins
            d("tree"),
            f("tree/leaf", b"l"),
            f("tree", b"now a file"),  # replaces the directory and its subtree
            d("attrs", pax={"SCHILY.xattr.user.dir": "yes"}),
        ]
    )
    write_oci(tmp_path / "img", Img([lower, upper], ref="odd"))
    do_import(store, f"oci:{tmp_path / 'img'}")
    top = store.image_layers("img:odd")[1].id
    keep = store.layer_lookup(top, b"/", b"keep")
    assert keep is not None and keep.kind == EntryKind.SYMLINK
    assert store.layer_lookup(top, b"/keep", b"old") is None
    gone = store.layer_lookup(top, b"/", b"gone")
    assert gone is not None and gone.kind == EntryKind.DIR and gone.opaque
    dup = store.layer_lookup(top, b"/", b"dup")
    assert dup is not None and store.content_path(dup.content or "").read_bytes() == b"second"
    tree = store.layer_lookup(top, b"/", b"tree")
    assert tree is not None and tree.kind == EntryKind.FILE
    assert store.layer_listdir(top, b"/tree") == []
    attrs = store.layer_lookup(top, b"/", b"attrs")
    assert attrs is not None and attrs.xattrs == ((b"user.dir", b"yes"),)
    assert store.fsck() == []
    out = tmp_path / "rootfs"
    cli(store.root, "unpack", "img:odd", str(out))
    assert os.readlink(out / "keep") == "sub"
    assert sorted(os.listdir(out / "gone")) == ["new"]
    assert (out / "tree").read_bytes() == b"now a file"


def test_content_key_collision_compares_bytes(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import xxhash

    # Make every small content hash alike: equal sizes then collide on the key.
    monkeypatch.setattr(xxhash, "xxh3_128_hexdigest", lambda _data: "0" * 32)
    layer = layer_tar([f("a", b"AAAA"), f("b", b"BBBB"), f("c", b"AAAA"), f("d", b"CC")])
    write_oci(tmp_path / "img", Img([layer], ref="col"))
    do_import(store, f"oci:{tmp_path / 'img'}")
    (lay,) = store.image_layers("img:col")
    found = {n: store.layer_lookup(lay.id, b"/", n) for n in (b"a", b"b", b"c", b"d")}
    keys = {n: e.content for n, e in found.items() if e is not None}
    assert keys[b"a"] == keys[b"c"] == "0" * 32 + "-4"
    assert keys[b"b"] == "0" * 32 + "-4.1"
    for n, want in ((b"a", b"AAAA"), (b"b", b"BBBB"), (b"d", b"CC")):
        assert store.content_path(keys[n] or "").read_bytes() == want
    # A second image colliding with both stored contents gets the next free key.
    write_oci(tmp_path / "img2", Img([layer_tar([f("z", b"ZZZZ"), f("y", b"BBBB")])], ref="c2"))
    do_import(store, f"oci:{tmp_path / 'img2'}")
    (lay2,) = store.image_layers("img2:c2")
    z = store.layer_lookup(lay2.id, b"/", b"z")
    y = store.layer_lookup(lay2.id, b"/", b"y")
    assert z is not None and z.content == "0" * 32 + "-4.2"
    assert y is not None and y.content == "0" * 32 + "-4.1"
    assert store.content_path(z.content or "").read_bytes() == b"ZZZZ"
    assert store.fsck() == []


def test_large_file_streams_through_a_temp_file(store: Store, tmp_path: Path) -> None:
    big = bytes(range(256)) * (5 * 4096 + 3)  # > 1 MiB: the streaming path
    write_oci(tmp_path / "img", Img([layer_tar([f("big", big), f("big2", big)])], ref="big"))
    do_import(store, f"oci:{tmp_path / 'img'}")
    (lay,) = store.image_layers("img:big")
    a = store.layer_lookup(lay.id, b"/", b"big")
    b = store.layer_lookup(lay.id, b"/", b"big2")
    assert a is not None and b is not None and a.content == b.content and a.size == len(big)
    assert store.content_path(a.content or "").read_bytes() == big
    assert store.df()["stored_bytes"] == len(big)
    assert store.fsck(full=True) == []


def test_lookup_many_and_listdir_many_match_per_layer_calls(store: Store, tmp_path: Path) -> None:
    write_oci(tmp_path / "img", Img([BASE, TOP], ref="m"))
    do_import(store, f"oci:{tmp_path / 'img'}")
    ids = [la.id for la in store.image_layers("img:m")]
    for parent, name in (
        (b"/etc", b"passwd"),
        (b"/", b"etc"),
        (b"/etc/conf.d", b"c"),
        (b"/", b"no"),
    ):
        want = {i: e for i in ids if (e := store.layer_lookup(i, parent, name)) is not None}
        assert store.lookup_many(ids, parent, name) == want
    for parent in (b"/", b"/etc", b"/etc/conf.d", b"/nothing"):
        want_ls = {i: ls for i in ids if (ls := store.layer_listdir(i, parent))}
        assert store.listdir_many(ids, parent) == want_ls


def test_unterminated_and_empty_layers(store: Store, tmp_path: Path) -> None:
    raw = layer_tar([d("a"), f("a/b", b"no end-of-archive marker")], eof_marker=False)
    empty = layer_tar([])
    write_oci(tmp_path / "img", Img([empty, raw, empty], ref="e"))
    p = cli(store.root, "import", f"oci:{tmp_path / 'img'}")
    assert p.stdout.count("Already exists") == 1  # the repeated empty layer, within one image
    layers = store.image_layers("img:e")
    assert len(layers) == 3 and layers[0].id == layers[2].id
    out = tmp_path / "rootfs"
    cli(store.root, "unpack", "img:e", str(out))
    assert (out / "a/b").read_bytes() == b"no end-of-archive marker"
    assert cli(store.root, "fsck").returncode == 0


def test_docker_archive_ref_by_index(store: Store, tmp_path: Path) -> None:
    arch = tmp_path / "save.tar"
    write_docker_archive(arch, [(Img([BASE]), ["a:1"]), (Img([TOP]), ["b:1"])], False)
    cli(store.root, "import", f"docker-archive:{arch}:@1")
    images = json.loads(cli(store.root, "images", "--json").stdout)
    assert [i["RepoTags"] for i in images] == [["b:1"]]
    p = cli(store.root, "import", f"docker-archive:{arch}:c:1", check=False)
    assert p.returncode == 1 and "has no image 'c:1'" in p.stderr


def test_store_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from layerstore import store as store_mod

    monkeypatch.setenv("LAYERFS_STORE", str(tmp_path / "env"))
    assert store_mod.default_store_dir() == tmp_path / "env"
    monkeypatch.delenv("LAYERFS_STORE")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert store_mod.default_store_dir() == tmp_path / "xdg" / "layerfs"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert store_mod.default_store_dir() == Path("/var/lib/layerfs")
    env = {**os.environ, "LAYERFS_STORE": str(tmp_path / "viaenv")}
    p = subprocess.run([*LAYERFS, "images"], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not (tmp_path / "viaenv").exists()  # reading creates nothing
    write_oci(tmp_path / "img", Img([BASE], ref="v"))
    p = subprocess.run(
        [*LAYERFS, "import", f"oci:{tmp_path / 'img'}:v"], env=env, capture_output=True, timeout=60
    )
    assert p.returncode == 0 and (tmp_path / "viaenv" / "index.db").exists()


def test_tar_split_rebuilds_every_layer_exactly(store: Store, tmp_path: Path) -> None:
    gnu = layer_tar([f("g/" + "l" * 150, b"gnu long name"), hard("g/h", "g/" + "l" * 150)],
                    fmt=tarfile.GNU_FORMAT)  # fmt: skip
    open_end = layer_tar([d("u"), f("u/v", b"v" * 1000)], eof_marker=False)
    dups = layer_tar([f("dup", b"one"), f("dup", b"two"), f("zero", b""), wh("gone")])
    write_oci(tmp_path / "img", Img([BASE, TOP, gnu, open_end], ref="t"))
    write_oci(tmp_path / "img2", Img([dups], compression="zstd", ref="d"))
    do_import(store, f"oci:{tmp_path / 'img'}")
    do_import(store, f"oci:{tmp_path / 'img2'}")
    originals = {digest: tar for tar in (BASE, TOP, gnu, open_end, dups)
                 if (digest := "sha256:" + hashlib.sha256(tar).hexdigest())}  # fmt: skip
    rows = store.conn.execute("SELECT id, diff_id, tarsplit FROM layers").fetchall()
    assert len(rows) == 5
    for lid, diff_id, has_split in rows:
        if diff_id == "sha256:" + hashlib.sha256(dups).hexdigest():
            # "one" is referenced by no entry (the later "two" wins): no split for this layer
            assert has_split == 0
            with pytest.raises(Exception, match="no tar-split"):
                b"".join(store.layer_tar(lid))
            continue
        assert has_split == 1
        assert b"".join(store.layer_tar(lid)) == originals[diff_id]
    assert store.fsck(full=True) == []
    # damage a split: fsck --full notices
    split = store.tarsplit_dir / rows[0][1].removeprefix("sha256:")
    split.write_bytes(b"not zstd")
    assert any("cannot rebuild" in p or "does not match" in p for p in store.fsck(full=True))
