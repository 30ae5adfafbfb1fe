"""Daemon CPU time per FUSE request, our request loop vs pyfuse3's own (run as root)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.mounting import overlay_mount  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def daemon_pid(mnt: Path) -> int:
    needle = os.fsencode(mnt)
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if needle in args and b"unionfs" in args:
            return int(name)
    raise RuntimeError("daemon not found")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def stat_all(paths: list[bytes]) -> None:
    for p in paths:
        os.lstat(p)


def create_all(paths: list[bytes]) -> None:
    data = b"c" * 4096
    for p in paths:
        fd = os.open(p + b".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, data)
        os.close(fd)


OPS = {"lstat": stat_all, "create": create_all}


def one(root: Path, loop: str, n: int, procs: int, op: str) -> tuple[float, float]:
    """Seconds of daemon CPU per operation and wall seconds for `op` on n fresh names
    (lstat: one LOOKUP each; create: create+write 4 KiB+close of NAME.new)."""
    env = dict(os.environ)
    if loop == "pyfuse3":
        env["LAYERFS_FUSE_LOOP"] = loop
    else:
        env.pop("LAYERFS_FUSE_LOOP", None)
    mnt = root / "mnt"
    upper, work = root / "upper", root / "work"
    for fresh in (upper, work):
        shutil.rmtree(fresh, ignore_errors=True)
        fresh.mkdir()
    with overlay_mount("layerfs", [root / "lower"], mnt, upper=upper, work=work, env=env):
        pid = daemon_pid(mnt)
        d = os.fsencode(mnt / "d")
        paths = [os.path.join(d, b"f%d" % i) for i in range(n)]
        os.lstat(d)
        chunks = [paths[i::procs] for i in range(procs)]
        c0, t0 = cpu_s(pid), time.perf_counter()
        if procs == 1:
            OPS[op](paths)
        else:
            with Pool(procs) as pool:
                pool.map(OPS[op], chunks)
        t1, c1 = time.perf_counter(), cpu_s(pid)
    return (c1 - c0) / n, t1 - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--files", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--op", choices=sorted(OPS), default="lstat")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        root = Path(tmp)
        (root / "lower" / "d").mkdir(parents=True)
        (root / "mnt").mkdir()
        for i in range(args.files):
            (root / "lower" / "d" / f"f{i}").touch()
        res: dict[str, list[tuple[float, float]]] = {"pyfuse3": [], "layerfs": []}
        for r in range(args.rounds):
            order = ["pyfuse3", "layerfs"] if r % 2 == 0 else ["layerfs", "pyfuse3"]
            for loop in order:
                res[loop].append(one(root, loop, args.files, args.procs, args.op))
        for loop, rs in res.items():
            cpu = statistics.median(c for c, _ in rs) * 1e6
            wall = statistics.median(w for _, w in rs) * 1e3
            print(
                f"{loop:8} loop: {cpu:6.1f} us daemon CPU/{args.op}, wall {wall:7.1f} ms "
                f"({args.files} x {args.op}, {args.procs} procs, {args.rounds} rounds)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
