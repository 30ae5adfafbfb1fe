"""Named uppers ("containers") kept in the store, and the records of active image mounts."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import StoreError
from .mountinfo import is_mount_point

# Layout (shared with diff/commit/export, see notes/ISSUE4-CONTRACT.md):
#   STORE/containers/NAME/upper/       the upper directory (overlayfs native format as root)
#   STORE/containers/NAME/work/        its workdir (same filesystem)
#   STORE/containers/NAME/config.json  {"name", "image", "ref", "created"}
#   STORE/mounts/<sha256 of the absolute mount point>.json   one active mount (MountRecord)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class ContainerError(StoreError):
    """A bad container name, a missing container, or one that belongs to another image."""


@dataclass(frozen=True)
class Container:
    name: str
    image: str  # image ID, sha256:...
    ref: str  # what the user typed
    created: float
    root: Path  # STORE/containers/NAME

    @property
    def upper(self) -> Path:
        return self.root / "upper"

    @property
    def work(self) -> Path:
        return self.root / "work"


@dataclass(frozen=True)
class MountRecord:
    mountpoint: str
    pid: int
    image: str
    name: str | None
    upper: str | None
    work: str | None
    readonly: bool
    ref: str = ""  # the image as the user named it (beyond the contract; for `ps`)
    # The DiffIDs the mount reads: gc keeps them while the mount's process lives, even when
    # its image is removed (a mount registers instead of holding the store's lock).
    layers: tuple[str, ...] = ()
    started: int = 0  # the process's start time (/proc/PID/stat): a reused pid is not it
    rm: bool = False  # `mount --rm`: its container is removed when the mount ends


def check_name(name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise ContainerError(
            f"bad container name {name!r}: use letters, digits, '_', '.', '-' "
            "(first a letter or digit, at most 128)"
        )


def containers_dir(store_root: Path) -> Path:
    return Path(store_root) / "containers"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a reader sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def load(store_root: Path, name: str) -> Container | None:
    check_name(name)
    root = containers_dir(store_root) / name
    try:
        data = json.loads((root / "config.json").read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ContainerError(f"container {name}: unreadable config.json: {exc}") from None
    return Container(name, str(data["image"]), str(data.get("ref", "")), data["created"], root)


def create(store_root: Path, name: str, image: str, ref: str) -> Container:
    """Make STORE/containers/NAME (upper, work, config.json); ContainerError if it exists."""
    check_name(name)
    parent = containers_dir(store_root)
    parent.mkdir(parents=True, exist_ok=True)
    root = parent / name
    try:
        root.mkdir()
    except FileExistsError:
        raise ContainerError(f"container {name} already exists") from None
    (root / "upper").mkdir()
    (root / "work").mkdir()
    created = time.time()
    _write_json(
        root / "config.json", {"name": name, "image": image, "ref": ref, "created": created}
    )
    return Container(name, image, ref, created, root)


def remove(store_root: Path, name: str) -> None:
    check_name(name)
    root = containers_dir(store_root) / name
    if not root.exists():
        raise ContainerError(f"no such container: {name}")
    try:
        shutil.rmtree(root)
    except OSError as exc:
        hint = ""
        if isinstance(exc, PermissionError):
            # e.g. chowned by a daemon that ran as root of a user namespace: only there can
            # the files be removed
            hint = " (files owned by ids of a user namespace? run `layerfs rm` in it)"
        raise ContainerError(
            f"cannot remove container {name}: {exc.strerror}: {exc.filename}{hint}"
        ) from None


def all_containers(store_root: Path) -> list[Container]:
    out = []
    parent = containers_dir(store_root)
    if parent.is_dir():
        for p in sorted(parent.iterdir()):
            if NAME_RE.fullmatch(p.name):
                c = load(store_root, p.name)
                if c is not None:
                    out.append(c)
    return out


def fresh_name(store_root: Path, ref: str) -> str:
    """An unused name from the image's repository name and random hex, e.g. `app-3f9c1a`."""
    base = ref.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", base).lstrip("._-")[:40] or "c"
    while True:
        name = f"{base}-{secrets.token_hex(3)}"
        if not (containers_dir(store_root) / name).exists():
            return name


# ---- mount records ----------------------------------------------------------------------


def mounts_dir(store_root: Path) -> Path:
    return Path(store_root) / "mounts"


def record_path(store_root: Path, mountpoint: str) -> Path:
    digest = hashlib.sha256(os.fsencode(mountpoint)).hexdigest()
    return mounts_dir(store_root) / f"{digest}.json"


def write_record(store_root: Path, rec: MountRecord) -> None:
    mounts_dir(store_root).mkdir(parents=True, exist_ok=True)
    _write_json(record_path(store_root, rec.mountpoint), asdict(rec))


def _parse(data: dict[str, Any]) -> MountRecord:
    return MountRecord(
        mountpoint=str(data["mountpoint"]),
        pid=int(data["pid"]),
        image=str(data["image"]),
        name=data.get("name"),
        upper=data.get("upper"),
        work=data.get("work"),
        readonly=bool(data.get("readonly", False)),
        ref=str(data.get("ref", "")),
        layers=tuple(str(x) for x in data.get("layers") or ()),
        started=int(data.get("started", 0)),
        rm=bool(data.get("rm", False)),
    )


def read_record(store_root: Path, mountpoint: str) -> MountRecord | None:
    try:
        return _parse(json.loads(record_path(store_root, mountpoint).read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_record(store_root: Path, mountpoint: str, pid: int | None = None) -> None:
    """Remove the record of `mountpoint` (only if it is `pid`'s, when given)."""
    path = record_path(store_root, mountpoint)
    if pid is not None:
        rec = read_record(store_root, mountpoint)
        if rec is None or rec.pid != pid:
            return
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def all_records(store_root: Path) -> Iterator[MountRecord]:
    d = mounts_dir(store_root)
    if not d.is_dir():
        return
    for p in sorted(d.glob("*.json")):
        try:
            yield _parse(json.loads(p.read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue


@contextlib.contextmanager
def pin_lock(store_root: Path) -> Iterator[None]:
    """A short critical section between registering a mount (or removing an image) and gc's
    choice of what to delete: neither can slip between the other's read and write."""
    with open(Path(store_root) / "mounts.lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def proc_start(pid: int) -> int:
    """The start time of process `pid` (clock ticks since boot), 0 if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0


def record_live(rec: MountRecord) -> bool:
    """Whether the process that registered `rec` still runs (a daemon that died, or a pid
    reused by another process, pins nothing)."""
    return pid_alive(rec.pid) and (not rec.started or proc_start(rec.pid) == rec.started)


def live_records(store_root: Path) -> list[MountRecord]:
    return [r for r in all_records(store_root) if record_live(r)]


def mount_status(rec: MountRecord) -> str:
    """running (daemon and mount), starting (daemon, no mount yet or any more), dead (mount
    left by a daemon that died: `umount` cleans it), gone (neither)."""
    alive = record_live(rec)
    mounted = is_mount_point(rec.mountpoint)
    if alive:
        return "running" if mounted else "starting"
    return "dead" if mounted else "gone"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) serves nothing.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[-1].split()[0] != b"Z"
    except OSError:
        return False


def find_mounted(store_root: Path, name: str) -> MountRecord | None:
    """The live mount of container `name` (also one still starting), if any."""
    for rec in all_records(store_root):
        if rec.name == name and record_live(rec):
            return rec
    return None


def resolve_target(store_root: Path, arg: str) -> tuple[Container, MountRecord | None]:
    """A `NAME|MOUNTPOINT` argument (contract): an existing directory with a mount record ->
    that mount's container and record; else the container NAME. ContainerError otherwise
    (also for a mount with no named upper, e.g. `--ro` or `--upper DIR`)."""
    if os.path.isdir(arg):
        rec = read_record(store_root, os.path.realpath(arg))
        if rec is not None:
            if rec.name is None:
                raise ContainerError(f"{arg}: mounted without a named upper (no container)")
            c = load(store_root, rec.name)
            if c is None:
                raise ContainerError(f"{arg}: its container {rec.name} no longer exists")
            return c, rec
    if not NAME_RE.fullmatch(arg):
        raise ContainerError(f"{arg}: neither an image mount point nor a container name")
    c = load(store_root, arg)
    if c is None:
        raise ContainerError(f"no such container: {arg}")
    return c, find_mounted(store_root, arg)
