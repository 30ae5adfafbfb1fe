"""The rootless engine mounted by a real unprivileged user: override stat (chown, chmod, mknod,
copy-up of what the user cannot own), privileged xattrs, squash and uid/gid maps.

The daemon always runs as the plain user. Operations the kernel itself reserves to privileged
callers (chown to another uid, mknod of a device, trusted.* xattrs) are made by a process with
the user's uid and the needed capabilities, as root inside a rootless container is: the kernel
lets them through to the daemon, which holds no privilege and must keep them as metadata.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.mounting import is_mounted
from tests.rootless.conftest import Rootless, home, rootless  # noqa: F401 - fixtures

OVERRIDE = b"user.containers.override_stat"
CAPS = "+chown,+mknod,+fowner,+dac_override,+sys_admin,+setfcap"
# security.capability v2 granting cap_net_raw (bit 13), as setcap would write it.
FCAP = "0x0100000200200000000000000000000000000000"


def as_container_root(
    rl: Rootless, script: str, home_dir: Path, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """`sh -c script` with the user's uid/gid plus CAPS (root of a rootless container)."""
    env = [f"{k}={v}" for k, v in rl.env(home_dir).items()]
    argv = [
        "setpriv", f"--reuid={rl.uid}", f"--regid={rl.gid}", "--clear-groups",
        f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}",
        "env", "-i", *env, "/bin/sh", "-c", script,
    ]  # fmt: skip
    proc = subprocess.run(
        argv, cwd=home_dir, capture_output=True, text=True, check=False, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script!r} exited {proc.returncode}: {proc.stderr}{proc.stdout}")
    return proc


def _lower(base: Path) -> Path:
    """A lower made by root: objects the user could not create or own."""
    low = base / "lower"
    (low / "etc").mkdir(parents=True)
    (low / "etc" / "passwd").write_bytes(b"root:x:0:0\n")
    os.setxattr(low / "etc" / "passwd", b"user.keep", b"kept")
    (low / "etc" / "group").write_bytes(b"root:x:0:\n")
    os.chown(low / "etc" / "group", 0, 42)
    os.mknod(low / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(low / "null", 0o666)
    os.mkfifo(low / "fifo")
    os.chmod(low / "fifo", 0o620)
    os.symlink(b"etc/passwd", low / "link")
    os.lchown(low / "link", 5, 6)
    (low / "ro").mkdir()
    (low / "ro" / "old").write_bytes(b"old\n")
    os.chmod(low / "ro", 0o555)
    for p in (base, low, low / "etc"):
        os.chmod(p, 0o755)
    return low


def _dirs(rl: Rootless, base: Path) -> tuple[Path, Path, Path]:
    upper, work, mnt = base / "upper", base / "work", base / "mnt"
    for p in (upper, work, mnt):
        p.mkdir()
        os.chown(p, rl.uid, rl.gid)
    return upper, work, mnt


def _stat_lines(rl: Rootless, home_dir: Path, mnt: Path, names: str) -> dict[str, str]:
    out = rl.sh(f"cd {mnt} && stat -c '%n %F %a %u:%g %t:%T' {names}", home_dir).stdout
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in out.splitlines()}


def test_owner_mode_devices_and_xattrs_kept_as_metadata(rl_home: tuple[Rootless, Path]) -> None:
    rl, home_dir = rl_home
    low = _lower(home_dir)
    upper, work, mnt = _dirs(rl, home_dir)
    opts = f"lowerdir={low},upperdir={upper},workdir={work}"
    names = "etc/passwd etc/group null fifo link ro dev0 pipe2 mine"
    with rl.mounted(["layerfs", "overlay", "-f", "-o", opts, str(mnt)], mnt, home_dir):
        shown = _stat_lines(rl, home_dir, mnt, "etc/passwd etc/group null fifo link ro")
        assert shown["etc/passwd"] == "regular file 644 0:0 0:0"
        assert shown["null"] == "character special file 666 0:0 1:3"
        assert shown["link"] == "symbolic link 777 5:6 0:0"
        # The plain user may not write a file it does not own, by appearance.
        denied = rl.sh(f"echo x >> {mnt}/etc/passwd", home_dir, check=False)
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        as_container_root(
            rl,
            f"cd {mnt} && echo more >> etc/passwd && chown 0:42 etc/group && "
            "chmod 4750 etc/group && mknod dev0 c 4 5 && chown 7:8 dev0 && "
            "mkfifo pipe2 && chown 11:12 pipe2 && chown -h 3:4 link && chmod 0 ro && "
            "touch ro/inside && chown 9:9 fifo && echo m > mine && "
            f"setfattr -n trusted.t -v tv etc/passwd && "
            f"setfattr -n security.capability -v {FCAP} etc/passwd",
            home_dir,
        )
        before = _stat_lines(rl, home_dir, mnt, names)
        assert before["etc/passwd"] == "regular file 644 0:0 0:0"  # copy-up kept the owner
        assert before["etc/group"] == "regular file 4750 0:42 0:0"
        assert before["dev0"] == "character special file 644 7:8 4:5"
        assert before["pipe2"] == "fifo 644 11:12 0:0"
        assert before["fifo"] == "fifo 620 9:9 0:0"
        assert before["link"] == "symbolic link 777 3:4 0:0"
        assert before["ro"] == "directory 0 0:0 0:0"
        assert before["mine"] == f"regular file 644 {rl.uid}:{rl.gid} 0:0"
        assert rl.sh(f"readlink {mnt}/link && cat {mnt}/link", home_dir).stdout == (
            "etc/passwd\nroot:x:0:0\nmore\n"
        )
        xattrs = as_container_root(rl, f"getfattr -d -m - -e hex {mnt}/etc/passwd", home_dir)
        assert "trusted.t=0x7476" in xattrs.stdout
        assert f"security.capability={FCAP}" in xattrs.stdout
        assert "user.keep=0x6b657074" in xattrs.stdout
        attrs = [ln for ln in xattrs.stdout.splitlines() if "=" in ln]
        assert not [a for a in attrs if "override" in a or "layerfs" in a], attrs
    assert not is_mounted(mnt)
    # On disk everything belongs to the user; what it could not do is in xattrs.
    for dirpath, dirnames, filenames in os.walk(upper):
        for n in dirnames + filenames:
            assert os.lstat(os.path.join(dirpath, n)).st_uid == rl.uid
    assert os.getxattr(upper / "etc" / "passwd", OVERRIDE) == b"0:0:0644:file"
    assert os.getxattr(upper / "dev0", OVERRIDE) == b"7:8:0644:char-4-5"
    assert os.getxattr(upper / "link", OVERRIDE) == b"3:4:0777:symlink"
    assert (upper / "link").read_bytes() == b"etc/passwd"
    assert os.getxattr(upper / "etc" / "passwd", b"user.layerfs.xattr.trusted.t") == b"tv"
    assert b"user.layerfs.xattr.security.capability" in [
        os.fsencode(n) for n in os.listxattr(upper / "etc" / "passwd")
    ]
    assert stat.S_IMODE(os.stat(upper / "ro").st_mode) == 0o700  # the daemon can still use it
    with pytest.raises(OSError):
        os.getxattr(upper / "mine", OVERRIDE)  # nothing to override
    # A new mount of the same upper shows the same, and so does the upper read back as a
    # lower layer (read-only mount).
    with rl.mounted(["layerfs", "overlay", "-f", "-o", opts, str(mnt)], mnt, home_dir):
        assert _stat_lines(rl, home_dir, mnt, names) == before
    ro = f"lowerdir={upper}:{low}"
    with rl.mounted(["layerfs", "overlay", "-f", "-o", ro, str(mnt)], mnt, home_dir):
        assert _stat_lines(rl, home_dir, mnt, names) == before
        assert rl.sh(f"readlink {mnt}/link", home_dir).stdout == "etc/passwd\n"
        xattrs = as_container_root(rl, f"getfattr -d -m - -e hex {mnt}/etc/passwd", home_dir)
        assert "trusted.t=0x7476" in xattrs.stdout
        assert not [a for a in xattrs.stdout.splitlines() if "override" in a]


def test_squash_shows_everything_as_the_user_who_may_change_it(
    rl_home: tuple[Rootless, Path],
) -> None:
    rl, home_dir = rl_home
    low = _lower(home_dir)
    upper, work, mnt = _dirs(rl, home_dir)
    opts = f"lowerdir={low},upperdir={upper},workdir={work},squash_to_uid={rl.uid}"
    opts += f",squash_to_gid={rl.gid}"
    with rl.mounted(["layerfs", "overlay", "-f", "-o", opts, str(mnt)], mnt, home_dir):
        shown = _stat_lines(rl, home_dir, mnt, "etc/passwd null link ro")
        owner = f"{rl.uid}:{rl.gid}"
        assert all(v.split()[-2] == owner for v in shown.values()), shown
        rl.sh(
            f"cd {mnt} && echo more >> etc/passwd && chmod 600 etc/passwd && chmod 755 ro "
            "&& touch ro/new",
            home_dir,
        )
        again = _stat_lines(rl, home_dir, mnt, "etc/passwd ro/new")
        assert again["etc/passwd"] == f"regular file 600 {owner} 0:0"
        # chown to another uid stays the kernel's to refuse (no CAP_CHOWN)
        assert rl.sh(f"chown 0 {mnt}/ro/new", home_dir, check=False).returncode != 0
    # What is stored is still the image's owner, with the new mode.
    assert os.getxattr(upper / "etc" / "passwd", OVERRIDE) == b"0:0:0600:file"
    assert os.getxattr(upper / "ro", OVERRIDE) == b"0:0:0755:dir"


def test_uid_gid_maps_show_host_ids_and_store_container_ids(
    rl_home: tuple[Rootless, Path],
) -> None:
    rl, home_dir = rl_home
    low = _lower(home_dir)
    upper, work, mnt = _dirs(rl, home_dir)
    # The upper root belongs to container root, as `layerfs mount` makes it.
    os.setxattr(upper, OVERRIDE, b"0:0:0755:dir")
    maps = f"uidmapping=0:{rl.uid}:1:1:200000:10,gidmapping=0:{rl.gid}:1"
    opts = f"lowerdir={low},upperdir={upper},workdir={work},{maps}"
    with rl.mounted(["layerfs", "overlay", "-f", "-o", opts, str(mnt)], mnt, home_dir):
        shown = _stat_lines(rl, home_dir, mnt, ". etc/passwd etc/group link")
        assert shown["etc/passwd"].split()[-2] == f"{rl.uid}:{rl.gid}"
        assert shown["etc/group"].split()[-2] == f"{rl.uid}:65534"  # gid 42 is not mapped
        assert shown["link"].split()[-2] == "200004:65534"
        rl.sh(f"echo new > {mnt}/created && echo more >> {mnt}/etc/passwd", home_dir)
        made = _stat_lines(rl, home_dir, mnt, "created")["created"]
        assert made.split()[-2] == f"{rl.uid}:{rl.gid}"
        as_container_root(rl, f"chown 200003:{rl.gid} {mnt}/created", home_dir)
        bad = as_container_root(rl, f"chown 4000 {mnt}/created", home_dir, check=False)
        assert bad.returncode != 0 and "Invalid argument" in bad.stderr
    assert os.getxattr(upper / "created", OVERRIDE) == b"4:0:0644:file"  # 1 + 200003 - 200000
    assert os.getxattr(upper / "etc" / "passwd", OVERRIDE) == b"0:0:0644:file"


def test_unprivileged_mount_errors_are_one_clear_line(rl_home: tuple[Rootless, Path]) -> None:
    rl, home_dir = rl_home
    low, mnt = home_dir / "low", home_dir / "m"
    rl.sh(f"mkdir {low} {mnt}", home_dir)
    cases = [
        ("allow_other", "needs 'user_allow_other' in /etc/fuse.conf"),
        ("uidmapping=0:1", "bad id map"),
        ("squash_to_gid=-3", "bad squash_to_gid"),
    ]
    conf = Path("/etc/fuse.conf")
    if conf.exists() and "user_allow_other" in conf.read_text(errors="replace").split():
        cases = cases[1:]  # this machine allows it: nothing to refuse
    for opt, msg in cases:
        out = rl.run_as_user(
            ["layerfs", "overlay", "-f", "-o", f"lowerdir={low},{opt}", str(mnt)],
            home_dir,
            check=False,
        )
        lines = out.stderr.strip().splitlines()
        assert out.returncode != 0 and len(lines) == 1, out.stderr
        assert lines[0].startswith("layerfs: ") and msg in lines[0], lines
        assert not is_mounted(mnt)
    # /dev/fuse not usable: the user's own 0600 copy stands in for it.
    fake = home_dir / "fuse"
    rl.sh(f"touch {fake} && chmod 000 {fake}", home_dir)
    code = (
        "import sys; from unionfs.daemon import check_unprivileged, MountError\n"
        f"try: check_unprivileged([], dev={str(fake)!r})\n"
        "except MountError as e: print(e); sys.exit(1)\n"
    )
    out = rl.run_as_user([rl.python, "-c", code], home_dir, check=False)
    assert out.returncode == 1
    assert "cannot open" in out.stdout and "----------" in out.stdout and "0666" in out.stdout


def test_an_upper_fuse_overlayfs_wrote_rootless_reads_back_the_same(
    rl_home: tuple[Rootless, Path],
) -> None:
    """fuse-overlayfs as the oracle of its own rootless format (xattr_permissions=2:
    user.fuseoverlayfs.override_stat, .opaque, `.wh.` whiteouts): layerfs over the same upper,
    as upper or as a lower, shows what fuse-overlayfs showed."""
    require_tool("fuse-overlayfs")
    rl, home_dir = rl_home
    low = _lower(home_dir)
    upper, work, mnt = _dirs(rl, home_dir)
    opts = f"lowerdir={low},upperdir={upper},workdir={work}"
    names = "etc/passwd ro ro/x fifo link null new"
    listing = f"cd {mnt} && ls -A . etc ro"
    fo = ["fuse-overlayfs", "-f", "-o", f"{opts},xattr_permissions=2", str(mnt)]
    with rl.mounted(fo, mnt, home_dir):
        as_container_root(
            rl,
            f"cd {mnt} && chmod 4711 etc/passwd && rm etc/group && rm -r ro && mkdir ro && "
            "chmod 755 ro && echo x > ro/x && echo n > new",
            home_dir,
        )
        expect = _stat_lines(rl, home_dir, mnt, names)
        expect_ls = rl.sh(listing, home_dir).stdout
        assert expect_ls.split("ro:")[1].split() == ["x"]  # the new ro is opaque
    assert os.getxattr(upper / "etc" / "passwd", b"user.fuseoverlayfs.override_stat")
    layerfs = ["layerfs", "overlay", "-f", "-o", opts, str(mnt)]
    with rl.mounted(layerfs, mnt, home_dir):
        assert _stat_lines(rl, home_dir, mnt, names) == expect
        assert rl.sh(listing, home_dir).stdout == expect_ls
        xattrs = rl.sh(f"getfattr -d -m - {mnt}/etc/passwd {mnt}/ro", home_dir).stdout
        assert "fuseoverlayfs" not in xattrs
    ro = ["layerfs", "overlay", "-f", "-o", f"lowerdir={upper}:{low}", str(mnt)]
    with rl.mounted(ro, mnt, home_dir):
        assert _stat_lines(rl, home_dir, mnt, names) == expect
        assert rl.sh(listing, home_dir).stdout == expect_ls


@pytest.mark.parametrize(
    "present",
    ["squash_to_uid={uid},squash_to_gid={gid}", "squash_to_root",
     "uidmapping=0:{uid}:1:1:200000:10,gidmapping=0:{gid}:1:42:300000:1"],
)  # fmt: skip
def test_presentation_options_show_what_fuse_overlayfs_shows(
    rl_home: tuple[Rootless, Path], present: str
) -> None:
    require_tool("fuse-overlayfs")
    rl, home_dir = rl_home
    low = _lower(home_dir)
    present = present.format(uid=rl.uid, gid=rl.gid)
    names = ". etc etc/passwd etc/group null fifo link ro ro/old"
    shown = {}
    for impl in ("fuse-overlayfs", "layerfs"):
        base = home_dir / impl
        base.mkdir()
        upper, work, mnt = _dirs(rl, base)
        opts = f"lowerdir={low},upperdir={upper},workdir={work},{present}"
        argv = [impl, "-f", "-o", opts, str(mnt)]
        if impl == "layerfs":
            argv.insert(1, "overlay")
        with rl.mounted(argv, mnt, home_dir):
            shown[impl] = _stat_lines(rl, home_dir, mnt, names)
    assert shown["layerfs"] == shown["fuse-overlayfs"]


def test_root_of_a_user_namespace_gets_the_rootless_format(
    rl_home: tuple[Rootless, Path],
) -> None:
    """`unshare -r` (as rootless podman): euid 0 but no trusted.* xattrs and no devices; the
    daemon writes `.wh.` whiteouts and user.overlay.* markers instead of failing."""
    rl, home_dir = rl_home
    probe = rl.sh("unshare -rm true", home_dir, check=False)
    if probe.returncode != 0:
        pytest.skip(f"unprivileged user namespaces are disabled here: {probe.stderr.strip()}")
    base = home_dir / "ns"
    rl.sh(f"mkdir -p {base}/lower/d {base}/upper {base}/work {base}/mnt", home_dir)
    rl.sh(f"echo a > {base}/lower/f && echo b > {base}/lower/d/g", home_dir)
    py = " ".join(rl.layerfs)
    opts = f"lowerdir={base}/lower,upperdir={base}/upper,workdir={base}/work"
    script = f"""
set -e
cd {base}
{py} overlay -f -o {opts} {base}/mnt 2> {base}/log &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
i=0
until grep -q " {base}/mnt " /proc/self/mountinfo; do
  i=$((i + 1)); [ $i -lt 600 ] || exit 9; sleep 0.05
done
test "$(id -u)" = 0
rm mnt/f
rm -r mnt/d
mkdir mnt/d
echo c > mnt/d/h
chown 0:0 mnt/d/h
ls mnt; ls mnt/d
umount mnt
wait $pid
"""
    out = rl.sh(f"unshare -rm sh -c {_quote(script)}", home_dir, check=False)
    log = (base / "log").read_text(errors="replace") if (base / "log").exists() else ""
    assert out.returncode == 0, out.stderr + log
    assert out.stdout.split() == ["d", "h"]
    assert "Traceback" not in log
    assert (base / "upper" / ".wh.f").is_file()
    d = base / "upper" / "d"
    assert (d / ".wh..wh..opq").is_file()  # the rootless opaque marker
    assert not [n for n in os.listxattr(d) if n.startswith("trusted.")]


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def _blob(layout: Path, data: bytes) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest).write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _oci_image(layout: Path, ref: str) -> None:
    """A one-layer OCI layout written by hand (no tools): a root-owned /etc/passwd and dirs,
    a file of uid/gid 1000, a char device."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, kind: bytes, mode: int, uid: int = 0, data: bytes = b"") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid = kind, mode, uid, uid
            info.size = len(data)
            if kind == tarfile.CHRTYPE:
                info.devmajor, info.devminor = 1, 3
            tar.addfile(info, io.BytesIO(data) if data else None)

        add("etc", tarfile.DIRTYPE, 0o755)
        add("etc/passwd", tarfile.REGTYPE, 0o644, data=b"root:x:0:0\n")
        add("home", tarfile.DIRTYPE, 0o755)
        add("home/notes", tarfile.REGTYPE, 0o600, uid=1000, data=b"alice\n")
        add("null", tarfile.CHRTYPE, 0o666)
    layer = buf.getvalue()
    (layout / "blobs" / "sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(layer).hexdigest()}"]},
        "config": {},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            **_blob(layout, json.dumps(config).encode()),
        },
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **_blob(layout, layer)}],
    }
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **_blob(layout, json.dumps(manifest).encode()),
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index))


def test_image_mount_squash_and_maps(rl_home: tuple[Rootless, Path]) -> None:
    rl, home_dir = rl_home
    layout = home_dir / "layout"
    _oci_image(layout, "v1")
    for dirpath, _, filenames in os.walk(layout):
        os.chmod(dirpath, 0o755)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o644)
    rl.run_as_user(["layerfs", "import", f"oci:{layout}:v1", "--tag", "img"], home_dir)
    mnt = home_dir / "mnt"
    rl.sh(f"mkdir {mnt}", home_dir)
    me = f"{rl.uid}:{rl.gid}"
    squash = ["layerfs", "mount", "-f", "img", str(mnt), "--name", "sq", "--squash"]
    with rl.mounted(squash, mnt, home_dir):
        shown = _stat_lines(rl, home_dir, mnt, ". etc/passwd home/notes null")
        assert {v.split()[-2] for v in shown.values()} == {me}, shown
        rl.sh(f"echo more >> {mnt}/etc/passwd && cat {mnt}/home/notes && touch {mnt}/new", home_dir)
    # Without --squash the same container shows the image's owners; what the user wrote
    # kept them.
    plain = ["layerfs", "mount", "-f", "img", str(mnt), "--name", "sq"]
    with rl.mounted(plain, mnt, home_dir):
        shown = _stat_lines(rl, home_dir, mnt, ". etc/passwd home/notes null new")
        assert shown["."] == "directory 755 0:0 0:0"
        assert shown["etc/passwd"] == "regular file 644 0:0 0:0"
        assert shown["home/notes"] == "regular file 600 1000:1000 0:0"
        assert shown["null"] == "character special file 666 0:0 1:3"
        assert shown["new"].split()[-2] == me
    # The container read-only: its rootless upper is read back as the top layer.
    ro = ["layerfs", "mount", "-f", "img", str(mnt), "--name", "sq", "--ro"]
    with rl.mounted(ro, mnt, home_dir):
        shown = _stat_lines(rl, home_dir, mnt, ". etc etc/passwd null")
        assert shown["."] == "directory 755 0:0 0:0"
        assert shown["etc"] == "directory 755 0:0 0:0"
        assert shown["etc/passwd"] == "regular file 644 0:0 0:0"
        assert rl.sh(f"cat {mnt}/etc/passwd", home_dir).stdout == "root:x:0:0\nmore\n"
    maps = ["--uidmap", f"0:{rl.uid}:1", "--uidmap", "1000:300000:5", "--gidmap", f"0:{rl.gid}:1"]
    mapped = ["layerfs", "mount", "-f", "img", str(mnt), "--name", "mp", *maps]
    with rl.mounted(mapped, mnt, home_dir):
        shown = _stat_lines(rl, home_dir, mnt, ". etc/passwd home/notes")
        assert shown["."] == f"directory 755 {me} 0:0"  # the container's root is the user
        assert shown["etc/passwd"].split()[-2] == me
        assert shown["home/notes"].split()[-2] == "300000:65534"
        rl.sh(f"echo x > {mnt}/made && echo y >> {mnt}/etc/passwd", home_dir)
        assert _stat_lines(rl, home_dir, mnt, "made")["made"].split()[-2] == me
    bad = rl.run_as_user(
        ["layerfs", "mount", "img", str(mnt), "--uidmap", "0:1:0"], home_dir, check=False
    )
    assert bad.returncode == 1 and bad.stderr.startswith("layerfs: bad id map")
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.fixture
def rl_home(rootless: Rootless, home: Path) -> tuple[Rootless, Path]:  # noqa: F811
    return rootless, home
