"""Export an image from the store as an OCI layout, an OCI archive or a docker-archive.

Each layer's tar is rebuilt byte for byte from its tar-split (Store.layer_tar, so its DiffID
is verified again) and compressed as the image's manifest says (OCI layouts) or left uncompressed
(docker-archive, as `docker save` writes it). The config is written exactly as imported (the
image ID does not change). The manifest is written as imported when every rebuilt blob has the
digest and size it lists and it is an OCI manifest; otherwise a new OCI manifest lists the new
digests (a recompressed gzip rarely matches another tool's bytes).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .blobwriter import LAYER_TYPES, BlobWriter, compression_of
from .commit import retar_layer
from .errors import StoreError
from .model import LayerInfo
from .sources import OCI_INDEX, OCI_MANIFEST, REF_NAME, sha256_digest
from .store import Store, with_tag

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYOUT_FILE = b'{"imageLayoutVersion":"1.0.0"}'


def parse_dest(dest: str) -> tuple[str, str, str | None]:
    """(transport, path, ref or None) of `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`,
    `docker-archive:FILE[:NAME:TAG]` (the path ends at its first `:`, as in skopeo)."""
    transport, sep, rest = dest.partition(":")
    if not sep or transport not in ("oci", "oci-archive", "docker-archive") or not rest:
        raise StoreError(
            f"bad destination {dest!r}: expected oci:DIR[:TAG], oci-archive:FILE[:TAG] or "
            "docker-archive:FILE[:NAME:TAG]"
        )
    path, _, ref = rest.partition(":")
    if not path:
        raise StoreError(f"bad destination {dest!r}: no path")
    return transport, path, ref or None


class _Blobs:
    """blobs/sha256/ of a layout being written: each blob through a temp file and a rename."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def put_bytes(self, data: bytes) -> str:
        digest = sha256_digest(data)
        path = self.dir / digest.removeprefix("sha256:")
        if not path.exists():
            tmp = self.dir / f".tmp-{secrets.token_hex(6)}"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return digest

    def put_layer(
        self, store: Store, layer: LayerInfo, compression: str, warn: Callable[[str], None]
    ) -> tuple[str, int, str]:
        """Rebuild a layer, compress it, verify its DiffID; (digest, size, DiffID) of the blob.

        A layer without a tar-split (see layerstore/README.md) is re-tarred from its entries:
        the same tree, a new DiffID (the caller rewrites the config)."""
        row = store.conn.execute("SELECT tarsplit FROM layers WHERE id = ?", (layer.id,)).fetchone()
        exact = bool(row and row[0])
        tmp = self.dir / f".tmp-{secrets.token_hex(6)}"
        try:
            with open(tmp, "xb") as fh:
                bw = BlobWriter(fh, compression)
                if exact:
                    for chunk in store.layer_tar(layer.id):
                        bw.write(chunk)
                else:
                    retar_layer(store, layer.id, bw, warn)
                bw.close()
            if exact and bw.diff_id != layer.diff_id:
                raise StoreError(
                    f"layer {layer.diff_id}: rebuilt tar has DiffID {bw.diff_id} (store damaged?)"
                )
            if not exact:
                warn(
                    f"layer {layer.diff_id} cannot be rebuilt byte for byte (no tar-split): "
                    f"re-tarred as {bw.diff_id}; the exported image gets a new ID"
                )
            os.replace(tmp, self.dir / bw.digest.removeprefix("sha256:"))
        finally:
            tmp.unlink(missing_ok=True)
        return bw.digest, bw.size, bw.diff_id


def _config_with(config: bytes, diff_ids: list[str]) -> bytes:
    """`config` as is, or with new rootfs.diff_ids when a layer had to be re-tarred."""
    cfg = json.loads(config)
    if (cfg.get("rootfs") or {}).get("diff_ids") == diff_ids:
        return config
    cfg.setdefault("rootfs", {"type": "layers"})["diff_ids"] = diff_ids
    return json.dumps(cfg, separators=(",", ":")).encode()


def _default_ref(store: Store, ref: str, image: str) -> tuple[str | None, str | None]:
    """(repository, tag) to name the export after: `ref` if it is a name, else the image's
    first tag, else (None, None)."""
    names = [with_tag(ref)] if not ref.startswith("sha256:") and "@" not in ref else []
    tags = list(store.image_info(image).tags)
    if not names or names[0] not in tags:
        names = tags
    if not names:
        return None, None
    repo, _, tag = names[0].rpartition(":")
    return repo, tag


def _oci_layout(
    store: Store, image: str, root: Path, tag: str | None, warn: Callable[[str], None]
) -> dict[str, Any]:
    """Write the image's blobs into an OCI layout at `root`; its index.json gets the manifest
    (named `tag`, replacing an entry of the same name). Returns the manifest descriptor."""
    root.mkdir(parents=True, exist_ok=True)
    blobs = _Blobs(root)
    config, manifest, mtype = store.image_blobs(image)
    mobj: dict[str, Any] = json.loads(manifest)
    layers = store.image_layers(image)
    old = mobj.get("layers") or []
    same = mtype == OCI_MANIFEST and len(old) == len(layers)
    descs: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for i, lay in enumerate(layers):
        prev = old[i] if i < len(old) and isinstance(old[i], dict) else {}
        # The image's own manifest says how it wants this layer; the store keeps one record
        # per DiffID (as first imported), which another image may have compressed otherwise.
        comp = compression_of(str(prev.get("mediaType") or lay.media_type))
        digest, size, diff_id = blobs.put_layer(store, lay, comp, warn)
        diff_ids.append(diff_id)
        mt = LAYER_TYPES[comp]
        desc: dict[str, Any] = {"mediaType": mt, "digest": digest, "size": size}
        if isinstance(prev.get("annotations"), dict):
            desc["annotations"] = prev["annotations"]
        descs.append(desc)
        if (prev.get("mediaType"), prev.get("digest"), prev.get("size")) != (mt, digest, size):
            same = False
    new_config = _config_with(config, diff_ids)
    same = same and new_config == config
    config = new_config
    config_digest = blobs.put_bytes(config)
    if not same:
        new: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": descs,
        }
        if isinstance(mobj.get("annotations"), dict):
            new["annotations"] = mobj["annotations"]
        manifest = json.dumps(new, separators=(",", ":")).encode()
    mdesc: dict[str, Any] = {
        "mediaType": OCI_MANIFEST,
        "digest": blobs.put_bytes(manifest),
        "size": len(manifest),
    }
    cfg = json.loads(config)
    if cfg.get("os") and cfg.get("architecture"):
        mdesc["platform"] = {"architecture": cfg["architecture"], "os": cfg["os"]}
        if cfg.get("variant"):
            mdesc["platform"]["variant"] = cfg["variant"]
    if tag:
        mdesc["annotations"] = {REF_NAME: tag}
    index_path = root / "index.json"
    index: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    if index_path.exists():
        try:
            index = json.loads(index_path.read_bytes())
        except ValueError:
            raise StoreError(f"{index_path}: not valid JSON; refusing to overwrite") from None
    kept = [
        m
        for m in index.get("manifests") or []
        if not (tag and (m.get("annotations") or {}).get(REF_NAME) == tag)
    ]
    index["manifests"] = [*kept, mdesc]
    tmp = root / f".index-{secrets.token_hex(4)}.json"
    tmp.write_bytes(json.dumps(index, separators=(",", ":")).encode())
    os.replace(tmp, index_path)
    if not (root / "oci-layout").exists():
        (root / "oci-layout").write_bytes(LAYOUT_FILE)
    return mdesc


def _docker_dir(
    store: Store, image: str, root: Path, repo_tag: str | None, warn: Callable[[str], None]
) -> None:
    """A `docker save` tree (manifest.json, blobs/sha256/: config, uncompressed layers)."""
    blobs = _Blobs(root)
    config, _, _ = store.image_blobs(image)
    paths = []
    diff_ids = []
    for lay in store.image_layers(image):
        digest, _, diff_id = blobs.put_layer(store, lay, "none", warn)
        diff_ids.append(diff_id)
        paths.append(f"blobs/sha256/{digest.removeprefix('sha256:')}")
    config_digest = blobs.put_bytes(_config_with(config, diff_ids))
    entry = {
        "Config": f"blobs/sha256/{config_digest.removeprefix('sha256:')}",
        "RepoTags": [repo_tag] if repo_tag else [],
        "Layers": paths,
    }
    (root / "manifest.json").write_bytes(json.dumps([entry], separators=(",", ":")).encode())
    if repo_tag:
        repo, _, tag = repo_tag.rpartition(":")
        last = paths[-1].rpartition("/")[2] if paths else ""
        (root / "repositories").write_bytes(json.dumps({repo: {tag: last}}).encode())


def _tar_tree(src: Path, out: Path) -> None:
    """A deterministic tar of `src` (sorted, root-owned, mtime 0) written to `out` atomically."""
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for dirpath, dirnames, filenames in os.walk(src):
                dirnames.sort()
                rel_dir = os.path.relpath(dirpath, src)
                for name in sorted(dirnames + filenames):
                    full = os.path.join(dirpath, name)
                    arc = name if rel_dir == "." else f"{rel_dir}/{name}"
                    ti = tar.gettarinfo(full, arc)
                    ti.uid = ti.gid = 0
                    ti.uname = ti.gname = ""
                    ti.mtime = 0
                    ti.mode = 0o755 if ti.isdir() else 0o644
                    if ti.isfile():
                        with open(full, "rb") as fh:
                            tar.addfile(ti, fh)
                    else:
                        tar.addfile(ti)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def export_image(
    store: Store, ref: str, dest: str, warn: Callable[[str], None] = lambda msg: None
) -> str:
    """Write image `ref` to `dest` (see parse_dest); returns a description of what was written."""
    transport, path, given = parse_dest(dest)
    image = store.resolve(ref)
    repo, tag = _default_ref(store, ref, image)
    out = Path(path)
    if transport == "oci":
        name = given or tag or "latest"
        _oci_layout(store, image, out, name, warn)
        return f"oci:{out}:{name}"
    if out.is_dir():
        raise StoreError(f"{out}: is a directory (an archive file is expected)")
    work = out.parent / f".{out.name}.d-{secrets.token_hex(4)}"
    try:
        if transport == "oci-archive":
            name = given or tag or "latest"
            _oci_layout(store, image, work, name, warn)
            _tar_tree(work, out)
            return f"oci-archive:{out}:{name}"
        repo_tag: str | None = None
        if given:
            repo_tag = with_tag(given)
        elif repo:
            repo_tag = f"{repo}:{tag}"
        work.mkdir()
        _docker_dir(store, image, work, repo_tag, warn)
        _tar_tree(work, out)
        return f"docker-archive:{out}" + (f":{repo_tag}" if repo_tag else "")
    finally:
        shutil.rmtree(work, ignore_errors=True)
