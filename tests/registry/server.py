"""A throwaway Debian `docker-registry` on 127.0.0.1: start, push with skopeo, stop by pid."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_tool

REGISTRY = "/usr/bin/docker-registry"
START_TIMEOUT = 20.0


def require_registry() -> None:
    if not Path(REGISTRY).is_file():
        pytest.skip(f"{REGISTRY} is absent (Debian package docker-registry; make deps)")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def htpasswd_line(user: str, password: str) -> str:
    """One htpasswd line with a bcrypt hash (the only scheme the registry accepts)."""
    bcrypt = pytest.importorskip("bcrypt", reason="no bcrypt module to hash an htpasswd file")
    hashed: bytes = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4))
    return f"{user}:{hashed.decode()}\n"


@dataclass
class Registry:
    """A running registry: `host` is `127.0.0.1:PORT`, `storage` its filesystem root."""

    host: str
    storage: Path
    proc: subprocess.Popen[bytes]
    log: list[str] = field(default_factory=list)

    def ref(self, repo: str) -> str:
        return f"{self.host}/{repo}"

    def push(self, source: str, repo: str, *opts: str) -> None:
        """`skopeo copy` SOURCE to this registry (plain HTTP, no auth unless opts say so)."""
        cmd = [
            "skopeo", "copy", "--quiet", "--dest-tls-verify=false", *opts,
            source, f"docker://{self.ref(repo)}",
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stderr}"

    def stop(self) -> None:
        """Stop the registry process this harness started (by its pid), and reap it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _config(storage: Path, port: int, htpasswd: Path | None) -> str:
    auth = (
        f"auth:\n  htpasswd:\n    realm: layerfs-test\n    path: {htpasswd}\n" if htpasswd else ""
    )
    return (
        "version: 0.1\n"
        "log:\n  level: info\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        "  delete:\n    enabled: true\n"
        f"http:\n  addr: 127.0.0.1:{port}\n  secret: layerfs-test-secret\n" + auth
    )


@contextlib.contextmanager
def running_registry(work: Path, htpasswd: Path | None = None) -> Iterator[Registry]:
    """Start `docker-registry serve` on a free port with storage and config under `work`;
    wait until it logs that it listens; always stop it (by its pid) on the way out."""
    require_registry()
    require_tool("skopeo")  # every user pushes its images with it
    work.mkdir(parents=True, exist_ok=True)
    storage = work / "storage"
    storage.mkdir(exist_ok=True)
    port = free_port()
    cfg = work / "config.yml"
    cfg.write_text(_config(storage, port, htpasswd))
    proc = subprocess.Popen(
        [REGISTRY, "serve", str(cfg)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    reg = Registry(f"127.0.0.1:{port}", storage, proc)
    ready = threading.Event()

    def drain() -> None:
        # Keeps the pipe from filling up, and tells us when the server listens.
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.decode(errors="replace")
            reg.log.append(line)
            if "listening on" in line:
                ready.set()
        ready.set()  # the process exited: stop waiting

    t = threading.Thread(target=drain, daemon=True)
    t.start()
    try:
        ready.wait(START_TIMEOUT)
        if proc.poll() is not None or not any("listening on" in x for x in reg.log):
            raise AssertionError("docker-registry did not start:\n" + "".join(reg.log[-20:]))
        yield reg
    finally:
        reg.stop()
        t.join(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
