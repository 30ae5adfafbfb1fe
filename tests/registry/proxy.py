"""A small HTTP front for the test registry: bearer-token auth (with its own token endpoint),
and connections cut in the middle of blob bodies, to test the client's token flow and
its Range resume."""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

TOKEN = "layerfs-test-token"
SERVICE = "layerfs-test"
FORWARD = ("Content-Type", "Content-Length", "Docker-Content-Digest", "Content-Range")


@dataclass
class ProxyState:
    upstream: str  # host:port of the real registry
    token_auth: bool = True
    cut_after: int | None = None  # cut blob bodies after this many bytes...
    cut_times: int = 0  # ...this many times (then serve them whole)
    # blob bodies over `cut_after`... wait here until this many are requested at once
    barrier: threading.Barrier | None = None
    log: list[str] = field(default_factory=list)  # "METHOD path [range]" per request
    token: str = TOKEN  # the one token accepted (a test changes it to expire the old one)
    tokens_issued: int = 0
    blob_bytes: int = 0  # bytes of blob bodies sent
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - base signature
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        st = self.server.state
        rng = self.headers.get("Range")
        with st.lock:
            st.log.append(f"GET {self.path}" + (f" {rng}" if rng else ""))
        url = urlsplit(self.path)
        if url.path == "/token":
            q = parse_qs(url.query)
            ok = q.get("service") == [SERVICE] and bool(q.get("scope"))
            with st.lock:
                st.tokens_issued += 1
                token = st.token
            self._send(200 if ok else 400, json.dumps({"token": token}).encode())
            return
        if st.token_auth and self.headers.get("Authorization") != f"Bearer {st.token}":
            repo = url.path.removeprefix("/v2/").rsplit("/", 2)[0]
            host, port = self.server.server_address[:2]
            challenge = (
                f'Bearer realm="http://{host}:{port}/token",service="{SERVICE}",'
                f'scope="repository:{repo}:pull"'
            )
            self._send(
                401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge}
            )
            return
        conn = http.client.HTTPConnection(st.upstream, timeout=30)
        try:
            hdrs = {k: v for k in ("Accept", "Range") if (v := self.headers.get(k)) is not None}
            conn.request("GET", self.path, headers=hdrs)
            up = conn.getresponse()
            body = up.read()
            cut = None
            with st.lock:
                cuttable = st.cut_after is not None and len(body) > st.cut_after
                if "/blobs/" in url.path and cuttable and st.cut_times > 0:
                    st.cut_times -= 1
                    cut = st.cut_after
            if st.barrier is not None and "/blobs/" in url.path and len(body) > (st.cut_after or 0):
                try:
                    st.barrier.wait()
                except threading.BrokenBarrierError:
                    self._send(503, b'{"errors":[{"code":"UNAVAILABLE","message":"not parallel"}]}')
                    return
            self.send_response(up.status)
            for k in FORWARD:
                v = up.getheader(k)
                if v is not None:
                    self.send_header(k, v)
            if cut is not None:
                self.send_header("Connection", "close")
            self.end_headers()
            sent = body if cut is None else body[:cut]
            if "/blobs/" in url.path:
                with st.lock:
                    st.blob_bytes += len(sent)
            self.wfile.write(sent)
            if cut is not None:
                self.close_connection = True  # fewer bytes than Content-Length said
        finally:
            conn.close()

    def _send(self, code: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: ProxyState) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.state = state


@contextlib.contextmanager
def running_proxy(state: ProxyState) -> Iterator[str]:
    """Serve `state` on 127.0.0.1 (a free port); yields its host:port; always shut down."""
    srv = _Server(state)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        host, port = srv.server_address[:2]
        yield f"{host!s}:{port}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)
