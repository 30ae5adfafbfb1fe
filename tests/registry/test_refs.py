"""Registry references, credentials files and auth challenges, without a registry."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from layerstore.errors import SourceError
from layerstore.registry import (
    Reference,
    is_local,
    load_credentials,
    parse_challenge,
    parse_reference,
)

D = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "want", "name"),
    [
        ("alpine", Reference("docker.io", "library/alpine", "latest", None), "alpine"),
        ("alpine:3.19", Reference("docker.io", "library/alpine", "3.19", None), "alpine"),
        ("docker.io/foo/bar", Reference("docker.io", "foo/bar", "latest", None), "foo/bar"),
        ("index.docker.io/x", Reference("docker.io", "library/x", "latest", None), "x"),
        ("localhost/a/b:t", Reference("localhost", "a/b", "t", None), "localhost/a/b"),
        ("127.0.0.1:5000/a", Reference("127.0.0.1:5000", "a", "latest", None), "127.0.0.1:5000/a"),
        (f"reg.io/a/b@{D}", Reference("reg.io", "a/b", None, D), "reg.io/a/b"),
        (f"reg.io:443/a:v1@{D}", Reference("reg.io:443", "a", "v1", D), "reg.io:443/a"),
        ("foo/bar:v1", Reference("docker.io", "foo/bar", "v1", None), "foo/bar"),
    ],
)
def test_parse_reference(text: str, want: Reference, name: str) -> None:
    got = parse_reference(text)
    assert got == want
    assert got.name == name
    assert got.reference == (want.digest or want.tag)


@pytest.mark.parametrize(
    "text", ["", "UPPER/x", "a//b", "reg.io/", "a:b:c", "a@sha256:12", "a@md5:" + "0" * 32, "a:-x"]
)
def test_bad_reference(text: str) -> None:
    with pytest.raises(SourceError):
        parse_reference(text)


def test_api_host_and_local() -> None:
    assert parse_reference("alpine").api_host == "registry-1.docker.io"
    assert is_local("127.0.0.1:5000") and is_local("localhost") and is_local("[::1]:80")
    assert not is_local("reg.io:5000") and not is_local("localhost.example")


def _auth(user: str, pw: str) -> str:
    return base64.b64encode(f"{user}:{pw}".encode()).decode()


def test_credentials(tmp_path: Path) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(
        json.dumps(
            {
                "auths": {
                    "https://index.docker.io/v1/": {"auth": _auth("hub", "p:w")},
                    "http://127.0.0.1:5000": {"auth": _auth("me", "pw")},
                    "reg.io": {"username": "u", "password": "x"},
                }
            }
        )
    )
    assert load_credentials("docker.io", cfg) == ("hub", "p:w")
    assert load_credentials("127.0.0.1:5000", cfg) == ("me", "pw")
    assert load_credentials("reg.io", cfg) == ("u", "x")
    assert load_credentials("other.io", cfg) is None
    assert load_credentials("x", tmp_path / "absent.json") is None
    cfg.write_text(json.dumps({"auths": {"reg.io": {"auth": "!!notbase64"}}}))
    with pytest.raises(SourceError, match="base64"):
        load_credentials("reg.io", cfg)
    cfg.write_text("{not json")
    with pytest.raises(SourceError, match="invalid JSON"):
        load_credentials("reg.io", cfg)


def test_parse_challenge() -> None:
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.io/token",service="registry.io",scope="repository:a/b:pull"'
    )
    assert scheme == "bearer"
    assert params == {
        "realm": "https://auth.io/token",
        "service": "registry.io",
        "scope": "repository:a/b:pull",
    }
    assert parse_challenge('Basic realm="x"') == ("basic", {"realm": "x"})
