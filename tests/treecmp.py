"""Snapshot a directory tree without following symlinks, and compare two snapshots."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Collection, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path

KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFCHR: "char",
    stat.S_IFBLK: "block",
    stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket",
}

# Overlay-private xattrs: kernel overlayfs hides trusted.overlay.* from listxattr on the
# mount, and security.* labels are set by the host, not by images.
DEFAULT_HIDDEN_XATTR_PREFIXES = (b"trusted.overlay.", b"user.overlay.", b"security.")


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int  # permission bits including setuid/setgid/sticky (no file type)
    uid: int
    gid: int
    size: int | None  # files and symlinks only; directory sizes are filesystem-specific
    sha256: str | None  # file content
    target: bytes | None  # symlink target
    nlink: int | None  # non-directories only; directory nlink differs between filesystems
    xattrs: tuple[tuple[bytes, bytes], ...]
    rdev: tuple[int, int] | None  # (major, minor) of char and block devices
    mtime_ns: int


def _xattrs(path: bytes, hidden: tuple[bytes, ...]) -> tuple[tuple[bytes, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = []
    for name in names:
        bname = os.fsencode(name)
        if bname.startswith(hidden):
            continue
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError:
            continue
        out.append((bname, value))
    return tuple(sorted(out))


def _sha256(path: bytes) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def node_of(path: bytes, hidden: tuple[bytes, ...] = DEFAULT_HIDDEN_XATTR_PREFIXES) -> Node:
    st = os.lstat(path)
    kind = KINDS.get(stat.S_IFMT(st.st_mode), "unknown")
    return Node(
        kind=kind,
        mode=stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind in ("file", "symlink") else None,
        sha256=_sha256(path) if kind == "file" else None,
        target=os.readlink(path) if kind == "symlink" else None,
        nlink=st.st_nlink if kind != "dir" else None,
        xattrs=_xattrs(path, hidden),
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        mtime_ns=st.st_mtime_ns,
    )


def snapshot(
    root: Path | str | bytes,
    hidden_xattr_prefixes: tuple[bytes, ...] = DEFAULT_HIDDEN_XATTR_PREFIXES,
) -> dict[bytes, Node]:
    """Map each path below `root` (relative, bytes, b"." for the root) to its Node.

    Symlinks are recorded, never followed; names are bytes so non-UTF-8 names survive.
    """
    base = os.fsencode(root)
    result: dict[bytes, Node] = {b".": node_of(base, hidden_xattr_prefixes)}
    stack = [b""]
    while stack:
        rel = stack.pop()
        here = os.path.join(base, rel) if rel else base
        for name in sorted(os.listdir(here)):
            relpath = os.path.join(rel, name) if rel else name
            node = node_of(os.path.join(base, relpath), hidden_xattr_prefixes)
            result[relpath] = node
            if node.kind == "dir":
                stack.append(relpath)
    return result


FIELD_NAMES = frozenset(f.name for f in fields(Node))


def compare(
    a: Mapping[bytes, Node],
    b: Mapping[bytes, Node],
    ignore: Collection[str] = ("mtime_ns",),
    ignore_paths: Collection[bytes] = (),
) -> list[str]:
    """Human-readable differences between two snapshots; [] when they agree.

    `ignore` names Node fields left out of the comparison (mtime by default: filesystems and
    tools differ in when they touch directory times); `ignore_paths` are left out entirely.
    """
    unknown = set(ignore) - FIELD_NAMES
    if unknown:
        raise ValueError(f"unknown Node fields to ignore: {sorted(unknown)}")
    blank = {name: None for name in ignore}
    diffs: list[str] = []
    for path in sorted(set(a) | set(b)):
        if path in ignore_paths:
            continue
        shown = path.decode(errors="backslashreplace")
        if path not in b:
            diffs.append(f"only in first: {shown} ({a[path].kind})")
            continue
        if path not in a:
            diffs.append(f"only in second: {shown} ({b[path].kind})")
            continue
        na, nb = replace(a[path], **blank), replace(b[path], **blank)  # type: ignore[arg-type]
        if na != nb:
            for f in fields(Node):
                va, vb = getattr(na, f.name), getattr(nb, f.name)
                if va != vb:
                    diffs.append(f"{shown}: {f.name} {va!r} != {vb!r}")
    return diffs
