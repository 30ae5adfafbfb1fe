"""The command line as users of docker, podman and skopeo expect it: one-line errors for any bad
input, global options, --format/--json, checked names, a store never created by reading it,
gc that says what it waits for, and shell completion."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from layerstore import containers
from layerstore.cli import IMAGE_FIELDS, INSPECT_FIELDS
from layerstore.containers import MountRecord
from layerstore.ocibuild import Img, tar_dir, write_oci
from layerstore.registry import load_credentials, save_credentials
from layerstore.store import Store
from tests.mounting import LAYERFS
from tests.store.test_import import BASE, TOP, cli, fingerprint

LAYERFS_BIN = str(Path(sys.executable).parent / "layerfs")


def run(
    *args: str,
    stdin: bytes | None = None,
    closed_stdin: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`layerfs ARGS` (global options as given); stdin from bytes, /dev/null, or closed."""
    return subprocess.run(
        [*LAYERFS, *args],
        input=stdin.decode() if stdin is not None else None,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        preexec_fn=(lambda: os.close(0)) if closed_stdin else None,
    )


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A store with `app:1` (two layers), and inputs good and bad."""
    w = tmp_path_factory.mktemp("cli")
    write_oci(w / "img", Img([BASE, TOP], ref="v1"))
    tar_dir(w / "img", w / "img.tar")
    data = (w / "img.tar").read_bytes()
    (w / "half.tar").write_bytes(data[: len(data) // 2])
    (w / "notar.tar").write_bytes(b"this is not a tar archive\n" * 20)
    (w / "full").mkdir()
    (w / "full" / "x").write_bytes(b"x")
    (w / "empty").mkdir()
    (w / "a-file").write_bytes(b"f")
    cli(w / "s", "import", f"oci:{w / 'img'}:v1", "--tag", "app:1")
    yield w


# argv after `layerfs --store S` ({w} is the work dir), and how stdin is given.
BAD = {
    "no verb": [],
    "unknown verb": ["frob"],
    "unknown option": ["images", "--bogus"],
    "missing argument": ["tag", "app:1"],
    "bad number": ["gc", "--timeout", "soon"],
    "import truncated": ["import", "{w}/half.tar"],
    "import truncated oci-archive": ["import", "oci-archive:{w}/half.tar"],
    "import not a tar": ["import", "{w}/notar.tar"],
    "import not a tar docker-archive": ["import", "docker-archive:{w}/notar.tar"],
    "import missing": ["import", "oci:{w}/nope"],
    "import bad --tag": ["import", "oci:{w}/img:v1", "--tag", "Bad:Name"],
    "import bad platform": ["import", "oci:{w}/img:v1", "--platform", "//"],
    "pull bad reference": ["pull", "bad::ref"],
    "pull dead registry": ["pull", "127.0.0.1:1/x/y:1"],
    "pull -q dead registry": ["pull", "-q", "127.0.0.1:1/x/y:1"],
    "push dead registry": ["push", "app:1", "127.0.0.1:1/x/y:1"],
    "push missing image": ["push", "nosuch:1", "127.0.0.1:1/x/y:1"],
    "push an ID alone": ["push", "IMAGEID"],
    "push bad reference": ["push", "app:1", "UPPER/x"],
    "login closed stdin": ["login", "127.0.0.1:1", "-u", "alice", "<closed>"],
    "login /dev/null stdin": ["login", "127.0.0.1:1", "-u", "alice"],
    "login no user": ["login", "127.0.0.1:1"],
    "login --password-stdin closed": [
        "login",
        "127.0.0.1:1",
        "-u",
        "a",
        "--password-stdin",
        "<closed>",
    ],
    "login dead registry": ["login", "127.0.0.1:1", "-u", "a", "--password-stdin", "<pw>"],
    "login bad host": ["login", "bad host!", "-u", "a", "-p", "b"],
    "logout bad host": ["logout", "bad host!"],
    "images bad reference": ["images", "Bad:Ref"],
    "images bad field": ["images", "--format", "{{.Nope}}"],
    "images bad template": ["images", "--format", "{{.Id"],
    "images --format and --json": ["images", "--format", "{{.Id}}", "--json"],
    "inspect missing": ["inspect", "nosuch"],
    "inspect bad function": ["inspect", "--format", "{{frob .Id}}", "app:1"],
    "history missing": ["history", "nosuch"],
    "tag empty": ["tag", "app:1", ""],
    "tag double colon": ["tag", "app:1", "bad::ref"],
    "tag two tags": ["tag", "app:1", "a:b:c"],
    "tag upper case": ["tag", "app:1", "UPPER:case"],
    "tag digest": ["tag", "app:1", "x@sha256:" + "0" * 64],
    "tag missing image": ["tag", "nosuch", "x:1"],
    "rmi missing": ["rmi", "nosuch"],
    "layers missing": ["layers", "nosuch"],
    "unpack into a non-empty dir": ["unpack", "app:1", "{w}/full"],
    "unpack missing": ["unpack", "nosuch", "{w}/empty"],
    "unpack onto a file": ["unpack", "app:1", "{w}/a-file"],
    "mount missing mount point": ["mount", "app:1", "{w}/nope"],
    "mount busy mount point": ["mount", "app:1", "/proc"],
    "mount missing image": ["mount", "nosuch", "{w}/empty"],
    "mount --rm --name": ["mount", "--rm", "--name", "x", "app:1", "{w}/empty"],
    "mount bad name": ["mount", "--name", "../x", "app:1", "{w}/empty"],
    "mount bad uidmap": ["mount", "--uidmap", "x", "app:1", "{w}/empty"],
    "umount missing": ["umount", "{w}/nope"],
    "umount not mounted": ["umount", "{w}/empty"],
    "ps bad field": ["ps", "--format", "{{.Nope}}"],
    "rm missing": ["rm", "nosuch"],
    "rm bad name": ["rm", "../x"],
    "diff missing": ["diff", "nosuch"],
    "diff nothing": ["diff"],
    "commit missing": ["commit", "nosuch", "x:1"],
    "commit bad name": ["commit", "--upper", "{w}/empty", "--image", "app:1", "BAD:x"],
    "export bad destination": ["export", "app:1", "bogus:{w}/x"],
    "export missing": ["export", "nosuch", "oci:{w}/out"],
    "which missing image": ["which", "nosuch", "/etc"],
    "which missing path": ["which", "app:1", "/nope"],
    "which bad field": ["which", "--format", "{{.Nope}}", "app:1", "/"],
    "overlay unknown option": ["overlay", "-o", "bogus", "{w}/empty"],
    "overlay missing lower": ["overlay", "-o", "lowerdir={w}/nope", "{w}/empty"],
    "completion unknown shell": ["completion", "fish"],
    "store is a file": ["--store", "{w}/a-file", "images"],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line(work: Path, case: str) -> None:
    """Every verb, bad input: one line on stderr starting `layerfs:`, a non-zero exit, no
    traceback, and the store as it was."""
    argv = [a.replace("{w}", str(work)) for a in BAD[case]]
    closed = "<closed>" in argv
    stdin = b"pw\n" if "<pw>" in argv else None
    argv = [a for a in argv if a not in ("<closed>", "<pw>")]
    if "IMAGEID" in argv:
        with Store(work / "s") as s:
            argv[argv.index("IMAGEID")] = s.resolve("app:1")[7:19]
    before = _contents(work / "s")
    p = run("--store", str(work / "s"), *argv, stdin=stdin, closed_stdin=closed)
    assert p.returncode != 0, (case, p.stdout, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("layerfs: "), (case, p.stderr)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, (case, p.stderr)
    assert _contents(work / "s") == before, case


def _contents(store: Path) -> dict[str, str]:
    """The store's fingerprint without its (empty) lock files, which any verb may create, and
    SQLite's WAL files, which a read-only connection (mount, which) leaves behind."""
    return {
        k: v
        for k, v in fingerprint(store).items()
        if not k.endswith(("lock", "index.db-wal", "index.db-shm"))
    }


def test_debug_shows_the_traceback(work: Path) -> None:
    p = run("inspect", "nosuch", "--store", str(work / "s"), "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr
    assert p.stderr.splitlines()[-1] == "layerfs: no such image: nosuch"


def test_closed_pipe_ends_quietly_as_ls_does(work: Path) -> None:
    """`layerfs images | head -0`: killed by SIGPIPE, nothing on stderr (before: 'layerfs:
    Broken pipe' with exit 0 or 1)."""
    for args in (["images"], ["inspect", "app:1"], ["layers", "--json"], ["ps", "-a"]):
        r, w = os.pipe()
        os.close(r)  # the reader is gone before anything is written
        try:
            p = subprocess.run(
                [*LAYERFS, "--store", str(work / "s"), *args],
                stdout=w,
                stderr=subprocess.PIPE,
                timeout=60,
            )
        finally:
            os.close(w)
        assert p.returncode == -signal.SIGPIPE and p.stderr == b"", (args, p.stderr)


def test_global_options_before_or_after_the_verb(work: Path) -> None:
    s = str(work / "s")
    fmt = ["--format", "{{.Repository}}:{{.Tag}}"]
    before = run("--store", s, "images", *fmt)
    after = run("images", *fmt, "--store", s)
    assert before.returncode == after.returncode == 0
    assert before.stdout == after.stdout == "app:1\nimg:v1\n"
    # The verb's value wins over the global one, as the nearer option.
    assert run("--store", "/nonexistent/x", "images", "--store", s, *fmt).stdout == before.stdout
    assert run("-d", "--store", s, "images", "-q").returncode == 0
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("layerfs ")


def test_read_only_verbs_never_create_the_store(tmp_path: Path) -> None:
    missing = tmp_path / "deep" / "x"
    for args in (
        ["images"],
        ["images", "-q"],
        ["images", "--json"],
        ["ps", "-a"],
        ["layers"],
        ["df"],
        ["gc", "-n"],
        ["gc"],
        ["fsck"],
        ["inspect", "x"],
        ["history", "x"],
        ["which", "x", "/"],
        ["diff", "x"],
        ["tag", "x", "y"],
        ["rmi", "x"],
        ["completion", "bash"],
    ):
        p = run("--store", str(missing), *args)
        assert not (tmp_path / "deep").exists(), (args, p.stderr)
        assert p.returncode in (0, 1) and "Traceback" not in p.stderr, (args, p.stderr)
    assert run("--store", str(missing), "images").stdout.split() == [
        "REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"
    ]  # fmt: skip
    assert json.loads(run("--store", str(missing), "images", "--json").stdout) == []


def test_names_are_checked_as_pull_and_push_read_them(work: Path, tmp_path: Path) -> None:
    store = tmp_path / "s"
    shutil.copytree(work / "s", store)
    before = fingerprint(store)
    for bad in ("", "bad::ref", "a:b:c", "UPPER:case", "x:", ":x", "x@sha256:1", "a//b"):
        p = cli(store, "tag", "app:1", bad, check=False)
        assert p.returncode == 1 and p.stderr.count("\n") == 1, (bad, p.stderr)
        p = cli(
            store, "commit", "--upper", str(work / "empty"), "--image", "app:1", bad, check=False
        )
        assert p.returncode != 0 and p.stderr.count("\n") == 1, (bad, p.stderr)
        p = cli(store, "import", f"oci:{work / 'img'}:v1", "--tag", bad, check=False)
        assert p.returncode != 0 and p.stderr.count("\n") == 1, (bad, p.stderr)
    assert fingerprint(store) == before
    # Good names are written as images shows them (docker.io/library/ dropped, :latest added).
    cli(store, "tag", "app:1", "docker.io/library/base")
    cli(store, "tag", "app:1", "127.0.0.1:5000/team/app:v2")
    names = cli(store, "images", "--format", "{{.Repository}}:{{.Tag}}").stdout.split()
    assert sorted(names) == ["127.0.0.1:5000/team/app:v2", "app:1", "base:latest", "img:v1"]
    assert cli(store, "inspect", "--format", "{{.Id}}", "docker.io/library/base:latest").stdout


def test_images_quiet_filter_format_and_json(work: Path, tmp_path: Path) -> None:
    store = tmp_path / "s"
    shutil.copytree(work / "s", store)
    write_oci(tmp_path / "other", Img([BASE], ref="o"))
    cli(store, "import", f"oci:{tmp_path / 'other'}:o", "--tag", "other:1", "--tag", "app:2")
    with Store(store) as s:
        app, other = s.resolve("app:1"), s.resolve("other:1")
    # -q: one short ID per image, however many names it has.
    assert cli(store, "images", "-q").stdout.split() == [other[7:19], app[7:19]]
    assert cli(store, "images", "-q", "--no-trunc").stdout.split() == [other, app]
    # REPO and REPO:TAG keep that repository's rows.
    fmt = ["--format", "{{.Repository}}:{{.Tag}} {{.Id}}"]
    assert cli(store, "images", "app", *fmt).stdout.splitlines() == [
        f"app:2 {other}",
        f"app:1 {app}",
    ]
    assert cli(store, "images", "app:1", *fmt).stdout.splitlines() == [f"app:1 {app}"]
    assert cli(store, "images", "docker.io/library/app:1", "-q").stdout.split() == [app[7:19]]
    # {{json .}}: one record per row, every documented field; --json: one per image.
    rows = [
        json.loads(x) for x in cli(store, "images", "--format", "{{json .}}").stdout.splitlines()
    ]
    per_image = json.loads(cli(store, "images", "--json").stdout)
    assert [i["Id"] for i in per_image] == [other, app]
    assert len(rows) == sum(len(i["RepoTags"]) for i in per_image)
    assert all(set(r) == set(IMAGE_FIELDS) for r in rows)
    assert {"app:2", "other:1"} <= set(per_image[0]["RepoTags"])
    assert all(set(i) <= set(IMAGE_FIELDS) for i in per_image)
    # table: a header from the fields, columns aligned; names match case-insensitively.
    table = cli(store, "images", "app:1", "--format", "table {{.Repository}}\\t{{.ID}}").stdout
    assert table.splitlines() == ["REPOSITORY   ID", f"app          {app}"]
    # inspect, history, layers, df take the same style of keys.
    (rec,) = json.loads(cli(store, "inspect", "--json", "app:1").stdout)
    assert set(rec) == set(INSPECT_FIELDS)
    assert cli(store, "inspect", "--format", "{{.Id}} {{json .RootFS.Layers}}", "app:1").stdout
    assert cli(store, "inspect", "--format", "{{len .RootFS.Layers}}", "app:1").stdout == "2\n"
    hist = json.loads(cli(store, "history", "--json", "app:1").stdout)
    assert hist[0]["Id"] == app and {"CreatedBy", "Size", "EmptyLayer"} <= set(hist[0])
    layers = cli(store, "layers", "app:1", "--format", "{{.DiffID}}").stdout.split()
    assert layers == json.loads(cli(store, "inspect", "app:1").stdout)[0]["RootFS"]["Layers"]
    df = json.loads(cli(store, "df", "--json").stdout)
    assert df["Images"] == 2 and all(k[0].isupper() and "_" not in k for k in df)


def test_gc_dry_run_counts_what_gc_removes(work: Path, tmp_path: Path) -> None:
    """Before: `gc -n` said 0 orphan files, then `gc` removed 1 (the removed layer's
    tar-split, unknown only once the layer was gone)."""
    store = tmp_path / "s"
    shutil.copytree(work / "s", store)
    cli(store, "rmi", "app:1", "img:v1")
    (store / "content" / "ab").mkdir(exist_ok=True)
    (store / "content" / "ab" / "abcd-1").write_bytes(b"orphan")
    (store / "tmp" / "import-999").mkdir()
    dry = cli(store, "gc", "-n").stdout.splitlines()[-1]
    real = cli(store, "gc").stdout.splitlines()[-1]
    assert dry.replace("Would remove", "Removed") == real
    assert "Removed 2 layers" in real and "1 orphan files" in real and "1 stale temp" in real
    assert cli(store, "gc", "-n").stdout.splitlines()[-1].startswith("Would remove 0 layers, 0")
    with Store(store) as s:
        assert s.fsck() == []


def test_a_waiting_verb_names_who_it_waits_for_and_gives_up(work: Path, tmp_path: Path) -> None:
    """gc waits for an import (shared lock): it says which pid, and --timeout bounds it."""
    store = tmp_path / "s"
    shutil.copytree(work / "s", store)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+b'); "
         "fcntl.flock(f, fcntl.LOCK_SH); print('held', flush=True); time.sleep(60)",
         str(store / "lock")],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        before = fingerprint(store)
        t0 = time.monotonic()
        p = cli(store, "gc", "--timeout", "1", check=False)
        assert time.monotonic() - t0 < 30  # bounded (a bug would wait for the holder's 60 s)
        lines = p.stderr.splitlines()
        assert p.returncode == 1 and len(lines) == 2, p.stderr
        assert lines[0].startswith(f"layerfs: waiting for pid {holder.pid} (")
        assert lines[1].startswith("layerfs: gave up after 1s waiting for pid")
        assert fingerprint(store) == before
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
    assert cli(store, "gc", "--timeout", "5").returncode == 0


def test_bash_completion(work: Path) -> None:
    s = str(work / "s")
    box = containers.create(work / "s", "box1", "sha256:x", "app:1")
    containers.write_record(
        work / "s", MountRecord("/mnt/some where", 1, "sha256:x", None, None, None, True)
    )
    try:

        def complete(line: str) -> list[str]:
            words = line.split(" ")
            empty_last = 'COMP_WORDS+=("");' if line.endswith(" ") else ""
            script = (
                f"source <({LAYERFS_BIN} completion bash); COMP_LINE={line!r}; "
                'COMP_POINT=${#COMP_LINE}; read -ra COMP_WORDS <<< "$COMP_LINE"; '
                f"COMP_WORDS[0]={LAYERFS_BIN}; COMP_CWORD={len(words) - 1}; {empty_last}"
                '_layerfs; printf "%s\\n" "${COMPREPLY[@]}"'
            )
            p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
            assert p.returncode == 0, p.stderr
            return [x for x in p.stdout.splitlines() if x]

        assert complete("layerfs mo") == ["mount"]
        assert "completion" in complete("layerfs ")
        assert "__complete" not in complete("layerfs ")
        assert complete("layerfs mount --na") == ["--name"]
        assert complete(f"layerfs --store {s} mount a") == ["app:1"]
        assert complete(f"layerfs --store {s} rmi app:") == ["1"]  # bash splits at ':'
        assert complete(f"layerfs images --store {s} i") == ["img"]
        assert complete(f"layerfs --store {s} rm b") == ["box1"]
        assert complete(f"layerfs --store {s} umount /mnt/") == ["/mnt/some\\ where"]
        assert complete("layerfs completion ") == ["bash", "zsh"]
        assert complete("layerfs overlay -o lowerdir=/a,up") == ["/a,upperdir="]  # after the =
        # Paths complete as the shell does: mount's second argument is a directory.
        assert complete(f"layerfs --store {s} mount app:1 {work}/emp") == [f"{work}/empty"]
    finally:
        shutil.rmtree(box.root)
        containers.remove_record(work / "s", "/mnt/some where")


def test_zsh_completion(work: Path) -> None:
    zsh = shutil.which("zsh")
    if zsh is None:
        pytest.skip("zsh is not installed (scripts/install-system-deps.sh installs it)")
    s = str(work / "s")
    script = (
        'compdef() { : }; compadd() { print -rl -- "${@:#-*}" }; '
        '_files() { print -r -- FILES "$@" }; '
        f"source <({LAYERFS_BIN} completion zsh); "
        f"words=({LAYERFS_BIN} --store {s} mount a); CURRENT=5; _layerfs; "
        f"words=({LAYERFS_BIN} mo); CURRENT=2; _layerfs; "
        f"words=({LAYERFS_BIN} mount app:1 /m); CURRENT=4; _layerfs"
    )
    p = subprocess.run([zsh, "-f", "-c", script], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["app:1", "mount", "FILES -/"]


def test_login_asks_on_a_terminal_and_logout_removes(tmp_path: Path) -> None:
    auth = tmp_path / "auth.json"
    save_credentials("127.0.0.1:5000", "a", "b", auth)
    save_credentials("other.example:443", "c", "d", auth)
    env = {"REGISTRY_AUTH_FILE": str(auth)}
    # Asked on the terminal: the user, then the password (the registry is dead: one line).
    pid, fd = pty.fork()
    if pid == 0:  # the child becomes `layerfs login` on the pty
        os.execvpe(LAYERFS[0], [*LAYERFS, "login", "127.0.0.1:1"], {**os.environ, **env})
    out = b""
    try:
        for answer in (b"alice\n", b"secret\n"):
            while b":" not in out.rsplit(b"\n", 1)[-1]:
                chunk = os.read(fd, 1024)
                assert chunk, out
                out += chunk
            os.write(fd, answer)
            out += b"\n"
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the pty
                break
            if not chunk:
                break
            out += chunk
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert "Username:" in text and "Password:" in text and "secret" not in text, text
    assert os.waitstatus_to_exitcode(status) == 1
    assert text.strip().splitlines()[-1].startswith("layerfs: 127.0.0.1:1: cannot GET /v2/")
    # logout drops that registry's entry only.
    p = run("logout", "127.0.0.1:5000", env=env)
    assert p.returncode == 0 and "Removing login credentials for 127.0.0.1:5000" in p.stdout
    assert load_credentials("127.0.0.1:5000", auth) is None
    assert load_credentials("other.example:443", auth) == ("c", "d")
    p = run("logout", "127.0.0.1:5000", env=env)
    assert p.returncode == 0 and p.stdout == "Not logged in to 127.0.0.1:5000\n"


def test_help_teaches(work: Path) -> None:
    """Every verb: a one-line description, each positional explained, examples."""
    from unionfs.cli import build_parser
    from unionfs.complete import _subparsers, _visible_verbs

    parser = build_parser()
    verbs = _subparsers(parser)
    for name in _visible_verbs(parser):
        p = verbs[name]
        assert p.description, name
        for a in p._actions:
            if not a.option_strings:
                assert a.help and a.metavar, (name, a.dest)
        assert p.epilog and "examples:" in p.epilog, name
    mount_help = run("mount", "--help").stdout
    assert "layerfs mount alpine:3.20 /mnt/a" in mount_help and "MOUNTPOINT" in mount_help
    top = run("--help").stdout
    assert "examples:" in top and "__complete" not in top


def test_stdin_fds_closed_do_not_become_store_files(work: Path, tmp_path: Path) -> None:
    """With stdout closed, no file the command opens may take fd 1 and receive its output."""
    store = tmp_path / "s"
    shutil.copytree(work / "s", store)
    before = _contents(store)
    p = subprocess.run(
        [*LAYERFS, "--store", str(store), "images"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.close(1),
        timeout=60,
    )
    assert "Traceback" not in p.stderr.decode()
    assert _contents(store) == before
    with open(store / "lock", "rb") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_diff_z_json_and_format(work: Path, tmp_path: Path) -> None:
    """-z ends each entry with NUL, so a name with a newline stays one entry."""
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc" / "two\nlines").write_bytes(b"x")
    base = ["diff", "--upper", str(upper), "--image", "app:1"]
    z = subprocess.run(
        [*LAYERFS, "--store", str(work / "s"), *base, "-z"], capture_output=True, timeout=60
    )
    assert z.returncode == 0 and z.stdout.split(b"\0") == [b"C /etc", b"A /etc/two\nlines", b""]
    records = json.loads(cli(work / "s", *base, "--json").stdout)
    assert records == [{"Kind": "C", "Path": "/etc"}, {"Kind": "A", "Path": "/etc/two\nlines"}]
    assert cli(work / "s", *base, "--format", "{{.Kind}}{{json .Path}}").stdout == (
        'C"/etc"\nA"/etc/two\\nlines"\n'
    )
