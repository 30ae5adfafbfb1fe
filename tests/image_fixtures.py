"""Session fixtures (a pytest plugin loaded by tests/conftest.py): test images built once by
real tools, their umoci rootfs and conversions, shared by store and mount tests."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import images
from tests.conftest import require_root
from tests.mounting import LAYERFS
from tests.treecmp import Node, snapshot

# Container formats every oracle test can import an image from; see `image_source`.
FORMATS = (
    "oci",
    "oci-archive",
    "docker-archive",
    "docker-legacy",
    "oci-zstd",
    "oci-gzip",
    "docker-blobs",
    "oci-v2s2",
)

# Left out of tree comparisons: overlay-private xattrs, and the security.* labels the host
# sets (SELinux, SMACK, IMA/EVM, AppArmor), which no image carries. Unlike treecmp's default,
# security.capability is compared: images carry file capabilities.
HOST_XATTRS = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"security.selinux",
    b"security.SMACK64",
    b"security.ima",
    b"security.evm",
    b"security.apparmor",
)


def image_snapshot(root: Path) -> dict[bytes, Node]:
    """treecmp.snapshot of an unpacked image, file capabilities included."""
    return snapshot(root, HOST_XATTRS)


@dataclass(frozen=True)
class BuiltImages:
    """Every test image, all in one OCI layout (`layout`), built once per session."""

    work: Path
    layout: Path
    base: images.Image
    app: images.Image
    other: images.Image
    retype: images.Image
    retype_pre: images.Image
    symwh: images.Image
    symwh_pre: images.Image
    buildah_amd64: images.Image
    buildah_arm64: images.Image
    buildah_index: images.Image

    def by_name(self, name: str) -> images.Image:
        found: images.Image = getattr(self, name.replace("-", "_"))
        return found


def require_builders(work: Path | None = None) -> None:
    """Skip unless root with umoci, skopeo, buildah, GNU tar and busybox-static, and (when
    `work` is given) a filesystem there that takes device nodes and the images' xattrs."""
    # Device nodes and odd owners in the images need root, like `umoci unpack` without
    # --rootless does.
    require_root()
    missing = images.missing_tools()
    if missing:
        pytest.skip(f"image builders need {', '.join(missing)} (make deps installs them)")
    if work is not None:
        problem = images.unsupported_here(work)
        if problem:
            pytest.skip(f"cannot build the test images in {work}: {problem}")


@pytest.fixture(scope="session")
def built_images(tmp_path_factory: pytest.TempPathFactory) -> BuiltImages:
    """Build every test image (a few seconds); skip when not root or a tool is absent."""
    work = tmp_path_factory.mktemp("images")
    require_builders(work)
    layout = images.init_layout(work / "layout")
    base = images.build_base(layout)
    app = images.build_app(layout, base)
    other = images.build_other(layout, base)
    retype, retype_pre = images.build_retype(layout, base)
    symwh, symwh_pre = images.build_symlink_whiteout(layout, base)
    amd64, arm64, index = images.build_buildah_images(work, layout, base)
    return BuiltImages(
        work=work,
        layout=layout,
        base=base,
        app=app,
        other=other,
        retype=retype,
        retype_pre=retype_pre,
        symwh=symwh,
        symwh_pre=symwh_pre,
        buildah_amd64=amd64,
        buildah_arm64=arm64,
        buildah_index=index,
    )


@pytest.fixture(scope="session")
def umoci_rootfs(built_images: BuiltImages) -> Callable[[images.Image], Path]:
    """`umoci unpack` of an image (cached per session): the oracle's rootfs. Do not modify."""
    cache: dict[str, Path] = {}

    def get(img: images.Image) -> Path:
        if img.ref not in cache:
            bundle = built_images.work / "umoci-unpacked" / img.ref
            bundle.parent.mkdir(exist_ok=True)
            cache[img.ref] = images.umoci_unpack(img.layout, img.ref, bundle)
        return cache[img.ref]

    return get


@pytest.fixture(scope="session")
def image_source(built_images: BuiltImages) -> Callable[[images.Image, str], str]:
    """`image_source(img, fmt)`: `img` converted to `fmt` (one of FORMATS), as a SOURCE
    argument for `layerfs import`; each conversion is made once per session."""
    cache: dict[tuple[str, str], str] = {}
    out = built_images.work / "converted"
    out.mkdir()

    def get(img: images.Image, fmt: str) -> str:
        key = (img.ref, fmt)
        if key not in cache:
            if fmt == "oci":
                cache[key] = img.source
            elif fmt == "oci-archive":
                cache[key] = images.to_oci_archive(img, out / f"{img.ref}.oci.tar")
            elif fmt == "docker-archive":
                cache[key] = images.to_docker_archive(img, out / f"{img.ref}.docker.tar")
            elif fmt == "docker-legacy":
                cache[key] = images.to_docker_legacy_archive(
                    img, out, out / f"{img.ref}.docker-legacy.tar"
                )
            elif fmt == "oci-zstd":
                cache[key] = images.to_zstd_layout(img, out / f"{img.ref}-zstd")
            elif fmt == "oci-gzip":
                cache[key] = images.to_gzip_layout(img, out / f"{img.ref}-gzip")
            elif fmt == "oci-v2s2":
                cache[key] = images.to_v2s2_layout(img, out / f"{img.ref}-v2s2")
            elif fmt == "docker-blobs":
                cache[key] = images.to_docker_blobs_archive(
                    img, out, out / f"{img.ref}.docker25.tar"
                )
            else:
                raise ValueError(f"unknown format {fmt!r}")
        return cache[key]

    return get


def layerfs(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a `layerfs` verb with `--store store`; output captured as text, never checked."""
    verb, *rest = args
    return subprocess.run(
        [*LAYERFS, verb, "--store", str(store), *rest],
        capture_output=True,
        text=True,
        errors="replace",
        check=False,
    )


def layerfs_ok(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a `layerfs` verb that must succeed (its output is quoted when it does not)."""
    proc = layerfs(store, *args)
    assert proc.returncode == 0, (
        f"layerfs {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}{proc.stdout}"
    )
    return proc
