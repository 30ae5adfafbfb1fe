"""`layerfs pull` from a real registry (Debian's docker-registry) equals `layerfs import` of the
same image from an archive; faults leave the store unchanged, byte for byte."""

from __future__ import annotations

import base64
import gzip
import json
import os
import random
import re
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from layerstore.ocibuild import Img, d, f, layer_tar, write_oci
from layerstore.registry import load_credentials
from tests import images
from tests.image_fixtures import BuiltImages, image_snapshot, layerfs, layerfs_ok
from tests.mounting import LAYERFS
from tests.registry.proxy import ProxyState, running_proxy
from tests.registry.server import Registry, htpasswd_line, running_registry
from tests.store.test_import import fingerprint
from tests.treecmp import compare

pytestmark = pytest.mark.tools


@dataclass(frozen=True)
class Pushed:
    """What the module's registry holds: repo -> (the source it was pushed from, platform)."""

    reg: Registry
    sources: dict[str, tuple[str, str | None]]


# repo in the registry -> (image, format of image_source, skopeo opts, platform to pull)
CASES = {
    "oci/app": ("app", "oci", (), None),
    "docker/app": ("app", "docker-archive", (), None),
    "zstd/app": ("app", "oci-zstd", (), None),
    "multi/index-arm64": ("buildah_index", "oci", ("--all",), "linux/arm64"),
}
# The image each case must equal when imported from its archive.
EXPECT = {
    "multi/index-arm64": ("buildah_arm64", "oci"),
}


@pytest.fixture(scope="module")
def pushed(
    built_images: BuiltImages,
    image_source: Callable[[images.Image, str], str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pushed]:
    """One registry for the module, every case pushed to it with skopeo."""
    work = tmp_path_factory.mktemp("registry")
    with running_registry(work) as reg:
        sources: dict[str, tuple[str, str | None]] = {}
        for repo, (name, fmt, opts, plat) in CASES.items():
            src = image_source(built_images.by_name(name), fmt)
            reg.push(src, f"{repo}:v1", *opts)
            ename, efmt = EXPECT.get(repo, (name, fmt))
            sources[repo] = (image_source(built_images.by_name(ename), efmt), plat)
        yield Pushed(reg, sources)


def inspect(store: Path, ref: str) -> dict[str, Any]:
    out: list[dict[str, Any]] = json.loads(layerfs_ok(store, "inspect", ref).stdout)
    return out[0]


def pulled_digest(stdout: str) -> str:
    m = re.search(r"^Digest: (sha256:[0-9a-f]{64})$", stdout, re.M)
    assert m, stdout
    return m.group(1)


def blob_gets(reg: Registry) -> list[str]:
    """Blob digests the registry served (from its request log), in order."""
    return re.findall(
        r"http\.request\.method=GET [^\n]*?/blobs/(sha256:[0-9a-f]{64})", "".join(reg.log)
    )


def manifest_json(reg: Registry, repo: str, ref: str) -> dict[str, Any]:
    raw = images.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{reg.ref(repo)}:{ref}"]
    )
    data: dict[str, Any] = json.loads(raw)
    return data


@pytest.mark.parametrize("repo", list(CASES))
def test_pull_equals_archive_import(pushed: Pushed, repo: str, tmp_path: Path) -> None:
    source, plat = pushed.sources[repo]
    ref = pushed.reg.ref(f"{repo}:v1")
    popts = ("--platform", plat) if plat else ()
    p = layerfs_ok(tmp_path / "pulled", "pull", ref, *popts)
    assert "Pull complete" in p.stdout
    layerfs_ok(tmp_path / "imported", "import", source, "--tag", "from/archive:v1")
    ours = inspect(tmp_path / "pulled", ref)
    want = inspect(tmp_path / "imported", "from/archive:v1")
    assert ours["Id"] == want["Id"]
    assert ours["RootFS"]["Layers"] == want["RootFS"]["Layers"]
    assert ours["RepoTags"] == [ref]
    digest = pulled_digest(p.stdout)
    assert ours["RepoDigests"] == [f"{pushed.reg.ref(repo)}@{digest}"]
    layerfs_ok(tmp_path / "pulled", "unpack", ref, str(tmp_path / "t1"))
    layerfs_ok(tmp_path / "imported", "unpack", "from/archive:v1", str(tmp_path / "t2"))
    assert compare(image_snapshot(tmp_path / "t1"), image_snapshot(tmp_path / "t2"), ()) == []


def test_zstd_layers_stay_zstd_in_the_registry(pushed: Pushed) -> None:
    man = manifest_json(pushed.reg, "zstd/app", "v1")
    assert man["layers"] and all(ly["mediaType"].endswith("+zstd") for ly in man["layers"])


def test_docker_archive_is_served_as_docker_schema2(pushed: Pushed) -> None:
    man = manifest_json(pushed.reg, "docker/app", "v1")
    assert man["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"


def test_pull_by_digest_reuses_layers(pushed: Pushed, tmp_path: Path) -> None:
    reg = pushed.reg
    store = tmp_path / "s"
    first = layerfs_ok(store, "pull", reg.ref("oci/app:v1"))
    digest = pulled_digest(first.stdout)
    before = len(blob_gets(reg))
    again = layerfs_ok(store, "pull", f"{reg.ref('oci/app')}@{digest}")
    layers = inspect(store, reg.ref("oci/app:v1"))["RootFS"]["Layers"]
    assert again.stdout.count("Already exists") == len(layers)
    assert "Pull complete" not in again.stdout
    # Only the config blob is fetched again; no layer blob is downloaded twice.
    assert len(blob_gets(reg)) - before == 1
    by_digest = inspect(store, f"{reg.ref('oci/app')}@{digest}")
    assert by_digest["Id"] == inspect(store, reg.ref("oci/app:v1"))["Id"]


def test_pull_index_by_digest_picks_platform(
    pushed: Pushed, built_images: BuiltImages, tmp_path: Path
) -> None:
    reg = pushed.reg
    index = manifest_json(reg, "multi/index-arm64", "v1")
    assert {m["platform"]["architecture"] for m in index["manifests"]} == {"amd64", "arm64"}
    p = layerfs_ok(
        tmp_path / "s", "pull", reg.ref("multi/index-arm64:v1"), "--platform", "linux/arm64"
    )
    digest = pulled_digest(p.stdout)
    q = layerfs_ok(
        tmp_path / "s2",
        "pull",
        f"{reg.ref('multi/index-arm64')}@{digest}",
        "--platform",
        "linux/amd64",
    )
    assert pulled_digest(q.stdout) == digest  # the index digest, as docker reports it
    arm = inspect(tmp_path / "s", reg.ref("multi/index-arm64:v1"))
    amd = inspect(tmp_path / "s2", f"{reg.ref('multi/index-arm64')}@{digest}")
    assert (arm["Architecture"], amd["Architecture"]) == ("arm64", "amd64")
    layerfs_ok(tmp_path / "s2", "import", built_images.buildah_amd64.source, "-t", "amd:1")
    want = inspect(tmp_path / "s2", "amd:1")
    assert (amd["Id"], amd["RootFS"]) == (want["Id"], want["RootFS"])
    r = layerfs(
        tmp_path / "s3", "pull", reg.ref("multi/index-arm64:v1"), "--platform", "linux/s390x"
    )
    assert r.returncode != 0 and r.stderr.startswith("layerfs: ") and "s390x" in r.stderr


# ---- faults ---------------------------------------------------------------------------------


def seeded_store(tmp_path: Path) -> Path:
    """A store holding one small image, so "unchanged" means something."""
    write_oci(tmp_path / "seed", Img([layer_tar([d("etc"), f("etc/seed", b"seed\n")])], ref="s"))
    store = tmp_path / "store"
    layerfs_ok(store, "import", f"oci:{tmp_path / 'seed'}:s", "--tag", "seed:1")
    return store


def one_error(p: subprocess.CompletedProcess[str], needle: str) -> None:
    lines = p.stderr.splitlines()
    assert p.returncode != 0, p.stdout
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), p.stderr
    assert needle in lines[0], lines[0]


def unique_image(root: Path, tag: str) -> Path:
    """A two-layer OCI layout whose blobs no other test pushes (the registry shares blobs)."""
    write_oci(
        root,
        Img(
            [
                layer_tar([d("opt"), f("opt/first", tag.encode() * 100)]),
                layer_tar([f("opt/second", b"second-" + tag.encode() * 5000)]),
            ],
            ref="u",
        ),
    )
    return root


def test_unknown_repo_is_404(pushed: Pushed, tmp_path: Path) -> None:
    store = seeded_store(tmp_path)
    before = fingerprint(store)
    p = layerfs(store, "pull", pushed.reg.ref("no/such-repo:v1"))
    one_error(p, "not found")
    assert "404" in p.stderr
    p = layerfs(store, "pull", pushed.reg.ref("oci/app:no-such-tag"))
    one_error(p, "not found")
    assert fingerprint(store) == before


def test_connection_refused(tmp_path: Path) -> None:
    store = seeded_store(tmp_path)
    with running_registry(tmp_path / "reg") as reg:
        pass  # started and stopped: nothing listens on its port now
    before = fingerprint(store)
    one_error(layerfs(store, "pull", reg.ref("oci/app:v1")), "refused")
    assert fingerprint(store) == before


def test_unknown_host(tmp_path: Path) -> None:
    store = seeded_store(tmp_path)
    before = fingerprint(store)
    # .invalid never resolves (RFC 2606); --insecure: no TLS needed to get that far
    p = layerfs(store, "pull", "no-such-host.invalid/x/y:1", "--insecure")
    one_error(p, "no-such-host.invalid")
    assert fingerprint(store) == before


@pytest.mark.parametrize("how", ["recompressed", "flipped", "deleted"])
def test_tampered_blob_leaves_store_unchanged(pushed: Pushed, tmp_path: Path, how: str) -> None:
    """The top layer's blob in the registry's storage is replaced: by the same tar compressed
    differently (the DiffID still matches, only the blob digest does not), or with one byte
    flipped (the tar or its compression breaks), or deleted (404). The first layer is fine and
    gets staged."""
    reg = pushed.reg
    layout = unique_image(tmp_path / "img", f"tamper-{how}")
    reg.push(f"oci:{layout}:u", f"fault/{how}:v1")
    man = manifest_json(reg, f"fault/{how}", "v1")
    top = man["layers"][-1]["digest"].removeprefix("sha256:")
    data = reg.storage / "docker/registry/v2/blobs/sha256" / top[:2] / top / "data"
    raw = data.read_bytes()
    if how == "recompressed":
        plain = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        tampered = gzip.compress(plain, compresslevel=1, mtime=1)
        assert tampered != raw
        needle = "blob digest mismatch"
    elif how == "deleted":
        tampered = b""
        needle = "not found (404"
    else:
        flipped = bytearray(raw)
        flipped[len(raw) // 2] ^= 0x55
        tampered = bytes(flipped)
        needle = "(2/2)"
    if tampered:
        data.write_bytes(tampered)
    else:
        data.unlink()
    store = seeded_store(tmp_path)
    before = fingerprint(store)
    p = layerfs(store, "pull", reg.ref(f"fault/{how}:v1"))
    assert "Pull complete" in p.stdout  # the first layer was fine and staged...
    one_error(p, needle)
    assert fingerprint(store) == before  # ...and nothing of it was committed
    assert layerfs_ok(store, "fsck").returncode == 0


def write_auth(path: Path, host: str, user: str, password: str) -> Path:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": token}}}))
    return path


def test_basic_auth_htpasswd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    htpasswd = tmp_path / "htpasswd"
    htpasswd.write_text(htpasswd_line("tester", "s3cret"))
    layout = unique_image(tmp_path / "img", "auth")
    store = seeded_store(tmp_path)
    with running_registry(tmp_path / "reg", htpasswd=htpasswd) as reg:
        reg.push(f"oci:{layout}:u", "auth/img:v1", "--dest-creds", "tester:s3cret")
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "none.json"))
        before = fingerprint(store)
        one_error(layerfs(store, "pull", reg.ref("auth/img:v1")), "authentication required")
        assert fingerprint(store) == before
        monkeypatch.setenv(
            "REGISTRY_AUTH_FILE", str(write_auth(tmp_path / "bad.json", reg.host, "tester", "nope"))
        )
        one_error(layerfs(store, "pull", reg.ref("auth/img:v1")), "401")
        assert fingerprint(store) == before
        monkeypatch.setenv(
            "REGISTRY_AUTH_FILE",
            str(write_auth(tmp_path / "good.json", f"http://{reg.host}", "tester", "s3cret")),
        )
        p = layerfs_ok(store, "pull", reg.ref("auth/img:v1"))
        assert p.stdout.count("Pull complete") == 2
        # layerfs login: a wrong password is refused and saves nothing; a right one is saved
        auth = tmp_path / "login" / "auth.json"
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth))
        login = [*LAYERFS, "login", reg.host, "-u", "tester", "--password-stdin"]
        bad = subprocess.run(login, input="wrong\n", capture_output=True, text=True, check=False)
        one_error(bad, "authentication failed")
        assert not auth.exists()
        good = subprocess.run(login, input="s3cret\n", capture_output=True, text=True, check=False)
        assert good.returncode == 0, good.stderr
        assert auth.stat().st_mode & 0o777 == 0o600
        assert load_credentials(reg.host, auth) == ("tester", "s3cret")
        # push with basic auth too: the layers are there already, the manifest is new
        p = layerfs_ok(store, "push", reg.ref("auth/img:v1"), reg.ref("auth/again:v1"))
        assert "v1: digest: sha256:" in p.stdout
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(tmp_path / "bad.json"))
        one_error(layerfs(store, "push", "seed:1", reg.ref("auth/again:v2")), "401")
    layerfs_ok(store, "import", f"oci:{layout}:u", "--tag", "local/auth:v1")
    assert inspect(store, "local/auth:v1")["Id"] == inspect(store, reg.ref("auth/img:v1"))["Id"]


# ---- through a front: bearer tokens, cut connections -----------------------------------------


def random_image(root: Path, tag: str) -> Path:
    """Two layers of incompressible bytes (blobs of ~200 kB, big enough to cut in the middle)."""
    rnd = random.Random(tag)
    write_oci(
        root,
        Img(
            [
                layer_tar([d("data"), f("data/a", rnd.randbytes(200_000))]),
                layer_tar([f("data/b", rnd.randbytes(200_000))]),
            ],
            ref="r",
        ),
    )
    return root


def test_bearer_token_flow(pushed: Pushed, tmp_path: Path) -> None:
    state = ProxyState(pushed.reg.host)
    with running_proxy(state) as front:
        p = layerfs_ok(tmp_path / "s", "pull", f"{front}/oci/app:v1")
    assert p.stdout.count("Pull complete") >= 1
    assert any(x.startswith("GET /token?") for x in state.log), state.log
    layerfs_ok(tmp_path / "s2", "pull", pushed.reg.ref("oci/app:v1"))
    assert (
        inspect(tmp_path / "s", f"{front}/oci/app:v1")["Id"]
        == (inspect(tmp_path / "s2", pushed.reg.ref("oci/app:v1"))["Id"])
    )


def test_cut_connection_resumes_with_range(pushed: Pushed, tmp_path: Path) -> None:
    layout = random_image(tmp_path / "img", "resume")
    pushed.reg.push(f"oci:{layout}:r", "cut/resume:v1")
    state = ProxyState(pushed.reg.host, token_auth=False, cut_after=50_000, cut_times=2)
    with running_proxy(state) as front:
        p = layerfs_ok(tmp_path / "s", "pull", f"{front}/cut/resume:v1", "--jobs", "1")
    assert p.stdout.count("Pull complete") == 2
    assert state.cut_times == 0
    # Cut at 50000 bytes, resumed from there, that response cut 50000 bytes later too.
    ranged = [x.rsplit(" ", 1)[1] for x in state.log if " bytes=" in x]
    assert ranged == ["bytes=50000-", "bytes=100000-"], "\n".join(state.log)
    layerfs_ok(tmp_path / "s", "import", f"oci:{layout}:r", "--tag", "local/resume:v1")
    assert (
        inspect(tmp_path / "s", "local/resume:v1")["Id"]
        == (inspect(tmp_path / "s", f"{front}/cut/resume:v1")["Id"])
    )


def test_connection_cut_for_good_fails_cleanly(pushed: Pushed, tmp_path: Path) -> None:
    layout = random_image(tmp_path / "img", "dead")
    pushed.reg.push(f"oci:{layout}:r", "cut/dead:v1")
    store = seeded_store(tmp_path)
    before = fingerprint(store)
    state = ProxyState(pushed.reg.host, token_auth=False, cut_after=50_000, cut_times=100)
    with running_proxy(state) as front:
        p = layerfs(store, "pull", f"{front}/cut/dead:v1")
    one_error(p, "retries")
    assert fingerprint(store) == before


# ---- push -------------------------------------------------------------------------------------


def test_push_round_trip(
    pushed: Pushed,
    built_images: BuiltImages,
    image_source: Callable[[images.Image, str], str],
    tmp_path: Path,
) -> None:
    """import -> push -> rmi -> gc -> pull: same image ID, DiffIDs and tree; skopeo reads it;
    a second push uploads nothing."""
    reg = pushed.reg
    store = tmp_path / "s"
    layerfs_ok(store, "import", image_source(built_images.app, "docker-archive"), "-t", "rt:1")
    before = inspect(store, "rt:1")
    layerfs_ok(store, "unpack", "rt:1", str(tmp_path / "t1"))
    dest = reg.ref("round/app:v1")
    p = layerfs_ok(store, "push", "rt:1", dest)
    m = re.search(r"^v1: digest: (sha256:[0-9a-f]{64}) size: (\d+)$", p.stdout, re.M)
    assert m, p.stdout
    raw = images.run(["skopeo", "inspect", "--tls-verify=false", f"docker://{dest}"])
    info = json.loads(raw)
    assert info["Digest"] == m.group(1)
    assert len(info["Layers"]) == len(before["RootFS"]["Layers"])
    again = layerfs_ok(store, "push", "rt:1", reg.ref("round/app:v2"))
    assert again.stdout.count("Layer already exists") == len(info["Layers"])
    assert "Pushed" not in again.stdout
    layerfs_ok(store, "rmi", *before["RepoTags"])  # the archive named it too
    layerfs_ok(store, "gc")
    assert layerfs_ok(store, "layers", "--json").stdout.strip() in ("[]", "")
    q = layerfs_ok(store, "pull", dest)
    assert pulled_digest(q.stdout) == m.group(1)
    after = inspect(store, dest)
    assert after["Id"] == before["Id"]
    assert after["RootFS"]["Layers"] == before["RootFS"]["Layers"]
    layerfs_ok(store, "unpack", dest, str(tmp_path / "t2"))
    assert compare(image_snapshot(tmp_path / "t1"), image_snapshot(tmp_path / "t2"), ()) == []


def test_pull_quiet_prints_the_reference_and_push_image_goes_to_its_own_name(
    pushed: Pushed, tmp_path: Path
) -> None:
    store = tmp_path / "s"
    src = pushed.reg.ref("oci/app:v1")
    q = layerfs_ok(store, "pull", "-q", src)
    assert q.stdout == f"{src}\n" and q.stderr == ""  # as `docker pull -q`
    own = pushed.reg.ref("own/app:v3")
    layerfs_ok(store, "tag", src, own)
    p = layerfs_ok(store, "push", "-q", own)  # no REF: the image's own name
    assert p.stdout == ""
    other = tmp_path / "s2"
    layerfs_ok(other, "pull", "-q", own)
    assert inspect(other, own)["Id"] == inspect(store, src)["Id"]
    # An ID is not a name: push says where it would need to go, in one line.
    short = inspect(store, src)["Id"][7:19]
    one_error(layerfs(store, "push", short), "not a name of the image")


def test_push_to_unreachable_registry(tmp_path: Path) -> None:
    store = seeded_store(tmp_path)
    with running_registry(tmp_path / "reg") as reg:
        pass
    one_error(layerfs(store, "push", "seed:1", reg.ref("x/y:1")), "refused")
    one_error(layerfs(store, "push", "no-such:image", reg.ref("x/y:1")), "no such image")


def test_layers_download_in_parallel(pushed: Pushed, tmp_path: Path) -> None:
    """The front holds each layer blob until two are requested at once: a pull that fetched
    one blob after another would get a 503 when the wait gives up."""
    layout = random_image(tmp_path / "img", "parallel")
    pushed.reg.push(f"oci:{layout}:r", "par/img:v1")
    state = ProxyState(
        pushed.reg.host,
        token_auth=False,
        cut_after=10_000,
        barrier=threading.Barrier(2, timeout=30),
    )
    with running_proxy(state) as front:
        p = layerfs_ok(tmp_path / "s", "pull", f"{front}/par/img:v1", "--jobs", "2")
    assert p.stdout.count("Pull complete") == 2
    q = layerfs(tmp_path / "s2", "pull", f"{front}/par/img:v1", "--jobs", "0")
    one_error(q, "--jobs")


def test_push_mounts_from_the_pulled_repo(pushed: Pushed, tmp_path: Path) -> None:
    """An image pulled from src/ and pushed to dst/ of the same registry: its blobs (rebuilt
    exactly as layerfs pushed them to src/) are mounted across repositories, not uploaded."""
    reg = pushed.reg
    layout = random_image(tmp_path / "img", "mount")
    a, b = tmp_path / "a", tmp_path / "b"
    layerfs_ok(a, "import", f"oci:{layout}:r", "--tag", "mnt:1")
    first = layerfs_ok(a, "push", "mnt:1", reg.ref("src/mnt:v1"))
    assert first.stdout.count("Pushed") == 2
    layerfs_ok(b, "pull", reg.ref("src/mnt:v1"))
    p = layerfs_ok(b, "push", reg.ref("src/mnt:v1"), reg.ref("dst/mnt:v1"))
    assert p.stdout.count("Mounted from src/mnt") == 2, p.stdout
    assert "Pushed" not in p.stdout
    c = tmp_path / "c"
    layerfs_ok(c, "pull", reg.ref("dst/mnt:v1"))
    assert inspect(c, reg.ref("dst/mnt:v1"))["Id"] == inspect(a, "mnt:1")["Id"]


def test_chunked_push(pushed: Pushed, tmp_path: Path) -> None:
    reg = pushed.reg
    layout = random_image(tmp_path / "img", "chunked")
    store = tmp_path / "s"
    layerfs_ok(store, "import", f"oci:{layout}:r", "--tag", "chunky:1")
    patches = "".join(reg.log).count("http.request.method=PATCH")
    p = layerfs_ok(store, "push", "chunky:1", reg.ref("chunked/img:v1"), "--chunk-size", "64")
    assert p.stdout.count("Pushed") == 2
    # two ~200 kB blobs in 64 KiB chunks: at least 4 PATCH requests each
    assert "".join(reg.log).count("http.request.method=PATCH") - patches >= 8
    layerfs_ok(tmp_path / "s2", "pull", reg.ref("chunked/img:v1"))
    assert (
        inspect(tmp_path / "s2", reg.ref("chunked/img:v1"))["Id"]
        == inspect(store, "chunky:1")["Id"]
    )
    one_error(
        layerfs(store, "push", "chunky:1", reg.ref("chunked/img:v2"), "--chunk-size", "0"), "chunk"
    )


def test_kill_9_mid_pull_then_recovery(pushed: Pushed, tmp_path: Path) -> None:
    """A pull killed (-9) after its first layer was staged, while the second may still be
    downloading into its spool: the next open cleans STORE/tmp, fsck passes, and the pull
    then completes."""
    layout = random_image(tmp_path / "img", "killed")
    pushed.reg.push(f"oci:{layout}:r", "kill/img:v1")
    store = seeded_store(tmp_path)
    ref = pushed.reg.ref("kill/img:v1")
    env = {**os.environ, "LAYERFS_TEST_CRASH": "layer-staged"}
    cmd = [*LAYERFS, "pull", "--store", str(store), ref]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert p.returncode == -9, p.stderr
    assert list((store / "tmp").iterdir()) != []  # staging and spool left behind
    assert layerfs_ok(store, "fsck", "--full").returncode == 0
    assert list((store / "tmp").iterdir()) == []
    assert layerfs(store, "inspect", ref).returncode != 0
    layerfs_ok(store, "pull", ref)
    assert layerfs_ok(store, "fsck", "--full").returncode == 0
