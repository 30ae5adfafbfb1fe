"""Differential tests: layerfs against kernel overlayfs, the oracle, on identical layer stacks.

Each case builds tests/difftest/fixtures.MAIN_STACK twice (three lowers and an initial upper:
files, dirs, symlinks, hard links within a layer, a fifo, a char device, user.* and trusted.*
xattrs, char 0/0 whiteouts, opaque dirs in a lower and in the upper, a kernel-made directory
redirect, odd modes, owners other than root, a setgid dir, nested dirs present in several
layers), mounts one copy with `mount -t overlay` (redirect_dir=on,index=on; why in
tests/difftest/runner.py) and the other with layerfs, applies the same operations to both and
requires: equal outcomes of every call (errno of a failure, result of a success, st_ino kept
across copy-up and rename), equal trees afterwards, untouched lowers, the same tree and the
same st_ino everywhere after layerfs is mounted again on its own dirs, and that the kernel
mounting layerfs' upper (fresh workdir) shows the kernel's tree. Some ops run as unprivileged
users, so permission checks are compared too.

Named scenarios pin the hard cases so every run covers them; Hypothesis adds random sequences
(LAYERFS_STRESS=1 / `make stress` runs many more). The OCI `.wh.` spelling in directory layers
is not read by the kernel, so it is checked against an expected tree instead. Differences
found are written up, minimised, in /work/notes/findings-engine.md.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import require_fuse, require_kernel_overlay, require_root, require_tool
from tests.difftest.fixtures import (
    MAIN_HIDDEN,
    MAIN_STACK,
    MAIN_VISIBLE,
    WH_EXPECTED,
    WH_STACK,
    StackSpec,
    build_stack,
    layer_fingerprint,
)
from tests.difftest.ops import RENAME_EXCHANGE, RENAME_NOREPLACE, Op, apply
from tests.difftest.runner import KERNEL_OPTS, run_sequence, scratch_dir, tree_state
from tests.difftest.strategies import (
    RANDOM_DIRS,
    RANDOM_PATHS,
    T1,
    op_sequences,
    random_stacks,
)
from tests.mounting import overlay_mount

pytestmark = pytest.mark.mount

# The implementation under test. Developers may point the same tests at another drop-in
# (LAYERFS_DIFF_IMPL=fuse-overlayfs) to see the harness fail on its known differences.
IMPL = os.environ.get("LAYERFS_DIFF_IMPL", "layerfs")
STRESS = os.environ.get("LAYERFS_STRESS") == "1"


NO_MOUNT = {"test_fixture_builds_identically"}  # needs root only


@pytest.fixture(autouse=True)
def _needs_mounts(request: pytest.FixtureRequest) -> None:
    require_root()  # devices, trusted.* xattrs and owners in the fixture; kernel mounts
    if request.function.__name__ not in NO_MOUNT:
        require_kernel_overlay()
        require_fuse()


# allow_other: some ops run as unprivileged users (permission checks must match the kernel's),
# and a FUSE mount is otherwise closed to every user but the one who mounted it.
IMPL_OPTS = ("allow_other",)


def check(ops: list[Op], snapshot_each: bool = False, self_remount: bool = True) -> None:
    problems = run_sequence(
        IMPL, ops, snapshot_each=snapshot_each, impl_opts=IMPL_OPTS, self_remount=self_remount
    )
    assert not problems, "layerfs differs from kernel overlayfs:\n" + "\n".join(problems)


# --- the fixture itself ---------------------------------------------------------------------


def test_fixture_builds_identically(tmp_path: Path) -> None:
    """Both sides of every run get byte-identical layers (incl. trusted.*, devices, links)."""
    a = build_stack(MAIN_STACK, tmp_path / "a")
    b = build_stack(MAIN_STACK, tmp_path / "b")
    for la, lb in zip((*a.lowers, a.upper), (*b.lowers, b.upper), strict=True):
        fa, fb = layer_fingerprint(la), layer_fingerprint(lb)
        assert fa == fb
    fp = layer_fingerprint(a.lowers[1])
    assert (b"trusted.overlay.opaque", b"y") in fp[b"opq"][0].xattrs
    assert fp[b"gone"][0].rdev == (0, 0)


def test_kernel_merged_view_is_the_planned_one(tmp_path: Path) -> None:
    """The oracle sees what the fixture intends (whiteouts, opaque dirs, redirect, links)."""
    s = build_stack(MAIN_STACK, tmp_path)
    with overlay_mount("kernel", s.lowers, tmp_path / "mnt", s.upper, s.work, KERNEL_OPTS) as m:
        state = tree_state(m)
    assert set(state.nodes) == MAIN_VISIBLE
    assert not (set(state.nodes) & MAIN_HIDDEN)
    assert frozenset({b"data/hl1", b"data/hl2", b"etc/hl3"}) in state.links
    assert state.nodes[b"data"].xattrs == ((b"user.dir", b"top"),)


def test_harness_detects_a_difference() -> None:
    """The comparison can fail: fuse-overlayfs refuses to rename a lower directory (EXDEV),
    which the kernel with redirect_dir=on does."""
    require_tool("fuse-overlayfs")
    problems = run_sequence("fuse-overlayfs", [Op("rename", (b"data/sub", b"data/sub2", 0))])
    assert any("EXDEV" in p for p in problems), problems


def test_harness_has_no_false_differences() -> None:
    """Kernel against kernel over random sequences: the comparison reports nothing, so every
    difference it reports against layerfs is real, not noise of the harness."""

    @settings(deadline=None, max_examples=15)
    @given(ops=op_sequences(10), snapshot_each=st.booleans())
    def kernel_vs_kernel(ops: list[Op], snapshot_each: bool) -> None:
        # upper_alone=False: the kernel's own upper needs its index to keep partly copied-up
        # hard links linked; that a fresh workdir suffices is a requirement on layerfs only.
        problems = run_sequence(
            "kernel", ops, snapshot_each=snapshot_each, impl_opts=KERNEL_OPTS, upper_alone=False
        )
        assert not problems, "\n".join(problems)

    kernel_vs_kernel()


# --- named scenarios --------------------------------------------------------------------------

W = Op  # short alias for the table below

SCENARIOS: dict[str, list[Op]] = {
    "copy-up write keeps times, owner, xattrs of file and parent": [
        W("write", (b"data/a", 3, 10, 1, False)),
        W("read", (b"data/a", 0, 1 << 20)),
        W("lstat", (b"data",)),
        W("listxattr", (b"data/a",)),
    ],
    "write past EOF and into a big lower file": [
        W("write", (b"big", 65530, 5000, 2, False)),
        W("write", (b"empty", 200_000, 10, 1, False)),
        W("read", (b"big", 65536, 100)),
        W("append", (b"etc/hosts", 5, 3)),
    ],
    "truncating open and truncate of lower files": [
        W("write", (b"etc/hosts", 0, 1, 0, True)),
        W("truncate", (b"big", 7)),
        W("truncate", (b"data/b", 300_000)),
        W("read", (b"data/b", 0, 100)),
    ],
    "hard links stay linked after copy-up": [
        W("write", (b"data/hl1", 0, 10, 1, False)),
        W("read", (b"etc/hl3", 0, 100)),
        W("lstat", (b"data/hl2",)),
        W("chmod", (b"tl2", 0o600)),
        W("lstat", (b"tl1",)),
    ],
    "unlink one lower hard link": [
        W("unlink", (b"data/hl2",)),
        W("lstat", (b"data/hl1",)),
        W("write", (b"etc/hl3", 0, 5, 1, False)),
    ],
    "link to a lower file": [
        W("link", (b"data/a", b"new1")),
        W("lstat", (b"data/a",)),
        W("write", (b"new1", 0, 4, 2, False)),
        W("read", (b"data/a", 0, 100)),
    ],
    "metadata changes copy up": [
        W("chmod", (b"suid", 0o755)),
        W("chown", (b"odd", 1000, 100, True)),
        W("chown", (b"link", 1234, 5678, False)),
        W("chown", (b"suid", 1000, -1, True)),
        W("utimens", (b"data/b", T1, "omit", True)),
        W("utimens", (b"data/sub/low", "omit", "now", True)),
        W("utimens", (b"dangling", T1, T1, False)),
        W("chmod", (b"data/sub/deep", 0o755)),
    ],
    "xattrs on lower, upper and merged objects": [
        W("setxattr", (b"data/a", b"user.color", b"blue", os.XATTR_REPLACE, True)),
        W("setxattr", (b"data/a", b"user.new", b"", os.XATTR_CREATE, True)),
        W("setxattr", (b"data/b", b"user.color", b"x", os.XATTR_CREATE, True)),
        W("removexattr", (b"data", b"user.dir", True)),
        W("setxattr", (b"etc/hosts", b"trusted.new", b"1", 0, True)),
        W("setxattr", (b"link", b"user.color", b"1", 0, False)),
        W("setxattr", (b"link", b"trusted.new", b"1", 0, False)),
        W("removexattr", (b"data/sub/top", b"user.color", True)),
        W("getxattr", (b"data/a", b"trusted.mine")),
        W("listxattr", (b"data",)),
    ],
    "rename a lower dir, then use old and new names": [
        W("rename", (b"data/sub", b"newdir", 0)),
        W("listdir", (b"newdir",)),
        W("lstat", (b"data/sub",)),
        W("mkdir", (b"data/sub", 0o755)),
        W("listdir", (b"data/sub",)),
        W("write", (b"newdir/deep/f", 0, 3, 1, False)),
        W("rename", (b"newdir", b"moved/new", 0)),
        W("listdir", (b"moved/new/deep",)),
    ],
    "rename a merged dir across parents and back": [
        W("rename", (b"data", b"mid/data", 0)),
        W("listdir", (b"mid/data/sub",)),
        W("rename", (b"mid/data", b"data", 0)),
        W("listdir", (b"data",)),
    ],
    "rename a redirected dir and an opaque dir": [
        W("rename", (b"moved", b"data/moved2", 0)),
        W("listdir", (b"data/moved2",)),
        W("rename", (b"opq", b"opq2", 0)),
        W("listdir", (b"opq2",)),
        W("mkdir", (b"moved", 0o700)),
        W("listdir", (b"moved",)),
    ],
    "rename flags: NOREPLACE and EXCHANGE": [
        W("rename", (b"data/a", b"data/b", RENAME_NOREPLACE)),
        W("rename", (b"data/a", b"data/b", RENAME_EXCHANGE)),
        W("rename", (b"data/sub", b"etc", RENAME_EXCHANGE)),
        W("rename", (b"upfile", b"new1", RENAME_EXCHANGE)),
        W("rename", (b"upfile", b"new1", RENAME_NOREPLACE)),
        W("listdir", (b"etc",)),
    ],
    "rename errors": [
        W("rename", (b"data", b"data/sub/x", 0)),
        W("rename", (b"data/a", b"data/sub", 0)),
        W("rename", (b"data/sub", b"data/a", 0)),
        W("rename", (b"data/sub", b"mid", 0)),
        W("rename", (b"gone", b"new1", 0)),
        W("rename", (b"data/a", b"data/a", 0)),
    ],
    "rename over lower files, dirs and whiteouts": [
        W("rename", (b"upfile", b"data/a", 0)),
        W("rename", (b"etc/hosts", b"gone", 0)),
        W("mkdir", (b"newdir", 0o755)),
        W("rename", (b"newdir", b"opq/old2", 0)),
        W("rename", (b"kindswap2", b"l2only/x", 0)),
        W("listdir", (b"opq",)),
    ],
    "unlink and rmdir create whiteouts; recreate over them": [
        W("unlink", (b"data/a",)),
        W("create", (b"data/a", 0o600, True, False)),
        W("rmdir", (b"data/sub/deep",)),
        W("unlink", (b"data/sub/deep/f",)),
        W("rmdir", (b"data/sub/deep",)),
        W("mkdir", (b"data/sub/deep", 0o755)),
        W("listdir", (b"data/sub/deep",)),
        W("mkdir", (b"gonedir", 0o700)),
        W("listdir", (b"gonedir",)),
        W("create", (b"gone", 0o644, False, False)),
    ],
    "rmdir of merged and opaque dirs": [
        W("rmdir", (b"data",)),
        W("rmdir", (b"opq",)),
        W("unlink", (b"opq/new",)),
        W("rmdir", (b"opq",)),
        W("rmdir", (b"l2only",)),
        W("unlink", (b"l2only/y",)),
        W("rmdir", (b"l2only",)),
        W("listdir", (b".",)),
    ],
    "unlink a file of a merged dir and rmdir it": [
        W("unlink", (b"mid/m1",)),
        W("unlink", (b"mid/m2",)),
        W("rmdir", (b"mid",)),
        W("mkdir", (b"mid", 0o755)),
        W("listdir", (b"mid",)),
    ],
    "kind changes across layers": [
        W("listdir", (b"kindswap",)),
        W("unlink", (b"kindswap2",)),
        W("mkdir", (b"kindswap2", 0o755)),
        W("listdir", (b"kindswap2",)),
        W("rmdir", (b"kindswap",)),
        W("unlink", (b"kindswap/child",)),
        W("rmdir", (b"kindswap",)),
        W("create", (b"kindswap", 0o644, True, False)),
    ],
    "create, mkdir, mknod, symlink in setgid, sticky and lower dirs": [
        W("create", (b"sgid/new", 0o644, True, False)),
        W("mkdir", (b"sgid/d", 0o755)),
        W("mknod", (b"sticky/p", "fifo", 0o644, (0, 0))),
        W("mknod", (b"data/sub/c", "char", 0o600, (1, 5))),
        W("mknod", (b"s", "sock", 0o600, (0, 0))),
        W("symlink", (b"nowhere", b"data/sub/deep/l")),
        W("create", (b"dangling", 0o644, False, False)),
        W("create", (b"link", 0o644, True, False)),
        W("mkdir", (b"data/a", 0o755)),
        W("create", (b"data/sub", 0o644, True, False)),
        W("lstat", (b"sgid/d",)),
        W("lstat", (b"sgid/new",)),
        W("read", (b"nowhere", 0, 10)),
    ],
    "through symlinks": [
        W("write", (b"link", 0, 5, 1, False)),
        W("lstat", (b"link",)),
        W("read", (b"etc/hosts", 0, 100)),
        W("chmod", (b"dirlink", 0o700)),
        W("create", (b"dirlink/new", 0o644, True, False)),
        W("rename", (b"dirlink/top", b"dirlink/top2", 0)),
        W("listdir", (b"data/sub",)),
        W("readlink", (b"data/c",)),
    ],
    "special files are copied up with their identity": [
        W("chmod", (b"fifo", 0o644)),
        W("chown", (b"null", 1000, 1000, False)),
        W("utimens", (b"fifo", T1, T1, False)),
        W("link", (b"null", b"null2")),
        W("rename", (b"fifo", b"data/fifo", 0)),
        W("lstat", (b"null2",)),
    ],
    "errors on hidden and missing names": [
        W("lstat", (b"gone",)),
        W("lstat", (b"opq/old1",)),
        W("unlink", (b"gonedir/x",)),
        W("rmdir", (b"origdir",)),
        W("read", (b"opqu/hidden", 0, 10)),
        W("truncate", (b"l2only/x", 0)),
        W("chmod", (b"missing", 0o644)),
        W("link", (b"data", b"new2")),
        W("unlink", (b"data",)),
        W("rmdir", (b"upfile",)),
        W("write", (b"data", 0, 1, 0, False)),
        W("readlink", (b"data/a",)),
        W("removexattr", (b"data/a", b"user.new", True)),
        W("getxattr", (b"upfile", b"user.none")),
    ],
    "name and nlink of a file unlinked after copy-up": [
        W("write", (b"tl1", 0, 5, 1, False)),
        W("unlink", (b"tl1",)),
        W("lstat", (b"tl2",)),
        W("read", (b"tl2", 0, 100)),
    ],
    "whiteouts and copy-ups inside a renamed lower dir, renamed back": [
        W("rename", (b"data", b"newdir", 0)),
        W("unlink", (b"newdir/a",)),
        W("write", (b"newdir/b", 0, 5, 1, False)),
        W("rmdir", (b"newdir/sub/deep",)),
        W("unlink", (b"newdir/sub/deep/f",)),
        W("rmdir", (b"newdir/sub/deep",)),
        W("listdir", (b"newdir",)),
        W("listdir", (b"newdir/sub",)),
        W("rename", (b"newdir", b"data", 0)),
        W("listdir", (b"data",)),
        W("mkdir", (b"newdir", 0o755)),
        W("listdir", (b"newdir",)),
    ],
    "an emptied merged dir: replaced by rename, removed, recreated": [
        W("unlink", (b"l2only/y",)),
        W("listdir", (b"l2only",)),
        W("mkdir", (b"newdir", 0o700)),
        W("create", (b"newdir/n", 0o644, True, False)),
        W("rename", (b"newdir", b"l2only", 0)),
        W("listdir", (b"l2only",)),
        W("unlink", (b"l2only/n",)),
        W("rmdir", (b"l2only",)),
        W("lstat", (b"l2only",)),
        W("mkdir", (b"l2only", 0o755)),
        W("listdir", (b"l2only",)),
        W("unlink", (b"mid/m1",)),
        W("unlink", (b"mid/m2",)),
        W("rename", (b"kindswap", b"mid", 0)),
        W("unlink", (b"kindswap/child",)),
        W("rename", (b"opqu", b"kindswap", RENAME_NOREPLACE)),
    ],
    "permissions as unprivileged users (copy-up on their behalf)": [
        W("as", (1000, 100, W("create", (b"sticky/f", 0o644, True, False)))),
        W("as", (65534, 65534, W("unlink", (b"sticky/f",)))),
        W("as", (65534, 65534, W("rename", (b"sticky/f", b"sticky/g", 0)))),
        W("as", (65534, 65534, W("read", (b"odd", 0, 10)))),
        W("as", (1234, 5678, W("chmod", (b"odd", 0o644)))),
        W("as", (65534, 65534, W("chmod", (b"odd", 0o644)))),
        W("as", (65534, 65534, W("read", (b"odd", 0, 10)))),
        W("as", (1000, 100, W("write", (b"data/a", 0, 5, 1, False)))),
        W("as", (1000, 100, W("read", (b"data/hl1", 0, 10)))),
        W("as", (1234, 5678, W("write", (b"etc/hl3", 0, 5, 2, False)))),
        W("as", (1000, 100, W("setxattr", (b"data/b", b"user.color", b"v", 0, True)))),
        W("as", (1000, 100, W("setxattr", (b"data/a", b"user.color", b"v", 0, True)))),
        W("as", (1000, 100, W("setxattr", (b"data/a", b"trusted.new", b"v", 0, True)))),
        W("as", (1000, 100, W("utimens", (b"data/b", "now", "now", True)))),
        W("as", (1000, 100, W("utimens", (b"data/b", T1, T1, True)))),
        W("as", (1000, 100, W("utimens", (b"sticky", "now", "now", True)))),
        W("as", (1000, 100, W("mkdir", (b"data/sub/deep/x", 0o755)))),
        W("as", (1000, 100, W("rename", (b"data/sub", b"data/sub2", 0)))),
        W("as", (1000, 100, W("unlink", (b"data/c",)))),
        W("as", (1000, 100, W("chown", (b"data/a", 1000, 100, True)))),
        W("as", (1000, 100, W("chown", (b"data/a", 1234, -1, True)))),
        W("as", (1000, 100, W("access", (b"data/a", os.R_OK | os.W_OK)))),
        W("as", (1000, 100, W("access", (b"suid", os.X_OK)))),
        W("as", (1000, 100, W("listdir", (b"opqu",)))),
    ],
    # F7: over a directory only the upper holds, the upper filesystem's rename decides
    # ENOTEMPTY after the copy-ups, and may touch the parent's times while failing.
    "a failed rename of a lower dir onto a non-empty upper dir": [
        W("rename", (b"mid", b"opqu", 0)),
        W("listdir", (b"mid",)),
        W("lstat", (b".",)),
    ],
    "a failed rename of a merged dir onto a non-empty opaque upper dir": [
        W("write", (b"data", 0, 10, 0, False)),
        W("rename", (b"data", b"opqu", 0)),
        W("lstat", (b".",)),
        W("listdir", (b"data",)),
    ],
    "an fd opened before copy-up sees later writes": [
        W("open", (b"data/a", 0, "r")),
        W("write", (b"data/a", 0, 10, 1, False)),
        W("fdread", (0, 0, 100)),
        W("fdstat", (0,)),
        W("open", (b"big", 1, "rw")),
        W("chmod", (b"big", 0o600)),
        W("fdwrite", (1, 3, 10, 2)),
        W("read", (b"big", 0, 100)),
    ],
    "files unlinked or renamed while open keep working": [
        W("open", (b"upfile", 0, "rw")),
        W("unlink", (b"upfile",)),
        W("fdstat", (0,)),
        W("fdwrite", (0, 0, 10, 1)),
        W("fdread", (0, 0, 100)),
        W("open", (b"data/b", 1, "rw")),
        W("rename", (b"data/b", b"new1", 0)),
        W("fdwrite", (1, 0, 5, 3)),
        W("read", (b"new1", 0, 100)),
        W("unlink", (b"new1",)),
        W("fdstat", (1,)),
        W("fdtruncate", (1, 3)),
        W("fdsync", (1,)),
        W("close", (1,)),
        W("fdread", (1, 0, 10)),
    ],
}


# Scenarios that still differ, each naming its entry in /work/notes/findings-engine.md. Strict:
# the day layerfs agrees with the kernel, the XPASS fails the run and the entry goes.
OPEN_FINDINGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=OPEN_FINDINGS[n]))
        if n in OPEN_FINDINGS
        else n
        for n in SCENARIOS
    ],
)
def test_scenario(name: str) -> None:
    check(SCENARIOS[name], snapshot_each=True)


# --- random sequences -------------------------------------------------------------------------


# Sized for CI (2 cores, the whole file within about 3 minutes): a layerfs mount costs about
# a second, and each example mounts layerfs once or twice (self_remount).
@settings(deadline=None, max_examples=400 if STRESS else 40)
@given(
    ops=op_sequences(20 if STRESS else 10),
    snapshot_each=st.booleans(),
    self_remount=st.booleans(),
)
def test_random_sequences(ops: list[Op], snapshot_each: bool, self_remount: bool) -> None:
    check(ops, snapshot_each, self_remount)


@settings(deadline=None, max_examples=300 if STRESS else 20)
@given(
    spec=random_stacks(),
    ops=op_sequences(12 if STRESS else 8, RANDOM_PATHS, RANDOM_DIRS),
    snapshot_each=st.booleans(),
    self_remount=st.booleans(),
)
def test_random_stacks(
    spec: StackSpec, ops: list[Op], snapshot_each: bool, self_remount: bool
) -> None:
    """Random layer stacks (any kind over any kind, whiteouts, opaque dirs) and random ops."""
    problems = run_sequence(
        IMPL,
        ops,
        spec=spec,
        snapshot_each=snapshot_each,
        impl_opts=IMPL_OPTS,
        self_remount=self_remount,
    )
    assert not problems, "layerfs differs from kernel overlayfs:\n" + "\n".join(problems)


# --- the OCI `.wh.` spelling, which the kernel does not read in directory layers ---------------


def test_oci_whiteout_spelling_in_lower_layers() -> None:
    with scratch_dir() as base:
        s = build_stack(WH_STACK, base)
        with overlay_mount(IMPL, s.lowers, base / "mnt", s.upper, s.work) as m:
            state = tree_state(m)
            got = {(p, n.kind) for p, n in state.nodes.items()}
            assert got == WH_EXPECTED
            root = os.fsencode(m)
            assert apply(Op("read", (b"same", 0, 100)), root).value == b"same layer wins\n"
            # A name hidden by a `.wh.` file behaves as absent, and can be created anew.
            assert apply(Op("lstat", (b"f1",)), root).err == "ENOENT"
            assert apply(Op("rmdir", (b"d1",)), root).err == "ENOENT"
            assert apply(Op("create", (b"f1", 0o644, True, False)), root).err is None
            assert apply(Op("read", (b"f1", 0, 100)), root).value == b""
            assert apply(Op("mkdir", (b"d1", 0o755)), root).err is None
            assert apply(Op("listdir", (b"d1",)), root).value == []
            assert apply(Op("listdir", (b"o",)), root).value == [b"new"]
            assert apply(Op("rmdir", (b"keep",)), root).err == "ENOTEMPTY"
        # No marker leaks into the upper as a visible name, and the lowers are untouched.
        assert not any(b".wh." in p for p in os.listdir(os.fsencode(s.upper)))
