"""Chunks of lazy layers fetched by HTTP Range from a real registry (Debian's docker-registry)
through a counting proxy: little is fetched, everything is verified, faults are retried."""

from __future__ import annotations

import io
import json
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from layerstore.errors import LayerError
from layerstore.lazy import estargz, zstdchunked
from layerstore.lazy.fetch import ChunkError, ChunkFetcher, ContentSink, RegistrySource
from layerstore.lazy.model import ESTARGZ, ZSTD_CHUNKED, LazyLayer
from layerstore.lazy.write import convert
from layerstore.ocibuild import d, f, layer_tar
from layerstore.registry import RegistryClient, RegistryError, parse_reference
from layerstore.store import Store
from tests.registry.proxy import ProxyState, running_proxy
from tests.registry.server import Registry, running_registry
from tests.store.test_lazy_formats import _layout, _skopeo_layer, files_of

pytestmark = pytest.mark.tools

FILES = 60
FILE_SIZE = 32 << 10


def source_tar() -> bytes:
    rng = random.Random(22)
    members = [d("etc"), f("etc/os-release", b"NAME=lazy\nID=layerfs\n"), d("data")]
    members += [f(f"data/{i:02d}", rng.randbytes(FILE_SIZE)) for i in range(FILES)]
    return layer_tar(members)


@dataclass(frozen=True)
class Lazy:
    reg: Registry
    tar: bytes
    repos: dict[str, str]  # case -> repo in the registry


@pytest.fixture(scope="module")
def lazy_reg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lazy]:
    """One registry holding the layer as our eStargz, our zstd:chunked and skopeo's."""
    work = tmp_path_factory.mktemp("lazyreg")
    tar = source_tar()
    with running_registry(work / "reg") as reg:
        repos = {}
        for fmt in (ESTARGZ, ZSTD_CHUNKED):
            out = io.BytesIO()
            w = convert(io.BytesIO(tar), out, fmt)
            name = fmt.replace(":", "-")
            desc = {"mediaType": w.media_type, "annotations": w.annotations}
            _layout(work / name, out.getvalue(), desc, w.diff_id)
            reg.push(f"oci:{work / name}:v1", f"lazy/{name}:v1")
            repos[name] = f"lazy/{name}"
        _skopeo_layer(work / "skopeo", tar)
        reg.push(f"oci:{work / 'skopeo' / 'dst'}:v1", "lazy/skopeo:v1")
        repos["skopeo"] = "lazy/skopeo"
        yield Lazy(reg, tar, repos)


@dataclass
class Opened:
    client: RegistryClient
    source: RegistrySource
    layer: LazyLayer


def open_layer(host: str, repo: str, **kw: Any) -> Opened:
    client = RegistryClient(parse_reference(f"{host}/{repo}:v1"))
    body, _, _ = client.manifest("v1")
    desc = json.loads(body)["layers"][0]
    ann = desc.get("annotations", {})
    src = RegistrySource(client, desc["digest"], desc["size"], **kw)
    mod = estargz if estargz.is_estargz(ann) else zstdchunked
    layer = mod.read_toc(ann, desc["digest"], desc["size"], src.read_at)
    return Opened(client, src, layer)


def blob_file(reg: Registry, digest: str) -> Path:
    hexd = digest.removeprefix("sha256:")
    return reg.storage / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"


@pytest.mark.parametrize("case", ["estargz", "zstd-chunked", "skopeo"])
def test_reading_one_file_fetches_a_small_part(lazy_reg: Lazy, tmp_path: Path, case: str) -> None:
    state = ProxyState(lazy_reg.reg.host, token_auth=True)
    with running_proxy(state) as host:
        o = open_layer(host, lazy_reg.repos[case])
        assert o.layer.format == (ESTARGZ if case == "estargz" else ZSTD_CHUNKED)
        with Store(tmp_path / "store") as st, ContentSink(st) as sink:
            fetcher = ChunkFetcher(o.layer, o.source, sink)
            lf = o.layer.files[b"/etc/os-release"]
            assert fetcher.read(lf, 0, 4096) == b"NAME=lazy\nID=layerfs\n"
            share = state.blob_bytes / o.source.size
            assert share < 0.05, f"{state.blob_bytes} of {o.source.size} bytes"
            blob_gets = [x for x in state.log if "/blobs/" in x]
            assert blob_gets and all(" bytes=" in x for x in blob_gets)  # Range requests only
            # Every file, fetched lazily, equals the source layer's.
            for path, body in files_of(lazy_reg.tar).items():
                assert fetcher.read(o.layer.files[path], 0, len(body)) == body
        o.client.close()


def test_flipped_byte_on_the_registry_disk_fails_and_caches_nothing(
    lazy_reg: Lazy, tmp_path: Path
) -> None:
    with running_proxy(ProxyState(lazy_reg.reg.host, token_auth=False)) as host:
        o = open_layer(host, lazy_reg.repos["zstd-chunked"])
        c = o.layer.files[b"/data/07"].chunks[0]
        path = blob_file(lazy_reg.reg, o.layer.blob_digest)
        good = path.read_bytes()
        bad = bytearray(good)
        bad[(c.offset + c.end) // 2] ^= 0x40
        path.write_bytes(bad)
        try:
            with Store(tmp_path / "store") as st, ContentSink(st) as sink:
                fetcher = ChunkFetcher(o.layer, o.source, sink)
                with pytest.raises(ChunkError) as exc:
                    fetcher.read(o.layer.files[b"/data/07"], 0, 10)
                assert "\n" not in str(exc.value)
                assert st.conn.execute("SELECT COUNT(*) FROM contents").fetchone()[0] == 0
                assert not list(st.tmp_dir.iterdir())
                assert not [p for p in st.content_dir.rglob("*") if p.is_file()]
                # Other files of the same blob still read.
                want = files_of(lazy_reg.tar)[b"/data/08"]
                assert fetcher.read(o.layer.files[b"/data/08"], 0, FILE_SIZE) == want
        finally:
            path.write_bytes(good)
        o.client.close()


def test_dropped_connections_are_retried_then_fail_then_work_again(
    lazy_reg: Lazy, tmp_path: Path
) -> None:
    state = ProxyState(lazy_reg.reg.host, token_auth=False)
    with running_proxy(state) as host:
        o = open_layer(host, lazy_reg.repos["estargz"], backoff=0.001)
        want = files_of(lazy_reg.tar)
        with Store(tmp_path / "store") as st, ContentSink(st) as sink:
            fetcher = ChunkFetcher(o.layer, o.source, sink, backoff=0.001)
            lf = o.layer.files[b"/data/03"]
            rng = lf.chunks[0]
            tag = f"bytes={rng.offset}-{rng.end - 1}"
            with state.lock:
                state.cut_after, state.cut_times = 1000, 2
            assert fetcher.read(lf, 0, FILE_SIZE) == want[b"/data/03"]
            assert sum(tag in x for x in state.log) == 3  # two cut, the third whole
            # More cuts than retries: the read fails with one line, nothing is kept...
            lf = o.layer.files[b"/data/04"]
            with state.lock:
                state.cut_times = 100
            with pytest.raises(RegistryError, match="failed after 4 retries") as exc:
                fetcher.read(lf, 0, 1)
            assert "\n" not in str(exc.value)
            assert not list(st.tmp_dir.iterdir())
            # ...and works again once the registry answers whole.
            with state.lock:
                state.cut_times = 0
            assert fetcher.read(lf, 0, FILE_SIZE) == want[b"/data/04"]
        o.client.close()


def test_registry_gone_gives_an_error_after_bounded_retries(lazy_reg: Lazy, tmp_path: Path) -> None:
    with running_proxy(ProxyState(lazy_reg.reg.host, token_auth=False)) as host:
        o = open_layer(host, lazy_reg.repos["estargz"], backoff=0.001)
    # The proxy is gone: nothing listens on its port any more.
    with Store(tmp_path / "store") as st, ContentSink(st) as sink:
        fetcher = ChunkFetcher(o.layer, o.source, sink, backoff=0.001)
        requests = o.source.requests
        with pytest.raises(RegistryError, match="failed after 4 retries"):
            fetcher.read(o.layer.files[b"/data/01"], 0, 1)
        assert o.source.requests - requests == 5
    o.client.close()


def test_expired_bearer_token_is_renewed(lazy_reg: Lazy, tmp_path: Path) -> None:
    state = ProxyState(lazy_reg.reg.host, token_auth=True)
    with running_proxy(state) as host:
        o = open_layer(host, lazy_reg.repos["zstd-chunked"])
        want = files_of(lazy_reg.tar)
        with Store(tmp_path / "store") as st, ContentSink(st) as sink:
            fetcher = ChunkFetcher(o.layer, o.source, sink)
            assert fetcher.read(o.layer.files[b"/data/00"], 0, FILE_SIZE) == want[b"/data/00"]
            assert state.tokens_issued == 1
            with state.lock:
                state.token = "a-later-token"  # the first one has expired
            assert fetcher.read(o.layer.files[b"/data/01"], 0, FILE_SIZE) == want[b"/data/01"]
            assert state.tokens_issued == 2
        o.client.close()


def test_concurrent_reads_of_one_chunk_make_one_request(lazy_reg: Lazy, tmp_path: Path) -> None:
    state = ProxyState(lazy_reg.reg.host, token_auth=False)
    with running_proxy(state) as host:
        o = open_layer(host, lazy_reg.repos["zstd-chunked"])
        want = files_of(lazy_reg.tar)[b"/data/09"]
        lf = o.layer.files[b"/data/09"]
        c = lf.chunks[0]
        with Store(tmp_path / "store") as st, ContentSink(st) as sink:
            fetcher = ChunkFetcher(o.layer, o.source, sink)
            got: list[bytes] = []
            start = threading.Barrier(8)

            def reader() -> None:
                start.wait()
                got.append(fetcher.read(lf, 0, FILE_SIZE))

            threads = [threading.Thread(target=reader) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert got == [want] * 8
            assert sum(f"bytes={c.offset}-{c.end - 1}" in x for x in state.log) == 1
            assert fetcher.fetches == 1
        o.client.close()


def test_range_outside_the_blob_is_refused(lazy_reg: Lazy) -> None:
    with running_proxy(ProxyState(lazy_reg.reg.host, token_auth=False)) as host:
        o = open_layer(host, lazy_reg.repos["estargz"])
        with pytest.raises(LayerError, match="outside"), o.source.open_range(0, o.source.size + 1):
            pass
        o.client.close()
