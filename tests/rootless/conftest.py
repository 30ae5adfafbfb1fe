"""Fixtures that run layerfs as a real unprivileged user: the user, a runtime it can execute,
a home per test, `run_as_user` and a mount context manager that always cleans up.

Why a runtime copy: the venv's python is a symlink into /root/.pyenv (mode 0700) and the
repository may live under /root, so the user can execute neither. The session copies
unionfs/, layerstore/ and the venv's runtime site-packages into a 0755 directory under
/var/tmp and runs them with Debian's python of the same version (same ABI for the compiled
modules: xxhash, zstandard).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
import typing
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from layerstore import mountinfo
from tests import treecmp
from tests.conftest import require_root, require_tool
from tests.mounting import MOUNT_TIMEOUT, force_unmount, is_mounted, reap, wait_mounted

USER = "layerfs-test"
REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("unionfs", "layerstore")
# Dev-only distributions left out of the runtime copy (big, and never imported by layerfs).
DEV_ONLY = (
    "mypy", "mypyc", "pip", "setuptools", "pkg_resources", "_distutils_hack", "pygments",
    "hypothesis", "_hypothesis", "ruff", "_pytest", "pytest", "py.py", "pluggy", "iniconfig",
    "__editable__", "distutils-precedence", "librt", "ast_serialize", "pathspec", "py_spy",
)  # fmt: skip
# Plain PATH for the user: no /root or venv directories.
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def _dev_only(name: str) -> bool:
    low = name.lower()
    return "mypyc" in low or low.startswith(DEV_ONLY) or low == "__pycache__"


def _user_python() -> str | None:
    """A python the user can execute with the venv's ABI: Debian's of the same version."""
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for cand in (f"/usr/bin/{want}", f"/usr/local/bin/{want}"):
        if os.path.isfile(cand) and os.stat(cand).st_mode & stat.S_IXOTH:
            return cand
    return None


def _ensure_user() -> pwd.struct_passwd:
    """The unprivileged test user, created once (kept afterwards: idempotent, no home)."""
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    useradd = require_tool("useradd")
    proc = subprocess.run(
        [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
         "--user-group", USER],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode not in (0, 9):  # 9: exists (a concurrent run made it)
        pytest.fail(f"useradd {USER} failed: {proc.stderr.strip()}")
    return pwd.getpwnam(USER)


def _fuse_for_everyone() -> None:
    """Make /dev/fuse 0666 as Debian's udev rule does (containers without udev have 0600):
    an unprivileged user's fusermount3 opens it before it becomes root-less."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is absent (no FUSE in this kernel or container)")
    mode = stat.S_IMODE(os.stat("/dev/fuse").st_mode)
    if mode & 0o666 != 0o666:
        os.chmod("/dev/fuse", mode | 0o666)


def _copy_runtime(dest: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    # treecmp (stdlib only) lets the user snapshot its own mount: root cannot read a FUSE
    # mount made without allow_other.
    shutil.copy2(Path(treecmp.__file__), dest / "treecmp.py")
    site = Path(sysconfig.get_paths()["purelib"])
    out = dest / "site-packages"
    out.mkdir()
    for item in site.iterdir():
        if _dev_only(item.name) or item.suffix == ".pth":
            continue
        if item.is_dir():
            shutil.copytree(item, out / item.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(item, out / item.name)
    for dirpath, _, filenames in os.walk(dest):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            p = os.path.join(dirpath, f)
            os.chmod(p, 0o755 if os.stat(p).st_mode & stat.S_IXUSR else 0o644)


SNAPSHOT_CODE = (
    "import pickle, sys, treecmp; "
    "sys.stdout.buffer.write(pickle.dumps(treecmp.snapshot(sys.argv[1], "
    "tuple(bytes.fromhex(h) for h in sys.argv[2:]))))"
)
SUBID_COUNT = 65536
_USERNS_OK: set[str] = set()  # users for whom `unshare --map-auto` worked this session


def load_snapshot(data: bytes) -> dict[bytes, treecmp.Node]:
    """A snapshot pickled by SNAPSHOT_CODE (only treecmp.Node objects are accepted)."""
    snap: dict[bytes, treecmp.Node] = _TreecmpUnpickler(io.BytesIO(data)).load()
    return snap


def _subid_ranges(path: str) -> list[tuple[str, int, int]]:
    out = []
    with contextlib.suppress(FileNotFoundError), open(path) as f:
        for line in f:
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out.append((parts[0], int(parts[1]), int(parts[2])))
    return out


def require_userns(user: str) -> None:
    """Give `user` subordinate uids/gids (once; a free range after every existing one) so that
    `unshare --map-auto` maps 65536 ids, as rootless container tools do; skip when
    newuidmap/newgidmap (Debian: uidmap) or usermod are absent."""
    for tool in ("newuidmap", "newgidmap", "unshare"):
        require_tool(tool)
    ranges = {f: _subid_ranges(f) for f in ("/etc/subuid", "/etc/subgid")}
    if all(any(r[0] == user for r in rs) for rs in ranges.values()):
        return
    usermod = require_tool("usermod")
    ends = [start + count for rs in ranges.values() for _, start, count in rs]
    start = max([100000, *ends])
    span = f"{start}-{start + SUBID_COUNT - 1}"
    proc = subprocess.run(
        [usermod, "--add-subuids", span, "--add-subgids", span, user],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"usermod --add-subuids {span} {user}: {proc.stderr.strip()}")


class _TreecmpUnpickler(pickle.Unpickler):
    """Loads the user's snapshot: its `treecmp.Node` is tests.treecmp.Node; nothing else."""

    def find_class(self, module: str, name: str) -> typing.Any:
        if module == "treecmp" and name == "Node":
            return treecmp.Node
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in a snapshot")


@dataclass(frozen=True)
class Rootless:
    """The unprivileged user and how to run things as it (see the module docstring)."""

    user: str
    uid: int
    gid: int
    python: str
    runtime: Path  # 0755, root-owned: the code the user runs
    scratch: Path  # 0755, root-owned: homes and shared inputs live below it

    @property
    def layerfs(self) -> list[str]:
        """argv prefix of `layerfs` for the user (== `python -m unionfs`)."""
        return [self.python, "-m", "unionfs"]

    def env(self, home: Path) -> dict[str, str]:
        return {
            "HOME": str(home),
            "USER": self.user,
            "LOGNAME": self.user,
            "PATH": USER_PATH,
            "LANG": "C.UTF-8",
            "XDG_DATA_HOME": str(home / ".local" / "share"),
            "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_RUNTIME_DIR": str(home / ".run"),
            "PYTHONPATH": f"{self.runtime}:{self.runtime / 'site-packages'}",
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def argv(self, args: Sequence[str], home: Path) -> list[str]:
        """`args` run as the user with a clean environment. `layerfs` as args[0] means the
        runtime's `python -m unionfs`. setpriv execs (the pid is the program's own)."""
        args = list(args)
        if args and args[0] == "layerfs":
            args = [*self.layerfs, *args[1:]]
        env = [f"{k}={v}" for k, v in self.env(home).items()]
        return [
            "setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
            "env", "-i", *env, *args,
        ]  # fmt: skip

    def new_home(self, name: str) -> Path:
        """A fresh home directory owned by the user (0700), with its XDG runtime dir."""
        home = Path(tempfile.mkdtemp(prefix=f"{name[:40]}-", dir=self.scratch))
        (home / ".run").mkdir()
        for p in (home, home / ".run"):
            os.chown(p, self.uid, self.gid)
            os.chmod(p, 0o700)
        return home

    def share(self, src: Path, name: str | None = None) -> Path:
        """A copy of `src` (file or tree, made by root) that the user can read, symlinks kept:
        pytest's tmp dirs are 0700 root."""
        dest = Path(tempfile.mkdtemp(prefix="shared-", dir=self.scratch)) / (name or src.name)
        if src.is_dir():
            shutil.copytree(src, dest, symlinks=True)
        else:
            shutil.copy2(src, dest)
        for dirpath, _, filenames in os.walk(dest.parent):
            os.chmod(dirpath, 0o755)
            for f in filenames:
                p = os.path.join(dirpath, f)
                if not os.path.islink(p):
                    os.chmod(p, os.stat(p).st_mode | 0o444)
        return dest

    def run_as_user(
        self,
        args: Sequence[str],
        home: Path,
        cwd: Path | None = None,
        check: bool = True,
        input: str | None = None,
        timeout: float = 120.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run `args` as the user (see argv); output captured as text; with check, a failure
        raises AssertionError quoting the command and its output."""
        proc = subprocess.run(
            self.argv(args, home),
            cwd=cwd or home,
            capture_output=True,
            text=True,
            errors="replace",
            input=input,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"as {self.user}: {' '.join(args)} exited {proc.returncode}:\n"
                f"{proc.stderr}{proc.stdout}"
            )
        return proc

    def snapshot(
        self,
        root: Path,
        home: Path,
        hidden: tuple[bytes, ...] = treecmp.DEFAULT_HIDDEN_XATTR_PREFIXES,
    ) -> dict[bytes, treecmp.Node]:
        """treecmp.snapshot of `root` taken by the user (e.g. its own FUSE mount)."""
        proc = subprocess.run(
            self.argv([*self.snapshot_argv(root, hidden)], home),
            capture_output=True,
            check=False,
            timeout=120,
        )
        if proc.returncode != 0:
            raise AssertionError(f"snapshot of {root} as {self.user}: {proc.stderr.decode()}")
        return load_snapshot(proc.stdout)

    def snapshot_argv(
        self, root: Path | str, hidden: tuple[bytes, ...] = treecmp.DEFAULT_HIDDEN_XATTR_PREFIXES
    ) -> list[str]:
        """A command (for the user's runtime) that writes the pickled treecmp.snapshot of
        `root` to stdout; read it back with load_snapshot."""
        return [self.python, "-c", SNAPSHOT_CODE, str(root), *(h.hex() for h in hidden)]

    def run_in_userns(
        self, script: str, home: Path, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """`sh -c script` as the user, as root of a new user namespace (with its subordinate
        ids, as rootless podman runs) and a new mount namespace. $PY is the runtime's python.
        Everything it starts is in its own session: killed at the end, should it linger."""
        require_userns(self.user)
        if self.user not in _USERNS_OK:
            probe = self.run_as_user(
                ["unshare", "--map-auto", "--map-root-user", "--mount", "true"], home, check=False
            )
            if probe.returncode != 0:
                pytest.skip(f"unprivileged user namespaces unavailable: {probe.stderr.strip()}")
            _USERNS_OK.add(self.user)
        argv = self.argv(
            ["env", f"PY={self.python}", "unshare", "--map-auto", "--map-root-user", "--mount",
             "/bin/sh", "-c", script],
            home,
        )  # fmt: skip
        proc = subprocess.Popen(
            argv,
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # our session only: what the script left
            proc.wait()
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def sh(self, script: str, home: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        """`sh -c script` as the user."""
        return self.run_as_user(["/bin/sh", "-c", script], home, check=check)

    @contextmanager
    def mounted(self, args: Sequence[str], mnt: Path, home: Path) -> Iterator[Path]:
        """Run a foreground mount command (`layerfs mount -f ...`, `layerfs overlay -f ...`)
        as the user and wait (bounded) until `mnt` is mounted. Always: `fusermount3 -u` as
        the user, then a forced unmount as root, then the daemon reaped (killed only if it
        does not exit). A traceback in the daemon's log fails the test."""
        log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below
        proc = subprocess.Popen(
            self.argv(args, home),
            cwd=home,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        daemon_log = b""
        try:
            wait_mounted(mnt, MOUNT_TIMEOUT, proc=proc, log=log)
            yield mnt
        finally:
            if is_mounted(mnt):
                self.run_as_user(["fusermount3", "-u", str(mnt)], home, check=False)
            force_unmount(mnt)
            if proc.poll() is None and not is_mounted(mnt):
                reap(proc)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            log.seek(0)
            daemon_log = log.read()
            log.close()
        if b"Traceback" in daemon_log:
            raise AssertionError(
                f"daemon (as {self.user}) logged an exception:\n"
                f"{daemon_log.decode(errors='replace')}"
            )


@pytest.fixture(scope="session")
def rootless() -> Iterator[Rootless]:
    """The unprivileged user, its runtime and a scratch area (removed at the end)."""
    require_root()
    require_tool("fusermount3")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is absent: cannot run as another user")
    python = _user_python()
    if python is None:
        pytest.skip(
            f"no python{sys.version_info.major}.{sys.version_info.minor} outside /root that an "
            "unprivileged user can run with the venv's compiled modules"
        )
    _fuse_for_everyone()
    pw = _ensure_user()
    base = Path(tempfile.mkdtemp(prefix="layerfs-rootless-", dir="/var/tmp"))
    try:
        os.chmod(base, 0o755)
        runtime = base / "rt"
        runtime.mkdir()
        _copy_runtime(runtime)
        scratch = base / "scratch"
        scratch.mkdir(mode=0o755)
        os.chmod(scratch, 0o755)
        rl = Rootless(USER, pw.pw_uid, pw.pw_gid, python, runtime, scratch)
        check = rl.run_as_user(
            [python, "-c", "import trio, xxhash, zstandard, unionfs.cli"],
            scratch,
            check=False,
        )
        if check.returncode != 0:
            pytest.fail(f"the user's runtime does not import: {check.stderr.strip()}")
        yield rl
    finally:
        _remove_tree(base)


def _remove_tree(base: Path) -> None:
    """Remove the scratch tree, first unmounting anything a failed test left mounted in it."""
    prefix = os.fsencode(base) + b"/"
    for p in sorted(mountinfo.mount_points(), reverse=True):
        if p.startswith(prefix):
            force_unmount(os.fsdecode(p))
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def home(rootless: Rootless, request: pytest.FixtureRequest) -> Path:
    """A fresh home directory of the user for one test."""
    return rootless.new_home(request.node.name.replace("/", "_"))


class RunAsUser(typing.Protocol):
    def __call__(
        self, args: Sequence[str], home: Path, cwd: Path | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]: ...


@pytest.fixture
def run_as_user(rootless: Rootless) -> RunAsUser:
    """`run_as_user(args, home, cwd=None, check=True)`: Rootless.run_as_user."""
    return rootless.run_as_user
