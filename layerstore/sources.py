"""Image sources in skopeo's transport syntax: OCI layout dir, OCI archive, docker-archive."""

from __future__ import annotations

import hashlib
import json
import platform as _platform
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .errors import SourceError
from .paths import normalize

MAX_JSON = 32 << 20

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
MANIFEST_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"


@dataclass
class LayerRef:
    """A layer blob to read: `digest` None when the source gives none (old docker-archive)."""

    digest: str | None
    media_type: str
    size: int | None
    diff_id: str
    opener: Callable[[], IO[bytes]]


@dataclass
class SourceImage:
    """One image found in a source, its JSON verified, its layers not yet read."""

    config: bytes
    config_digest: str
    manifest: bytes
    manifest_digest: str
    media_type: str
    layers: list[LayerRef]
    names: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)

    @property
    def config_json(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.config)
        return data


def host_platform() -> tuple[str, str, str | None]:
    """(os, architecture, variant) of this machine in OCI terms."""
    m = _platform.machine().lower()
    table: dict[str, tuple[str, str | None]] = {
        "x86_64": ("amd64", None),
        "amd64": ("amd64", None),
        "aarch64": ("arm64", None),
        "arm64": ("arm64", None),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i386": ("386", None),
        "i686": ("386", None),
        "ppc64le": ("ppc64le", None),
        "s390x": ("s390x", None),
        "riscv64": ("riscv64", None),
    }
    arch, variant = table.get(m, (m, None))
    return "linux", arch, variant


def parse_platform(text: str) -> tuple[str, str, str | None]:
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise SourceError(f"bad --platform {text!r}: expected os/arch[/variant]")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # RecursionError: hostile nesting ([[[[...) deeper than the parser's stack
        raise SourceError(f"{what}: invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise SourceError(f"{what}: expected a JSON object")
    return obj


def _check_digest(digest: Any, what: str) -> str:
    if not isinstance(digest, str) or ":" not in digest:
        raise SourceError(f"{what}: missing or malformed digest {digest!r}")
    alg, _, hexd = digest.partition(":")
    if alg != "sha256":
        raise SourceError(f"{what}: unsupported digest algorithm {alg!r}")
    if len(hexd) != 64 or any(c not in "0123456789abcdef" for c in hexd):
        raise SourceError(f"{what}: malformed digest {digest!r}")
    return digest


class _Files:
    """Access to the files of a source: a directory or a tar archive (members by path)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._members: dict[bytes, tarfile.TarInfo] = {}
        if path.is_dir():
            return
        try:
            tf = tarfile.open(  # noqa: SIM115 - kept open for the source's lifetime
                path, "r:*", encoding="utf-8", errors="surrogateescape"
            )
        except tarfile.ReadError:
            raise SourceError(
                f"{path}: not a tar archive (nor a gzip, bzip2 or xz compressed one)"
            ) from None
        except (OSError, tarfile.TarError) as exc:
            raise SourceError(f"{path}: not a readable tar archive: {exc}") from None
        self._tar = tf
        try:
            for ti in tf:
                try:
                    name = normalize(ti.name.encode("utf-8", "surrogateescape"))
                except Exception:
                    continue
                if ti.isreg() or ti.issym() or ti.islnk():
                    self._members[name] = ti
        except (OSError, EOFError, tarfile.TarError, zlib.error) as exc:
            tf.close()
            raise SourceError(f"{path}: truncated or damaged archive: {exc}") from None
        tf.members = []  # type: ignore[attr-defined]  # stubs omit it; frees the headers

    def _inside(self, rel: str) -> Path:
        """The file `rel` of a directory source; a name leaving the directory is refused."""
        parts = rel.split("/")
        if rel.startswith("/") or ".." in parts:
            raise SourceError(f"{self.path}: {rel!r} is outside the source, refused")
        return self.path / rel

    def exists(self, rel: str) -> bool:
        if self._tar is None:
            return self._inside(rel).is_file()
        return normalize(rel.encode()) in self._members

    def open(self, rel: str) -> IO[bytes]:
        if self._tar is None:
            try:
                p = self._inside(rel)
                if p.is_symlink() or not p.is_file():
                    raise FileNotFoundError(rel)
                return open(p, "rb")  # noqa: SIM115 - returned to the caller
            except OSError as exc:
                raise SourceError(f"{self.path}: cannot open {rel}: {exc}") from None
        ti = self._members.get(normalize(rel.encode()))
        if ti is None:
            raise SourceError(f"{self.path}: missing {rel}")
        try:
            f = self._tar.extractfile(ti)
        except (KeyError, tarfile.TarError) as exc:
            raise SourceError(f"{self.path}: cannot read {rel}: {exc}") from None
        if f is None:
            raise SourceError(f"{self.path}: {rel} is not a file")
        return f

    def read(self, rel: str, what: str) -> bytes:
        with self.open(rel) as f:
            data = f.read(MAX_JSON + 1)
        if len(data) > MAX_JSON:
            raise SourceError(f"{what}: larger than {MAX_JSON} bytes")
        return data


def _blob_rel(digest: str) -> str:
    alg, _, hexd = digest.partition(":")
    return f"blobs/{alg}/{hexd}"


def _read_blob(files: _Files, desc: dict[str, Any], what: str) -> bytes:
    digest = _check_digest(desc.get("digest"), what)
    data = files.read(_blob_rel(digest), what)
    if sha256_digest(data) != digest:
        raise SourceError(f"{what} {digest}: content does not match its digest")
    size = desc.get("size")
    if isinstance(size, int) and size != len(data):
        raise SourceError(f"{what} {digest}: size {len(data)} != descriptor size {size}")
    return data


def _annotations(desc: dict[str, Any]) -> dict[str, Any]:
    """A descriptor's annotations; a hostile non-object value counts as none."""
    ann = desc.get("annotations")
    return ann if isinstance(ann, dict) else {}


def _platform_of(desc: dict[str, Any]) -> tuple[str, str, str | None] | None:
    p = desc.get("platform")
    if not isinstance(p, dict):
        return None
    return str(p.get("os", "")), str(p.get("architecture", "")), p.get("variant")


def _pick_platform(
    descs: list[dict[str, Any]], want: tuple[str, str, str | None], what: str
) -> dict[str, Any]:
    os_, arch, variant = want
    matches = []
    for d in descs:
        p = _platform_of(d)
        if p is None or p[0] != os_ or p[1] != arch:
            continue
        if variant is not None and p[2] != variant:
            continue
        matches.append(d)
    if not matches:
        avail = sorted(
            "/".join(x for x in p if x) for d in descs if (p := _platform_of(d)) is not None
        )
        want_s = "/".join(x for x in want if x)
        raise SourceError(f"{what}: no image for platform {want_s} (has: {', '.join(avail)})")
    # Without a wanted variant, prefer an entry without one (or arm64's usual v8).
    matches.sort(key=lambda d: (_platform_of(d) or ("", "", None))[2] not in (None, "v8"))
    return matches[0]


def _media_type(desc: dict[str, Any], body: dict[str, Any]) -> str:
    mt = desc.get("mediaType") or body.get("mediaType")
    if isinstance(mt, str) and mt:
        return mt
    if "manifests" in body:
        return OCI_INDEX
    if "layers" in body:
        return OCI_MANIFEST
    return ""


class OciSource:
    """An OCI image layout (directory or archive)."""

    def __init__(self, files: _Files, ref: str | None, label: str) -> None:
        self.files = files
        self.ref = ref
        self.label = label

    def images(self, want: tuple[str, str, str | None]) -> list[SourceImage]:
        if not self.files.exists("oci-layout"):
            raise SourceError(f"{self.label}: not an OCI image layout (no oci-layout file)")
        index = _json(self.files.read("index.json", "index.json"), f"{self.label}: index.json")
        descs = index.get("manifests")
        if not isinstance(descs, list) or not all(isinstance(d, dict) for d in descs):
            raise SourceError(f"{self.label}: index.json: 'manifests' is not a list of objects")
        if self.ref is not None:
            descs = [d for d in descs if _annotations(d).get(REF_NAME) == self.ref]
            if not descs:
                raise SourceError(f"{self.label}: no image named {self.ref!r} in index.json")
        if not descs:
            raise SourceError(f"{self.label}: index.json lists no image")
        groups: list[list[dict[str, Any]]]
        if len(descs) > 1 and all(_platform_of(d) for d in descs):
            groups = [descs]  # one multi-platform image spelled out in index.json
        else:
            groups = [[d] for d in descs]
        out = []
        for group in groups:
            desc = group[0] if len(group) == 1 else _pick_platform(group, want, self.label)
            name = self._name(_annotations(group[0]))
            names = [name] if name else []
            out.append(self._resolve(desc, want, names, depth=0))
        return out

    def _name(self, ann: dict[str, Any]) -> str | None:
        full = ann.get(CONTAINERD_NAME)
        if isinstance(full, str) and full:
            return full
        ref = ann.get(REF_NAME)
        if not isinstance(ref, str) or not ref:
            return None
        if ":" in ref.rsplit("/", 1)[-1] or "/" in ref:
            return ref if ":" in ref.rsplit("/", 1)[-1] else ref + ":latest"
        base = Path(str(self.files.path)).name.lower()
        base = base.removesuffix(".tar") or "image"
        return f"{base}:{ref}"

    def _resolve(
        self, desc: dict[str, Any], want: tuple[str, str, str | None], names: list[str], depth: int
    ) -> SourceImage:
        if depth > 4:
            raise SourceError(f"{self.label}: image index nested too deep")
        what = f"{self.label}: manifest"
        body_bytes = _read_blob(self.files, desc, what)
        body = _json(body_bytes, f"{what} {desc.get('digest')}")
        mt = _media_type(desc, body)
        if mt in INDEX_TYPES:
            subs = body.get("manifests")
            if not isinstance(subs, list) or not all(isinstance(d, dict) for d in subs):
                raise SourceError(f"{what} {desc.get('digest')}: 'manifests' is not a list")
            return self._resolve(_pick_platform(subs, want, self.label), want, names, depth + 1)
        if mt not in MANIFEST_TYPES:
            raise SourceError(f"{what} {desc.get('digest')}: unsupported media type {mt!r}")
        return _from_manifest(
            self.files, body, body_bytes, str(desc["digest"]), mt, names, f"{self.label}"
        )


def _from_manifest(
    files: _Files,
    body: dict[str, Any],
    body_bytes: bytes,
    digest: str,
    mt: str,
    names: list[str],
    label: str,
) -> SourceImage:
    what = f"{label}: manifest {digest}"
    cdesc = body.get("config")
    ldescs = body.get("layers")
    if not isinstance(cdesc, dict) or not isinstance(ldescs, list):
        raise SourceError(f"{what}: missing config or layers")
    config = _read_blob(files, cdesc, f"{label}: config")
    cjson = _json(config, f"{label}: config {cdesc.get('digest')}")
    diff_ids = _diff_ids(cjson, f"{label}: config")
    if len(diff_ids) != len(ldescs):
        raise SourceError(
            f"{what}: {len(ldescs)} layers but the config lists {len(diff_ids)} DiffIDs"
        )
    layers = []
    for i, (ld, diff) in enumerate(zip(ldescs, diff_ids, strict=True)):
        if not isinstance(ld, dict):
            raise SourceError(f"{what}: layer {i} is not an object")
        ldig = _check_digest(ld.get("digest"), f"{what}: layer {i}")
        rel = _blob_rel(ldig)
        if not files.exists(rel):
            raise SourceError(f"{label}: layer {ldig} is missing from the source")
        size = ld.get("size")
        layers.append(
            LayerRef(
                digest=ldig,
                media_type=str(ld.get("mediaType", "")),
                size=size if isinstance(size, int) else None,
                diff_id=diff,
                opener=lambda rel=rel: files.open(rel),  # type: ignore[misc]
            )
        )
    repo_digests = [
        f"{n.rsplit(':', 1)[0] if ':' in n.rsplit('/', 1)[-1] else n}@{digest}" for n in names
    ]
    return SourceImage(
        config=config,
        config_digest=str(cdesc["digest"]),
        manifest=body_bytes,
        manifest_digest=digest,
        media_type=mt,
        layers=layers,
        names=names,
        repo_digests=repo_digests,
    )


def _diff_ids(cjson: dict[str, Any], what: str) -> list[str]:
    rootfs = cjson.get("rootfs")
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids"), list):
        raise SourceError(f"{what}: missing rootfs.diff_ids")
    return [_check_digest(d, f"{what}: rootfs.diff_ids") for d in rootfs["diff_ids"]]


class DockerArchiveSource:
    """A `docker save` archive: manifest.json with <id>/layer.tar or blobs/sha256/… paths."""

    def __init__(self, files: _Files, ref: str | None, label: str) -> None:
        self.files = files
        self.ref = ref
        self.label = label

    def images(self, want: tuple[str, str, str | None]) -> list[SourceImage]:
        raw = self.files.read("manifest.json", f"{self.label}: manifest.json")
        try:
            entries = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise SourceError(f"{self.label}: manifest.json: invalid JSON: {exc}") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SourceError(f"{self.label}: manifest.json: expected a list of objects")
        chosen: list[tuple[dict[str, Any], list[str]]] = []
        for i, e in enumerate(entries):
            rtags = e.get("RepoTags")
            tags = [t for t in rtags if isinstance(t, str)] if isinstance(rtags, list) else []
            if self.ref is None:
                chosen.append((e, tags))
            elif self.ref.startswith("@"):
                if self.ref[1:].isdigit() and int(self.ref[1:]) == i:
                    chosen.append((e, tags))
            elif self.ref in tags:
                chosen.append((e, [self.ref]))
        if not chosen:
            what = f"image {self.ref!r}" if self.ref else "any image"
            raise SourceError(f"{self.label}: manifest.json has no {what}")
        return [self._image(e, tags) for e, tags in chosen]

    def _image(self, e: dict[str, Any], tags: list[str]) -> SourceImage:
        cpath = e.get("Config")
        lpaths = e.get("Layers")
        if not isinstance(cpath, str) or not isinstance(lpaths, list):
            raise SourceError(f"{self.label}: manifest.json: entry without Config or Layers")
        config = self.files.read(cpath, f"{self.label}: config")
        cdigest = sha256_digest(config)
        exp = _digest_from_path(cpath)
        if exp is not None and exp != cdigest:
            raise SourceError(f"{self.label}: config {cpath}: content does not match its digest")
        cjson = _json(config, f"{self.label}: config {cpath}")
        diff_ids = _diff_ids(cjson, f"{self.label}: config")
        if len(diff_ids) != len(lpaths):
            raise SourceError(
                f"{self.label}: {len(lpaths)} layers but the config lists {len(diff_ids)} DiffIDs"
            )
        layers = []
        for lp, diff in zip(lpaths, diff_ids, strict=True):
            if not isinstance(lp, str) or not self.files.exists(lp):
                raise SourceError(f"{self.label}: layer {lp!r} is missing from the archive")
            layers.append(
                LayerRef(
                    digest=_digest_from_path(lp),
                    media_type=DOCKER_LAYER,
                    size=None,
                    diff_id=diff,
                    opener=lambda lp=lp: self.files.open(lp),  # type: ignore[misc]
                )
            )
        manifest = json.dumps(e, sort_keys=True, separators=(",", ":")).encode()
        return SourceImage(
            config=config,
            config_digest=cdigest,
            manifest=manifest,
            manifest_digest=sha256_digest(manifest),
            media_type="application/vnd.docker.save.manifest+json",
            layers=layers,
            names=tags,
        )


def _digest_from_path(p: str) -> str | None:
    parts = p.strip("./").split("/")
    if len(parts) == 3 and parts[0] == "blobs" and len(parts[2]) == 64:
        return f"{parts[1]}:{parts[2]}"
    return None


Source = OciSource | DockerArchiveSource


def open_source(spec: str) -> Source:
    """Parse SOURCE (`oci:DIR[:REF]`, `oci-archive:FILE[:REF]`, `docker-archive:FILE[:REF]`, or
    a plain path, auto-detected) and open it."""
    for prefix in ("oci:", "oci-archive:", "docker-archive:"):
        if spec.startswith(prefix):
            rest = spec[len(prefix) :]
            path_s, sep, ref = rest.partition(":")
            path = Path(path_s)
            if not path.exists():
                raise SourceError(f"{spec}: {path_s} does not exist")
            files = _Files(path)
            if prefix == "oci:":
                if files._tar is not None:
                    raise SourceError(f"{spec}: {path_s} is not a directory")
                return OciSource(files, ref if sep else None, spec)
            if files._tar is None:
                raise SourceError(f"{spec}: {path_s} is not an archive file")
            if prefix == "oci-archive:":
                return OciSource(files, ref if sep else None, spec)
            return DockerArchiveSource(files, ref if sep else None, spec)
    path = Path(spec)
    if not path.exists():
        raise SourceError(f"{spec}: no such file or directory (and not TRANSPORT:PATH)")
    files = _Files(path)
    if files.exists("manifest.json"):
        return DockerArchiveSource(files, None, spec)
    if files.exists("oci-layout"):
        return OciSource(files, None, spec)
    raise SourceError(f"{spec}: neither an OCI layout nor a docker-archive")


def source_images(spec: str, platform: str | None = None) -> list[SourceImage]:
    want = parse_platform(platform) if platform else host_platform()
    src = open_source(spec)
    return src.images(want)
