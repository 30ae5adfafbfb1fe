#!/usr/bin/env python3
"""Benchmark layerfs against kernel overlayfs and fuse-overlayfs on the same layer stacks.

Run by hand as root (never a test). Every measurement mounts a fresh overlay of the same lower
layers (built once under --workdir, reused through a stamp file) with each implementation;
rounds are interleaved with the order rotated; cold figures drop the page cache after the
fresh mount (the kernel's FUSE caches die with the mount); the trees the implementations show
are compared after each workload (first round by default) and a difference is shouted.
Prints a table of medians with ratios to the kernel and layerfs/fuse-overlayfs, and --json.

    .venv/bin/python scripts/bench.py --scale 0.02                 # quick check, ~1.5 min
    .venv/bin/python scripts/bench.py --json bench.json            # full size, see README
    .venv/bin/python scripts/bench.py --only 'walk,stat*' --profile --impls layerfs

Exit status: 0, 1 when trees differ or an implementation answered wrongly, 2 on bad usage,
130 when interrupted (mounts are always unmounted and our daemons reaped).
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import errno
import fcntl
import fnmatch
import gzip
import hashlib
import io
import json
import mmap
import os
import platform
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from layerstore.mountinfo import mount_points

REPO = Path(__file__).resolve().parent.parent
IMPLS = ("kernel", "fuse-overlayfs", "layerfs")
# With --baseline DIR: layerfs from another checkout (e.g. a worktree of an older commit),
# measured in the same run beside this one.
BASE = "layerfs-base"
FIXTURE_VERSION = 2
MiB = 1 << 20
PAGE = os.sysconf("SC_PAGESIZE")
CHUNK = 1 << 20  # read/write unit for bulk I/O (what `dd bs=1M` would use)

# One snapshot value per path: (kind, mode, size, sha256-or-link-target) or ("ABSENT",).
Snap = dict[str, tuple[object, ...]]


class MountError(Exception):
    """The implementation could not mount this stack (the message says why)."""


# --------------------------------------------------------------------------------------------
# Parameters and fixtures


@dataclass(frozen=True)
class Params:
    """Sizes and counts of every workload at a given scale (1.0 = the issue's sizes)."""

    scale: float
    seq_bytes: int
    walk_dirs: int
    walk_files_per_dir_layer: int
    walk_layers: int
    readdir_entries: int
    readdir_layers: int
    stack_files: int
    stack_depths: tuple[int, ...]
    create_files: int
    create_size: int
    copyup_bytes: int
    rename_files: int
    unlink_files: int
    par_procs: int
    par_bytes: int
    src_c_files: int
    src_proj_headers: int
    src_sys_headers: int
    img_files: int

    @staticmethod
    def at(scale: float) -> Params:
        def n(full: float, lo: int) -> int:
            return max(lo, round(full * scale))

        return Params(
            scale=scale,
            seq_bytes=n(1024 * MiB, MiB) // MiB * MiB,
            walk_dirs=n(1000, 5),
            walk_files_per_dir_layer=4,  # 1,000 dirs x 5 layers x 4 = 20,000 files
            walk_layers=5,
            readdir_entries=n(10_000, 100),
            readdir_layers=4,
            stack_files=n(2000, 20),
            stack_depths=(1, 10, 50, 100),  # depth is the point: never scaled
            create_files=n(5000, 20),
            create_size=4096,
            copyup_bytes=n(100_000_000, MiB),
            rename_files=n(1000, 10),
            unlink_files=n(5000, 20),
            par_procs=4,
            par_bytes=n(256 * MiB, MiB) // MiB * MiB,
            src_c_files=n(3000, 20),
            src_proj_headers=n(600, 10),
            src_sys_headers=n(400, 10),
            img_files=n(100_000, 200),
        )


def _block(seed: int) -> bytes:
    return random.Random(seed).randbytes(CHUNK)


def _write_big(path: Path, size: int, seed: int) -> None:
    """Pseudo-random content, different in every MiB (no two blocks alike)."""
    block = bytearray(_block(seed))
    with open(path, "wb") as f:
        done = 0
        i = 0
        while done < size:
            block[:8] = i.to_bytes(8, "little")
            n = min(CHUNK, size - done)
            f.write(block[:n])
            done += n
            i += 1


def _small(rng: random.Random, lo: int, hi: int) -> bytes:
    return rng.randbytes(rng.randint(lo, hi))


def _whiteout(path: Path) -> None:
    """overlayfs native whiteout: a 0/0 character device (all three implementations read it)."""
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def build_seq(d: Path, p: Params) -> None:
    (d / "0").mkdir()
    _write_big(d / "0" / "big.bin", p.seq_bytes, 1)
    (d / "1").mkdir()  # a small top layer, so the file is really looked up through a stack
    (d / "1" / "README").write_bytes(b"top layer\n")


def walk_dir_names(p: Params) -> list[str]:
    return [f"t/d{i // 100}/e{(i // 10) % 10}/f{i % 10}" for i in range(p.walk_dirs)]


def build_walk(d: Path, p: Params) -> None:
    rng = random.Random(2)
    dirs = walk_dir_names(p)
    for layer in range(p.walk_layers):
        for i, rel in enumerate(dirs):
            dd = d / str(layer) / rel
            dd.mkdir(parents=True)
            for j in range(p.walk_files_per_dir_layer):
                (dd / f"l{layer}_{j}").write_bytes(_small(rng, 50, 2000))
            top = layer == p.walk_layers - 1
            if top and i % 10 == 0:
                _whiteout(dd / "l0_0")  # deletes a bottom-layer file
            if layer == p.walk_layers - 2 and i % 5 == 0:
                (dd / "l0_1").write_bytes(b"shadows the bottom layer's l0_1\n")


def build_readdir(d: Path, p: Params) -> None:
    for layer in range(p.readdir_layers):
        (d / str(layer) / "big").mkdir(parents=True)
    top = p.readdir_layers - 1
    for i in range(p.readdir_entries):
        layer = i % p.readdir_layers
        (d / str(layer) / "big" / f"e{i:05d}").touch()
        if i % 10 == 1 and layer != top:  # the same name again in the top layer: merged once
            (d / str(top) / "big" / f"e{i:05d}").write_bytes(b"top\n")


def build_stack(d: Path, p: Params) -> None:
    deepest = max(p.stack_depths)
    bottom = d / "0" / "p" / "q"
    bottom.mkdir(parents=True)
    for i in range(p.stack_files):
        (bottom / f"b{i}").write_bytes(b"bottom %d\n" % i)
    for layer in range(1, deepest):
        q = d / str(layer) / "p" / "q"
        q.mkdir(parents=True)
        for j in range(5):
            (q / f"f{layer}_{j}").write_bytes(b"filler\n")
        (d / str(layer) / f"x{layer}").write_bytes(b"filler\n")


def build_copyup(d: Path, p: Params) -> None:
    (d / "0").mkdir()
    _write_big(d / "0" / "big.bin", p.copyup_bytes, 3)


def build_rename(d: Path, p: Params) -> None:
    rng = random.Random(4)
    for i in range(p.rename_files):
        sub = d / "0" / "old" / f"s{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_bytes(_small(rng, 10, 400))


def build_unlink(d: Path, p: Params) -> None:
    for i in range(p.unlink_files):
        sub = d / "0" / "u" / f"s{i // 100}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"f{i}").write_bytes(b"x" * (i % 97))


def build_par(d: Path, p: Params) -> None:
    (d / "0").mkdir()
    for i in range(p.par_procs):
        _write_big(d / "0" / f"p{i}.bin", p.par_bytes, 10 + i)


def _c_source(rng: random.Random, p: Params, idx: int) -> bytes:
    lines = [f"/* unit {idx} */"]
    for _ in range(8):
        lines.append(f'#include "h{rng.randrange(p.src_proj_headers)}.h"')
    for _ in range(6):
        k = rng.randrange(p.src_sys_headers)
        lines.append(f"#include <sys/t{k}.h>" if k % 3 == 0 else f"#include <s{k}.h>")
    body_lines = rng.randint(60, 600)
    for i in range(body_lines):
        lines.append(f"static int f{idx}_{i}(int x) {{ return x * {rng.randrange(1000)} + {i}; }}")
    return ("\n".join(lines) + "\n").encode()


def build_src(d: Path, p: Params) -> None:
    """A base layer with system headers, and a tarball of a synthetic C project."""
    rng = random.Random(5)
    inc = d / "0" / "usr" / "include"
    (inc / "sys").mkdir(parents=True)
    (d / "0" / "usr" / "local").mkdir()  # no include/ here: a compiler's lookup misses it
    for k in range(p.src_sys_headers):
        rel = f"sys/t{k}.h" if k % 3 == 0 else f"s{k}.h"
        (inc / rel).write_bytes(b"/* system header */\n" + _small(rng, 200, 4000).hex().encode())
    ndirs = max(1, p.src_c_files // 20)
    with tarfile.open(d / "src.tar", "w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes | None) -> None:
            info = tarfile.TarInfo(name)
            info.mtime = 1_700_000_000
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))

        add("proj", None)
        add("proj/include", None)
        for k in range(p.src_proj_headers):
            add(
                f"proj/include/h{k}.h",
                b"/* project header */\n" + rng.randbytes(300).hex().encode(),
            )
        for dn in range(ndirs):
            add(f"proj/d{dn}", None)
        for idx in range(p.src_c_files):
            add(f"proj/d{idx % ndirs}/u{idx}.c", _c_source(rng, p, idx))


def _tar_member(
    name: str, data: bytes | None = None, kind: bytes = tarfile.REGTYPE, target: str = ""
) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.linkname = target
    if data is not None:
        info.size = len(data)
    return info, data


def image_layers(p: Params) -> list[list[tuple[tarfile.TarInfo, bytes | None]]]:
    """Three layers: a base tree, changes with whiteouts and an opaque dir, new files."""
    rng = random.Random(7)
    n0 = max(100, p.img_files * 7 // 10)
    per_dir = 50
    base: list[tuple[tarfile.TarInfo, bytes | None]] = [
        _tar_member("usr/", kind=tarfile.DIRTYPE),
        _tar_member("usr/share/", kind=tarfile.DIRTYPE),
    ]
    for j in range(n0):
        dname = f"usr/share/d{j // per_dir}"
        if j % per_dir == 0:
            base.append(_tar_member(dname + "/", kind=tarfile.DIRTYPE))
        size = 256 * 1024 if j % 500 == 499 else rng.randint(100, 8000)
        base.append(_tar_member(f"{dname}/f{j}", rng.randbytes(size)))
        if j % 100 == 1:
            base.append(_tar_member(f"{dname}/l{j}", kind=tarfile.SYMTYPE, target=f"f{j}"))
        if j % 1000 == 0:
            base.append(_tar_member(f"{dname}/h{j}", kind=tarfile.LNKTYPE, target=f"{dname}/f{j}"))
    changes: list[tuple[tarfile.TarInfo, bytes | None]] = [
        _tar_member("usr/share/d0/.wh..wh..opq", b""),
        _tar_member("usr/share/d0/new", b"replaces the whole directory\n"),
    ]
    for j in range(per_dir, n0):
        dname = f"usr/share/d{j // per_dir}"
        if j % 10 == 3:
            changes.append(_tar_member(f"{dname}/f{j}", rng.randbytes(rng.randint(100, 4000))))
        elif j % 20 == 7:
            changes.append(_tar_member(f"{dname}/.wh.f{j}", b""))
    new: list[tuple[tarfile.TarInfo, bytes | None]] = [_tar_member("opt/", kind=tarfile.DIRTYPE)]
    # The third layer tops the merged tree up to `img_files` files (non-directories): what
    # the first two leave visible, counted by applying the second's whiteouts to the first.
    visible = {i.name for i, _ in base if i.type != tarfile.DIRTYPE}
    for info, _ in changes:
        parent, _sep, name = info.name.rpartition("/")
        if name == ".wh..wh..opq":
            visible = {v for v in visible if not v.startswith(parent + "/")}
        elif name.startswith(".wh."):
            visible.discard(f"{parent}/{name[4:]}")
    for info, _ in changes:
        if not info.name.rpartition("/")[2].startswith(".wh."):
            visible.add(info.name)
    n2 = max(10, p.img_files - len(visible))
    for j in range(n2):
        dname = f"opt/m{j // per_dir}"
        if j % per_dir == 0:
            new.append(_tar_member(dname + "/", kind=tarfile.DIRTYPE))
        new.append(_tar_member(f"{dname}/g{j}", rng.randbytes(rng.randint(100, 8000))))
    return [base, changes, new]


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def build_image(d: Path, p: Params) -> None:
    """An OCI image layout (gzip layers) with about `img_files` files, tagged `bench`."""
    layout = d / "oci"
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')

    def blob(data: bytes, media: str) -> dict[str, Any]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    diff_ids: list[str] = []
    descs: list[dict[str, Any]] = []
    for members in image_layers(p):
        raw = d / "layer.tar"
        with tarfile.open(raw, "w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in members:
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        diff_ids.append("sha256:" + _sha256_file(raw))
        gz = d / "layer.tar.gz"
        with open(raw, "rb") as src, gzip.GzipFile(gz, "wb", compresslevel=6, mtime=0) as dst:
            shutil.copyfileobj(src, dst, CHUNK)
        digest = _sha256_file(gz)
        os.rename(gz, blobs / digest)
        raw.unlink()
        descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": f"sha256:{digest}",
                "size": (blobs / digest).stat().st_size,
            }
        )
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": f"bench layer {i}"} for i in range(len(descs))],
    }
    cdesc = blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": cdesc,
        "layers": descs,
    }
    mdesc = blob(json.dumps(manifest).encode(), "application/vnd.oci.image.manifest.v1+json")
    mdesc["annotations"] = {"org.opencontainers.image.ref.name": "bench"}
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [mdesc]}))


@dataclass(frozen=True)
class Group:
    """A set of layers (and files) built once and reused; `deps` are the Params fields used."""

    name: str
    build: Callable[[Path, Params], None]
    deps: tuple[str, ...]


GROUPS = {
    g.name: g
    for g in (
        Group("seq", build_seq, ("seq_bytes",)),
        Group("w", build_walk, ("walk_dirs", "walk_files_per_dir_layer", "walk_layers")),
        Group("r", build_readdir, ("readdir_entries", "readdir_layers")),
        Group("k", build_stack, ("stack_files", "stack_depths")),
        Group("c", build_copyup, ("copyup_bytes",)),
        Group("n", build_rename, ("rename_files",)),
        Group("x", build_unlink, ("unlink_files",)),
        Group("p", build_par, ("par_procs", "par_bytes")),
        Group("b", build_src, ("src_c_files", "src_proj_headers", "src_sys_headers")),
        Group("i", build_image, ("img_files",)),
    )
}


def ensure_group(root: Path, g: Group, p: Params, rebuild: bool) -> Path:
    """Build a fixture group once (into a temp dir, then rename); a stamp records its params."""
    d = root / g.name
    stamp = root / f"{g.name}.stamp"
    want = json.dumps(
        {"version": FIXTURE_VERSION, **{k: getattr(p, k) for k in g.deps}}, sort_keys=True
    )
    if not rebuild and d.is_dir() and stamp.is_file() and stamp.read_text() == want:
        return d
    stamp.unlink(missing_ok=True)
    for old in (d, root / f"{g.name}.tmp"):
        if old.exists():
            shutil.rmtree(old)
    tmp = root / f"{g.name}.tmp"
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    g.build(tmp, p)
    os.rename(tmp, d)
    stamp.write_text(want)
    log(f"built fixture {g.name} in {time.perf_counter() - t0:.1f}s")
    return d


# --------------------------------------------------------------------------------------------
# Mounting


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def is_mounted(path: Path) -> bool:
    return os.fsencode(os.path.realpath(path)) in mount_points()


def unmount(path: Path, fuse: bool) -> None:
    """Unmount what is mounted at `path`; retries a busy mount briefly, lazily as a last resort."""
    cmds = [["fusermount3", "-u", "-q", str(path)]] if fuse else []
    cmds.append(["umount", str(path)])
    deadline = time.monotonic() + 10
    while is_mounted(path) and time.monotonic() < deadline:
        for cmd in cmds:
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
            if not is_mounted(path):
                return
        time.sleep(0.1)
    if is_mounted(path):
        log(f"warning: {path} busy, unmounting lazily")
        subprocess.run(["umount", "-l", str(path)], check=False, stderr=subprocess.DEVNULL)


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL a daemon we started in its own session, with whatever it started (py-spy's
    child, a wrapper's child): killing only the top process could leave the FUSE server."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()


class Children:
    """The daemons this process started: reaped after their unmount, and again on the way out."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc: subprocess.Popen[bytes] = subprocess.Popen(cmd, **kw)
        self.procs.append(proc)
        return proc

    def reap(self, proc: subprocess.Popen[bytes], what: str) -> None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"{what} did not exit after unmount; killing pid {proc.pid}")
            kill_group(proc)
            proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def cleanup(self, mnt: Path) -> None:
        """Last resort (interrupt during a cleanup): unmount, then reap or kill our children."""
        if is_mounted(mnt):
            unmount(mnt, fuse=True)
        for proc in list(self.procs):
            self.reap(proc, f"pid {proc.pid}")


CHILDREN = Children()
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
FINAL_CLEANUP = threading.Event()


def descendants() -> list[int]:
    """Every process started by this one, directly or not (daemons, py-spy's child, readers)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                parent[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    found: list[int] = []
    frontier = [os.getpid()]
    while frontier:
        pid = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == pid]
        found += kids
        frontier += kids
    return found


def watch_signals() -> None:
    """Take SIGINT/SIGTERM/SIGHUP in a thread of their own, blocked everywhere else.

    The main thread may sit in a FUSE call that only the daemon's answer (or its death) ends,
    and a signal aimed at it would wait with it. The watcher kills every process we started,
    so the call fails at once, and then interrupts the main thread, whose `finally` blocks
    unmount and reap. Must run before any other thread starts (threads inherit the mask).
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.default_int_handler)  # an ignored signal would be dropped
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def run() -> None:
        while True:
            sig = signal.sigwait(STOP_SIGNALS)
            log(f"signal {sig}: stopping, killing our child processes")
            for pid in descendants():
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            if not FINAL_CLEANUP.is_set():
                _thread.interrupt_main()

    threading.Thread(target=run, name="signals", daemon=True).start()


def lock_workdir(workdir: Path) -> typing.IO[str]:
    f = open(workdir / ".lock", "a+")  # noqa: SIM115 - held open until the end of main()
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "unknown"
        f.close()
        raise SystemExit(
            f"bench: {workdir} is in use by another bench run ({who}); wait, or use --workdir"
        ) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S UTC', time.gmtime())}\n")
    f.flush()
    return f


@dataclass
class Mounted:
    impl: str
    path: Path
    proc: subprocess.Popen[bytes] | None
    profiled: bool
    mount_s: float = 0.0  # from starting mount(8) / the daemon until the mount point appears
    timed_out: threading.Event = field(default_factory=threading.Event)

    def peak_rss_kib(self) -> int | None:
        """The daemon's peak resident set (VmHWM), None for the kernel or a profiled daemon."""
        if self.proc is None or self.profiled:
            return None
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None


@dataclass
class Config:
    workdir: Path
    python: str
    mount_timeout: float
    timeout: float
    profile: str | None  # "py-spy" | "pyinstrument" | None
    profile_dir: Path
    cold_ok: bool = True
    baseline: Path | None = None  # the checkout BASE runs from
    base_python: str = ""


def overlay_opts(lowers: Sequence[Path], upper: Path | None, work: Path | None) -> str:
    opts = f"lowerdir={':'.join(str(x) for x in lowers)}"
    return opts if upper is None else f"{opts},upperdir={upper},workdir={work}"


@contextlib.contextmanager
def mounted(
    cfg: Config,
    impl: str,
    lowers: Sequence[Path],
    upper: Path | None,
    work: Path | None,
    mnt: Path,
    label: str,
) -> Iterator[Mounted]:
    """Mount `lowers` (top first) at `mnt`; always unmounts and reaps only our own child."""
    mnt.mkdir(parents=True, exist_ok=True)
    if is_mounted(mnt):
        raise MountError(f"{mnt} is already a mount point")
    opts = overlay_opts(lowers, upper, work)
    proc: subprocess.Popen[bytes] | None = None
    logpath = cfg.workdir / "logs" / f"{label}.log"
    logpath.parent.mkdir(parents=True, exist_ok=True)
    m: Mounted | None = None
    watchdog: threading.Timer | None = None
    with open(logpath, "wb") as logf:
        try:
            t_start = time.perf_counter()
            if impl == "kernel":
                kopts, kcwd = opts + ",redirect_dir=on", None
                if len(kopts) >= PAGE:
                    # mount(2) takes one page of options: name the layers relative to their
                    # common parent, which the kernel resolves against our working directory.
                    kcwd = Path(os.path.commonpath([str(x) for x in lowers]))
                    rel = [Path(os.path.relpath(x, kcwd)) for x in lowers]
                    kopts = overlay_opts(rel, upper, work) + ",redirect_dir=on"
                r = subprocess.run(
                    ["mount", "-t", "overlay", "overlay", "-o", kopts, str(mnt)],
                    capture_output=True,
                    check=False,
                    cwd=kcwd,
                )
                if r.returncode != 0:
                    msg = " ".join(r.stderr.decode(errors="replace").split())
                    raise MountError(
                        f"mount -t overlay failed ({len(kopts)} byte options): "
                        + (msg or f"exit {r.returncode}")
                    )
                m = Mounted(impl, mnt, None, False, time.perf_counter() - t_start)
            else:
                profiled = False
                cwd, env = REPO, None
                if impl == "fuse-overlayfs":
                    cmd = ["fuse-overlayfs", "-f", "-o", opts, str(mnt)]
                elif impl == "layerfs":
                    cmd = [cfg.python, "-m", "unionfs", "overlay", "-f", "-o", opts, str(mnt)]
                    if cfg.profile is not None:
                        profiled = True
                        cmd = profile_cmd(cfg, cmd, label)
                elif impl == BASE and cfg.baseline is not None:
                    # The other checkout's packages first, whatever the interpreter has
                    # installed (an editable install of this one, say).
                    cwd = cfg.baseline
                    env = dict(os.environ, PYTHONPATH=str(cfg.baseline))
                    cmd = [cfg.base_python, "-m", "unionfs", "overlay", "-f", "-o", opts, str(mnt)]
                else:
                    raise ValueError(f"unknown implementation {impl!r}")
                # Own session: a Ctrl-C reaches only us, and we unmount the daemon ourselves.
                proc = CHILDREN.spawn(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=logf,
                    stderr=logf,
                    cwd=cwd,
                    env=env,
                    start_new_session=True,
                )
                m = Mounted(impl, mnt, proc, profiled)
                deadline = time.monotonic() + cfg.mount_timeout
                while not is_mounted(mnt):
                    if proc.poll() is not None:
                        logf.flush()
                        tail = logpath.read_bytes().decode(errors="replace").strip().splitlines()
                        raise MountError(
                            f"{impl} exited {proc.returncode} before mounting"
                            + (f": {tail[-1]}" if tail else "")
                        )
                    if time.monotonic() > deadline:
                        raise MountError(f"{impl} not mounted after {cfg.mount_timeout:.0f}s")
                    time.sleep(0.002)
                m.mount_s = time.perf_counter() - t_start

                # A hung daemon would hang the bench: the watchdog kills our own child, and the
                # blocked system call then fails with ENOTCONN.
                def expire(mm: Mounted = m) -> None:
                    mm.timed_out.set()
                    if mm.proc is not None:
                        kill_group(mm.proc)

                watchdog = threading.Timer(cfg.timeout, expire)
                watchdog.daemon = True
                watchdog.start()
            yield m
        finally:
            if watchdog is not None:
                watchdog.cancel()
            unmount(mnt, fuse=impl != "kernel")
            if proc is not None:
                CHILDREN.reap(proc, impl)
            text = logpath.read_bytes()
            if b"Traceback" in text:
                log(f"!!! {impl} logged a traceback during {label}: see {logpath}")
            if not text:
                logpath.unlink()


def profile_cmd(cfg: Config, cmd: list[str], label: str) -> list[str]:
    cfg.profile_dir.mkdir(parents=True, exist_ok=True)
    if cfg.profile == "py-spy":
        out = cfg.profile_dir / f"{label}.speedscope.json"
        return [pyspy_path() or "py-spy", "record", "-f", "speedscope", "-o", str(out), "--", *cmd]
    out = cfg.profile_dir / f"{label}.pyinstrument.html"
    return [cmd[0], "-m", "pyinstrument", "-r", "html", "-o", str(out), *cmd[1:]]


def profile_summary(path: Path, top: int = 12) -> list[str]:
    """The functions with the most samples in a py-spy speedscope file: self and total time."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    self_w: dict[int, float] = {}
    total_w: dict[int, float] = {}
    all_w = 0.0
    for prof in doc["profiles"]:
        for stack, w in zip(prof["samples"], prof["weights"], strict=True):
            if not stack:
                continue
            all_w += w
            self_w[stack[-1]] = self_w.get(stack[-1], 0.0) + w  # the leaf is last
            for fi in set(stack):
                total_w[fi] = total_w.get(fi, 0.0) + w
    if all_w == 0:
        return ["  (no samples)"]

    def name(fi: int) -> str:
        f = frames[fi]
        return f"{f['name']} ({Path(str(f.get('file') or '?')).name}:{f.get('line')})"

    out = [f"  {all_w:.2f}s sampled; self%  total%  function"]
    for fi, w in sorted(self_w.items(), key=lambda kv: -kv[1])[:top]:
        out.append(f"  {100 * w / all_w:5.1f}  {100 * total_w[fi] / all_w:6.1f}  {name(fi)}")
    return out


def pyspy_path() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    venv = REPO / ".venv" / "bin" / "py-spy"
    for cand in (local, venv):
        if cand.exists():
            return str(cand)
    return shutil.which("py-spy")


# --------------------------------------------------------------------------------------------
# Workload primitives (identical code for every implementation)


def drop_caches(cfg: Config) -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        if cfg.cold_ok:
            log(f"warning: cannot drop caches ({exc}); cold figures are not cold")
        cfg.cold_ok = False


def io_buffer() -> mmap.mmap:
    """A page-aligned CHUNK buffer, as dd(1) uses. A bytearray of 1 MiB comes from malloc at an
    address 16 bytes past a 64-byte boundary or on it, by allocation history; the kernel's copy to
    a misaligned buffer runs 2-3x slower on this CPU (180 vs 65 ms per warm GiB), which swamped the
    filesystem being measured."""
    return mmap.mmap(-1, CHUNK)


def read_whole(path: str | bytes, buf: mmap.mmap) -> int:
    mv = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(mv):
            total += n
    return total


def walk_lstat(root: bytes) -> int:
    """find-like: readdir every directory and lstat every entry (no cached d_type shortcut)."""
    count = 0
    stack = [root]
    while stack:
        d = stack.pop()
        with os.scandir(d) as it:
            for e in it:
                st = os.lstat(e.path)
                count += 1
                if stat.S_ISDIR(st.st_mode):
                    stack.append(e.path)
    return count


def files_under(root: Path) -> list[bytes]:
    out: list[bytes] = []
    for dirpath, _dirs, files in os.walk(os.fsencode(root)):
        out.extend(os.path.join(dirpath, f) for f in files)
    out.sort()
    return out


def timed(rec: dict[str, float], row: str, fn: Callable[[], object]) -> None:
    t0 = time.perf_counter()
    fn()
    rec[row] = time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# Workloads


@dataclass
class Ctx:
    cfg: Config
    params: Params
    root: Path  # fixture root
    stack_paths: dict[int, list[bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class Workload:
    name: str
    rows: tuple[str, ...]
    what: str
    group: str
    lowers: Callable[[Params], list[str]]  # layer dirs relative to the group dir, TOP first
    touched: tuple[str, ...]  # mount-relative subtrees compared across implementations
    cold: bool  # drop caches after the fresh mount, before the workload
    run: Callable[[Ctx, Path, dict[str, float]], None]
    readonly: bool = False  # mounted without an upper layer (lowerdir only)


def top_first(n: int) -> list[str]:
    return [str(i) for i in reversed(range(n))]


def fixed_layers(n: int) -> Callable[[Params], list[str]]:
    return lambda _p: top_first(n)


def wl_seqread(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    buf = io_buffer()
    path = str(mnt / "big.bin")
    size = ctx.params.seq_bytes
    for row in ("seqread-cold", "seqread-warm"):
        t0 = time.perf_counter()
        got = read_whole(path, buf)
        rec[row] = time.perf_counter() - t0
        if got != size:
            raise RuntimeError(f"read {got} bytes, expected {size}")


def wl_walk(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    p = ctx.params
    dirs = walk_dir_names(p)
    subdirs = {"/".join(d.split("/")[1:k]) for d in dirs for k in range(2, 5)}
    whiteouts = sum(1 for i in range(len(dirs)) if i % 10 == 0)
    want = len(subdirs) + len(dirs) * p.walk_layers * p.walk_files_per_dir_layer - whiteouts
    root = os.fsencode(mnt / "t")
    for row in ("walk-cold", "walk-warm"):
        t0 = time.perf_counter()
        n = walk_lstat(root)
        rec[row] = time.perf_counter() - t0
        if n != want:
            raise RuntimeError(f"{row} saw {n} entries, expected {want}")


def wl_readdir(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    path = os.fsencode(mnt / "big")
    for row in ("readdir-cold", "readdir-warm"):
        t0 = time.perf_counter()
        n = len(os.listdir(path))
        rec[row] = time.perf_counter() - t0
        if n != ctx.params.readdir_entries:
            raise RuntimeError(f"readdir saw {n} entries, expected {ctx.params.readdir_entries}")


def make_wl_stat(depth: int) -> Callable[[Ctx, Path, dict[str, float]], None]:
    def run(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
        q = os.fsencode(mnt / "p" / "q")
        paths = [os.path.join(q, b"b%d" % i) for i in range(ctx.params.stack_files)]
        for row in (f"stat{depth}-cold", f"stat{depth}-warm"):
            t0 = time.perf_counter()
            for path in paths:
                os.lstat(path)
            rec[row] = time.perf_counter() - t0

    return run


def wl_create(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    data = b"c" * ctx.params.create_size
    d = os.fsencode(mnt / "new")
    paths = [os.path.join(d, b"f%d" % i) for i in range(ctx.params.create_files)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC

    def go() -> None:
        os.mkdir(d)
        for path in paths:
            fd = os.open(path, flags, 0o644)
            os.write(fd, data)
            os.close(fd)

    timed(rec, "create", go)


def wl_copyup(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    path = mnt / "big.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY)  # no O_TRUNC: the whole file is copied up
    try:
        os.pwrite(fd, b"COPIED-UP", 0)
        rec["copyup"] = time.perf_counter() - t0
    finally:
        os.close(fd)


def wl_rename(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    timed(rec, "rename-dir", lambda: os.rename(mnt / "old", mnt / "new"))


def wl_mv(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    # coreutils mv: rename(2), and on EXDEV a recursive copy + delete (what users get).
    def go() -> None:
        r = subprocess.run(["mv", str(mnt / "old"), str(mnt / "new")], capture_output=True)
        if r.returncode != 0:
            raise OSError(errno.EIO, "mv failed: " + r.stderr.decode(errors="replace").strip())

    timed(rec, "mv-dir", go)


def wl_unlink(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    paths = files_under(mnt / "u")  # the listing is not timed
    if len(paths) != ctx.params.unlink_files:
        raise RuntimeError(
            f"found {len(paths)} files to unlink, expected {ctx.params.unlink_files}"
        )

    def go() -> None:
        for path in paths:
            os.unlink(path)

    timed(rec, "unlink", go)


def parallel_read(paths: Sequence[str]) -> float:
    """Fork one reader per file; they start together on a pipe; time until all have exited."""
    rfd, wfd = os.pipe()
    pids: list[int] = []
    try:
        for path in paths:
            pid = os.fork()
            if pid == 0:  # child: wait for the start signal, read, exit without cleanup
                code = 1
                try:
                    os.close(wfd)
                    if os.read(rfd, 1) == b"g":
                        read_whole(path, io_buffer())
                        code = 0
                except BaseException:
                    code = 1
                finally:
                    os._exit(code)
            pids.append(pid)
        os.close(rfd)
        rfd = -1
        t0 = time.perf_counter()
        os.write(wfd, b"g" * len(pids))
        failed = 0
        while pids:
            pid, status = os.waitpid(pids[0], 0)
            pids.pop(0)
            failed += os.waitstatus_to_exitcode(status) != 0
        elapsed = time.perf_counter() - t0
        if failed:
            raise OSError(errno.EIO, f"{failed} parallel reader(s) failed")
        return elapsed
    finally:
        os.close(wfd)
        if rfd >= 0:
            os.close(rfd)
        for pid in pids:  # only on error: our own children, reaped
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)


def read_only(
    fn: Callable[[Ctx, Path, dict[str, float]], None],
) -> Callable[[Ctx, Path, dict[str, float]], None]:
    """`fn` on a read-only mount, its rows named X-ro-cold/warm for X-cold/warm."""

    def run(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
        got: dict[str, float] = {}
        fn(ctx, mnt, got)
        for row, t in got.items():
            head, _, temp = row.rpartition("-")
            rec[f"{head}-ro-{temp}"] = t

    return run


def wl_parread(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    paths = [str(mnt / f"p{i}.bin") for i in range(ctx.params.par_procs)]
    for row in ("parread-cold", "parread-warm"):
        rec[row] = parallel_read(paths)


INCLUDE_SYS = ("proj/include", "usr/local/include", "usr/include")


def compile_pass(mnt: Path) -> int:
    """Read each .c, look up and read its headers like cc -I proj/include, write a .o."""
    sys_dirs = [os.fsencode(mnt / d) for d in INCLUDE_SYS]
    sources = sorted(p for p in files_under(mnt / "proj") if p.endswith(b".c"))
    n = 0
    for src in sources:
        with open(src, "rb") as f:
            data = f.read()
        here = os.path.dirname(src)
        for line in data.split(b"\n", 20)[:20]:
            if not line.startswith(b"#include "):
                continue
            spec = line[9:]
            name = spec[1:-1]
            dirs = [here, sys_dirs[0]] if spec.startswith(b'"') else sys_dirs
            for d in dirs:
                cand = os.path.join(d, name)
                try:
                    os.stat(cand)
                except FileNotFoundError:
                    continue
                with open(cand, "rb") as h:
                    h.read()
                break
            else:
                raise FileNotFoundError(errno.ENOENT, "header not found", name)
        obj = hashlib.sha256(data).digest() * max(1, len(data) // 64)
        with open(src[:-2] + b".o", "wb") as o:
            o.write(obj)
        n += 1
    return n


def wl_untar(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    tarball = ctx.root / "b" / "src.tar"

    def untar() -> None:
        r = subprocess.run(["tar", "-xf", str(tarball), "-C", str(mnt)], capture_output=True)
        if r.returncode != 0:
            raise OSError(errno.EIO, "tar failed: " + r.stderr.decode(errors="replace").strip())

    timed(rec, "untar", untar)
    timed(rec, "compile", lambda: compile_pass(mnt))


def all_workloads(p: Params) -> list[Workload]:
    wls = [
        Workload(
            "seqread",
            ("seqread-cold", "seqread-warm"),
            f"read {p.seq_bytes // MiB} MiB file",
            "seq",
            lambda p: ["1", "0"],
            ("big.bin",),
            True,
            wl_seqread,
        ),
        Workload(
            "walk",
            ("walk-cold", "walk-warm"),
            f"walk+lstat {p.walk_dirs * p.walk_layers * p.walk_files_per_dir_layer} files, "
            f"{p.walk_dirs} dirs, {p.walk_layers} layers",
            "w",
            lambda p: top_first(p.walk_layers),
            ("t",),
            True,
            wl_walk,
        ),
        Workload(
            "readdir",
            ("readdir-cold", "readdir-warm"),
            f"readdir {p.readdir_entries} entries from {p.readdir_layers} layers",
            "r",
            lambda p: top_first(p.readdir_layers),
            ("big",),
            True,
            wl_readdir,
        ),
    ]
    for depth in p.stack_depths:
        wls.append(
            Workload(
                f"stat{depth}",
                (f"stat{depth}-cold", f"stat{depth}-warm"),
                f"lstat {p.stack_files} bottom files, {depth} layers",
                "k",
                fixed_layers(depth),
                ("p",),
                True,
                make_wl_stat(depth),
            )
        )
    wls += [
        Workload(
            "create",
            ("create",),
            f"create+write+close {p.create_files} x {p.create_size} B",
            "b",
            lambda p: ["0"],
            ("new",),
            False,
            wl_create,
        ),
        Workload(
            "copyup",
            ("copyup",),
            f"open+first write of a {p.copyup_bytes / 1e6:.0f} MB lower file",
            "c",
            lambda p: ["0"],
            ("big.bin",),
            False,
            wl_copyup,
        ),
        Workload(
            "rename-dir",
            ("rename-dir",),
            f"rename(2) of a lower dir with {p.rename_files} files",
            "n",
            lambda p: ["0"],
            ("old", "new"),
            False,
            wl_rename,
        ),
        Workload(
            "mv-dir",
            ("mv-dir",),
            f"mv(1) of a lower dir with {p.rename_files} files (copy on EXDEV)",
            "n",
            lambda p: ["0"],
            ("old", "new"),
            False,
            wl_mv,
        ),
        Workload(
            "unlink",
            ("unlink",),
            f"unlink {p.unlink_files} lower files",
            "x",
            lambda p: ["0"],
            ("u",),
            False,
            wl_unlink,
        ),
        Workload(
            "parread",
            ("parread-cold", "parread-warm"),
            f"{p.par_procs} processes each read a {p.par_bytes // MiB} MiB file",
            "p",
            lambda p: ["0"],
            tuple(f"p{i}.bin" for i in range(p.par_procs)),
            True,
            wl_parread,
        ),
        # The same reads on read-only mounts (as `layerfs mount --ro` of an image): there,
        # layerfs lets the kernel read lower files directly (passthrough).
        Workload(
            "seqread-ro",
            ("seqread-ro-cold", "seqread-ro-warm"),
            f"read {p.seq_bytes // MiB} MiB file, read-only mount",
            "seq",
            lambda p: ["1", "0"],
            ("big.bin",),
            True,
            read_only(wl_seqread),
            readonly=True,
        ),
        Workload(
            "parread-ro",
            ("parread-ro-cold", "parread-ro-warm"),
            f"{p.par_procs} processes each read a {p.par_bytes // MiB} MiB file, read-only mount",
            "p",
            # Kernel overlayfs wants two lower layers without an upper: the seq group's small
            # top layer (one README) goes on top.
            lambda p: ["../seq/1", "0"],
            tuple(f"p{i}.bin" for i in range(p.par_procs)),
            True,
            read_only(wl_parread),
            readonly=True,
        ),
        Workload(
            "untar",
            ("untar", "compile"),
            f"tar -x {p.src_c_files} .c + {p.src_proj_headers} .h; compile-like pass",
            "b",
            lambda p: ["0"],
            ("proj",),
            False,
            wl_untar,
        ),
    ]
    return wls


# --------------------------------------------------------------------------------------------
# Tree check


def snapshot(mnt: Path, rels: Sequence[str]) -> Snap:
    """Kind, permission bits, size and content hash (or link target) of each touched subtree."""
    out: Snap = {}

    def one(rel: str, path: bytes) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            out[rel] = ("ABSENT",)
            return False
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            out[rel] = ("dir", oct(mode))
            return True
        if stat.S_ISLNK(st.st_mode):
            out[rel] = ("symlink", oct(mode), st.st_size, os.readlink(path).hex())
        elif stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(CHUNK):
                    h.update(chunk)
            out[rel] = ("file", oct(mode), st.st_size, h.hexdigest())
        else:
            out[rel] = ("other", oct(st.st_mode))
        return False

    for top in rels:
        pending = [(top, os.fsencode(mnt / top))]
        while pending:
            rel, path = pending.pop()
            if one(rel, path):
                for name in sorted(os.listdir(path)):
                    pending.append((f"{rel}/{os.fsdecode(name)}", os.path.join(path, name)))
    return out


def diff_snaps(ref: Snap, other: Snap, limit: int = 8) -> list[str]:
    diffs: list[str] = []
    for key in sorted(set(ref) | set(other)):
        a = ref.get(key, ("ABSENT",))
        b = other.get(key, ("ABSENT",))
        if a != b:
            diffs.append(f"{key}: {a} != {b}")
    if len(diffs) > limit:
        diffs = diffs[:limit] + [f"... and {len(diffs) - limit} more"]
    return diffs


# --------------------------------------------------------------------------------------------
# Runner


@dataclass
class Cell:
    times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Results:
    cells: dict[str, dict[str, Cell]] = field(default_factory=dict)  # row -> impl -> Cell
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    checked: dict[str, str] = field(default_factory=dict)  # workload -> ok|MISMATCH
    rss_kib: dict[str, dict[str, int]] = field(default_factory=dict)  # workload -> impl -> KiB
    mount_s: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # same keys
    disk_bytes: dict[str, int] = field(default_factory=dict)  # import tool -> bytes written
    # `layerfs mount --ro` of the imported bench image: mount_s, walk_s (cold), rss_kib
    image_mount: list[dict[str, float]] = field(default_factory=list)

    def cell(self, row: str, impl: str) -> Cell:
        return self.cells.setdefault(row, {}).setdefault(impl, Cell())


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def measure(
    ctx: Ctx, wl: Workload, impl: str, rnd: int, res: Results, want_snap: bool
) -> Snap | None:
    """One fresh mount of `wl`'s stack with `impl`; records times or the failure."""
    cfg = ctx.cfg
    group_dir = ctx.root / wl.group
    lowers = [group_dir / rel for rel in wl.lowers(ctx.params)]
    run_dir = fresh_dir(cfg.workdir / "u")
    upper: Path | None = fresh_dir(run_dir / "u")
    work: Path | None = fresh_dir(run_dir / "w")
    if wl.readonly:
        upper = work = None
    mnt = cfg.workdir / "m"
    rec: dict[str, float] = {}
    snap: Snap | None = None
    label = f"{wl.name}-r{rnd}-{impl}"
    error: str | None = None
    timed_out = False
    wrong: str | None = None
    check_error: str | None = None
    try:
        with mounted(cfg, impl, lowers, upper, work, mnt, label) as m:
            try:
                if wl.cold:
                    drop_caches(cfg)
                try:
                    wl.run(ctx, mnt, rec)
                except RuntimeError as exc:  # the mount works but answered wrongly
                    wrong = f"WRONG RESULT: {exc}"
                if want_snap and wrong is None:
                    try:
                        snap = snapshot(mnt, wl.touched)
                    except OSError as exc:  # the timed part passed, reading the tree back not
                        check_error = f"{errno.errorcode.get(exc.errno or 0, 'OSError')}: {exc}"
            finally:
                timed_out = m.timed_out.is_set()
                res.mount_s.setdefault(wl.name, {}).setdefault(impl, []).append(m.mount_s)
                rss = m.peak_rss_kib()
                if rss is not None:
                    prev = res.rss_kib.setdefault(wl.name, {}).get(impl, 0)
                    res.rss_kib[wl.name][impl] = max(prev, rss)
    except MountError as exc:
        error = f"MOUNT FAILED: {exc}"
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        error = "EXDEV" if exc.errno == errno.EXDEV else f"{name}: {exc.strerror or exc}"
    except Exception as exc:  # report what fails and go on with the next measurement
        error = f"ERROR {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if timed_out and all(row in rec for row in wl.rows):
        check_error = f"TIMEOUT after {cfg.timeout:g}s (daemon killed)"
        timed_out = False
        error = None
    if check_error is not None:
        res.checked[wl.name] = "CHECK-ERR"
        res.mismatches.append(
            {"workload": wl.name, "round": rnd + 1, "impl": impl, "check_error": check_error}
        )
        loud(f"CHECK FAILED in {wl.name} (round {rnd + 1}): reading {impl}'s tree: {check_error}")
    if timed_out:
        error = f"TIMEOUT after {cfg.timeout:g}s (daemon killed)"
    elif wrong is not None and error is None:
        error = wrong
        rec.clear()  # a wrong answer's time means nothing (it may have done less work)
        res.checked[wl.name] = "WRONG"
        res.mismatches.append(
            {"workload": wl.name, "round": rnd + 1, "impl": impl, "wrong_result": wrong[14:]}
        )
        loud(f"WRONG RESULT in {wl.name} (round {rnd + 1}) from {impl}: {wrong[14:]}")
    for row in wl.rows:
        c = res.cell(row, impl)
        if row in rec:
            c.times.append(rec[row])
        if error is not None and row not in rec:
            c.errors.append(error)
    if error is not None:
        log(f"{label}: {error}")
    return snap


def run_all(
    ctx: Ctx, wls: Sequence[Workload], impls: Sequence[str], rounds: int, check: str
) -> Results:
    res = Results()
    given_up: set[tuple[str, str]] = set()  # (workload, impl) that timed out: not retried
    for wi, wl in enumerate(wls):
        for rnd in range(rounds):
            k = (rnd + wi) % len(impls)
            order = list(impls[k:]) + list(impls[:k])
            want = check == "all" or (check == "first" and rnd == 0)
            snaps: dict[str, Snap] = {}
            t0 = time.perf_counter()
            for impl in order:
                if (wl.name, impl) in given_up:
                    for row in wl.rows:
                        res.cell(row, impl).errors.append("skipped after timeout")
                    continue
                snap = measure(ctx, wl, impl, rnd, res, want)
                if snap is not None:
                    snaps[impl] = snap
                if any("TIMEOUT" in e for r in wl.rows for e in res.cell(r, impl).errors):
                    given_up.add((wl.name, impl))
            if want:
                check_round(wl, rnd, impls, snaps, res)
            cells = "  ".join(
                f"{impl}={fmt_time(res.cell(row, impl).times[-1])}"
                if res.cell(row, impl).times
                else f"{impl}=-"
                for row in wl.rows[:1]
                for impl in impls
            )
            log(f"{wl.name} round {rnd + 1}/{rounds} ({time.perf_counter() - t0:.1f}s): {cells}")
    return res


def check_round(
    wl: Workload, rnd: int, impls: Sequence[str], snaps: dict[str, Snap], res: Results
) -> None:
    ref_impl = next((i for i in impls if i in snaps), None)
    if ref_impl is None or len(snaps) < 2:
        return  # nothing to compare (the others failed, and say so in their cells)
    earlier = res.checked.get(wl.name)  # WRONG / CHECK-ERR from measure(), or a past round
    status = "ok"
    for impl in impls:
        if impl == ref_impl or impl not in snaps:
            continue
        diffs = diff_snaps(snaps[ref_impl], snaps[impl])
        if diffs:
            status = "MISMATCH"
            res.mismatches.append(
                {
                    "workload": wl.name,
                    "round": rnd + 1,
                    "ref": ref_impl,
                    "impl": impl,
                    "diffs": diffs,
                }
            )
            loud(
                f"MISMATCH in {wl.name} (round {rnd + 1}): {impl} differs from {ref_impl}:",
                *diffs,
            )
    if earlier is not None and earlier != "ok" and status == "ok":
        status = earlier
    res.checked[wl.name] = status


IMPORT_ROW = "import"
IMPORT_WHAT = "OCI layout, 3 gzip layers: umoci unpack vs layerfs import (fresh store)"


def disk_usage(root: Path) -> int:
    """Allocated bytes under root, each inode once (the store may hardlink)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def measure_import(ctx: Ctx, tool: str, rnd: int, res: Results, want_snap: bool) -> Snap | None:
    """Import the bench image with `tool` into a fresh directory, caches dropped first."""
    cfg = ctx.cfg
    layout = ctx.root / "i" / "oci"
    run_dir = fresh_dir(cfg.workdir / "u")
    dest = run_dir / ("bundle" if tool == "umoci" else "store")
    if tool == "umoci":
        cmd = ["umoci", "unpack", "--image", f"{layout}:bench", str(dest)]
    else:
        cmd = [cfg.python, "-m", "unionfs", "import", "--store", str(dest), "--quiet"]
        cmd += ["--tag", "bench", f"oci:{layout}:bench"]
    c = res.cell(IMPORT_ROW, tool)
    snap: Snap | None = None
    error: str | None = None
    try:
        drop_caches(cfg)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=cfg.timeout, check=False)
        elapsed = time.perf_counter() - t0
        if r.returncode != 0:
            tail = r.stderr.decode(errors="replace").strip().splitlines()
            error = f"exit {r.returncode}: {tail[-1] if tail else ''}"
        else:
            c.times.append(elapsed)
            res.disk_bytes[tool] = disk_usage(dest)
            if tool == "layerfs":
                measure_image_mount(ctx, dest, run_dir / "mnt", rnd, res)
            if want_snap:
                rootfs = dest / "rootfs"
                if tool != "umoci":
                    rootfs = run_dir / "rootfs"
                    u = subprocess.run(
                        [cfg.python, "-m", "unionfs", "unpack", "--store", str(dest)]
                        + ["bench", str(rootfs)],
                        capture_output=True,
                        cwd=REPO,
                        timeout=cfg.timeout,
                        check=False,
                    )
                    if u.returncode != 0:
                        raise RuntimeError("layerfs unpack failed: " + u.stderr.decode()[-300:])
                snap = snapshot(rootfs, sorted(os.listdir(rootfs)))
    except subprocess.TimeoutExpired:
        error = f"TIMEOUT after {cfg.timeout:g}s"
    except Exception as exc:  # report and go on
        error = f"ERROR {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    if error is not None:
        c.errors.append(error)
        log(f"import-r{rnd}-{tool}: {error}")
    return snap


def measure_image_mount(ctx: Ctx, store: Path, mnt: Path, rnd: int, res: Results) -> None:
    """`layerfs mount --ro` of the freshly imported bench image: time until the command returns
    (the mount is live then), a cold walk + lstat of every file, and the daemon's peak RSS."""
    cfg = ctx.cfg
    mnt.mkdir()
    lfs = [cfg.python, "-m", "unionfs"]
    drop_caches(cfg)
    t0 = time.perf_counter()
    r = subprocess.run(
        [*lfs, "mount", "--store", str(store), "--ro", "bench", str(mnt)],
        capture_output=True,
        cwd=REPO,
        timeout=cfg.timeout,
        check=False,
    )
    mount_s = time.perf_counter() - t0
    if r.returncode != 0:
        log(f"image-mount-r{rnd}: {r.stderr.decode(errors='replace').strip()[-300:]}")
        return
    try:
        ps = subprocess.run(
            [*lfs, "ps", "--store", str(store), "--json"],
            capture_output=True,
            cwd=REPO,
            timeout=60,
            check=True,
        )
        pids = [int(m["pid"]) for m in json.loads(ps.stdout or b"[]")]
        t0 = time.perf_counter()
        n = 0
        for dirpath, dirs, files in os.walk(mnt):
            for name in dirs + files:
                os.lstat(os.path.join(dirpath, name))
                n += 1
        walk_s = time.perf_counter() - t0
        rss = 0
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        rss = max(rss, int(line.split()[1]))
        res.image_mount.append(
            {"mount_s": mount_s, "walk_s": walk_s, "rss_kib": float(rss), "entries": float(n)}
        )
        log(
            f"image-mount-r{rnd}: mount {mount_s:.2f}s, walk {walk_s:.2f}s, {n} entries, "
            f"RSS {rss / 1024:.0f} MiB"
        )
    finally:
        subprocess.run(
            [*lfs, "umount", "--store", str(store), str(mnt)],
            capture_output=True,
            cwd=REPO,
            timeout=120,
            check=False,
        )


def run_import(ctx: Ctx, tools: Sequence[str], rounds: int, check: str, res: Results) -> None:
    wl = Workload(IMPORT_ROW, (IMPORT_ROW,), IMPORT_WHAT, "i", lambda p: [], (), True, wl_none)
    for rnd in range(rounds):
        k = rnd % len(tools)
        order = list(tools[k:]) + list(tools[:k])
        want = check == "all" or (check == "first" and rnd == 0)
        snaps: dict[str, Snap] = {}
        for tool in order:
            snap = measure_import(ctx, tool, rnd, res, want)
            if snap is not None:
                snaps[tool] = snap
        if want:
            check_round(wl, rnd, tools, snaps, res)
        done = "  ".join(
            f"{t}={fmt_time(res.cell(IMPORT_ROW, t).times[-1])}"
            if res.cell(IMPORT_ROW, t).times
            else f"{t}=-"
            for t in tools
        )
        log(f"import round {rnd + 1}/{rounds}: {done}")


def wl_none(ctx: Ctx, mnt: Path, rec: dict[str, float]) -> None:
    """Placeholder run function of the import pseudo-workload (measured by run_import)."""


def loud(head: str, *details: str) -> None:
    bar = "!" * 78
    body = "\n".join([f"!!! {head}", *(f"!!!   {d}" for d in details)])
    print(f"\n{bar}\n{body}\n{bar}\n", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Report


def fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1:
        return f"{t * 1000:.1f}ms"
    return f"{t:.2f}s"


def short_err(errors: list[str]) -> str:
    e = errors[0]
    for key, label in (
        ("EXDEV", "EXDEV"),
        ("TIMEOUT", "TIMEOUT"),
        ("MOUNT FAILED", "MNT-FAIL"),
        ("WRONG RESULT", "WRONG"),
        ("skipped", "skipped"),
    ):
        if e.startswith(key):
            return label
    return e.split(":")[0][:9]


def fuse_overlayfs_version() -> str:
    try:
        r = subprocess.run(["fuse-overlayfs", "--version"], capture_output=True, text=True)
    except OSError:
        return "absent"
    for line in (r.stdout + r.stderr).splitlines():
        if line.startswith("fuse-overlayfs"):
            return line.split()[-1]
    return "?"


def git_commit(checkout: Path) -> tuple[str, bool]:
    """The short commit of a checkout, and whether tracked files have local changes."""

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=checkout)
        return r.stdout.strip()

    return git("rev-parse", "--short", "HEAD") or "?", bool(
        git("status", "--porcelain", "--untracked-files=no")
    )


def machine_info(python: str) -> dict[str, Any]:
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break

    def out(cmd: list[str]) -> str:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            return "?"
        return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr) else "?"

    return {
        "nproc": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
        "cpu": cpu,
        "mem_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "daemon_python": out([python, "-c", "import sys; print(sys.version.split()[0])"]),
        "fuse_overlayfs": fuse_overlayfs_version(),
        "layerfs_commit": git_commit(REPO)[0],
        "layerfs_dirty": git_commit(REPO)[1],
    }


def render(
    res: Results,
    wls: Sequence[Workload],
    impls: Sequence[str],
    machine: dict[str, Any],
    args: argparse.Namespace,
    cold_ok: bool,
) -> tuple[str, dict[str, Any]]:
    lines = [
        f"layerfs bench  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}  "
        f"scale {args.scale:g}  rounds {args.rounds}  medians",
        f"machine: {machine['nproc']} cpus ({machine['cpu']}), {machine['mem_gib']} GiB, "
        f"Linux {machine['kernel']}, Python {machine['python']} "
        f"(daemon {machine['daemon_python']}), fuse-overlayfs {machine['fuse_overlayfs']}, "
        f"layerfs {machine['layerfs_commit']}"
        + (" +local changes" if machine["layerfs_dirty"] else "")
        + (f", {BASE} {machine['baseline']}" if "baseline" in machine else "")
        + f"; load {machine['loadavg_start']:.1f} at start, "
        f"{machine.get('loadavg_end', 0.0):.1f} at end",
        "cold = fresh mount + page cache dropped"
        + ("" if cold_ok else " (FAILED: cold figures are NOT cold)")
        + "; every measurement mounts fresh (fresh upper for writes)",
        "ratios: a/b of the medians, below 1 means a is faster; mount time is not in the figures",
    ]
    lines.append("command: " + " ".join(["scripts/bench.py", *sys.argv[1:]]))
    if args.profile:
        lines.append("PROFILED: layerfs ran under a profiler, its times are not representative")
    short = {
        "kernel": "kernel",
        "fuse-overlayfs": "fuse-ovl",
        "layerfs": "layerfs",
        BASE: "lfs-base",
    }
    ratios = [(a, b) for a, b in (("fuse-overlayfs", "kernel"), ("layerfs", "kernel"))]
    ratios += [("layerfs", "fuse-overlayfs"), ("layerfs", BASE)]
    ratios = [(a, b) for a, b in ratios if a in impls and b in impls]
    rname = {
        ("fuse-overlayfs", "kernel"): "fo/k",
        ("layerfs", "kernel"): "lfs/k",
        ("layerfs", "fuse-overlayfs"): "lfs/fo",
        ("layerfs", BASE): "lfs/base",
    }
    head = f"{'workload':<14}" + "".join(f"{short[i]:>11}" for i in impls)
    head += "".join(f"{rname[r]:>8}" for r in ratios) + "  check    what"
    if wls:
        lines += [head, "-" * len(head)]
    table: dict[str, Any] = {}
    for wl in wls:
        for row in wl.rows:
            cells = res.cells.get(row, {})
            med: dict[str, float | None] = {}
            line = f"{row:<14}"
            jrow: dict[str, Any] = {"workload": wl.name, "what": wl.what, "impls": {}}
            for impl in impls:
                c = cells.get(impl, Cell())
                m = statistics.median(c.times) if c.times else None
                med[impl] = m
                shown = fmt_time(m) if m is not None else (short_err(c.errors) if c.errors else "-")
                if m is not None and c.errors:
                    shown += "*"  # some rounds failed
                line += f"{shown:>11}"
                jrow["impls"][impl] = {
                    "median_s": m,
                    "times_s": c.times,
                    "errors": c.errors,
                }
            for a, b in ratios:
                ma, mb = med[a], med[b]
                rv = ma / mb if ma is not None and mb is not None and mb > 0 else None
                line += f"{(f'{rv:.2f}' if rv is not None else '-'):>8}"
                jrow[rname[a, b]] = rv
            status = res.checked.get(wl.name, "-")
            jrow["check"] = status
            line += f"  {status:<8} {wl.what if row == wl.rows[0] else ''}"
            lines.append(line)
            table[row] = jrow
    notes = []
    for row, jrow in table.items():
        for impl, d in jrow["impls"].items():
            if d["errors"]:
                errs = sorted(set(d["errors"]))
                notes.append(f"  {row} / {impl}: {'; '.join(errs)}")
    if "mv-dir" in table and "fuse-overlayfs" in impls:
        rn = table.get("rename-dir", {}).get("impls", {}).get("fuse-overlayfs", {})
        if any(e == "EXDEV" for e in rn.get("errors", [])):
            notes.append(
                "  mv-dir / fuse-overlayfs: rename(2) returns EXDEV there, so mv(1) fell back to "
                "copy + delete; the kernel (redirect_dir=on) renames"
            )
    if "copyup" in table and "kernel" in impls:
        notes.append(
            "  copyup / kernel: overlayfs fsyncs a copied-up file before the open returns "
            "(unless -o volatile); the FUSE daemons do not"
        )
    if notes:
        lines += ["", "notes and failures (* = some rounds failed):", *notes]
    extra: dict[str, Any] = {}
    depths = sorted(int(w.name[4:]) for w in wls if w.name.startswith("stat"))
    if len(depths) >= 2:
        lo, hi = depths[0], depths[-1]
        lines += ["", f"stack depth cost (stat{hi} / stat{lo}, medians):"]
        depth_json: dict[str, dict[str, float | None]] = {}
        for impl in impls:
            parts = []
            for temp in ("cold", "warm"):
                a = table.get(f"stat{hi}-{temp}", {}).get("impls", {}).get(impl, {})
                b = table.get(f"stat{lo}-{temp}", {}).get("impls", {}).get(impl, {})
                ma, mb = a.get("median_s"), b.get("median_s")
                r = ma / mb if ma is not None and mb else None
                depth_json.setdefault(impl, {})[temp] = r
                parts.append(f"{temp} {r:.2f}" if r is not None else f"{temp} -")
            lines.append(f"  {impl:<15}" + "  ".join(parts))
        extra["stack_depth_cost"] = depth_json
    if IMPORT_ROW in res.cells:
        imp = res.cells[IMPORT_ROW]
        meds = {t: statistics.median(c.times) for t, c in imp.items() if c.times}
        lines += [
            "",
            f"image import: {IMPORT_WHAT}, caches dropped; "
            f"check {res.checked.get(IMPORT_ROW, '-')}",
        ]
        jimp: dict[str, Any] = {}
        for tool, c in imp.items():
            m = meds.get(tool)
            shown = fmt_time(m) if m is not None else short_err(c.errors) if c.errors else "-"
            du = res.disk_bytes.get(tool)
            lines.append(
                f"  {tool:<8}{shown:>11}"
                + (f"   {du / MiB:.0f} MiB on disk" if du is not None else "")
                + (f"   ({'; '.join(sorted(set(c.errors)))})" if c.errors else "")
            )
            jimp[tool] = {"median_s": m, "times_s": c.times, "errors": c.errors, "disk_bytes": du}
        if "umoci" in meds and "layerfs" in meds:
            ratio = meds["layerfs"] / meds["umoci"]
            lines.append(f"  layerfs/umoci {ratio:.2f}")
            jimp["layerfs/umoci"] = ratio
        extra["import"] = jimp
    if res.image_mount:
        im: dict[str, float] = {
            k: statistics.median(run[k] for run in res.image_mount)
            for k in ("mount_s", "walk_s", "rss_kib", "entries")
        }
        lines.append(
            f"  layerfs mount --ro of that image ({im['entries']:.0f} entries): mount "
            f"{fmt_time(im['mount_s'])}, cold walk+lstat {fmt_time(im['walk_s'])}, daemon "
            f"peak RSS {im['rss_kib'] / 1024:.0f} MiB (medians of {len(res.image_mount)})"
        )
        extra["image_mount"] = {"median": im, "runs": res.image_mount}
    if res.mount_s:
        lines += ["", "mount time (start to mount point visible, median), per workload:"]
        for wl in wls:
            ms = res.mount_s.get(wl.name)
            if ms:
                lines.append(
                    f"  {wl.name:<12}"
                    + "  ".join(
                        f"{i}={fmt_time(statistics.median(ms[i]))}" for i in impls if i in ms
                    )
                )
    if res.rss_kib:
        lines += ["", "daemon peak RSS (VmHWM) per workload, MiB:"]
        for wl in wls:
            r = res.rss_kib.get(wl.name)
            if r:
                lines.append(
                    f"  {wl.name:<12}"
                    + "  ".join(f"{i}={r[i] / 1024:.0f}" for i in impls if i in r)
                )
    if res.mismatches:
        lines += [
            "",
            f"!!! {len(res.mismatches)} TREE MISMATCH(ES) / WRONG RESULT(S): see above / the JSON",
        ]
    doc = {
        "machine": machine,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "params": asdict(Params.at(args.scale)),
        "cold_ok": cold_ok,
        "rows": table,
        **extra,
        "rss_kib": res.rss_kib,
        "mount_s": res.mount_s,
        "mismatches": res.mismatches,
    }
    return "\n".join(lines), doc


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Benchmark layerfs vs kernel overlayfs vs fuse-overlayfs (run as root)."
    )
    ap.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/layerfs-bench"),
        help="layers, uppers and the mount point (one filesystem for all three; short paths "
        "keep a 100-layer option string within a page); default %(default)s",
    )
    ap.add_argument("--scale", type=float, default=1.0, help="shrink sizes/counts, e.g. 0.02")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--impls", default=",".join(IMPLS), help="comma list of " + ",".join(IMPLS))
    ap.add_argument(
        "--only", default="", help="comma list of workload names or globs (e.g. stat*,walk)"
    )
    ap.add_argument("--skip", default="", help="comma list of workload names or globs to leave out")
    ap.add_argument("--list", action="store_true", help="list the workloads and exit")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument(
        "--check",
        choices=("first", "all", "none"),
        default="first",
        help="compare the trees after the workload in the first round (default), all, none",
    )
    ap.add_argument("--python", help="interpreter for the layerfs daemon (default: the venv's)")
    ap.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help=f"also run layerfs from the checkout DIR (e.g. a git worktree of an older commit) "
        f"as {BASE!r}, interleaved with the others, with a lfs/base ratio column",
    )
    ap.add_argument(
        "--baseline-python",
        help="interpreter for the baseline's daemon (default: DIR/.venv/bin/python if there, "
        "else --python's)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        help="per measurement, seconds; the daemon is killed after it (default 900 x scale, "
        "at least 120)",
    )
    ap.add_argument(
        "--mount-timeout", type=float, default=60.0, help="bounded wait for a FUSE mount, seconds"
    )
    ap.add_argument("--rebuild", action="store_true", help="rebuild the fixtures")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="auto",
        choices=("auto", "py-spy", "pyinstrument"),
        help="run layerfs under py-spy (speedscope JSON) or pyinstrument (HTML), "
        "files under WORKDIR/profiles",
    )
    args = ap.parse_args(argv)
    if args.scale <= 0 or args.scale > 1:
        ap.error("--scale must be in (0, 1]")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    impls = [i for i in args.impls.split(",") if i]
    known = (*IMPLS, BASE) if args.baseline else IMPLS
    bad = [i for i in impls if i not in known]
    if bad or not impls:
        ap.error(f"unknown implementation(s) {bad}; choose from {','.join(known)}")
    if args.baseline:
        if not (args.baseline / "unionfs" / "__main__.py").is_file():
            ap.error(f"--baseline {args.baseline}: not a layerfs checkout")
        if BASE not in impls:
            impls.append(BASE)
    args.impls = impls
    return args


def matches(name: str, rows: Sequence[str], patterns: str) -> bool:
    """Does a comma list of names/globs name this workload or one of its rows?"""
    pats = [p for p in patterns.split(",") if p]
    return any(fnmatch.fnmatch(n, pat) for pat in pats for n in (name, *rows))


def select(wls: Sequence[Workload], only: str, skip: str) -> list[Workload]:
    return [
        w
        for w in wls
        if (not only or matches(w.name, w.rows, only)) and not matches(w.name, w.rows, skip)
    ]


def resolve_profiler(want: str | None, python: str) -> str | None:
    if want is None:
        return None
    if want in ("auto", "py-spy") and pyspy_path():
        return "py-spy"
    ok = subprocess.run([python, "-c", "import pyinstrument"], capture_output=True).returncode == 0
    if want in ("auto", "pyinstrument") and ok:
        return "pyinstrument"
    raise SystemExit(
        f"bench: --profile {want}: not installed (.venv/bin/pip install py-spy or pyinstrument)"
    )


def layerfs_available(python: str, command: str, checkout: Path = REPO) -> str | None:
    r = subprocess.run(
        [python, "-m", "unionfs", command, "--help"],
        capture_output=True,
        cwd=checkout,
        env=dict(os.environ, PYTHONPATH=str(checkout)),
        timeout=60,
    )
    if r.returncode == 0:
        return None
    tail = (r.stderr or r.stdout).decode(errors="replace").strip().splitlines()
    return tail[-1] if tail else f"exit {r.returncode}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    params = Params.at(args.scale)
    wls = select(all_workloads(params), args.only, args.skip)
    do_import = (
        "layerfs" in args.impls
        and (not args.only or matches(IMPORT_ROW, (), args.only))
        and not matches(IMPORT_ROW, (), args.skip)
    )
    if args.list:
        for w in all_workloads(params):
            print(f"{w.name:<12} rows {','.join(w.rows):<28} {w.what}")
        print(f"{IMPORT_ROW:<12} rows {IMPORT_ROW:<28} {IMPORT_WHAT}, {params.img_files} files")
        return 0
    if not wls and not do_import:
        log(f"--only {args.only!r} / --skip {args.skip!r} leave no workload (see --list)")
        return 2
    if os.geteuid() != 0:
        log("needs root (mount -t overlay, drop_caches)")
        return 2
    if args.rounds < 3:
        log(f"note: {args.rounds} round(s); medians want at least 3")

    python = args.python or (
        str(REPO / ".venv" / "bin" / "python")
        if (REPO / ".venv" / "bin" / "python").exists()
        else sys.executable
    )
    impls: list[str] = list(args.impls)
    if "fuse-overlayfs" in impls and shutil.which("fuse-overlayfs") is None:
        log("fuse-overlayfs is not installed: skipped")
        impls.remove("fuse-overlayfs")
    tools: list[str] = []
    if do_import:
        if shutil.which("umoci"):
            tools.append("umoci")
        else:
            log("umoci is not installed: import compared without it")
        if "layerfs" in impls:
            why = layerfs_available(python, "import")
            if why is None:
                tools.append("layerfs")
            else:
                log(f"layerfs import command not usable ({why}): skipped")
    if "layerfs" in impls and wls:
        why = layerfs_available(python, "overlay")
        if why is not None:
            log(f"layerfs overlay command not usable ({why}): skipped")
            impls.remove("layerfs")
    baseline = args.baseline.resolve() if args.baseline else None
    base_python = ""
    if baseline is not None:
        base_python = args.baseline_python or (
            str(baseline / ".venv" / "bin" / "python")
            if (baseline / ".venv" / "bin" / "python").exists()
            else python
        )
        why = layerfs_available(base_python, "overlay", baseline)
        if why is not None:
            raise SystemExit(f"bench: the baseline's overlay command is not usable: {why}")
    if not (impls and wls) and not tools:
        log("nothing left to run")
        return 2

    workdir: Path = args.workdir.resolve()
    root = workdir / f"x{args.scale:g}"
    cfg = Config(
        workdir=workdir,
        python=python,
        mount_timeout=args.mount_timeout,
        timeout=args.timeout if args.timeout else max(120.0, 900.0 * args.scale),
        profile=resolve_profiler(args.profile, python) if "layerfs" in impls else None,
        profile_dir=workdir / "profiles",
        baseline=baseline,
        base_python=base_python,
    )

    workdir.mkdir(parents=True, exist_ok=True)
    lock = lock_workdir(workdir)  # held until exit: two runs would unmount each other
    watch_signals()

    mnt = workdir / "m"
    if is_mounted(mnt):  # left by an earlier, killed run of this script
        log(f"unmounting a leftover mount at {mnt}")
        unmount(mnt, fuse=True)
    shutil.rmtree(workdir / "logs", ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    # A workload may also stack a layer of another group ("../seq/1").
    borrowed = [rel.split("/")[1] for w in wls for rel in w.lowers(params) if rel.startswith("../")]
    for gname in dict.fromkeys([w.group for w in wls] + borrowed + (["i"] if tools else [])):
        ensure_group(root, GROUPS[gname], params, args.rebuild)

    ctx = Ctx(cfg=cfg, params=params, root=root)
    machine = machine_info(python)
    if baseline is not None:
        commit, dirty = git_commit(baseline)
        machine["baseline"] = commit + (" +local changes" if dirty else "")
    t0 = time.perf_counter()
    try:
        res = run_all(ctx, wls, impls, args.rounds, args.check) if impls else Results()
        if tools:
            run_import(ctx, tools, args.rounds, args.check, res)
    except KeyboardInterrupt:
        log("interrupted; mounts cleaned up")
        return 130
    finally:
        FINAL_CLEANUP.set()  # from here a signal kills our children but interrupts nothing
        CHILDREN.cleanup(mnt)
        if not is_mounted(mnt):  # never delete below a live mount
            shutil.rmtree(workdir / "u", ignore_errors=True)
        lock.close()
    machine["loadavg_end"] = os.getloadavg()[0]
    text, doc = render(res, wls, impls, machine, args, cfg.cold_ok)
    if cfg.profile == "py-spy":
        for prof in sorted(cfg.profile_dir.glob("*-r0-layerfs.speedscope.json")):
            try:
                text += f"\n\nprofile {prof}:\n" + "\n".join(profile_summary(prof))
            except (OSError, ValueError, KeyError) as exc:
                text += f"\n\nprofile {prof}: unreadable ({exc})"
    doc["elapsed_s"] = round(time.perf_counter() - t0, 1)
    print(text)
    print(f"(measured in {doc['elapsed_s']:.0f}s)")
    if args.json:
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, args.json)
        log(f"wrote {args.json}")
    return 1 if res.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
