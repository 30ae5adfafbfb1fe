"""Build layer tars, OCI image layouts and docker-archives in memory (for tests and benchmarks)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard


@dataclass
class M:
    """One tar member to write. `name` is str (surrogateescape for non-UTF-8 bytes) or bytes."""

    name: str | bytes
    type: bytes = tarfile.REGTYPE
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = 1_600_000_000
    linkname: str | bytes = ""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)


def _s(x: str | bytes) -> str:
    return x.decode("utf-8", "surrogateescape") if isinstance(x, bytes) else x


def f(name: str | bytes, data: bytes = b"", **kw: Any) -> M:
    return M(name, tarfile.REGTYPE, data, **kw)


def d(name: str | bytes, mode: int = 0o755, **kw: Any) -> M:
    return M(name, tarfile.DIRTYPE, mode=mode, **kw)


def sym(name: str | bytes, target: str | bytes, **kw: Any) -> M:
    return M(name, tarfile.SYMTYPE, mode=0o777, linkname=target, **kw)


def hard(name: str | bytes, target: str | bytes, **kw: Any) -> M:
    return M(name, tarfile.LNKTYPE, linkname=target, **kw)


def wh(name: str) -> M:
    """A whiteout `.wh.` file for `name` (a path)."""
    head, _, base = name.rpartition("/")
    return f(f"{head}/.wh.{base}" if head else f".wh.{base}")


def layer_tar(members: list[M], fmt: int = tarfile.PAX_FORMAT, eof_marker: bool = True) -> bytes:
    """An uncompressed tar of `members` in order. Without `eof_marker`, the archive stops right
    after the last member (as some producers write them)."""
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for m in members:
            ti = tarfile.TarInfo(_s(m.name))
            ti.type = m.type
            ti.size = len(m.data) if m.type == tarfile.REGTYPE else 0
            ti.mode = m.mode
            ti.uid, ti.gid = m.uid, m.gid
            ti.uname = ti.gname = ""
            ti.mtime = m.mtime
            ti.linkname = _s(m.linkname)
            ti.devmajor, ti.devminor = m.devmajor, m.devminor
            ti.pax_headers = dict(m.pax)
            tf.addfile(ti, io.BytesIO(m.data) if m.type == tarfile.REGTYPE else None)
        end = tf.offset
    data = buf.getvalue()
    return data if eof_marker else data[:end]


def compress(tar: bytes, how: str) -> bytes:
    if how == "gzip":
        return gzip.compress(tar, mtime=0)
    if how == "zstd":
        return zstandard.ZstdCompressor().compress(tar)
    return tar


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


LAYER_MT = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}


@dataclass
class Img:
    """An image to write: layer tars bottom first, a compression per layer (or one for all)."""

    layers: list[bytes]
    compression: str = "gzip"
    ref: str | None = "latest"
    arch: str = "amd64"
    diff_ids: list[str] | None = None  # override (to test a wrong DiffID)
    blobs: list[bytes] | None = None  # raw layer blobs instead of compress(layers) (hostile tests)
    history: list[dict[str, Any]] | None = None

    def config(self) -> bytes:
        cfg = {
            "created": "2024-01-02T03:04:05Z",
            "architecture": self.arch,
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
            "rootfs": {
                "type": "layers",
                "diff_ids": self.diff_ids or [digest(t) for t in self.layers],
            },
            "history": self.history
            or [
                {"created": "2024-01-02T03:04:05Z", "created_by": f"step {i}"}
                for i in range(len(self.layers))
            ],  # fmt: skip
        }
        return json.dumps(cfg, sort_keys=True).encode()


class Layout:
    """An OCI image layout directory being written."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
        (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
        self.index: list[dict[str, Any]] = []
        self.blobs: dict[str, bytes] = {}

    def blob(self, data: bytes) -> str:
        dg = digest(data)
        (self.root / "blobs" / "sha256" / dg[7:]).write_bytes(data)
        self.blobs[dg] = data
        return dg

    def manifest(self, img: Img) -> dict[str, Any]:
        """Write the image's blobs and manifest; return the manifest's descriptor."""
        cfg = img.config()
        layers = []
        for i, t in enumerate(img.layers):
            blob = img.blobs[i] if img.blobs else compress(t, img.compression)
            layers.append(
                {
                    "mediaType": LAYER_MT[img.compression],
                    "digest": self.blob(blob),
                    "size": len(blob),
                }  # fmt: skip
            )
        man = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": self.blob(cfg),
                "size": len(cfg),
            },
            "layers": layers,
        }
        mb = json.dumps(man).encode()
        return {
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": self.blob(mb),
            "size": len(mb),
            "platform": {"os": "linux", "architecture": img.arch},
        }

    def add(self, img: Img) -> dict[str, Any]:
        desc = self.manifest(img)
        if img.ref:
            desc["annotations"] = {"org.opencontainers.image.ref.name": img.ref}
        self.index.append(desc)
        self.save()
        return desc

    def add_multiarch(self, imgs: list[Img], ref: str) -> None:
        descs = [self.manifest(i) for i in imgs]
        idx = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "manifests": descs,
            }  # fmt: skip
        ).encode()
        self.index.append(
            {
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": self.blob(idx),
                "size": len(idx),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        )
        self.save()

    def save(self) -> None:
        (self.root / "index.json").write_text(
            json.dumps({"schemaVersion": 2, "manifests": self.index})
        )


def write_oci(root: Path, *imgs: Img) -> Layout:
    lay = Layout(root)
    for i in imgs:
        lay.add(i)
    return lay


def tar_dir(src: Path, out: Path) -> None:
    """Archive a directory's contents (an OCI layout -> an oci-archive)."""
    with tarfile.open(out, "w") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=str(p.relative_to(src)), recursive=False)


def write_docker_archive(out: Path, imgs: list[tuple[Img, list[str]]], new_style: bool) -> None:
    """A `docker save` archive: old style (<id>/layer.tar, <id>.json) or new (blobs/sha256)."""
    with tarfile.open(out, "w") as tf:

        def put(name: str, data: bytes) -> None:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))

        manifest = []
        seen: set[str] = set()
        for img, tags in imgs:
            cfg = img.config()
            cname = f"blobs/sha256/{digest(cfg)[7:]}" if new_style else f"{digest(cfg)[7:]}.json"
            if cname not in seen:
                put(cname, cfg)
                seen.add(cname)
            lnames = []
            for t in img.layers:
                h = digest(t)[7:]
                ln = f"blobs/sha256/{h}" if new_style else f"{h}/layer.tar"
                if ln not in seen:
                    put(ln, t)
                    seen.add(ln)
                lnames.append(ln)
            manifest.append({"Config": cname, "RepoTags": tags, "Layers": lnames})
        put("manifest.json", json.dumps(manifest).encode())
