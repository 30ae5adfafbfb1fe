"""Differential: random operations on the union core (no mount), once by root over a native
upper and once by a real unprivileged user over a rootless upper. The user's daemon cannot
chown, make devices or set trusted.* xattrs, so it keeps them as override metadata and
stand-ins; what the two cores show must be the same, operation results included."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.rootless.conftest import Rootless, rootless  # noqa: F401 - fixture

RUNNER = Path(__file__).with_name("rootless_engine_runner.py")
REPO = Path(__file__).resolve().parents[2]

PATHS = ["etc/passwd", "etc/group", "etc", "dev/null", "dev/fifo", "link", "ro", "ro/old",
         "n1", "n2", "etc/n3", "ro/n4", "d1", "d1/n5", "dev/n6"]  # fmt: skip
MODES = [0o644, 0o600, 0o4755, 0o2750, 0o000, 0o1777, 0o555]
SPECIAL = [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK]


def _lower(root: Path, uid: int, gid: int) -> None:
    """Made by root, readable by everyone: owners the user cannot have, devices, a fifo."""
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_bytes(b"root:x:0:0\n")
    os.setxattr(root / "etc" / "passwd", b"user.note", b"lower")
    (root / "etc" / "group").write_bytes(b"root:x:0:\n")
    os.chown(root / "etc" / "group", 0, 42)
    (root / "dev").mkdir()
    os.mknod(root / "dev" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(root / "dev" / "fifo", 0o620)
    os.chmod(root / "dev" / "fifo", 0o620)
    os.symlink("etc/passwd", root / "link")
    os.lchown(root / "link", 5, 6)
    (root / "ro").mkdir()
    (root / "ro" / "old").write_bytes(b"old\n")
    os.chown(root / "ro" / "old", 1000, 1000)
    os.chmod(root / "ro", 0o555)
    (root / "mine").write_bytes(b"the user's\n")
    os.chown(root / "mine", uid, gid)


def ops_strategy(uid: int, gid: int) -> st.SearchStrategy[list[list[Any]]]:
    path = st.sampled_from(PATHS)
    uids = st.sampled_from([0, uid, 1000])
    gids = st.sampled_from([0, gid, 42])
    mode = st.sampled_from(MODES)
    rdev = st.sampled_from([os.makedev(1, 3), os.makedev(8, 1)])
    xattr_names = st.sampled_from(["user.a", "trusted.b"])
    op = st.one_of(
        st.tuples(st.just("create"), path, mode, uids, gids),
        st.tuples(st.just("mkdir"), path, mode, uids, gids),
        st.builds(
            lambda p, f, m, r, u, g: ("mknod", p, f | m, r, u, g),
            path,
            st.sampled_from(SPECIAL),
            mode,
            rdev,
            uids,
            gids,
        ),  # fmt: skip
        st.tuples(st.just("symlink"), path, st.sampled_from(["etc/passwd", "nowhere"]), uids, gids),
        st.tuples(st.just("chown"), path, st.none() | uids, st.none() | gids),
        st.tuples(st.just("chmod"), path, mode),
        st.tuples(st.just("write"), path, st.sampled_from(["a", "bb\n"])),
        st.tuples(st.just("setxattr"), path, xattr_names, st.just("v")),
        st.tuples(st.sampled_from(["unlink", "rmdir"]), path),
        st.tuples(st.sampled_from(["rename", "link"]), path, path),
    )
    return st.lists(op.map(list), min_size=1, max_size=12)


def _run(argv: list[str], ops: list[list[Any]], env: dict[str, str] | None) -> dict[str, Any]:
    proc = subprocess.run(
        argv, input=json.dumps(ops), capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def test_rootless_core_shows_what_a_root_core_shows(rootless: Rootless) -> None:  # noqa: F811
    rl = rootless
    home = rl.new_home("core-diff")
    runner = rl.share(RUNNER)
    lower = home / "lower"
    _lower(lower, rl.uid, rl.gid)
    for dirpath, _, _ in os.walk(lower):
        if not dirpath.endswith("/ro"):
            os.chmod(dirpath, 0o755)
    counter = iter(range(1 << 30))

    @settings(deadline=None, max_examples=12)
    @given(ops_strategy(rl.uid, rl.gid))
    @example([["chmod", "etc/passwd", 0o4755], ["chown", "etc/passwd", None, 0]])  # kills suid
    def check(ops: list[list[Any]]) -> None:
        case = home / f"case{next(counter)}"
        dirs = {}
        for side in ("native", "rootless"):
            for d in ("upper", "work"):
                p = case / side / d
                p.mkdir(parents=True)
                os.chown(p, rl.uid, rl.gid)  # both merged roots show the user's upper dir
                os.chown(p.parent, rl.uid, rl.gid)
                dirs[side, d] = p
        os.chown(case, rl.uid, rl.gid)
        native = _run(
            [sys.executable, str(RUNNER), str(lower), str(dirs["native", "upper"]),
             str(dirs["native", "work"]), "1"],
            ops,
            {**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        user = _run(
            rl.argv(
                [rl.python, str(runner), str(lower), str(dirs["rootless", "upper"]),
                 str(dirs["rootless", "work"]), "0"],
                home,
            ),
            ops,
            None,
        )  # fmt: skip
        assert user["results"] == native["results"], ops
        assert user["tree"] == native["tree"], ops
        shutil.rmtree(case)

    check()
