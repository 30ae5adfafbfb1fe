"""Apply a list of operations to a union core (no mount) and print what it shows, as JSON.

Run twice by tests/unit/test_rootless_engine_diff.py: by root over a native upper, and by an
unprivileged user (this file copied where it can read it) over a rootless one. Usage:
`python rootless_engine_runner.py LOWER UPPER WORK NATIVE(0|1) < ops.json > result.json`.
The operations are those the kernel would send: a call the kernel never makes (chmod of a
symlink, user.* xattrs on a special file, a write to a non-file) is skipped, on both sides.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
from typing import Any

from unionfs.core.errors import FsError
from unionfs.core.fs import UnionFS
from unionfs.core.layers import DirLayer
from unionfs.core.types import ROOT_INO, Ino
from unionfs.core.upper import UpperLayer

Op = list[Any]


def _ino(fs: UnionFS, path: str) -> Ino:
    ino = ROOT_INO
    for comp in path.split("/") if path else []:
        ino = fs.lookup(ino, comp.encode()).ino
    return ino


def _split(path: str) -> tuple[str, str]:
    head, _, tail = path.rpartition("/")
    return head, tail


def apply(fs: UnionFS, op: Op) -> str:
    """Run one operation; "ok", "skip" or the errno name."""
    kind, args = op[0], op[1:]
    try:
        if kind in ("create", "mkdir", "mknod", "symlink"):
            path = args[0]
            parent, name = _split(path)
            pino, bname = _ino(fs, parent), name.encode()
            uid, gid = args[-2], args[-1]
            if kind == "create":
                fh, _ = fs.create(pino, bname, stat.S_IFREG | args[1], os.O_WRONLY, uid, gid)
                fs.release(fh)
            elif kind == "mkdir":
                fs.mkdir(pino, bname, args[1], uid, gid)
            elif kind == "mknod":
                fs.mknod(pino, bname, args[1], args[2], uid, gid)
            else:
                fs.symlink(pino, bname, args[1].encode(), uid, gid)
            return "ok"
        ino = _ino(fs, args[0])
        mode = fs.getattr(ino).st.mode
        if kind == "chown":
            fs.setattr(ino, uid=args[1], gid=args[2])
        elif kind == "chmod":
            if stat.S_ISLNK(mode):
                return "skip"
            fs.setattr(ino, mode=args[1])
        elif kind == "write":
            if not stat.S_ISREG(mode):
                return "skip"
            fh, _ = fs.open(ino, os.O_WRONLY)
            try:
                os.pwrite(fs.write_fd(fh), args[1].encode(), 0)
            finally:
                fs.release(fh)
        elif kind == "setxattr":
            if args[1].startswith("user.") and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                return "skip"
            fs.setxattr(ino, args[1].encode(), args[2].encode())
        elif kind in ("unlink", "rmdir"):
            parent, name = _split(args[0])
            getattr(fs, kind)(_ino(fs, parent), name.encode())
        elif kind in ("rename", "link"):
            parent, name = _split(args[1])
            if kind == "rename":
                sp, sn = _split(args[0])
                fs.rename(_ino(fs, sp), sn.encode(), _ino(fs, parent), name.encode())
            else:
                fs.link(ino, _ino(fs, parent), name.encode())
        else:
            raise ValueError(kind)
        return "ok"
    except FsError as exc:
        return os.strerror(exc.errno)


def shown(fs: UnionFS) -> dict[str, Any]:
    """Every object of the merged tree: type, mode, owner, rdev, size, content/target and
    xattrs (times and inode numbers differ by nature and are left out)."""
    out: dict[str, Any] = {}

    def walk(ino: Ino, prefix: str) -> None:
        fh = fs.opendir(ino)
        try:
            entries = fs.readdir(fh, 0)
            names = []
            while entries:
                names += [n for n, _, _ in entries]
                entries = fs.readdir(fh, entries[-1][2])
        finally:
            fs.releasedir(fh)
        for bname in sorted(names):
            name = bname.decode()
            path = f"{prefix}{name}"
            a = fs.lookup(ino, bname)
            st = a.st
            rec: dict[str, Any] = {
                "mode": oct(st.mode),
                "owner": [st.uid, st.gid],
                "rdev": st.rdev,
                "xattrs": sorted(
                    [x.decode(), fs.getxattr(a.ino, x).hex()] for x in fs.listxattr(a.ino)
                ),
            }
            if stat.S_ISREG(st.mode):
                rec["size"] = st.size
                rec["nlink"] = st.nlink
                fh2, _ = fs.open(a.ino, os.O_RDONLY)
                try:
                    rec["sha"] = hashlib.sha256(os.pread(fs.read_fd(fh2), 1 << 20, 0)).hexdigest()
                finally:
                    fs.release(fh2)
            elif stat.S_ISLNK(st.mode):
                rec["target"] = fs.readlink(a.ino).decode()
                rec["size"] = st.size
            out[path] = rec
            if stat.S_ISDIR(st.mode):
                walk(a.ino, path + "/")

    root = fs.getattr(ROOT_INO).st
    out["."] = {"mode": oct(root.mode), "owner": [root.uid, root.gid]}
    walk(ROOT_INO, "")
    return out


def main() -> int:
    lower, upper, work, native = sys.argv[1:5]
    ops: list[Op] = json.load(sys.stdin)
    os.umask(0)  # as the daemon runs
    fs = UnionFS(
        [DirLayer(os.fsencode(lower))],
        UpperLayer(os.fsencode(upper), os.fsencode(work), native == "1"),
    )
    try:
        results = [apply(fs, op) for op in ops]
        json.dump({"results": results, "tree": shown(fs)}, sys.stdout)
    finally:
        fs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
