"""Push an image from the store to an OCI registry: blobs the registry lacks, then the manifest.

The blobs are those `layerfs export` writes (export._oci_layout): each layer's tar rebuilt
from its tar-split (DiffID verified again) and compressed as the image's manifest says, the
config exactly as imported (the image ID does not change), the manifest as imported when
every rebuilt blob matches it, else a new OCI manifest. They are staged in STORE/tmp (held
under the store's shared lock, so gc waits; a killed push is cleaned by the next recovery),
and each is uploaded unless a HEAD finds it or the registry mounts it from a repository the
image was pulled from (same registry): monolithically (POST, PUT ?digest=) or, with a chunk
size, in chunks (PATCH with Content-Range, then PUT ?digest=).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .errors import StoreError
from .export import export_image
from .registry import RegistryClient, RegistryError
from .sources import REF_NAME
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


def try_mount(client: RegistryClient, digest: str, source_repo: str) -> bool:
    """Cross-repository mount (POST ?mount=&from=): True when the registry linked the blob;
    a registry that declines starts an upload instead, which is simply abandoned."""
    repo = client.ref.repo
    resp = client.request(
        "POST",
        f"/v2/{repo}/blobs/uploads/?mount={digest}&from={source_repo}",
        {"Content-Length": "0"},
    )
    resp.close()
    return resp.status_code == 201


def upload_blob(
    client: RegistryClient, digest: str, path: Path, chunk_size: int | None = None
) -> None:
    """Monolithic upload (POST, then PUT <location>?digest= with the bytes), or with
    `chunk_size` a chunked one (PATCH each chunk with its Content-Range, then PUT ?digest=)."""
    repo = client.ref.repo
    what = f"upload of {digest} to {client.ref.name}"
    resp = client.request("POST", f"/v2/{repo}/blobs/uploads/", {"Content-Length": "0"})
    client.check(resp, what)
    url = _location(client, resp.headers.get("Location", ""))
    resp.close()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if chunk_size is not None:
            offset = 0
            while offset < size:
                data = fh.read(chunk_size)
                end = offset + len(data) - 1
                resp = client.request(
                    "PATCH",
                    url,
                    {
                        "Content-Type": "application/octet-stream",
                        "Content-Length": str(len(data)),
                        "Content-Range": f"{offset}-{end}",
                    },
                    content=lambda data=data: data,  # type: ignore[misc]
                )
                client.check(resp, what)
                url = _location(client, resp.headers.get("Location", ""))
                resp.close()
                offset += len(data)
            url += ("&" if "?" in url else "?") + f"digest={digest}"
            resp = client.request("PUT", url, {"Content-Length": "0"}, content=lambda: b"")
        else:

            def body() -> IO[bytes]:
                fh.seek(0)
                return fh

            url += ("&" if "?" in url else "?") + f"digest={digest}"
            resp = client.request(
                "PUT",
                url,
                {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                content=body,
            )
    client.check(resp, what)
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


def _manifest_desc(root: Path, tag: str) -> dict[str, Any]:
    """The descriptor named `tag` in the index.json of the layout export_image wrote."""
    index = json.loads((root / "index.json").read_bytes())
    for m in index.get("manifests") or []:
        if (m.get("annotations") or {}).get(REF_NAME) == tag:
            found: dict[str, Any] = m
            return found
    raise StoreError(f"export wrote no manifest named {tag!r}")


def mount_sources(store: Store, image: str, client: RegistryClient) -> list[str]:
    """Other repositories of the same registry the image was pulled from (its RepoDigests)."""
    out = []
    for name in store.image_info(image).repo_digests:
        repo_name = name.split("@", 1)[0]
        host, sep, repo = repo_name.partition("/")
        if sep and host == client.ref.host and repo != client.ref.repo and repo not in out:
            out.append(repo)
    return out


def push_image(
    store: Store,
    image_ref: str,
    client: RegistryClient,
    say: Callable[[str], None],
    chunk_size: int | None = None,
) -> PushResult:
    """Push `image_ref` from `store` to the client's repository under its tag."""
    ref = client.ref
    if ref.digest is not None or ref.tag is None:
        raise StoreError(f"push to {ref}: name a tag, not a digest")
    image = store.resolve(image_ref)
    sources = mount_sources(store, image, client)
    with store.shared(), tempfile.TemporaryDirectory(prefix="push-", dir=store.tmp_dir) as tmp:
        root = Path(tmp)
        # The public export entry point (its private helpers are still changing).
        export_image(store, image, f"oci:{root}:{ref.tag}")
        mdesc = _manifest_desc(root, ref.tag)
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
            mounted = next((src for src in sources if try_mount(client, digest, src)), None)
            if mounted is not None:
                existed += 1
                if i:
                    say(f"{short}: Mounted from {mounted}")
                continue
            upload_blob(client, digest, blobs / digest.removeprefix("sha256:"), chunk_size)
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
