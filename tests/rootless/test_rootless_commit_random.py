"""Random changes (chown included) through a rootless `layerfs mount`, made by the user as root
of its user namespace, committed by the user: root's unpack of the committed image equals the
changed mount as the namespace saw it. The image has files of several owners, a fifo and a
device, so copy-ups of objects the user does not own and stand-ins are exercised."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerstore import ocibuild as ob
from tests.mounting import LAYERFS
from tests.rootless.conftest import Rootless, load_snapshot
from tests.treecmp import Node, compare, snapshot

pytestmark = pytest.mark.mount

IMAGE = "rand/rootless:1"
PATHS = ("etc", "etc/passwd", "etc/shadow", "www", "www/index", "home", "home/a", "dev/null",
         "dev/fifo", "sym", "hl1", "hl2", "new", "etc/new", "www/new", "newdir",
         "newdir/n")  # fmt: skip
IDS = (0, 33, 1000, 4242)
Op = tuple[str, str, str, int]
OPS = st.tuples(
    st.sampled_from(
        [
            "write",
            "rm",
            "mkdir",
            "rename",
            "chmod",
            "link",
            "symlink",
            "chown",
            "mkfifo",
            "setxattr",
        ]
    ),  # fmt: skip
    st.sampled_from(PATHS),
    st.sampled_from(PATHS),
    st.sampled_from(IDS),
)

# Applies the ops (JSON in argv[2]) below argv[1], ignoring each op's errors (ENOENT, EEXIST
# and the like are part of the game), then writes the snapshot of the tree to stdout.
APPLY = r"""
import json, os, pickle, shutil, sys, treecmp
root = sys.argv[1]
for kind, a, b, n in json.loads(sys.argv[2]):
    pa, pb = os.path.join(root, a), os.path.join(root, b)
    try:
        if kind == "write":  # O_NONBLOCK: a fifo with no reader is ENXIO, not a hang
            fd = os.open(pa, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK, 0o644)
            try:
                os.write(fd, b"+" + a.encode())
            finally:
                os.close(fd)
        elif kind == "rm":
            if os.path.isdir(pa) and not os.path.islink(pa):
                shutil.rmtree(pa)
            else:
                os.unlink(pa)
        elif kind == "mkdir":
            os.mkdir(pa, 0o750)
        elif kind == "rename":
            os.rename(pa, pb)
        elif kind == "chmod":
            if not os.path.islink(pa):  # Linux cannot chmod a symlink itself
                os.chmod(pa, 0o4750 if n else 0o600)
        elif kind == "link":
            os.link(pa, pb, follow_symlinks=False)
        elif kind == "symlink":
            os.symlink(b, pa)
        elif kind == "chown":
            os.chown(pa, n, n if n != 1000 else 5, follow_symlinks=False)
        elif kind == "mkfifo":
            os.mkfifo(pa, 0o640)
        else:
            os.setxattr(pa, b"user.n", str(n).encode(), follow_symlinks=False)
    except OSError:
        pass
sys.stdout.buffer.write(pickle.dumps(treecmp.snapshot(root)))
"""

SCRIPT = r"""
set -eu
M=$HOME/mnt
mkdir -p "$M"
"$PY" -m unionfs mount -f {image} "$M" --name {name} 2>"$HOME/daemon-{name}.log" &
pid=$!
trap 'fusermount3 -u "$M" 2>/dev/null || true; wait $pid || true' EXIT
i=0
until grep -q " $M " /proc/self/mountinfo; do  # bounded poll for the mount
  i=$((i + 1)); [ $i -le 1500 ] && kill -0 $pid || {{ cat "$HOME/daemon-{name}.log"; exit 3; }}
  sleep 0.02
done
"$PY" -c "$APPLY" "$M" "$OPS" > "$HOME/{name}.snapshot"
fusermount3 -u "$M"
trap - EXIT
wait $pid
cat "$HOME/daemon-{name}.log" >&2
"$PY" -m unionfs commit {name} {name}-committed:1 --allow-empty
"""
# In the namespace: the upper holds files of its subordinate ids, which only it can remove.
RM_SCRIPT = '"$PY" -m unionfs rm {name}'


@pytest.fixture(scope="module")
def user_store(
    rootless: Rootless, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    """(the user's home, its store) holding IMAGE, imported by the user."""
    src = tmp_path_factory.mktemp("rootless-random") / "src"
    layer = [
        ob.d("etc"), ob.f("etc/passwd", b"root\n"), ob.f("etc/shadow", b"s\n", mode=0o640, gid=42),
        ob.d("www", uid=33, gid=33), ob.f("www/index", b"hi\n", uid=33, gid=33),
        ob.d("home"), ob.d("home/a", mode=0o700, uid=1000, gid=1000),
        ob.d("dev"), ob.M("dev/null", b"3", mode=0o666, devmajor=1, devminor=3),
        ob.M("dev/fifo", b"6", mode=0o620, uid=33), ob.sym("sym", "etc/passwd"),
        ob.f("hl1", b"hl\n", uid=1000), ob.hard("hl2", "hl1", uid=1000),
    ]  # fmt: skip
    ob.write_oci(src, ob.Img([ob.layer_tar(layer)], ref="v1"))
    home = rootless.new_home("random")
    shared = rootless.share(src)
    rootless.run_as_user(["layerfs", "import", "-q", f"oci:{shared}:v1", "--tag", IMAGE], home)
    yield home, home / ".local" / "share" / "layerfs"


_n = itertools.count()


@settings(deadline=None, max_examples=8)
@given(ops=st.lists(OPS, min_size=1, max_size=8))
def test_rootless_changes_committed_unpack_to_the_mount(
    rootless: Rootless, user_store: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory,
    ops: list[Op],
) -> None:  # fmt: skip
    home, store = user_store
    name = f"r{next(_n)}"
    script = SCRIPT.format(image=IMAGE, name=name)
    env_script = f"export APPLY={_sh_quote(APPLY)} OPS={_sh_quote(json.dumps(ops))}\n" + script
    proc = rootless.run_in_userns(env_script, home)
    assert proc.returncode == 0, (ops, proc.stdout + proc.stderr)
    assert "Traceback" not in proc.stderr, (ops, proc.stderr)
    seen = load_snapshot((home / f"{name}.snapshot").read_bytes())
    out = tmp_path_factory.mktemp("unpacked") / name
    unpack = subprocess.run(
        [*LAYERFS, "unpack", "--store", str(store), f"{name}-committed:1", str(out)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert unpack.returncode == 0, unpack.stderr
    upper = store / "containers" / name / "upper"
    diffs = [d for d in compare(seen, snapshot(out)) if not _unkeepable_nlink(d, upper, seen)]
    assert diffs == [], ops
    gone = rootless.run_in_userns(RM_SCRIPT.format(name=name), home)
    assert gone.returncode == 0 and not (store / "containers" / name).exists(), gone.stderr


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _unkeepable_nlink(diff: str, upper: Path, seen: dict[bytes, Node]) -> bool:
    """A link count that cannot agree: (as in tests/mount/test_commit_random.py) a lower hard
    link broken by a copy-up keeps the lower inode's count for the names not copied up, which
    the committed image holds as lone files; and the store keeps a hard link to anything but
    a regular file (symlink, device, fifo) as a copy (layerstore/ingest.py)."""
    path, sep, _ = diff.partition(": nlink ")
    if not sep:
        return False
    node = seen.get(os.fsencode(path))
    return not os.path.lexists(upper / path) or (node is not None and node.kind != "file")
