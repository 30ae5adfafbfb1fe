"""The mount table of this process (/proc/self/mountinfo): the one reader for all of layerfs."""

from __future__ import annotations

import os
from dataclasses import dataclass

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of mountinfo (proc(5)); paths are bytes, unescaped."""

    mount_id: int
    parent_id: int
    major: int
    minor: int
    root: bytes
    point: bytes
    options: bytes  # per-mount options (rw, nosuid, ...)
    fstype: str
    source: bytes
    super_options: bytes  # per-superblock options (e.g. overlayfs' lowerdir=, index=on)


def unescape(field: bytes) -> bytes:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    if b"\\" not in field:
        return field
    return (
        field.replace(b"\\040", b" ")
        .replace(b"\\011", b"\t")
        .replace(b"\\012", b"\n")
        .replace(b"\\134", b"\\")
    )


def parse_line(line: bytes) -> Mount | None:
    """One mountinfo line; None when it is not one (never raises on odd input)."""
    fields = line.split()
    try:
        sep = fields.index(b"-", 6)
        major, _, minor = fields[2].partition(b":")
        return Mount(
            mount_id=int(fields[0]),
            parent_id=int(fields[1]),
            major=int(major),
            minor=int(minor),
            root=unescape(fields[3]),
            point=unescape(fields[4]),
            options=fields[5],
            fstype=fields[sep + 1].decode(errors="replace"),
            source=unescape(fields[sep + 2]) if len(fields) > sep + 2 else b"",
            super_options=fields[sep + 3] if len(fields) > sep + 3 else b"",
        )
    except (ValueError, IndexError):
        return None


def mounts() -> list[Mount]:
    """Every mount of this process's namespace, in the kernel's order (later mounts on top)."""
    with open(MOUNTINFO, "rb") as f:
        return [m for m in map(parse_line, f) if m is not None]


def mount_points() -> set[bytes]:
    return {m.point for m in mounts()}


def mount_at(path: str | bytes | os.PathLike[str], *, resolved: bool = False) -> Mount | None:
    """The mount on top at `path`, or None when nothing is mounted there. `resolved`: `path`
    is already a real path (resolving it would stat the mount, which a FUSE daemon must not
    ask itself)."""
    target = os.fsencode(path if resolved else os.path.realpath(path))
    found = None
    for m in mounts():
        if m.point == target:
            found = m  # the last one: the mount on top
    return found


def is_mount_point(path: str | bytes | os.PathLike[str]) -> bool:
    """Whether `path` (resolved) is a mount point."""
    return mount_at(path) is not None
