"""Declarative overlay layer stacks, built byte-for-byte identically as often as needed.

A stack is a list of lower layers (TOP first, as overlay options list them) and an initial
upper layer, each a list of `E` entries created in order. Building the same spec twice gives
two identical trees (content, modes, owners, xattrs incl. trusted.*, devices, hard links, fixed
times), which is how each side of a differential run gets "identical copies": rebuilt from one
spec rather than copied, so no copier can lose an xattr or a link; `layer_fingerprint` lets a
test prove the two copies are equal.

Whiteouts and opaque markers use the kernel's native spelling (char 0/0, trusted.overlay.opaque)
in every stack the kernel is compared with. The kernel does not read the OCI `.wh.` spelling
in directory layers, so `WH_STACK` (which uses it) is checked against `WH_EXPECTED` instead.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.treecmp import Node, snapshot

# Fixture times are in 2001; every explicit time an operation sets is before 2010. Any time
# after NOW_THRESHOLD_NS was therefore set by "now" (a write, UTIME_NOW, a create).
FIXED_MTIME_NS = 1_000_000_000 * 10**9
NOW_THRESHOLD_NS = 1_577_836_800 * 10**9  # 2020-01-01


@dataclass(frozen=True)
class E:
    """One entry of a layer: created in list order, metadata applied after all are created.

    kind: file, dir, symlink, hardlink (target = path of an earlier file of the same layer),
    fifo, char, sock, whiteout (char 0/0), wh (empty `.wh.NAME` file, OCI spelling: `path` is
    the hidden NAME), opq (`.wh..wh..opq` inside dir `path`).
    """

    path: bytes
    kind: str = "file"
    mode: int | None = None  # None: 0o755 for dirs, 0o644 otherwise
    uid: int = 0
    gid: int = 0
    data: bytes = b""
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    opaque: bool = False  # dirs: trusted.overlay.opaque=y
    redirect: bytes = b""  # dirs: trusted.overlay.redirect
    mtime_ns: int = FIXED_MTIME_NS


@dataclass(frozen=True)
class StackSpec:
    name: str
    lowers: tuple[tuple[E, ...], ...]  # TOP first
    upper: tuple[E, ...] = ()


@dataclass(frozen=True)
class Stack:
    """A built stack on disk: lowers TOP first, the upper, an empty work dir."""

    lowers: tuple[Path, ...]
    upper: Path
    work: Path
    spec: StackSpec = field(compare=False)


def pattern(seed: int, size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes (so offsets matter when content is compared)."""
    out = bytearray()
    x = seed * 2654435761 + 12345
    while len(out) < size:
        x = (x * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        out += x.to_bytes(8, "little")
    return bytes(out[:size])


def _make(root: bytes, e: E) -> None:
    p = os.path.join(root, e.path)
    if e.kind == "file":
        with open(p, "xb") as f:
            f.write(e.data)
    elif e.kind == "dir":
        os.makedirs(p, exist_ok=True)
    elif e.kind == "symlink":
        os.symlink(e.target, p)
    elif e.kind == "hardlink":
        os.link(os.path.join(root, e.target), p)
    elif e.kind == "fifo":
        os.mkfifo(p)
    elif e.kind == "char":
        os.mknod(p, stat.S_IFCHR | 0o600, os.makedev(*e.rdev))
    elif e.kind == "sock":
        os.mknod(p, stat.S_IFSOCK | 0o600)
    elif e.kind == "whiteout":
        os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))
    elif e.kind == "wh":
        head, tail = os.path.split(p)
        with open(os.path.join(head, b".wh." + tail), "xb"):
            pass
    elif e.kind == "opq":
        with open(os.path.join(p, b".wh..wh..opq"), "xb"):
            pass
    else:
        raise ValueError(f"unknown entry kind {e.kind!r}")


def _meta(root: bytes, e: E) -> None:
    if e.kind in ("hardlink",):
        return  # shares the inode of its target, whose metadata is applied on its own
    p = os.path.join(root, e.path)
    if e.kind == "wh":
        head, tail = os.path.split(p)
        p = os.path.join(head, b".wh." + tail)
    elif e.kind == "opq":
        p = os.path.join(p, b".wh..wh..opq")
    elif e.kind == "whiteout":
        os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)
        return
    for name, value in e.xattrs:
        os.setxattr(p, name, value, follow_symlinks=False)
    if e.opaque:
        os.setxattr(p, b"trusted.overlay.opaque", b"y", follow_symlinks=False)
    if e.redirect:
        os.setxattr(p, b"trusted.overlay.redirect", e.redirect, follow_symlinks=False)
    os.chown(p, e.uid, e.gid, follow_symlinks=False)
    if e.kind != "symlink":
        os.chmod(
            p, e.mode if e.mode is not None else (0o755 if e.kind == "dir" else 0o644)
        )  # after chown: chown clears setuid/setgid bits
    os.utime(p, ns=(e.mtime_ns, e.mtime_ns), follow_symlinks=False)


def build_layer(root: Path, entries: Sequence[E]) -> None:
    """Create `entries` under `root` (which must exist) with their exact metadata and times."""
    broot = os.fsencode(root)
    for e in entries:
        _make(broot, e)
    # Deepest first, so setting a child's metadata never bumps an already-set parent's mtime.
    for e in sorted(entries, key=lambda e: -e.path.count(b"/")):
        _meta(broot, e)
    os.utime(broot, ns=(FIXED_MTIME_NS, FIXED_MTIME_NS))


def build_stack(spec: StackSpec, base: Path) -> Stack:
    """Build `spec` under `base` as lower0 (TOP) .. lowerN, upper, work."""
    lowers = []
    for i, entries in enumerate(spec.lowers):
        d = base / f"lower{i}"
        d.mkdir(parents=True)
        build_layer(d, entries)
        lowers.append(d)
    upper = base / "upper"
    upper.mkdir()
    build_layer(upper, spec.upper)
    work = base / "work"
    work.mkdir()
    return Stack(tuple(lowers), upper, work, spec)


def layer_fingerprint(root: Path) -> dict[bytes, tuple[Node, tuple[bytes, ...]]]:
    """Everything that must be identical between two builds of a layer, incl. trusted.overlay.*
    xattrs, times and which paths share an inode."""
    snap = snapshot(root, hidden_xattr_prefixes=())
    broot = os.fsencode(root)
    inos: dict[int, list[bytes]] = {}
    for rel in snap:
        inos.setdefault(os.lstat(os.path.join(broot, rel)).st_ino, []).append(rel)
    out: dict[bytes, tuple[Node, tuple[bytes, ...]]] = {}
    for rel, node in snap.items():
        st = os.lstat(os.path.join(broot, rel))
        out[rel] = (node, tuple(sorted(inos[st.st_ino])))
    return out


# ---------------------------------------------------------------------------------------------
# The main kernel-comparison stack: three lowers and an initial upper.

BIG = pattern(7, 100_000)
NON_UTF8 = b"caf\xe9"

_L2_BOTTOM: tuple[E, ...] = (
    E(b"etc", "dir", 0o755),
    E(b"etc/passwd", data=b"root:x:0:0::/root:/bin/sh\n"),
    E(b"etc/hosts", data=b"127.0.0.1 localhost\n"),
    E(b"data", "dir", 0o750, uid=1000, gid=1000, xattrs=((b"user.dir", b"bottom"),)),
    E(
        b"data/a",
        mode=0o640,
        uid=1000,
        gid=1000,
        data=b"alpha\n" * 50,
        xattrs=((b"user.color", b"red"), (b"trusted.mine", b"1")),
    ),
    E(b"data/hl1", mode=0o600, uid=1234, gid=5678, data=b"shared inode\n"),
    E(b"data/hl2", "hardlink", target=b"data/hl1"),
    E(b"etc/hl3", "hardlink", target=b"data/hl1"),
    E(b"data/sub", "dir", 0o755),
    E(b"data/sub/deep", "dir", 0o700),
    E(b"data/sub/deep/f", data=b"deep\n"),
    E(b"data/sub/low", data=b"low\n"),
    E(b"gone", data=b"whited out above\n"),
    E(b"gonedir", "dir"),
    E(b"gonedir/x", data=b"x\n"),
    E(b"opq", "dir", 0o755),
    E(b"opq/old1", data=b"old1\n"),
    E(b"opq/old2", "dir"),
    E(b"opqu", "dir", 0o755),
    E(b"opqu/hidden", data=b"hidden by the upper's opaque dir\n"),
    E(b"link", "symlink", target=b"etc/hosts"),
    E(b"dangling", "symlink", target=b"nowhere"),
    E(b"dirlink", "symlink", target=b"data/sub"),
    E(b"fifo", "fifo", 0o600),
    E(b"null", "char", 0o666, rdev=(1, 3)),
    E(b"suid", mode=0o4755, data=b"#!/bin/sh\n"),
    E(b"sgid", "dir", 0o2775, gid=1234),
    E(b"sgid/f", mode=0o664, gid=1234, data=b"in setgid dir\n"),
    E(b"sticky", "dir", 0o1777),
    E(b"odd", mode=0o000, uid=65534, gid=65534, data=b"mode zero\n"),
    E(b"big", data=BIG),
    E(b"empty"),
    E(b"kindswap", data=b"file below a dir\n"),
    E(b"kindswap2", "dir"),
    E(b"kindswap2/child", data=b"below a file\n"),
    E(NON_UTF8, data=b"latin-1 name\n"),
)

_L1_MIDDLE: tuple[E, ...] = (
    E(b"gone", "whiteout"),
    E(b"opq", "dir", 0o711, opaque=True),
    E(b"opq/new", data=b"new in opaque\n"),
    E(b"data", "dir", 0o755, uid=1000, gid=100, xattrs=((b"user.dir", b"middle"),)),
    E(b"data/b", data=b"bravo\n", xattrs=((b"user.color", b"green"),)),
    E(b"data/sub", "dir", 0o755),
    E(b"data/sub/mid", data=b"mid\n"),
    E(b"etc", "dir", 0o755),
    E(b"etc/hosts", data=b"10.0.0.1 middle\n"),
    E(b"kindswap", "dir", 0o755),
    E(b"kindswap/child", data=b"dir over a file\n"),
    E(b"kindswap2", data=b"file over a dir\n"),
    E(b"mid", "dir", 0o755, uid=42, gid=42),
    E(b"mid/m1", data=b"m1\n"),
    E(b"mid/m2", "symlink", target=b"m1"),
)

_L0_TOP: tuple[E, ...] = (
    E(b"gonedir", "whiteout"),
    E(b"data", "dir", 0o755, uid=1000, gid=100, xattrs=((b"user.dir", b"top"),)),
    E(b"data/c", "symlink", target=b"a"),
    E(b"data/sub", "dir", 0o755),
    E(b"data/sub/top", data=b"top\n"),
    E(b"l2only", "dir", 0o755),
    E(b"l2only/x", data=b"x\n"),
    E(b"l2only/y", data=b"y\n"),
    E(b"origdir", "dir", 0o755),
    E(b"origdir/k", data=b"k\n"),
    E(b"tl1", data=b"top-layer hard link\n"),
    E(b"tl2", "hardlink", target=b"tl1"),
)

_UPPER: tuple[E, ...] = (
    E(b"upfile", data=b"only in upper\n", xattrs=((b"user.u", b"1"),)),
    E(b"data", "dir", 0o755, uid=1000, gid=100, xattrs=((b"user.dir", b"top"),)),
    E(b"data/u", data=b"upper in merged dir\n"),
    E(b"etc", "dir", 0o755),
    E(b"etc/passwd", data=b"root:x:0:0::/root:/bin/bash\n"),
    E(b"l2only", "dir", 0o755),
    E(b"l2only/x", "whiteout"),
    E(b"opqu", "dir", 0o700, opaque=True),
    E(b"opqu/n", data=b"n\n"),
    # A directory the kernel itself renamed: origdir -> moved (a relative redirect and a
    # whiteout of the old name), as `mv origdir moved` leaves it with redirect_dir=on.
    E(b"origdir", "whiteout"),
    E(b"moved", "dir", 0o755, redirect=b"origdir"),
)

MAIN_STACK = StackSpec("main", (_L0_TOP, _L1_MIDDLE, _L2_BOTTOM), _UPPER)

# Paths the merged view of MAIN_STACK shows (what the kernel shows; checked by a test).
MAIN_VISIBLE: frozenset[bytes] = frozenset(
    {
        b".",
        b"etc",
        b"etc/passwd",
        b"etc/hosts",
        b"etc/hl3",
        b"data",
        b"data/a",
        b"data/b",
        b"data/c",
        b"data/u",
        b"data/hl1",
        b"data/hl2",
        b"data/sub",
        b"data/sub/deep",
        b"data/sub/deep/f",
        b"data/sub/low",
        b"data/sub/mid",
        b"data/sub/top",
        b"opq",
        b"opq/new",
        b"opqu",
        b"opqu/n",
        b"link",
        b"dangling",
        b"dirlink",
        b"fifo",
        b"null",
        b"suid",
        b"sgid",
        b"sgid/f",
        b"sticky",
        b"odd",
        b"big",
        b"empty",
        b"kindswap",
        b"kindswap/child",
        b"kindswap2",
        NON_UTF8,
        b"mid",
        b"mid/m1",
        b"mid/m2",
        b"l2only",
        b"l2only/y",
        b"moved",
        b"moved/k",
        b"tl1",
        b"tl2",
        b"upfile",
    }
)

# Names that exist in some layer but are hidden in the merged view.
MAIN_HIDDEN: frozenset[bytes] = frozenset(
    {
        b"gone",
        b"gonedir",
        b"gonedir/x",
        b"opq/old1",
        b"opq/old2",
        b"opqu/hidden",
        b"kindswap2/child",
        b"l2only/x",
        b"origdir",
        b"origdir/k",
    }
)

# ---------------------------------------------------------------------------------------------
# OCI `.wh.` spelling in directory layers: not read by the kernel, compared with an expected tree.

WH_STACK = StackSpec(
    "wh",
    (
        (
            E(b"f1", "wh"),
            E(b"d1", "wh"),
            E(b"o", "dir", 0o755),
            E(b"o", "opq"),
            E(b"o/new", data=b"new\n"),
            E(b"keep", "dir", 0o755),
            E(b"keep/gone", "wh"),
            E(b"keep/top", data=b"top\n"),
            E(b"same", data=b"same layer wins\n"),
            E(b"same", "wh"),
        ),
        (
            E(b"f1", data=b"f1\n"),
            E(b"f2", data=b"f2\n"),
            E(b"d1", "dir"),
            E(b"d1/x", data=b"x\n"),
            E(b"o", "dir", 0o755),
            E(b"o/old", data=b"old\n"),
            E(b"keep", "dir", 0o755),
            E(b"keep/gone", data=b"gone\n"),
            E(b"keep/stay", data=b"stay\n"),
        ),
    ),
    (),
)

# (path, kind) of the merged view of WH_STACK: whiteouts and markers hidden, targets gone.
WH_EXPECTED: frozenset[tuple[bytes, str]] = frozenset(
    {
        (b".", "dir"),
        (b"f2", "file"),
        (b"o", "dir"),
        (b"o/new", "file"),
        (b"keep", "dir"),
        (b"keep/top", "file"),
        (b"keep/stay", "file"),
        (b"same", "file"),
    }
)
