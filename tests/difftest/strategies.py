"""Hypothesis strategies: operation sequences whose paths hit lower, upper and merged objects.

Paths come from a pool: names visible in the fixture's merged view (lower-only, upper-only and
merged directories, hard links, devices, symlinks), names hidden by whiteouts and opaque dirs,
paths through a symlinked directory, and new names. Simple, common paths come first in each
list, so shrinking moves towards them. Explicit times are all before 2010 (see
fixtures.NOW_THRESHOLD_NS).
"""

from __future__ import annotations

import os

from hypothesis import strategies as st

from tests.difftest.fixtures import MAIN_HIDDEN, MAIN_VISIBLE, E, StackSpec
from tests.difftest.ops import RENAME_EXCHANGE, RENAME_NOREPLACE, Op

NEW_NAMES: tuple[bytes, ...] = (
    b"new1",
    b"new2",
    b"newdir",
    b"newdir/n",
    b"data/new",
    b"data/sub/new",
    b"opq/new2",
    b"moved/new",
    b"l2only/x",
    b"dirlink/top",
    b"dirlink/new",
    b"newdir/sub",
    b"newdir/sub/f",
    b"data/" + b"n" * 255,  # the longest name
    b"n" * 256,  # one byte too long: ENAMETOOLONG
)

# Most interesting first: merged dirs and lower files before odd corners.
_FIRST = (
    b"data",
    b"data/a",
    b"upfile",
    b"data/sub",
    b"data/hl1",
    b"data/hl2",
    b"etc/hl3",
    b"etc/hosts",
    b"moved",
    b"opq",
    b"big",
)
PATHS: tuple[bytes, ...] = tuple(
    dict.fromkeys(
        _FIRST + NEW_NAMES + tuple(sorted(MAIN_VISIBLE - {b"."})) + tuple(sorted(MAIN_HIDDEN))
    )
)
DIR_PATHS: tuple[bytes, ...] = (
    b"newdir",
    b"data/sub",
    b"data",
    b"moved",
    b"opq",
    b"l2only",
    b"data/sub/deep",
    b"kindswap",
    b"mid",
    b"sgid",
    b"gonedir",
    b"newdir/sub",
    b"opqu",
    b"etc",
)

T1 = 1_100_000_000 * 10**9 + 123_456_789
T2 = 1_200_000_000 * 10**9
FILE_MODES = (0o644, 0o600, 0o755, 0o4755, 0o2755, 0o000, 0o1777, 0o7777)
DIR_MODES = (0o755, 0o700, 0o2775, 0o1777, 0o500)
XATTR_NAMES = (
    b"user.color",
    b"user.new",
    b"trusted.mine",
    b"trusted.new",
    b"user.dir",
)
# Markers the kernel keeps in layers and never shows on the mount (queried, never set: setting
# trusted.overlay.* on a mount is kernel-version specific, escaped since Linux 6.7).
OVERLAY_XATTRS = (b"trusted.overlay.opaque", b"trusted.overlay.redirect", b"trusted.overlay.origin")
XATTR_VALUES = (b"v", b"", b"x" * 300)
SYMLINK_TARGETS = (b"data/a", b"nowhere", b"etc", b"upfile", b"moved/k")

follow = st.booleans()
slots = st.sampled_from((0, 1))
FD_OPS = frozenset({"open", "fdread", "fdwrite", "fdstat", "fdtruncate", "fdsync", "close"})
times = st.sampled_from((T1, "now", "omit", T2))


def _op(name: str, *args: st.SearchStrategy[object]) -> st.SearchStrategy[Op]:
    return st.tuples(*args).map(lambda t: Op(name, tuple(t)))


def ops(
    path_pool: tuple[bytes, ...] = PATHS, dir_pool: tuple[bytes, ...] = DIR_PATHS
) -> st.SearchStrategy[Op]:
    """One operation on paths of `path_pool` (files and anything) and `dir_pool` (dirs)."""
    j = st.just
    paths = st.sampled_from(path_pool)
    dir_paths = st.sampled_from(dir_pool)
    any_path = st.one_of(paths, dir_paths)
    return st.one_of(
        _op(
            "write",
            paths,
            st.sampled_from((0, 3, 4096, 65530, 200_000)),
            st.sampled_from((10, 1, 0, 5000, 70_000)),
            st.integers(0, 3),
            st.booleans(),
        ),
        _op("create", paths, st.sampled_from(FILE_MODES), st.booleans(), st.booleans()),
        _op("rename", any_path, any_path, st.sampled_from((0, RENAME_NOREPLACE, RENAME_EXCHANGE))),
        _op("truncate", paths, st.sampled_from((0, 1, 7, 100_000, 300_000))),
        _op("chmod", any_path, st.sampled_from(FILE_MODES + DIR_MODES)),
        _op(
            "chown",
            any_path,
            st.sampled_from((1000, -1, 0, 1234, 65534)),
            st.sampled_from((100, -1, 0, 5678)),
            follow,
        ),
        _op("utimens", any_path, times, times, follow),
        _op("unlink", paths),
        _op("rmdir", any_path),
        _op("mkdir", any_path, st.sampled_from(DIR_MODES)),
        _op("symlink", st.sampled_from(SYMLINK_TARGETS), paths),
        _op("link", paths, paths),
        _op(
            "mknod",
            paths,
            st.sampled_from(("fifo", "char", "sock")),
            st.sampled_from((0o644, 0o600)),
            st.sampled_from(((1, 3), (1, 5))),
        ),
        _op(
            "setxattr",
            any_path,
            st.sampled_from(XATTR_NAMES),
            st.sampled_from(XATTR_VALUES),
            st.sampled_from((0, os.XATTR_CREATE, os.XATTR_REPLACE)),
            follow,
        ),
        _op("removexattr", any_path, st.sampled_from(XATTR_NAMES), follow),
        _op("append", paths, st.sampled_from((5, 70_000)), st.integers(0, 3)),
        _op("read", paths, st.sampled_from((0, 5, 65536)), st.sampled_from((1 << 20, 100))),
        _op("open", paths, slots, st.sampled_from(("r", "rw", "w", "trunc"))),
        _op("fdread", slots, st.sampled_from((0, 5, 65536)), st.sampled_from((100, 1 << 20))),
        _op(
            "fdwrite",
            slots,
            st.sampled_from((0, 3, 70_000)),
            st.sampled_from((10, 5000)),
            st.integers(0, 3),
        ),
        _op("fdstat", slots),
        _op("fdtruncate", slots, st.sampled_from((0, 3, 100_000))),
        _op("close", slots),
        _op("access", any_path, st.sampled_from((os.F_OK, os.R_OK, os.W_OK, os.X_OK, 7))),
        _op("mmapwrite", paths, st.integers(0, 3)),
        _op("mmapread", paths, st.just(0)),
        _op("statfs", any_path),
        _op("listdir", dir_paths),
        _op("lstat", any_path),
        _op("getxattr", any_path, st.sampled_from(XATTR_NAMES + OVERLAY_XATTRS)),
        _op("listxattr", any_path),
        _op("readlink", paths),
        j(Op("listdir", (b".",))),
    )


USERS = ((1000, 100), (65534, 65534), (1234, 5678))


def user_ops(
    path_pool: tuple[bytes, ...] = PATHS, dir_pool: tuple[bytes, ...] = DIR_PATHS
) -> st.SearchStrategy[Op]:
    """A path operation run by an unprivileged user (the fixture has files owned by these)."""
    path_ops = ops(path_pool, dir_pool).filter(lambda op: op.name not in FD_OPS)
    return st.tuples(st.sampled_from(USERS), path_ops).map(
        lambda t: Op("as", (t[0][0], t[0][1], t[1]))
    )


def op_sequences(
    max_size: int, path_pool: tuple[bytes, ...] = PATHS, dir_pool: tuple[bytes, ...] = DIR_PATHS
) -> st.SearchStrategy[list[Op]]:
    """Sequences of ops, about one in three run as an unprivileged user."""
    one = ops(path_pool, dir_pool)
    return st.lists(
        st.one_of(one, one, user_ops(path_pool, dir_pool)), min_size=1, max_size=max_size
    )


# --- random layer stacks ----------------------------------------------------------------------

TOP_NAMES = (b"a", b"b", b"c", b"d")
CHILD_NAMES = (b"x", b"y")
TOP_KINDS = ("file", "dir", "opaque", "whiteout", "symlink")
CHILD_KINDS = ("file", "dir", "whiteout")


@st.composite
def layer_entries(draw: st.DrawFn, layer: int) -> tuple[E, ...]:
    """A small layer over names a-d with children x, y (and x/z): files, dirs, opaque dirs,
    char 0/0 whiteouts, symlinks; each file's content names its layer."""
    out: list[E] = []
    tag = b"L%d:" % layer
    for top in TOP_NAMES:
        kind = draw(st.sampled_from((None,) + TOP_KINDS))
        if kind is None:
            continue
        if kind == "file":
            out.append(E(top, "file", data=tag + top, mode=draw(st.sampled_from((0o644, 0o600)))))
        elif kind == "symlink":
            out.append(E(top, "symlink", target=draw(st.sampled_from(TOP_NAMES + (b"a/x",)))))
        elif kind == "whiteout":
            out.append(E(top, "whiteout"))
        else:
            out.append(E(top, "dir", uid=layer, opaque=kind == "opaque"))
            for child in CHILD_NAMES:
                ck = draw(st.sampled_from((None,) + CHILD_KINDS))
                if ck is None:
                    continue
                path = top + b"/" + child
                if ck == "dir":
                    out.append(E(path, "dir"))
                    if draw(st.booleans()):
                        out.append(E(path + b"/z", "file", data=tag + path + b"/z"))
                elif ck == "file":
                    out.append(E(path, "file", data=tag + path))
                else:
                    out.append(E(path, "whiteout"))
    return tuple(out)


@st.composite
def random_stacks(draw: st.DrawFn) -> StackSpec:
    """Two or three lowers and an upper, drawn independently: every combination of kinds
    across layers (dir over file, whiteout over dir, opaque over merged dir, ...)."""
    n = draw(st.integers(2, 3))
    layers = [draw(layer_entries(9))] + [draw(layer_entries(i)) for i in range(n)]
    # A whiteout inside a directory that is not merged with a lower one is never written by
    # the kernel, and its readdir would show it (passthrough). Keep whiteouts below the root
    # only in a non-opaque dir whose next layer down has the same dir.
    kept: list[tuple[E, ...]] = []
    for i, entries in enumerate(layers):
        below = layers[i + 1] if i + 1 < len(layers) else ()
        below_dirs = {e.path for e in below if e.kind == "dir"}
        here_dirs = {e.path for e in entries if e.kind == "dir" and not e.opaque}

        def ok(e: E, here: set[bytes] = here_dirs, low: set[bytes] = below_dirs) -> bool:
            parent = e.path.rpartition(b"/")[0]
            return e.kind != "whiteout" or not parent or (parent in here and parent in low)

        kept.append(tuple(e for e in entries if ok(e)))
    return StackSpec("random", tuple(kept[1:]), kept[0])


RANDOM_PATHS: tuple[bytes, ...] = (
    TOP_NAMES
    + tuple(t + b"/" + c for t in TOP_NAMES for c in CHILD_NAMES)
    + tuple(t + b"/" + c + b"/z" for t in TOP_NAMES for c in CHILD_NAMES)
    + (b"e", b"a/new")
)
RANDOM_DIRS: tuple[bytes, ...] = TOP_NAMES + (b"e", b"a/x", b"b/y")
