"""Differential runs: one op sequence on kernel overlayfs and on another implementation, compared.

`run_sequence(impl, ops)` builds the same layer stack twice, mounts one copy with the kernel and
the other with `impl`, applies every op to both (outcomes must be equal: errno of a failure,
result of a success, whether st_ino survived), compares the two merged trees, checks that no
lower layer was written, then unmounts `impl`, mounts it again on the same dirs (same tree,
same st_ino for every path), and mounts ITS upper with the kernel over the same lowers and a
fresh workdir: that tree must equal the kernel's own. It returns a list of human-readable
problems ([] when the implementations agree) that starts with the op sequence.

What the tree comparison leaves out, and why:
- atime and ctime (not in treecmp.Node): reading and copy-up legitimately touch them.
- exact st_ino values: two filesystems number inodes differently. What must agree is which
  paths share an inode (hard links) and that every entry reports one st_dev.
- times set by "now" (a write, a create, UTIME_NOW, a directory change): equal as the class
  "now", not to the nanosecond. Every explicit time is before 2010, so any older time must
  match exactly: copy-up must preserve times, chmod must not touch mtime, and so on.
- directory sizes and directory nlink (treecmp leaves them out: filesystem-specific).
- security.* xattrs (host labels). trusted.overlay.* is compared: the kernel hides its markers
  on the mount, so a leaked marker is a difference.

Kernel options, chosen so the kernel is the reference the issue asks for:
- redirect_dir=on: a directory that exists in a lower layer can be renamed (the kernel stores
  a redirect xattr) instead of failing with EXDEV.
- index=on: a copied-up lower hard link stays linked to its other names (the kernel indexes the
  copy-up in workdir/index by the lower inode's file handle); with index=off the other names
  would keep showing the old lower content, which is not what the issue asks for. This needs
  the lowers' file system to support file handles (ext4, xfs, btrfs, tmpfs do);
  `check_kernel_index` refuses to run if the kernel fell back to index=off.
The re-mount of the other implementation's upper uses redirect_dir=on and index=off: its
workdir is fresh, so there is no index to read, and the upper must stand on its own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from layerstore import mountinfo
from tests.difftest.fixtures import (
    MAIN_STACK,
    NOW_THRESHOLD_NS,
    Stack,
    StackSpec,
    build_stack,
    layer_fingerprint,
)
from tests.difftest.ops import Op, Outcome, apply, close_all
from tests.mounting import overlay_mount
from tests.treecmp import Node, compare, snapshot

KERNEL_OPTS = ("redirect_dir=on", "index=on")
REMOUNT_OPTS = ("redirect_dir=on", "index=off")
NOW = -1  # mtime_ns of a Node whose mtime was set by "now"


@dataclass(frozen=True)
class TreeState:
    nodes: dict[bytes, Node]
    links: frozenset[frozenset[bytes]]  # groups of 2+ paths sharing one st_ino
    devs: int  # number of distinct st_dev values


def tree_state(root: Path) -> TreeState:
    # Only host labels are left out: the kernel shows no trusted.overlay.* xattr on the mount
    # (its own markers are hidden), so an implementation must not leak its markers either.
    snap = snapshot(root, hidden_xattr_prefixes=(b"security.",))
    nodes = {
        rel: replace(n, mtime_ns=NOW) if n.mtime_ns >= NOW_THRESHOLD_NS else n
        for rel, n in snap.items()
    }
    broot = os.fsencode(root)
    by_ino: dict[int, set[bytes]] = {}
    devs = set()
    for rel in snap:
        st = os.lstat(os.path.join(broot, rel) if rel != b"." else broot)
        by_ino.setdefault(st.st_ino, set()).add(rel)
        devs.add(st.st_dev)
    links = frozenset(frozenset(g) for g in by_ino.values() if len(g) > 1)
    return TreeState(nodes, links, len(devs))


def _show(paths: frozenset[bytes]) -> str:
    return "{" + ", ".join(sorted(p.decode(errors="backslashreplace") for p in paths)) + "}"


def compare_states(k: TreeState, o: TreeState, other: str) -> list[str]:
    diffs = [
        d.replace("only in first", "only in kernel").replace("only in second", f"only in {other}")
        if d.startswith("only in")
        else f"{d}   [kernel != {other}]"
        for d in compare(k.nodes, o.nodes, ignore=())
    ]
    if k.links != o.links:
        for g in sorted(k.links - o.links, key=sorted):
            diffs.append(f"hard-link group only in kernel: {_show(g)}")
        for g in sorted(o.links - k.links, key=sorted):
            diffs.append(f"hard-link group only in {other}: {_show(g)}")
    if o.devs != 1:
        diffs.append(f"{other} reports {o.devs} distinct st_dev values (kernel: {k.devs})")
    return diffs


def format_ops(ops: Sequence[Op]) -> str:
    return "\n".join(f"  {i}: {op!r}" for i, op in enumerate(ops))


def _mounts_below(base: Path) -> list[bytes]:
    prefix = os.fsencode(os.path.realpath(base)) + b"/"
    return [m for m in mountinfo.mount_points() if m.startswith(prefix)]


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary directory, removed afterwards only if nothing is still mounted below it."""
    base = Path(tempfile.mkdtemp(prefix="layerfs-diff-", dir=os.environ.get("LAYERFS_DIFF_TMP")))
    try:
        yield base
    finally:
        left = _mounts_below(base)
        if left:
            raise RuntimeError(f"still mounted after the test, not removing {base}: {left}")
        shutil.rmtree(base)


def check_kernel_index(mnt: Path) -> None:
    """Fail loudly if the kernel mounted without index (it falls back silently on some fs)."""
    m = mountinfo.mount_at(mnt)
    if m is None:
        raise RuntimeError(f"{mnt} is not mounted")
    if b"index=on" not in m.super_options.split(b","):
        raise RuntimeError(f"kernel overlay at {mnt} runs without index=on: {m.super_options!r}")


def inode_numbers(root: Path) -> dict[bytes, int]:
    broot = os.fsencode(root)
    out = {b".": os.lstat(broot).st_ino}
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            out[os.path.relpath(p, broot)] = os.lstat(p).st_ino
    return out


def _self_remount_check(
    impl: str,
    impl_opts: Sequence[str],
    kstate: TreeState,
    inos: dict[bytes, int],
    stack: Stack,
    base: Path,
) -> list[str]:
    """`impl` mounted again on its own upper and workdir: same tree, same st_ino everywhere."""
    with overlay_mount(
        impl, stack.lowers, base / "o" / "mnt-again", stack.upper, stack.work, impl_opts
    ) as mnt:
        state = tree_state(mnt)
        again = inode_numbers(mnt)
    diffs = compare_states(kstate, state, f"{impl}-remounted")
    diffs += [
        f"{p.decode(errors='backslashreplace')}: st_ino {inos[p]} before the remount, "
        f"{again[p]} after"
        for p in sorted(inos)
        if p in again and inos[p] != again[p]
    ]
    if diffs:
        return [f"{impl} mounted again on its own upper differs:"] + ["    " + d for d in diffs]
    return []


def _remount(stack: Stack, base: Path, name: str) -> TreeState:
    work = base / f"{name}-work"
    work.mkdir()
    with overlay_mount(
        "kernel", stack.lowers, base / f"{name}-mnt", stack.upper, work, REMOUNT_OPTS
    ) as mnt:
        return tree_state(mnt)


def _remount_check(impl: str, kstate: TreeState, ks: Stack, os_: Stack, base: Path) -> list[str]:
    """The kernel mounting `impl`'s upper (fresh workdir, index=off) must show the live tree.

    This is stricter than the kernel is with itself: a lower hard link of which only some
    names were copied up is kept linked by the kernel through workdir/index, which a fresh
    workdir lacks, so the kernel's own upper can show those names unlinked. layerfs links all
    names up, so its upper stands alone. On a difference, the kernel's own upper is mounted
    the same way and reported alongside, to tell the two situations apart.
    """
    try:
        ostate = _remount(os_, base, "o-remount")
    except subprocess.CalledProcessError as exc:
        return [f"kernel cannot mount {impl}'s upper: {exc.stderr!r}"]
    diffs = compare_states(kstate, ostate, f"kernel-on-{impl}-upper")
    if not diffs:
        return []
    kown = _remount(ks, base, "k-remount")
    odiffs = compare_states(kown, ostate, f"kernel-on-{impl}-upper")
    return (
        [f"kernel mount of {impl}'s upper differs from the kernel's live tree:"]
        + ["    " + d for d in diffs]
        + ["the kernel's mount of its own upper (fresh workdir, index=off), compared:"]
        + ["    " + d.replace("[kernel !=", "[kernel-on-kernel-upper !=") for d in odiffs]
        + ([] if odiffs else ["    (identical)"])
    )


def _run_ops(
    impl: str,
    ops: Sequence[Op],
    kmnt: Path,
    omnt: Path,
    kfds: dict[int, int],
    ofds: dict[int, int],
    snapshot_each: bool,
    problems: list[str],
) -> None:
    kroot, oroot = os.fsencode(kmnt), os.fsencode(omnt)
    for i, op in enumerate(ops):
        ko: Outcome = apply(op, kroot, kfds)
        oo: Outcome = apply(op, oroot, ofds)
        if ko != oo:
            problems.append(f"op {i} {op!r}:\n    kernel: {ko}\n    {impl}: {oo}")
            return
        if snapshot_each:
            diffs = compare_states(tree_state(kmnt), tree_state(omnt), impl)
            if diffs:
                problems.append(f"trees differ after op {i} {op!r}:")
                problems.extend("    " + d for d in diffs)
                return


def run_sequence(
    impl: str,
    ops: Sequence[Op],
    *,
    spec: StackSpec = MAIN_STACK,
    snapshot_each: bool = False,
    impl_opts: Sequence[str] = (),
    known: Callable[[list[str]], list[str]] | None = None,
    self_remount: bool = True,
    upper_alone: bool = True,
) -> list[str]:
    """Apply `ops` on the kernel and on `impl`; return the problems found ([] if none).

    `self_remount`: also unmount `impl` and mount it again on the same dirs: the tree must still
    be the kernel's, and every path must keep its st_ino. `upper_alone`: the kernel mounting
    `impl`'s upper with a fresh workdir must show the kernel's tree (see _remount_check).
    `known` may filter out problems that are documented, deliberate differences.
    """
    problems: list[str] = []
    with scratch_dir() as base:
        ks = build_stack(spec, base / "k")
        os_ = build_stack(spec, base / "o")
        lowers_before = [layer_fingerprint(p) for p in os_.lowers]
        kstate: TreeState | None = None
        kmnt, omnt = base / "k" / "mnt", base / "o" / "mnt"
        with (
            overlay_mount("kernel", ks.lowers, kmnt, ks.upper, ks.work, KERNEL_OPTS),
            overlay_mount(impl, os_.lowers, omnt, os_.upper, os_.work, impl_opts),
        ):
            check_kernel_index(kmnt)
            kfds: dict[int, int] = {}
            ofds: dict[int, int] = {}
            try:
                _run_ops(impl, ops, kmnt, omnt, kfds, ofds, snapshot_each, problems)
            finally:
                close_all(kfds)
                close_all(ofds)
            if not problems:
                kstate = tree_state(kmnt)
                oinos = inode_numbers(omnt)
                diffs = compare_states(kstate, tree_state(omnt), impl)
                if diffs:
                    problems.append("final trees differ:")
                    problems.extend("    " + d for d in diffs)
        if kstate is not None and not problems and self_remount:
            problems.extend(_self_remount_check(impl, impl_opts, kstate, oinos, os_, base))
        if kstate is not None and not problems and upper_alone:
            problems.extend(_remount_check(impl, kstate, ks, os_, base))
        for i, (p, before) in enumerate(zip(os_.lowers, lowers_before, strict=True)):
            if layer_fingerprint(p) != before:
                problems.append(f"{impl} modified lower layer {i} ({p.name})")
    if known is not None:
        problems = known(problems)
    if problems:
        problems.insert(0, f"ops ({len(ops)}):\n{format_ops(ops)}")
    return problems
