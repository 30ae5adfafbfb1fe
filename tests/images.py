"""Build test images with real tools (umoci, skopeo, buildah, GNU tar) from local files only.

Every builder writes into an OCI image layout and returns an `Image` naming it. Payloads are
small: busybox-static's /bin/busybox is the one real binary; everything else is a few bytes.
Builders need root (device nodes, odd owners) and the tools; fixtures skip when absent.

The images, and what each exercises:
- ``base``: one layer from ``umoci repack``: busybox, applet symlinks, /etc files, a sticky
  /tmp, an empty file, ``/etc/motd`` (identical copies appear in later layers and images).
- ``app`` (``base`` + 3 layers, by ``umoci repack`` twice, then GNU tar):
  1. hard links, symlinks (relative, absolute, dangling, to a directory, a target longer
     than 100 bytes), char and block devices, a fifo, file capabilities
     (``security.capability``), a ``trusted.*`` xattr, ``user.*`` xattrs (on a directory
     too, a binary value; no empty value: Go's archive/tar, which umoci uses, drops empty PAX
     records), uid/gid 1234:5678 and 65534, setuid, setgid and sticky bits, non-UTF-8
     names, names and paths longer than 100 bytes, empty and identical files;
  2. whiteouts of a file, a directory and one of two hard links, a new hard link to a lower
     file, a changed content, a changed mode;
  3. (``umoci raw add-layer``) an opaque directory whose marker precedes the directory's own
     entry; whiteouts of two lower files that the same layer re-creates (one before, one
     after the whiteout); the directory whited out in 2 made again with a new child; a file
     whose parent directories have no entries; a history time with 8 fraction digits.
- ``other`` (``base`` + 1 layer): shares the base layer with ``app`` and a file's content.
- ``retype`` (``base`` + 2 layers): a file becomes a directory, a directory a symlink (umoci
  then writes a whiteout under that new symlink, and its unpack follows that symlink and
  deletes a file of the same name in the target: compared against an expected tree), a
  symlink a file.
- ``symwh`` (``base`` + 2 layers): ``link -> real`` and ``real/f``; then a raw layer with only
  ``link/.wh.f``. umoci follows the symlink and deletes ``real/f``; the kernel and layerfs do
  not (DESIGN §2), so tests compare this one against an expected tree (``symwh-pre``).
- buildah: ``buildah from oci:...:base``, ``copy --chown 65534``, ``config --arch``, commit to a
  layout (uncompressed layers, the base layer's DiffID unchanged), and ``buildah manifest`` for a
  two-platform index (linux/amd64 and linux/arm64).

Conversions of any of them: skopeo's oci-archive; skopeo's docker-archive (``manifest.json``,
``<diffid>.tar``, ``<id>/layer.tar`` symlinks, ``repositories``); the same rewritten as
Docker before 25 wrote it (layers only as ``<id>/layer.tar``); Docker 25's ``docker save``
(an OCI layout of uncompressed layers plus ``manifest.json`` naming ``blobs/sha256/...``);
layers recompressed by skopeo with zstd or gzip; an OCI layout holding a Docker v2 schema 2
manifest (``skopeo --format v2s2``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ls", "cat", "echo", "mkdir", "rm")
MOTD = b"layerfs test image\n"
TOOLS = ("umoci", "skopeo", "buildah", "tar")

# A symlink target longer than 100 bytes needs a PAX/GNU long link header.
LONG_TARGET = b"/" + b"/".join([b"long-target-component"] * 6) + b"/end"
LONG_NAME = b"n" * 150  # one component longer than a ustar name field
LONG_DIR = b"/".join([b"d" * 40] * 3)  # a path longer than 100 bytes made of short parts
# security.capability granting cap_net_raw (effective, permitted), as `setcap` writes it
# (VFS_CAP_REVISION_2): images carry file capabilities, e.g. on ping.
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
NON_UTF8 = (b"caf\xe9", b"\xff\xfe-latin1-\xe0")


@dataclass(frozen=True)
class Image:
    """An image inside an OCI layout: `layout` directory, `ref` its tag there."""

    name: str
    layout: Path
    ref: str

    @property
    def source(self) -> str:
        """The image in skopeo transport syntax (``oci:DIR:REF``)."""
        return f"oci:{self.layout}:{self.ref}"


class ToolError(RuntimeError):
    """A builder tool failed; the message quotes its command and stderr."""


def run_bytes(cmd: Sequence[str | os.PathLike[str]], cwd: Path | None = None) -> bytes:
    """Run a tool, return its stdout bytes; raise ToolError with its stderr when it fails."""
    argv = [os.fspath(c) for c in cmd]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise ToolError(
            f"{' '.join(argv)} exited {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace').strip()}"
        )
    return proc.stdout


def run(cmd: Sequence[str | os.PathLike[str]], cwd: Path | None = None) -> str:
    """Run a tool, return its stdout as text; raise ToolError when it fails."""
    return run_bytes(cmd, cwd).decode(errors="replace")


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of `data`, as OCI descriptors spell digests."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def missing_tools(tools: Sequence[str] = TOOLS) -> list[str]:
    """The tools of `tools` that are not on PATH (plus busybox-static's binary)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if not BUSYBOX.is_file():
        missing.append(f"{BUSYBOX} (busybox-static)")
    return missing


def unsupported_here(work: Path) -> str | None:
    """Why the images cannot be built in `work` (None when they can): root in a user
    namespace may not make devices or set trusted.* xattrs; some filesystems take no user.*
    xattrs."""
    probe = os.fsencode(work / "probe")
    step = "create a file"
    try:
        for kind, what in ((stat.S_IFCHR, "char"), (stat.S_IFBLK, "block")):
            step = f"make a {what} device"
            os.mknod(probe, 0o600 | kind, os.makedev(1, 3))
            os.unlink(probe)
        step = "create a file"
        open(probe, "wb").close()
        for name, value in (
            (b"user.probe", b"x"),
            (b"trusted.probe", b"x"),
            (b"security.capability", CAP_NET_RAW),
        ):
            step = f"set the xattr {name.decode()}"
            os.setxattr(probe, name, value)
    except OSError as exc:
        return f"cannot {step}: {exc.strerror}"
    finally:
        if os.path.lexists(probe):
            os.unlink(probe)
    return None


# --- umoci ---------------------------------------------------------------------------------


def init_layout(layout: Path) -> Path:
    """Create an empty OCI image layout at `layout`."""
    run(["umoci", "init", "--layout", layout])
    return layout


def umoci_unpack(layout: Path, ref: str, bundle: Path) -> Path:
    """``umoci unpack`` (as root, not rootless) into `bundle`; return its rootfs."""
    run(["umoci", "unpack", "--image", f"{layout}:{ref}", bundle])
    return bundle / "rootfs"


def _repack(layout: Path, ref: str, bundle: Path, comment: str) -> None:
    run(
        [
            "umoci",
            "repack",
            "--history.created_by",
            f"layerfs tests: {comment}",
            "--image",
            f"{layout}:{ref}",
            bundle,
        ]
    )
    shutil.rmtree(bundle)


def _bytes_path(root: Path, rel: bytes) -> bytes:
    return os.path.join(os.fsencode(root), rel)


def _write(root: Path, rel: bytes | str, data: bytes, mode: int = 0o644) -> bytes:
    path = _bytes_path(root, os.fsencode(rel))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def _mkdir(root: Path, rel: bytes | str, mode: int = 0o755) -> bytes:
    path = _bytes_path(root, os.fsencode(rel))
    os.makedirs(path, exist_ok=True)
    os.chmod(path, mode)  # chmod: makedirs' mode is filtered by the umask
    return path


def _symlink(root: Path, rel: bytes | str, target: bytes | str) -> None:
    os.symlink(os.fsencode(target), _bytes_path(root, os.fsencode(rel)))


def build_base(layout: Path, ref: str = "base") -> Image:
    """The base image: one umoci layer with busybox, applet links and a few /etc files."""
    run(["umoci", "new", "--image", f"{layout}:{ref}"])
    bundle = layout.parent / f"bundle-{ref}"
    rootfs = umoci_unpack(layout, ref, bundle)
    _mkdir(rootfs, "bin")
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    os.chmod(rootfs / "bin" / "busybox", 0o755)
    for applet in APPLETS:
        _symlink(rootfs, f"bin/{applet}", "busybox")
    _write(
        rootfs, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/sh\n"
    )
    _write(rootfs, "etc/group", b"root:x:0:\nnobody:x:65534:\n")
    _write(rootfs, "etc/motd", MOTD)
    _write(rootfs, "etc/empty", b"")
    _mkdir(rootfs, "tmp", 0o1777)
    _mkdir(rootfs, "root", 0o700)
    _repack(layout, ref, bundle, "busybox base")
    run(
        [
            "umoci",
            "config",
            "--config.cmd",
            "/bin/sh",
            "--config.env",
            "PATH=/bin",
            "--author",
            "layerfs tests",
            "--image",
            f"{layout}:{ref}",
        ]
    )
    return Image("base", layout, ref)


def _features_layer(rootfs: Path) -> None:
    """Everything a layer tar can hold that we support, written into an unpacked rootfs."""
    _mkdir(rootfs, "data")
    hello = _write(rootfs, "data/hello", b"hello, world\n", 0o640)
    os.chown(hello, 1234, 5678)
    os.setxattr(hello, b"user.comment", b"greeting")
    os.setxattr(hello, b"user.binary", b"\x00\xff\x01")
    os.link(hello, _bytes_path(rootfs, b"data/hello.link"))  # a hard link pair kept
    hl1 = _write(rootfs, "data/hl1", b"hard link pair, one deleted later\n")
    os.link(hl1, _bytes_path(rootfs, b"data/hl2"))
    for rel in ("data/nobody", "srv/nobody"):
        nobody = _write(rootfs, rel, b"owned by nobody\n", 0o600)
        os.chown(nobody, 65534, 65534)
    _write(rootfs, "data/sub/deep/file", b"deep v1\n")
    xdir = _mkdir(rootfs, "data/xattr-dir", 0o750)
    os.setxattr(xdir, b"user.dir", b"on a directory")
    _symlink(rootfs, "data/dirlink", "sub")
    _symlink(rootfs, "data/dangling", "/does/not/exist")
    _symlink(rootfs, "data/abs", "/bin/busybox")
    _symlink(rootfs, "data/longlink", LONG_TARGET)
    symown = _bytes_path(rootfs, b"data/dangling")
    os.chown(symown, 1234, 5678, follow_symlinks=False)
    _mkdir(rootfs, "dev")
    os.mknod(_bytes_path(rootfs, b"dev/null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(_bytes_path(rootfs, b"dev/loop0"), 0o660 | stat.S_IFBLK, os.makedev(7, 0))
    os.chown(_bytes_path(rootfs, b"dev/loop0"), 0, 6)
    os.mkfifo(_bytes_path(rootfs, b"dev/fifo"), 0o620)
    _write(rootfs, "usr/bin/suid", b"#!/bin/sh\necho suid\n", 0o4755)
    _write(rootfs, "usr/bin/sgid", b"#!/bin/sh\necho sgid\n", 0o2711)
    ping = _write(rootfs, "usr/bin/ping", b"#!/bin/sh\necho ping\n", 0o755)
    os.setxattr(ping, b"security.capability", CAP_NET_RAW)
    os.setxattr(ping, b"trusted.layerfs-test", b"a trusted.* xattr")
    _mkdir(rootfs, "srv/shared", 0o2775)
    _mkdir(rootfs, "srv/sticky", 0o1733)
    for name in NON_UTF8:
        _write(rootfs, b"data/" + name, b"not utf-8: " + name + b"\n")
    _write(rootfs, b"data/" + LONG_NAME, b"long name\n")
    _write(rootfs, b"data/" + LONG_DIR + b"/leaf-in-a-long-path", b"long path\n")
    _write(rootfs, "data/empty1", b"")
    _write(rootfs, "data/empty2", b"", 0o600)
    _write(rootfs, "data/motd-copy", MOTD)  # identical to the base layer's /etc/motd
    _write(rootfs, "data/same-a", b"identical content\n")
    _write(rootfs, "data/same-b", b"identical content\n", 0o755)
    # Targets of the deletion layer.
    _write(rootfs, "data/gone.txt", b"deleted in the next layer\n")
    _write(rootfs, "data/gonedir/a", b"a\n")
    _write(rootfs, "data/gonedir/b/c", b"c\n")
    _write(rootfs, "data/chmodded", b"mode changes later\n", 0o644)
    # Targets of the opaque layer.
    _write(rootfs, "data/opq/old1", b"hidden by an opaque dir\n")
    _write(rootfs, "data/opq/oldsub/x", b"hidden too\n")


def _deletions_layer(rootfs: Path) -> None:
    os.unlink(rootfs / "data" / "gone.txt")
    shutil.rmtree(rootfs / "data" / "gonedir")
    os.unlink(rootfs / "data" / "hl2")
    os.chmod(rootfs / "data" / "chmodded", 0o600)
    _write(rootfs, "data/sub/deep/file", b"deep v2, changed in layer 3\n")
    _write(rootfs, "etc/motd-again", MOTD)  # the same content in a third layer
    # A new hard link to a lower file: umoci writes the file again, then the link to it.
    os.link(rootfs / "data" / "same-a", rootfs / "data" / "same-a.link")


def _tar_layer(staging: Path, members: Sequence[str], out: Path) -> Path:
    """A layer tar by GNU tar (POSIX format, xattrs), members in the order given."""
    run(
        [
            "tar",
            "--format=posix",
            "--xattrs",
            "--xattrs-include=user.*",
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "-C",
            staging,
            "--no-recursion",
            "-cf",
            out,
            *members,
        ]
    )
    return out


def _add_raw_layer(
    layout: Path, ref: str, tar: Path, comment: str, created: str | None = None
) -> None:
    created_opts = ["--history.created", created] if created else []
    run(
        [
            "umoci",
            "raw",
            "add-layer",
            "--history.created_by",
            f"layerfs tests: {comment}",
            *created_opts,
            "--image",
            f"{layout}:{ref}",
            tar,
        ]
    )


# Go writes RFC 3339 times with as many fraction digits as needed (trailing zeros trimmed),
# so 1 to 9 digits occur in real configs; the opaque layer's history entry has eight.
ODD_PRECISION_TIME = "2001-02-03T04:05:06.12345678Z"


SAME_LAYER_CONTENT = b"re-created in the layer that whites it out\n"


def build_app(layout: Path, base: Image, ref: str = "app") -> Image:
    """``base`` + features layer + deletions layer + opaque layer (see the module docstring)."""
    run(["umoci", "tag", "--image", f"{layout}:{base.ref}", ref])
    bundle = layout.parent / f"bundle-{ref}"
    _features_layer(umoci_unpack(layout, ref, bundle))
    _repack(layout, ref, bundle, "features")
    _deletions_layer(umoci_unpack(layout, ref, bundle))
    _repack(layout, ref, bundle, "deletions")
    staging = layout.parent / f"staging-{ref}"
    (staging / "data" / "opq").mkdir(parents=True)
    (staging / "data" / "opq" / ".wh..wh..opq").touch()
    new = staging / "data" / "opq" / "new"
    new.write_bytes(b"the only child of the opaque dir\n")
    os.setxattr(new, b"user.from", b"gnu tar")
    os.chmod(staging / "data" / "opq", 0o751)
    # A whiteout and an entry of the same name in one layer: the whiteout hides the lower
    # file only, the entry stays (OCI image spec; umoci agrees), whichever comes first.
    for name in ("empty1", "nobody"):
        (staging / "data" / name).write_bytes(SAME_LAYER_CONTENT)
        (staging / "data" / f".wh.{name}").touch()
    # A directory whited out in the layer below, made again: only its new child shows,
    # although this directory is not opaque (the whiteout below ends the merge).
    (staging / "data" / "gonedir").mkdir()
    (staging / "data" / "gonedir" / "reborn").write_bytes(b"a new child\n")
    # No entries for srv/ and srv/sticky/: the lower directories keep their metadata.
    (staging / "srv" / "sticky").mkdir(parents=True)
    (staging / "srv" / "sticky" / "no-parent-entries").write_bytes(b"parents implied\n")
    members = [
        "data/opq/.wh..wh..opq",  # the opaque marker before its directory's own entry
        "data",
        "data/opq",
        "data/opq/new",
        "data/.wh.empty1",
        "data/empty1",
        "data/nobody",
        "data/.wh.nobody",
        "data/gonedir",
        "data/gonedir/reborn",
        "srv/sticky/no-parent-entries",
    ]
    tar = _tar_layer(staging, members, layout.parent / f"{ref}-opaque.tar")
    _add_raw_layer(layout, ref, tar, "opaque dir, same-layer whiteouts", ODD_PRECISION_TIME)
    shutil.rmtree(staging)
    tar.unlink()
    return Image("app", layout, ref)


def build_other(layout: Path, base: Image, ref: str = "other") -> Image:
    """``base`` + one small layer: shares the base layer (and a file's content) with ``app``."""
    run(["umoci", "tag", "--image", f"{layout}:{base.ref}", ref])
    bundle = layout.parent / f"bundle-{ref}"
    rootfs = umoci_unpack(layout, ref, bundle)
    _write(rootfs, "srv/motd-copy", MOTD)
    _write(rootfs, "srv/other", b"only in other\n")
    os.unlink(rootfs / "etc" / "empty")
    _repack(layout, ref, bundle, "other")
    return Image("other", layout, ref)


RETYPE_SUB_CHILD = b"not wasdir's child, but in the directory wasdir comes to point to\n"


def build_retype(layout: Path, base: Image, ref: str = "retype") -> tuple[Image, Image]:
    """``base`` + a layer of a file, a directory and a symlink + a layer changing each one's
    type: the file becomes a directory, the directory a symlink, the symlink a file.

    For the directory, umoci writes the new symlink *and* a whiteout under it
    (``wasdir -> sub``, ``wasdir/.wh.child``): a whiteout below a symlink of the same layer.
    ``sub/child`` exists, and umoci's own unpack follows the new symlink and deletes it.
    Returns (the image, the same image without its last layer).
    """
    run(["umoci", "tag", "--image", f"{layout}:{base.ref}", ref])
    bundle = layout.parent / f"bundle-{ref}"
    rootfs = umoci_unpack(layout, ref, bundle)
    _write(rootfs, "data/replaced", b"a file that becomes a directory\n")
    _write(rootfs, "data/wasdir/child", b"a directory that becomes a symlink\n")
    _write(rootfs, "data/sub/kept", b"the symlink's target\n")
    _write(rootfs, "data/sub/child", RETYPE_SUB_CHILD)  # the same name as wasdir's child
    _symlink(rootfs, "data/waslink", "sub")
    _repack(layout, ref, bundle, "three types")
    run(["umoci", "tag", "--image", f"{layout}:{ref}", f"{ref}-pre"])
    rootfs = umoci_unpack(layout, ref, bundle)
    os.unlink(rootfs / "data" / "replaced")
    _write(rootfs, "data/replaced/now-a-dir", b"child\n")
    shutil.rmtree(rootfs / "data" / "wasdir")
    _symlink(rootfs, "data/wasdir", "sub")
    os.unlink(rootfs / "data" / "waslink")
    _write(rootfs, "data/waslink", b"was a symlink\n")
    _repack(layout, ref, bundle, "types changed")
    return Image("retype", layout, ref), Image("retype-pre", layout, f"{ref}-pre")


SYMWH_REAL_F = b"behind a symlink\n"


def build_symlink_whiteout(layout: Path, base: Image, ref: str = "symwh") -> tuple[Image, Image]:
    """``base`` + ``link -> real``, ``real/{f,g}`` + a raw layer holding only ``link/.wh.f``.

    Returns (the image, the same image without its last layer).
    """
    run(["umoci", "tag", "--image", f"{layout}:{base.ref}", ref])
    bundle = layout.parent / f"bundle-{ref}"
    rootfs = umoci_unpack(layout, ref, bundle)
    _write(rootfs, "real/f", SYMWH_REAL_F)
    _write(rootfs, "real/g", b"untouched\n")
    _symlink(rootfs, "link", "real")
    _repack(layout, ref, bundle, "symlink to a dir")
    # The image without its last layer: what layerfs must show for the whole image, since a
    # whiteout behind a symlink hides nothing.
    run(["umoci", "tag", "--image", f"{layout}:{ref}", f"{ref}-pre"])
    staging = layout.parent / f"staging-{ref}"
    (staging / "link").mkdir(parents=True)
    (staging / "link" / ".wh.f").touch()
    # Only the whiteout: no entry for `link` itself, so the layer does not replace the symlink.
    tar = _tar_layer(staging, ["link/.wh.f"], layout.parent / f"{ref}.tar")
    _add_raw_layer(layout, ref, tar, "whiteout under a symlink")
    shutil.rmtree(staging)
    tar.unlink()
    return Image("symwh", layout, ref), Image("symwh-pre", layout, f"{ref}-pre")


# --- buildah -------------------------------------------------------------------------------


class Buildah:
    """buildah with its own vfs storage under `root` (no daemon, no network, no runtime)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def __call__(self, *args: str | os.PathLike[str]) -> str:
        return run(
            [
                "buildah",
                "--storage-driver",
                "vfs",
                "--root",
                self.root / "storage",
                "--runroot",
                self.root / "run",
                *args,
            ]
        ).strip()


def build_buildah_images(work: Path, layout: Path, base: Image) -> tuple[Image, Image, Image]:
    """Two single-platform images built on ``base`` and their two-platform index.

    Returns (linux/amd64 image, linux/arm64 image, index); all in `layout`. The index is made
    by ``buildah manifest create/add/push --all``.
    """
    bh = Buildah(work / "buildah")
    payload = work / "buildah-payload"
    payload.mkdir()
    (payload / "hello").write_bytes(b"copied by buildah\n")
    (payload / "motd").write_bytes(MOTD)
    (payload / "tree" / "inner").mkdir(parents=True)
    (payload / "tree" / "inner" / "leaf").write_bytes(b"leaf\n")
    images = []
    for arch, ref in (("amd64", "buildah-amd64"), ("arm64", "buildah-arm64")):
        ctr = bh("from", "--pull-never", "--name", f"ctr-{arch}", base.source)
        bh("copy", "--chown", "65534:65534", "--chmod", "0640", ctr, payload / "hello", "/srv/")
        bh("copy", ctr, payload / "motd", f"/srv/motd-{arch}")
        bh("copy", ctr, payload / "tree", "/srv/tree")
        bh("config", "--arch", arch, "--os", "linux", "--label", f"arch={arch}", ctr)
        bh("commit", "-q", ctr, f"oci:{layout}:{ref}")
        images.append(Image(ref, layout, ref))
    bh("manifest", "create", "layerfs-test-list")
    for img in images:
        bh("manifest", "add", "layerfs-test-list", img.source)
    bh("manifest", "push", "--all", "layerfs-test-list", f"oci:{layout}:buildah-index")
    shutil.rmtree(work / "buildah")
    shutil.rmtree(payload)
    return images[0], images[1], Image("buildah-index", layout, "buildah-index")


# --- skopeo conversions --------------------------------------------------------------------


def skopeo_copy(src: str, dest: str, *opts: str) -> None:
    """``skopeo copy`` between local transports (no signatures, no network)."""
    run(["skopeo", "copy", "-q", *opts, src, dest])


def to_oci_archive(img: Image, out: Path) -> str:
    """An OCI archive of `img` (same blobs); returns the transport string to import."""
    skopeo_copy(img.source, f"oci-archive:{out}:{img.ref}")
    return f"oci-archive:{out}"


def to_docker_archive(img: Image, out: Path) -> str:
    """``docker save``'s legacy layout: manifest.json, <id>/layer.tar, repositories."""
    skopeo_copy(img.source, f"docker-archive:{out}:layerfs-test/{img.name}:latest")
    return f"docker-archive:{out}"


def to_docker_legacy_archive(img: Image, work: Path, out: Path) -> str:
    """``docker save`` as Docker before 25 wrote it: each layer only as ``<id>/layer.tar`` (a
    regular file), which manifest.json's Layers name, beside ``<id>/json`` and ``VERSION``.

    skopeo's docker-archive stores each layer once as ``<diffid>.tar`` and makes
    ``<id>/layer.tar`` a symlink to it; this rewrites skopeo's tar into Docker's shape.
    """
    skopeo_out = work / f"{img.name}.skopeo-docker.tar"
    to_docker_archive(img, skopeo_out)
    with tarfile.open(skopeo_out) as src:
        members = {m.name: m for m in src.getmembers()}
        # <diffid>.tar -> <id>/layer.tar, through skopeo's symlinks.
        legacy = {
            os.path.normpath(os.path.join(os.path.dirname(name), m.linkname)): name
            for name, m in members.items()
            if name.endswith("/layer.tar") and m.issym()
        }
        manifest = json.load(src.extractfile("manifest.json"))  # type: ignore[arg-type]
        for entry in manifest:
            entry["Layers"] = [legacy[layer] for layer in entry["Layers"]]
        with tarfile.open(out, "w") as dst:
            for name, m in members.items():
                if name in legacy:
                    continue  # the top-level <diffid>.tar: Docker writes only <id>/layer.tar
                if name == "manifest.json":
                    data = json.dumps(manifest).encode()
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    dst.addfile(info, io.BytesIO(data))
                elif m.issym() and name.endswith("/layer.tar"):
                    target = members[
                        os.path.normpath(os.path.join(os.path.dirname(name), m.linkname))
                    ]
                    info = tarfile.TarInfo(name)
                    info.size = target.size
                    dst.addfile(info, src.extractfile(target))
                else:
                    dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    skopeo_out.unlink()
    return f"docker-archive:{out}"


def to_zstd_layout(img: Image, layout: Path) -> str:
    """An OCI layout whose layers skopeo recompressed with zstd."""
    skopeo_copy(
        img.source, f"oci:{layout}:{img.ref}", "--dest-compress", "--dest-compress-format", "zstd"
    )
    return f"oci:{layout}:{img.ref}"


def to_gzip_layout(img: Image, layout: Path) -> str:
    """An OCI layout whose layers skopeo (re)compressed with gzip."""
    skopeo_copy(
        img.source, f"oci:{layout}:{img.ref}", "--dest-compress", "--dest-compress-format", "gzip"
    )
    return f"oci:{layout}:{img.ref}"


def index_to_oci_archive(index: Image, out: Path) -> str:
    """An OCI archive holding a whole image index and every platform's image (``--all``)."""
    skopeo_copy(index.source, f"oci-archive:{out}:{index.ref}", "--all")
    return f"oci-archive:{out}"


def to_v2s2_layout(img: Image, layout: Path) -> str:
    """An OCI layout holding a Docker v2 schema 2 manifest (docker media types throughout),
    as ``skopeo copy --format v2s2`` writes it (skopeo itself cannot read it back)."""
    skopeo_copy(img.source, f"oci:{layout}:{img.ref}", "--format", "v2s2")
    return f"oci:{layout}:{img.ref}"


def to_docker_blobs_archive(img: Image, work: Path, out: Path) -> str:
    """Docker 25's ``docker save`` layout: an OCI layout of uncompressed layers, plus
    ``manifest.json`` whose Config and Layers name ``blobs/sha256/<hex>`` (and a
    ``repositories`` file), in one tar.

    skopeo writes the OCI part (``--dest-decompress``); the two Docker files are written here
    the way Docker 25 writes them, since no Debian tool produces this layout.
    """
    layout = work / f"docker-blobs-{img.name}"
    skopeo_copy(img.source, f"oci:{layout}:{img.ref}", "--dest-decompress")
    index = json.loads((layout / "index.json").read_text())
    desc = index["manifests"][0]
    manifest = json.loads(
        (layout / "blobs" / "sha256" / desc["digest"].removeprefix("sha256:")).read_text()
    )
    repo_tag = f"layerfs-test/{img.name}:latest"
    desc.setdefault("annotations", {})["io.containerd.image.name"] = f"docker.io/{repo_tag}"
    (layout / "index.json").write_text(json.dumps(index))
    docker_manifest = [
        {
            "Config": "blobs/sha256/" + manifest["config"]["digest"].removeprefix("sha256:"),
            "RepoTags": [repo_tag],
            "Layers": [
                "blobs/sha256/" + layer["digest"].removeprefix("sha256:")
                for layer in manifest["layers"]
            ],
        }
    ]
    (layout / "manifest.json").write_text(json.dumps(docker_manifest))
    (layout / "repositories").write_text(
        json.dumps(
            {
                f"layerfs-test/{img.name}": {
                    "latest": manifest["layers"][-1]["digest"].removeprefix("sha256:")
                }
            }
        )
    )
    with tarfile.open(out, "w") as tar:
        for child in sorted(layout.iterdir()):
            tar.add(child, arcname=child.name)
    shutil.rmtree(layout)
    return f"docker-archive:{out}"


def config_diff_ids(source: str) -> list[str]:
    """The DiffIDs ``skopeo inspect --config`` reports for an image."""
    config = json.loads(run(["skopeo", "inspect", "--config", source]))
    return list(config["rootfs"]["diff_ids"])


def manifest_layers(source: str) -> list[str]:
    """The layer (compressed blob) digests of an image's manifest, via ``skopeo inspect``."""
    manifest = json.loads(run(["skopeo", "inspect", "--raw", source]))
    return [layer["digest"] for layer in manifest["layers"]]


def layer_members(img: Image) -> list[list[tarfile.TarInfo]]:
    """The tar members of each layer of `img` (bottom first), read from its layout's blobs."""
    out = []
    for digest in manifest_layers(img.source):
        with tarfile.open(img.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")) as t:
            out.append(t.getmembers())
    return out


def has_root_entry(img: Image) -> bool:
    """Whether some layer of `img` carries an entry for the root directory itself."""
    return any(m.name.strip("/") in ("", ".") for members in layer_members(img) for m in members)


def hardlink_groups(root: Path) -> set[frozenset[bytes]]:
    """The sets of two or more paths below `root` (relative, bytes) sharing an inode."""
    base = os.fsencode(root)
    by_inode: dict[tuple[int, int], set[bytes]] = {}
    for dirpath, dirs, files in os.walk(base):
        for name in [*files, *dirs]:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                rel = os.path.relpath(path, base)
                by_inode.setdefault((st.st_dev, st.st_ino), set()).add(rel)
    # A lone name can have nlink > 1 when its partners are out of view (overlayfs shows a
    # lower inode's own count, names whited out above included): not a group.
    return {frozenset(group) for group in by_inode.values() if len(group) > 1}


# --- layers as directories, for kernel overlayfs ------------------------------------------

OPAQUE_XATTR = b"trusted.overlay.opaque"


def _tar_name(name: str) -> bytes:
    """A tar member name as a relative path (b"" for the root)."""
    raw = os.fsencode(name)
    while raw.startswith(b"./"):
        raw = raw[2:]
    raw = raw.strip(b"/")
    return b"" if raw == b"." else raw


def _mtime_ns(member: tarfile.TarInfo) -> int:
    # tarfile parses a PAX mtime into a float, which cannot hold nanoseconds at today's
    # epoch: read the decimal string itself.
    text = member.pax_headers.get("mtime")
    if text is None:
        return int(member.mtime) * 10**9
    seconds, _, fraction = text.partition(".")
    return int(seconds) * 10**9 + int((fraction + "000000000")[:9])


def _copy_meta(src: bytes, dst: bytes) -> int:
    """Give directory `dst` the mode, owner and xattrs of `src`; return src's mtime in ns."""
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    for name in os.listxattr(src):
        if not name.startswith("trusted.overlay."):
            os.setxattr(dst, name, os.getxattr(src, name))
    return st.st_mtime_ns


class _NativeLayer:
    """Extracts one layer tar into a directory the way overlayfs stores layers: ``.wh.NAME``
    becomes a 0/0 char device, ``.wh..wh..opq`` the ``trusted.overlay.opaque=y`` xattr.

    A whiteout applies to lower layers only (an entry of the same name in this layer wins,
    before or after it); a whiteout below a non-directory of this layer hides nothing. A parent
    directory the layer has no entry for takes its metadata from the lower layers (as umoci
    and layerfs show it), since overlayfs shows the topmost directory's. A whiteout is made
    only where a lower layer has the name, as overlayfs itself does in its upper.
    """

    def __init__(self, root: bytes, lowers: Sequence[bytes]) -> None:
        self.root = root
        self.lowers = lowers  # top first
        self.entries: set[bytes] = set()
        self.dir_times: dict[bytes, int] = {}

    def _lower_has(self, rel: bytes) -> bool:
        """Whether a lower layer has `rel`, through real directories only."""
        parts = rel.split(b"/")
        for lower in self.lowers:
            here = lower
            for part in parts[:-1]:
                here = os.path.join(here, part)
                if not os.path.isdir(here) or os.path.islink(here):
                    break
            else:
                if os.path.lexists(os.path.join(here, parts[-1])):
                    return True
        return False

    def _lower_dir(self, rel: bytes) -> bytes | None:
        for lower in self.lowers:
            path = os.path.join(lower, rel) if rel else lower
            if os.path.lexists(path):
                return path if stat.S_ISDIR(os.lstat(path).st_mode) else None
        return None

    def _implied_dir(self, rel: bytes) -> None:
        path = os.path.join(self.root, rel) if rel else self.root
        if rel:
            os.mkdir(path, 0o755)
        lower = self._lower_dir(rel)
        if lower is not None:
            self.dir_times[rel] = _copy_meta(lower, path)

    def _parent_ready(self, parent: bytes) -> bool:
        here = b""
        for part in parent.split(b"/") if parent else []:
            here = os.path.join(here, part) if here else part
            path = os.path.join(self.root, here)
            if not os.path.lexists(path):
                self._implied_dir(here)
            elif not stat.S_ISDIR(os.lstat(path).st_mode):
                return False
        return True

    def add(self, tar: tarfile.TarFile, m: tarfile.TarInfo) -> None:
        rel = _tar_name(m.name)
        parent, base = os.path.split(rel)
        if rel and not self._parent_ready(parent):
            return  # below a symlink or file of this layer: nothing there to hide or make
        if base == b".wh..wh..opq":
            os.setxattr(
                os.path.join(self.root, parent) if parent else self.root, OPAQUE_XATTR, b"y"
            )
            return
        if base.startswith(b".wh..wh."):
            return  # other AUFS metadata
        if base.startswith(b".wh."):
            hidden = os.path.join(parent, base[4:]) if parent else base[4:]
            # Only where a lower layer has the name: overlayfs lists a directory that no
            # lower layer merges into as it is, whiteouts included.
            if hidden not in self.entries and self._lower_has(hidden):
                os.mknod(os.path.join(self.root, hidden), stat.S_IFCHR, os.makedev(0, 0))
            return
        path = os.path.join(self.root, rel) if rel else self.root
        if rel and os.path.lexists(path) and not (m.isdir() and os.path.isdir(path)):
            if stat.S_ISDIR(os.lstat(path).st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)  # an earlier entry or whiteout of the same name
        if m.isdir():
            if not os.path.isdir(path):
                os.mkdir(path)
        elif m.isreg():
            src = tar.extractfile(m)
            assert src is not None
            with open(path, "wb") as f:
                shutil.copyfileobj(src, f)
        elif m.issym():
            os.symlink(os.fsencode(m.linkname), path)
        elif m.islnk():
            os.link(os.path.join(self.root, _tar_name(m.linkname)), path)
        elif m.ischr() or m.isblk():
            kind = stat.S_IFCHR if m.ischr() else stat.S_IFBLK
            os.mknod(path, kind, os.makedev(m.devmajor, m.devminor))
        elif m.isfifo():
            os.mkfifo(path)
        else:
            raise ToolError(f"unexpected tar member type {m.type!r}: {m.name}")
        self.entries.add(rel)
        os.chown(path, m.uid, m.gid, follow_symlinks=False)
        if not m.issym():
            os.chmod(path, m.mode & 0o7777)
        for key, value in m.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                name = key.removeprefix("SCHILY.xattr.").encode("utf-8", "surrogateescape")
                data = value.encode("utf-8", "surrogateescape")
                os.setxattr(path, name, data, follow_symlinks=False)
        if m.isdir():
            self.dir_times[rel] = _mtime_ns(m)
        else:
            t = _mtime_ns(m)
            os.utime(path, ns=(t, t), follow_symlinks=False)

    def finish(self) -> None:
        if b"" not in self.entries and b"" not in self.dir_times:
            self._implied_dir(b"")
        for rel in sorted(self.dir_times, key=lambda r: -r.count(b"/") - (1 if r else 0)):
            t = self.dir_times[rel]
            path = os.path.join(self.root, rel) if rel else self.root
            if os.path.isdir(path) and not os.path.islink(path):
                os.utime(path, ns=(t, t))


def native_layers(img: Image, dest: Path) -> list[Path]:
    """Each layer of `img` extracted into ``dest/layerN`` in overlayfs' own format (see
    `_NativeLayer`); bottom first. Mount them with kernel overlayfs (lowerdir top first) to
    see the image as the kernel does. Needs root (devices, owners, trusted.* xattrs).

    A one-layer image gets an empty ``layer-empty`` below it: overlayfs wants two lowers."""
    dirs: list[Path] = []
    for i, digest in enumerate(manifest_layers(img.source)):
        layer_dir = dest / f"layer{i}"
        layer_dir.mkdir(parents=True)
        lowers = [os.fsencode(d) for d in reversed(dirs)]
        native = _NativeLayer(os.fsencode(layer_dir), lowers)
        blob = img.layout / "blobs" / "sha256" / digest.removeprefix("sha256:")
        with tarfile.open(blob) as tar:
            for member in tar:
                native.add(tar, member)
        native.finish()
        dirs.append(layer_dir)
    if len(dirs) == 1:
        (dest / "layer-empty").mkdir()
        dirs.insert(0, dest / "layer-empty")
    return dirs
