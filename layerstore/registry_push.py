"""Push an image from the store to an OCI registry: blobs the registry lacks, then the manifest.

The blobs are those `layerfs export` writes (export._oci_layout): each layer's tar rebuilt
from its tar-split (DiffID verified again) and compressed as the image's manifest says, the
config exactly as imported (the image ID does not change), the manifest as imported when
every rebuilt blob matches it, else a new OCI manifest. They are staged in STORE/tmp (held
under the store's shared lock, so gc waits; a killed push is cleaned by the next recovery),
and each is uploaded monolithically (POST, then PUT ?digest=) unless a HEAD finds it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import StoreError
from .export import _oci_layout
from .registry import RegistryClient, RegistryError
from .store import Store


@dataclass
class PushResult:
    digest: str  # manifest digest
    size: int  # manifest size
    pushed: int  # blobs uploaded
    existed: int  # blobs the registry already had


def _location(client: RegistryClient, loc: str) -> str:
    if not loc:
        raise RegistryError(f"{client.ref.host}: upload started without a Location header")
    if "://" in loc:
        return loc
    return client.base + (loc if loc.startswith("/") else "/" + loc)


def blob_exists(client: RegistryClient, digest: str) -> bool:
    resp = client.request("HEAD", f"/v2/{client.ref.repo}/blobs/{digest}")
    resp.close()
    if resp.status_code == 404:
        return False
    client.check(resp, f"blob {digest} of {client.ref.name}")
    return True


def upload_blob(client: RegistryClient, digest: str, path: Path) -> None:
    """Monolithic upload: POST /blobs/uploads/, then PUT <location>?digest= with the bytes."""
    repo = client.ref.repo
    resp = client.request("POST", f"/v2/{repo}/blobs/uploads/", {"Content-Length": "0"})
    client.check(resp, f"upload of {digest} to {client.ref.name}")
    url = _location(client, resp.headers.get("Location", ""))
    resp.close()
    url += ("&" if "?" in url else "?") + f"digest={digest}"
    size = path.stat().st_size
    with open(path, "rb") as fh:

        def body() -> IO[bytes]:
            fh.seek(0)
            return fh

        resp = client.request(
            "PUT",
            url,
            {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            content=body,
        )
    client.check(resp, f"upload of {digest} to {client.ref.name}")
    resp.close()


def put_manifest(client: RegistryClient, tag: str, body: bytes, media_type: str) -> str:
    resp = client.request(
        "PUT",
        f"/v2/{client.ref.repo}/manifests/{tag}",
        {"Content-Type": media_type},
        content=lambda: body,
    )
    client.check(resp, f"manifest {client.ref}")
    resp.close()
    return str(resp.headers.get("Docker-Content-Digest", ""))


def push_image(
    store: Store, image_ref: str, client: RegistryClient, say: Callable[[str], None]
) -> PushResult:
    """Push `image_ref` from `store` to the client's repository under its tag."""
    ref = client.ref
    if ref.digest is not None or ref.tag is None:
        raise StoreError(f"push to {ref}: name a tag, not a digest")
    image = store.resolve(image_ref)
    with store.shared(), tempfile.TemporaryDirectory(prefix="push-", dir=store.tmp_dir) as tmp:
        root = Path(tmp)
        mdesc = _oci_layout(store, image, root, ref.tag)
        blobs = root / "blobs" / "sha256"
        manifest = (blobs / str(mdesc["digest"]).removeprefix("sha256:")).read_bytes()
        mobj: dict[str, Any] = json.loads(manifest)
        descs = [mobj["config"], *mobj["layers"]]
        pushed = existed = 0
        for i, desc in enumerate(descs):
            digest = str(desc["digest"])
            short = digest.removeprefix("sha256:")[:12]
            if blob_exists(client, digest):
                existed += 1
                if i:
                    say(f"{short}: Layer already exists")
                continue
            upload_blob(client, digest, blobs / digest.removeprefix("sha256:"))
            pushed += 1
            if i:
                say(f"{short}: Pushed")
        mt = str(mobj.get("mediaType") or mdesc["mediaType"])
        got = put_manifest(client, ref.tag, manifest, mt)
        if got and got != mdesc["digest"]:
            raise RegistryError(
                f"{ref}: registry stored the manifest as {got}, expected {mdesc['digest']}"
            )
        return PushResult(str(mdesc["digest"]), len(manifest), pushed, existed)
