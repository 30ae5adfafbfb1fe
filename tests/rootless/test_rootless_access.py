"""Who gets into a mount: `-o allow_root`, `-o allow_other` and neither, for `overlay` and
`mount`, tried by the real unprivileged user. allow_root is enforced by our request loop
(as libfuse enforces it): the kernel lets everyone in, the daemon answers EACCES to anyone
but the mounting user and root."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore.ocibuild import Img, d, f, layer_tar, write_oci
from tests.image_fixtures import layerfs_ok
from tests.mount.test_image_mount import image_mount
from tests.mounting import force_unmount, is_mounted, overlay_mount
from tests.rootless.conftest import Rootless

pytestmark = pytest.mark.mount

NOBODY = 65534
# What a visitor tries, each answered with "ok", what it read, or the errno's name.
PROBE = r"""
import errno, json, os, sys
m = sys.argv[1]
def attempt(fn):
    try:
        out = fn()
        return out if isinstance(out, (str, list)) else "ok"
    except OSError as exc:
        return errno.errorcode[exc.errno]
def create():
    os.close(os.open(os.path.join(m, "by-visitor"), os.O_CREAT | os.O_WRONLY, 0o644))
print(json.dumps({
    "stat": attempt(lambda: os.stat(os.path.join(m, "public"))),
    "read": attempt(lambda: open(os.path.join(m, "public")).read()),
    "list": attempt(lambda: sorted(os.listdir(os.path.join(m, "dir")))),
    "create": attempt(create),
}))
"""
REFUSED = {"stat": "EACCES", "read": "EACCES", "list": "EACCES", "create": "EACCES"}
# Let in as the modes allow: a 0644 file read, a root-owned directory not written.
AS_MODES_ALLOW = {"stat": "ok", "read": "public\n", "list": ["inner"], "create": "EACCES"}
WELCOME = {"stat": "ok", "read": "public\n", "list": ["inner"], "create": "ok"}


def _probe(argv_prefix: list[str], python: str, mnt: Path) -> dict[str, object]:
    proc = subprocess.run(
        [*argv_prefix, python, "-c", PROBE, str(mnt)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def as_user(rootless: Rootless, home: Path, mnt: Path) -> dict[str, object]:
    return _probe(rootless.argv([], home), rootless.python, mnt)


def as_root(mnt: Path) -> dict[str, object]:
    return _probe([], sys.executable, mnt)


@pytest.fixture
def shared_dir(rootless: Rootless) -> Iterator[Path]:
    """A root-owned 0755 directory below the rootless scratch area (reachable by the user)."""
    base = Path(tempfile.mkdtemp(prefix="access-", dir=rootless.scratch))
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        for mnt in base.glob("*/mnt"):
            force_unmount(mnt)
        shutil.rmtree(base, ignore_errors=True)


def _lower(base: Path) -> Path:
    lower = base / "lower"
    (lower / "dir" / "inner").mkdir(parents=True)
    (lower / "public").write_text("public\n")
    for p in (lower, lower / "dir", lower / "dir" / "inner"):
        os.chmod(p, 0o755)
    os.chmod(lower / "public", 0o644)
    return lower


@pytest.mark.parametrize(
    ("opts", "visitor"),
    [(("allow_root",), REFUSED), (("allow_other",), AS_MODES_ALLOW), ((), AS_MODES_ALLOW)],
    ids=["allow_root", "allow_other", "neither"],
)
def test_overlay_by_root(
    rootless: Rootless, home: Path, shared_dir: Path, opts: tuple[str, ...], visitor: object
) -> None:
    """Root's mount: allow_root keeps the user out of everything (asked first, so nothing
    of it is in the kernel's caches); allow_other and neither (root's default) let it in as
    the modes allow. Root itself is served either way."""
    lower = _lower(shared_dir)
    upper, work, mnt = (shared_dir / "o" / n for n in ("upper", "work", "mnt"))
    for p in (upper, work, mnt):
        p.mkdir(parents=True)
    os.chmod(shared_dir / "o", 0o755)
    with overlay_mount("layerfs", [lower], mnt, upper, work, opts=opts):
        assert as_user(rootless, home, mnt) == visitor
        root_view = as_root(mnt)
    assert root_view["read"] == "public\n" and root_view["create"] == "ok"


@pytest.mark.parametrize(
    ("opts", "visitor"),
    [(("allow_root",), REFUSED), (("allow_other",), AS_MODES_ALLOW), ((), AS_MODES_ALLOW)],
    ids=["allow_root", "allow_other", "neither"],
)
def test_image_mount_by_root(
    rootless: Rootless,
    home: Path,
    shared_dir: Path,
    tmp_path: Path,
    opts: tuple[str, ...],
    visitor: object,
) -> None:
    layer = layer_tar([d("."), d("dir"), d("dir/inner"), f("public", b"public\n", mode=0o644)])
    write_oci(tmp_path / "img", Img([layer], ref="v1"))
    store = tmp_path / "store"
    layerfs_ok(store, "import", f"oci:{tmp_path / 'img'}:v1", "--tag", "acc:1")
    mnt = shared_dir / "i" / "mnt"
    mnt.mkdir(parents=True)
    os.chmod(mnt.parent, 0o755)
    extra = ("-o", ",".join(opts)) if opts else ()
    with image_mount(store, "acc:1", mnt, *extra):
        assert as_user(rootless, home, mnt) == visitor
        root_view = as_root(mnt)
    assert root_view["read"] == "public\n" and root_view["create"] == "ok"


# Run by root in a private mount namespace, where /etc/fuse.conf allows user_allow_other
# (the host's file is left alone): the user's daemon mounts, then each visitor (argv prefix)
# runs PROBE. Prints one JSON object {visitor: PROBE's result}.
OWNER_SCRIPT = r"""
import json, subprocess, sys, time
from layerstore.mountinfo import is_mount_point
conf, daemon_argv, visitors, python, mnt, probe = sys.argv[1:7]
subprocess.run(["mount", "--bind", conf, "/etc/fuse.conf"], check=True)
daemon = subprocess.Popen(json.loads(daemon_argv), stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
deadline = time.monotonic() + 30
while not is_mount_point(mnt):
    if daemon.poll() is not None or time.monotonic() > deadline:
        daemon.kill()
        sys.exit("not mounted: " + daemon.stderr.read().decode(errors="replace"))
    time.sleep(0.02)
out = {}
try:
    for who, argv in json.loads(visitors).items():
        p = subprocess.run([*argv, python, "-c", probe, mnt], capture_output=True, text=True)
        out[who] = json.loads(p.stdout) if p.returncode == 0 else p.stderr
finally:
    subprocess.run(["umount", "-l", mnt])
    daemon.wait(timeout=30)
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    ("opts", "expected"),
    [
        ("allow_root", {"owner": WELCOME, "root": WELCOME, "nobody": REFUSED}),
        ("allow_other", {"owner": WELCOME, "root": WELCOME, "nobody": AS_MODES_ALLOW}),
    ],
)
def test_overlay_by_the_user(
    rootless: Rootless,
    home: Path,
    shared_dir: Path,
    tmp_path: Path,
    opts: str,
    expected: dict[str, object],
) -> None:
    """The user's own mount: with allow_root the user (its owner) and root are served and
    anyone else is refused by the daemon; with allow_other everyone gets in as the modes
    allow. (Without either the kernel keeps even root out: see test_rootless_env.)"""
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is absent")
    base = shared_dir / "u"
    base.mkdir()
    os.chmod(base, 0o755)
    lower = _lower(base)
    upper, work, mnt = (base / n for n in ("upper", "work", "mnt"))
    for p in (upper, work, mnt):
        p.mkdir()
        os.chown(p, rootless.uid, rootless.gid)
    conf = tmp_path / "fuse.conf"
    conf.write_text("user_allow_other\n")
    optstr = f"lowerdir={lower},upperdir={upper},workdir={work},{opts}"
    daemon = rootless.argv(["layerfs", "overlay", "-f", "-o", optstr, str(mnt)], home)
    visitors = {
        "owner": rootless.argv([], home),
        "nobody": ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"],
        "root": [],
    }
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", OWNER_SCRIPT,
         str(conf), json.dumps(daemon), json.dumps(visitors), rootless.python, str(mnt),
         PROBE],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected
    assert not is_mounted(mnt)  # it lived in the private namespace only


def test_allow_root_via_the_cli_for_a_user_without_user_allow_other(
    rootless: Rootless, home: Path
) -> None:
    """Without user_allow_other in /etc/fuse.conf an ordinary user's allow_root is refused
    before anything is mounted, in one line (fusermount3 would refuse it too)."""
    lower, mnt = home / "lower", home / "mnt"
    rootless.sh(f"mkdir {lower} {mnt}", home)
    with open("/etc/fuse.conf") as f:
        if any(line.strip() == "user_allow_other" for line in f):
            pytest.skip("this host's /etc/fuse.conf allows user_allow_other")
    out = rootless.run_as_user(
        ["layerfs", "overlay", "-o", f"lowerdir={lower},allow_root", str(mnt)], home, check=False
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "layerfs: -o allow_root needs 'user_allow_other' in /etc/fuse.conf when not run as root"
    ]
    assert not is_mounted(mnt)
