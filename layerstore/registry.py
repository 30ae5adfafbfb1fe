"""Pull from an OCI distribution registry (HTTP API v2): references, auth, manifests, blobs.

The registry is one more image source: `registry_image()` fetches and verifies the manifest
(following an image index to one platform) and the config, and returns a `SourceImage` whose
`LayerRef.opener`s stream each blob from the registry. `ingest.import_source` then verifies
every blob digest and DiffID while streaming and commits all layers in one transaction, so a
failed pull leaves the store as it was; layers the store already has are never requested.
`registry_fetch.Prefetcher` downloads the missing blobs in parallel ahead of the importer;
`registry_push` pushes. Auth: anonymous, basic (credentials from the auth file) and the
bearer-token challenge; a broken blob download is resumed with a Range request.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

from .errors import LayerError, SourceError
from .reference import (  # noqa: F401 - re-exported: the registry's API names them
    _HOST_RE,
    _REPO_RE,
    _TAG_RE,
    DOCKER_HUB,
    DOCKER_HUB_API,
    DOCKER_HUB_KEYS,
    Reference,
    is_local,
    parse_reference,
)
from .sources import (
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_JSON,
    OCI_INDEX,
    OCI_MANIFEST,
    LayerRef,
    SourceImage,
    _check_digest,
    _diff_ids,
    _json,
    _pick_platform,
    sha256_digest,
)

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
RETRIES = 3  # re-requests (with Range) of a blob whose connection broke mid-stream
CHUNK = 1 << 20


class RegistryError(SourceError):
    """The registry refused or failed a request, or sent something that does not verify."""


class RegistryUnreachable(RegistryError):
    """A request could not be sent or answered (connection refused, reset, timed out): worth
    retrying, unlike a refusal."""


# ---- credentials ---------------------------------------------------------------------------


def auth_file() -> Path:
    """$REGISTRY_AUTH_FILE, else $DOCKER_CONFIG/config.json, else ~/.docker/config.json."""
    env = os.environ.get("REGISTRY_AUTH_FILE")
    if env:
        return Path(env)
    dc = os.environ.get("DOCKER_CONFIG")
    if dc:
        return Path(dc) / "config.json"
    return Path(os.path.expanduser("~")) / ".docker" / "config.json"


def _auth_key(key: str) -> str:
    """An `auths` key (`host`, `https://host/v1/`, ...) -> host[:port]."""
    k = key.strip()
    for scheme in ("https://", "http://"):
        k = k.removeprefix(scheme)
    k = k.split("/", 1)[0]
    return DOCKER_HUB if k in DOCKER_HUB_KEYS else k


def load_credentials(host: str, path: Path | None = None) -> tuple[str, str] | None:
    """(user, password) for `host` from the auth file, or None when it has none."""
    path = path or auth_file()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise SourceError(f"{path}: cannot read: {exc.strerror or exc}") from None
    data = _json(raw, str(path))
    auths = data.get("auths")
    if not isinstance(auths, dict):
        return None
    want = DOCKER_HUB if host in DOCKER_HUB_KEYS else host
    for key, val in auths.items():
        if not isinstance(key, str) or _auth_key(key) != want or not isinstance(val, dict):
            continue
        enc = val.get("auth")
        if isinstance(enc, str) and enc:
            try:
                dec = base64.b64decode(enc, validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                raise SourceError(
                    f"{path}: auths[{key!r}].auth is not base64 of user:password"
                ) from None
            user, sep, pw = dec.partition(":")
            if not sep:
                raise SourceError(f"{path}: auths[{key!r}].auth is not base64 of user:password")
            return user, pw
        uname, upw = val.get("username"), val.get("password")
        if isinstance(uname, str) and isinstance(upw, str):
            return uname, upw
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """`Bearer realm="...",service="...",scope="..."` -> ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in re.finditer(r'([A-Za-z_]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]+))', rest)
    }
    return scheme.lower(), params


# ---- the client ----------------------------------------------------------------------------


def _describe(exc: httpx.HTTPError) -> str:
    msg = str(exc) or type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    while cause is not None and not str(cause):
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, httpx.ConnectError) and cause is not None:
        msg = str(cause)
    msg = re.sub(r"^\[Errno -?\d+\] ", "", msg.splitlines()[0] if msg else "")
    return msg or type(exc).__name__


class RegistryClient:
    """One registry and repository; handles anonymous, basic and bearer-token auth."""

    def __init__(
        self,
        ref: Reference,
        insecure: bool = False,
        credentials: tuple[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.ref = ref
        scheme = "http" if insecure or is_local(ref.host) else "https"
        self.base = f"{scheme}://{ref.api_host}"
        self.credentials = credentials
        self.authorization: str | None = None
        self.actions = "pull"  # scope asked for when a bearer challenge names none ("": none)
        self._tried: set[str] = set()  # challenges already answered
        self._worked: set[str] = set()  # authorizations the registry accepted at least once
        self._auth_lock = threading.Lock()
        self.http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, 15.0)),
            follow_redirects=True,  # blob redirects to storage; httpx drops auth cross-origin
            headers={"User-Agent": "layerfs"},
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests --

    def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        content: Callable[[], bytes | IO[bytes]] | None = None,
    ) -> httpx.Response:
        """One request with auth (answering a 401 challenge once); transport errors become
        RegistryError. The caller checks the status (see `check`) and closes a stream.
        `content` makes the body (called again when the request is repeated after a 401)."""
        url = path if "://" in path else self.base + path
        while True:
            hdrs = dict(headers or {})
            sent = self.authorization
            if sent:
                hdrs["Authorization"] = sent
            try:
                req = self.http.build_request(
                    method, url, headers=hdrs, content=content() if content else None
                )
                resp = self.http.send(req, stream=stream)
            except httpx.HTTPError as exc:
                raise RegistryUnreachable(
                    f"{self.ref.api_host}: cannot {method} {path}: {_describe(exc)}"
                ) from None
            challenge = resp.headers.get("WWW-Authenticate", "")
            if resp.status_code != 401 or not challenge:
                if sent and resp.status_code < 400:
                    self._worked.add(sent)
                return resp
            with self._auth_lock:  # downloads run in threads: one of them answers
                if self.authorization != sent:
                    resp.close()
                    continue  # another thread authenticated meanwhile: retry with that
                if challenge in self._tried and not (sent and sent in self._worked):
                    return resp
                # A token that worked and is refused now has expired (a lazy mount outlives
                # it): ask for a new one, once per token.
                if sent:
                    self._worked.discard(sent)
                resp.close()
                self._tried.add(challenge)
                self._authenticate(challenge)

    def _authenticate(self, challenge: str) -> None:
        scheme, params = parse_challenge(challenge)
        where = f"{self.ref.host}"
        if scheme == "basic":
            if self.credentials is None:
                raise RegistryError(
                    f"{where}: authentication required (no credentials for {where} in "
                    f"{auth_file()})"
                )
            self.authorization = _basic(*self.credentials)
            return
        if scheme != "bearer":
            raise RegistryError(f"{where}: unsupported authentication scheme {scheme!r}")
        realm = params.get("realm")
        if not realm or not realm.startswith(("http://", "https://")):
            raise RegistryError(f"{where}: bearer challenge without a usable realm")
        query = {"service": params.get("service", "")}
        scope = params.get("scope") or (
            f"repository:{self.ref.repo}:{self.actions}" if self.actions else ""
        )
        if scope:
            query["scope"] = scope
        hdrs = {"Authorization": _basic(*self.credentials)} if self.credentials else {}
        try:
            resp = self.http.get(realm, params=query, headers=hdrs)
        except httpx.HTTPError as exc:
            raise RegistryError(f"{where}: token endpoint {realm}: {_describe(exc)}") from None
        if resp.status_code != 200:
            raise RegistryError(
                f"{where}: authentication failed: token endpoint {realm} answered "
                f"{resp.status_code} {resp.reason_phrase}"
            )
        try:
            body = resp.json()
        except ValueError:
            body = None
        token = None
        if isinstance(body, dict):
            token = body.get("token") or body.get("access_token")
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{where}: token endpoint {realm} returned no token")
        self.authorization = f"Bearer {token}"

    def check(self, resp: httpx.Response, what: str) -> None:
        """Raise one RegistryError line unless the response is a success."""
        if 200 <= resp.status_code < 300:
            return
        detail = ""
        try:
            resp.read()
            body = resp.json()
            errs = body.get("errors") if isinstance(body, dict) else None
            if isinstance(errs, list) and errs and isinstance(errs[0], dict):
                code, msg = errs[0].get("code", ""), errs[0].get("message", "")
                detail = f", {code}: {msg}" if code and msg else f", {code or msg}"
        except (ValueError, httpx.HTTPError):
            pass
        finally:
            resp.close()
        status = f"({resp.status_code} {resp.reason_phrase}{detail.rstrip(', ')})"
        if resp.status_code == 401:
            who = f" as {self.credentials[0]!r}" if self.credentials else ""
            why = f"authentication failed{who}" if self.authorization else "authentication required"
            raise RegistryError(f"{what}: {why} {status}")
        if resp.status_code == 403:
            raise RegistryError(f"{what}: access denied {status}")
        if resp.status_code == 404:
            raise RegistryError(f"{what}: not found {status}")
        raise RegistryError(f"{what}: registry error {status}")

    def _small(self, resp: httpx.Response, what: str) -> bytes:
        """The body of a JSON document, at most MAX_JSON bytes."""
        buf = bytearray()
        try:
            for chunk in resp.iter_bytes():
                buf += chunk
                if len(buf) > MAX_JSON:
                    raise RegistryError(f"{what}: larger than {MAX_JSON} bytes")
        except httpx.HTTPError as exc:
            raise RegistryError(f"{what}: {self.ref.api_host}: {_describe(exc)}") from None
        finally:
            resp.close()
        return bytes(buf)

    # -- API --

    def manifest(self, reference: str) -> tuple[bytes, str, str]:
        """(body, media type, digest) of a manifest or index, its digest verified."""
        what = f"manifest {self.ref.name}{'@' if reference.startswith('sha256:') else ':'}"
        what += reference
        resp = self.request(
            "GET", f"/v2/{self.ref.repo}/manifests/{reference}", {"Accept": ACCEPT}, stream=True
        )
        self.check(resp, what)
        ctype = resp.headers.get("Content-Type", "").split(";")[0].strip()
        header_digest = resp.headers.get("Docker-Content-Digest", "")
        body = self._small(resp, what)
        digest = sha256_digest(body)
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"{what}: content does not match its digest (got {digest})")
        if header_digest.startswith("sha256:") and header_digest != digest:
            raise RegistryError(
                f"{what}: content digest {digest} != Docker-Content-Digest {header_digest}"
            )
        obj = _json(body, what)
        mt = obj.get("mediaType") if isinstance(obj.get("mediaType"), str) else None
        if ctype in INDEX_TYPES or ctype in MANIFEST_TYPES:
            mt = ctype
        if not mt:
            mt = OCI_INDEX if "manifests" in obj else OCI_MANIFEST
        return body, str(mt), digest

    def blob_bytes(self, digest: str, size: int | None, what: str) -> bytes:
        """A small blob (the config) read whole and verified."""
        resp = self.request("GET", f"/v2/{self.ref.repo}/blobs/{digest}", stream=True)
        self.check(resp, f"{what} {digest}")
        data = self._small(resp, f"{what} {digest}")
        if sha256_digest(data) != digest:
            raise RegistryError(f"{what} {digest}: content does not match its digest")
        if size is not None and len(data) != size:
            raise RegistryError(f"{what} {digest}: {len(data)} bytes, descriptor says {size}")
        return data

    def open_blob(self, digest: str) -> IO[bytes]:
        """A layer blob as a stream (not verified here: the importer hashes it). A broken
        connection is resumed with a Range request up to RETRIES times."""
        return io.BufferedReader(_BlobStream(self, digest), buffer_size=CHUNK)


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class _BlobStream(io.RawIOBase):
    """Raw reader over GET /v2/<repo>/blobs/<digest>, resuming after a cut connection."""

    def __init__(self, client: RegistryClient, digest: str) -> None:
        super().__init__()
        self.client = client
        self.digest = digest
        self.path = f"/v2/{client.ref.repo}/blobs/{digest}"
        self.offset = 0
        self.retries = 0
        self.pending = b""
        self.resp: httpx.Response | None = None
        self.it: Iterator[bytes] | None = None
        self._open()

    def _open(self) -> None:
        headers = {"Accept-Encoding": "identity"}  # offsets count blob bytes
        if self.offset:
            headers["Range"] = f"bytes={self.offset}-"
        resp = self.client.request("GET", self.path, headers, stream=True)
        self.client.check(resp, f"blob {self.digest} of {self.client.ref.name}")
        skip = 0
        if self.offset and resp.status_code != 206:
            skip = self.offset  # the server ignored Range: drop what we already have
        self.resp = resp
        self.it = resp.iter_bytes()  # as received: a chunk size would hold back a cut tail
        while skip:
            chunk = self._next()
            if chunk is None:
                raise LayerError(f"blob {self.digest}: shorter on re-request")
            if len(chunk) > skip:
                self.pending = chunk[skip:]
                skip = 0
            else:
                skip -= len(chunk)

    def _next(self) -> bytes | None:
        assert self.it is not None
        try:
            return next(self.it)
        except StopIteration:
            return None

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        while not self.pending:
            try:
                chunk = self._next()
            except httpx.TransportError as exc:
                self._drop()
                if self.retries >= RETRIES:
                    raise OSError(
                        f"download of {self.digest} failed after {RETRIES} retries: "
                        f"{_describe(exc)}"
                    ) from None
                self.retries += 1
                try:
                    self._open()
                except SourceError as err:
                    raise OSError(f"resuming {self.digest}: {err}") from None
                except httpx.TransportError as err:
                    raise OSError(f"resuming {self.digest}: {_describe(err)}") from None
                continue
            if chunk is None:
                return 0
            self.pending = chunk
        n = min(len(view), len(self.pending))
        view[:n] = self.pending[:n]
        self.pending = self.pending[n:]
        self.offset += n
        return n

    def _drop(self) -> None:
        if self.resp is not None:
            self.resp.close()
            self.resp = None
            self.it = None

    def close(self) -> None:
        self._drop()
        super().close()


# ---- pulling -------------------------------------------------------------------------------


@dataclass
class Pulled:
    """What `registry_image` resolved: the image and the digest the reference named."""

    image: SourceImage
    digest: str  # digest of the manifest or index the reference resolved to


def registry_image(client: RegistryClient, want: tuple[str, str, str | None]) -> Pulled:
    """Resolve the client's reference to one image (choosing `want` from an index)."""
    ref = client.ref
    body, mt, digest = client.manifest(ref.reference)
    top = digest
    depth = 0
    while mt in INDEX_TYPES:
        depth += 1
        if depth > 4:
            raise RegistryError(f"{ref}: image index nested too deep")
        idx = _json(body, f"{ref}: index {digest}")
        subs = idx.get("manifests")
        if not isinstance(subs, list) or not all(isinstance(d, dict) for d in subs):
            raise RegistryError(f"{ref}: index {digest}: 'manifests' is not a list of objects")
        desc = _pick_platform(subs, want, str(ref))
        sub = _check_digest(desc.get("digest"), f"{ref}: index {digest}")
        body, mt, digest = client.manifest(sub)
        size = desc.get("size")
        if isinstance(size, int) and size != len(body):
            raise RegistryError(f"{ref}: manifest {sub}: {len(body)} bytes, index says {size}")
    if mt not in MANIFEST_TYPES:
        raise RegistryError(f"{ref}: manifest {digest}: unsupported media type {mt!r}")
    man = _json(body, f"{ref}: manifest {digest}")
    cdesc, ldescs = man.get("config"), man.get("layers")
    if not isinstance(cdesc, dict) or not isinstance(ldescs, list):
        raise RegistryError(f"{ref}: manifest {digest}: missing config or layers")
    cdig = _check_digest(cdesc.get("digest"), f"{ref}: config")
    csize = cdesc.get("size")
    config = client.blob_bytes(cdig, csize if isinstance(csize, int) else None, f"{ref}: config")
    diff_ids = _diff_ids(_json(config, f"{ref}: config {cdig}"), f"{ref}: config")
    if len(diff_ids) != len(ldescs):
        raise RegistryError(
            f"{ref}: manifest {digest}: {len(ldescs)} layers but the config lists "
            f"{len(diff_ids)} DiffIDs"
        )
    layers = []
    for i, (ld, diff) in enumerate(zip(ldescs, diff_ids, strict=True)):
        if not isinstance(ld, dict):
            raise RegistryError(f"{ref}: manifest {digest}: layer {i} is not an object")
        ldig = _check_digest(ld.get("digest"), f"{ref}: manifest {digest}: layer {i}")
        size = ld.get("size")
        layers.append(
            LayerRef(
                digest=ldig,
                media_type=str(ld.get("mediaType", "")),
                size=size if isinstance(size, int) else None,
                diff_id=diff,
                opener=lambda d=ldig: client.open_blob(d),  # type: ignore[misc]
            )
        )
    names = [f"{ref.name}:{ref.tag}"] if ref.tag else []
    image = SourceImage(
        config=config,
        config_digest=cdig,
        manifest=body,
        manifest_digest=digest,
        media_type=mt,
        layers=layers,
        names=names,
        repo_digests=[f"{ref.name}@{top}"],
    )
    return Pulled(image, top)


def save_credentials(host: str, user: str, password: str, path: Path | None = None) -> Path:
    """Record `auths[host].auth` in the auth file (other keys kept), atomically, mode 0600."""
    path = path or auth_file()
    data: dict[str, Any] = {}
    if path.exists():
        data = _json(path.read_bytes(), str(path))
    auths = data.get("auths")
    if not isinstance(auths, dict):
        auths = data["auths"] = {}
    want = _auth_key(host)
    for key in [k for k in auths if isinstance(k, str) and _auth_key(k) == want]:
        del auths[key]
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    auths["https://index.docker.io/v1/" if want == DOCKER_HUB else want] = {"auth": token}
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_auth(path, data)
    return path


def _write_auth(path: Path, data: dict[str, Any]) -> None:
    """Replace the auth file atomically, mode 0600."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def remove_credentials(host: str, path: Path | None = None) -> bool:
    """Drop `host`'s entries from the auth file (other keys kept, atomically); False when it
    had none."""
    path = path or auth_file()
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return False
    data = _json(raw, str(path))
    auths = data.get("auths")
    if not isinstance(auths, dict):
        return False
    want = _auth_key(host)
    keys = [k for k in auths if isinstance(k, str) and _auth_key(k) == want]
    if not keys:
        return False
    for key in keys:
        del auths[key]
    _write_auth(path, data)
    return True


def check_login(client: RegistryClient) -> None:
    """GET /v2/ with the client's credentials; RegistryError unless the registry accepts."""
    client.actions = ""
    resp = client.request("GET", "/v2/")
    client.check(resp, f"login to {client.ref.host}")
    resp.close()
