"""Image references: the `[host[:port]/]repo[:tag|@sha256:…]` grammar of pull, push and every
verb that names an image (tag, commit, import --tag), with docker's defaults."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SourceError
from .sources import _check_digest

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
DOCKER_HUB_KEYS = {
    "docker.io",
    "index.docker.io",
    "registry-1.docker.io",
    "registry.hub.docker.com",
}
_REPO_RE = re.compile(
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_HOST_RE = re.compile(r"(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(?::[0-9]+)?")


@dataclass(frozen=True)
class Reference:
    """`[host[:port]/]repo[:tag|@sha256:digest]` with docker's defaults filled in."""

    host: str  # as written (docker.io for Docker Hub)
    repo: str  # library/ added for a one-component Docker Hub name
    tag: str | None  # None when pulled by digest only
    digest: str | None

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def name(self) -> str:
        """The repository as docker shows it (docker.io/ and library/ dropped)."""
        if self.host == DOCKER_HUB:
            return self.repo.removeprefix("library/")
        return f"{self.host}/{self.repo}"

    @property
    def reference(self) -> str:
        """What goes into /v2/<repo>/manifests/<reference>."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        tail = f"@{self.digest}" if self.digest else f":{self.tag}"
        return f"{self.name}{tail}"


def parse_reference(text: str) -> Reference:
    """Parse an image reference; SourceError (one line) when it is malformed."""
    rest = text
    digest = None
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        _check_digest(digest, f"reference {text!r}")
    first, sep, remainder = rest.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.startswith("[")):
        host, path = first, remainder
        if not _HOST_RE.fullmatch(host):
            raise SourceError(f"invalid reference {text!r}: bad registry host {host!r}")
    else:
        host, path = DOCKER_HUB, rest
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
        if not _TAG_RE.fullmatch(tag):
            raise SourceError(f"invalid reference {text!r}: bad tag {tag!r}")
    if not path or not _REPO_RE.fullmatch(path):
        raise SourceError(
            f"invalid reference {text!r}: repository {path!r} must be lowercase "
            "[a-z0-9._-] components separated by /"
        )
    if host in DOCKER_HUB_KEYS:
        host = DOCKER_HUB
        if "/" not in path:
            path = "library/" + path
    if tag is None and digest is None:
        tag = "latest"
    return Reference(host, path, tag, digest)


def is_local(host: str) -> bool:
    """Hosts spoken to over plain HTTP by default (as docker does for a local registry)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if host.startswith("[") and "]" in host:
        name = host[: host.index("]") + 1]
    return name in ("localhost", "127.0.0.1", "[::1]")


def local_name(text: str) -> str:
    """The name an image gets in the store from `tag`, `commit` or `import --tag`: the
    grammar of pull and push, without a digest, written as `images` shows it (docker.io/ and
    library/ dropped, `:latest` added). SourceError (one line) when it is not a name."""
    if not text:
        raise SourceError("invalid image name '': empty")
    ref = parse_reference(text)
    if ref.digest is not None:
        raise SourceError(
            f"invalid image name {text!r}: a digest names content, not a tag (give NAME[:TAG])"
        )
    return f"{ref.name}:{ref.tag}"
