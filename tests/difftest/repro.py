"""Run one shell reproduction on kernel overlayfs and on layerfs and print both outputs.

    python -m tests.difftest.repro SETUP COMMAND [--impl layerfs] [--lowers 2] [--after CMD]

SETUP runs in a fresh directory holding empty `L0` (top) .. `L<n-1>`, `U` and `W`; it builds the
layers (twice: once per side). COMMAND then runs inside each mount point (kernel with
redirect_dir=on,index=on; the other implementation with allow_other). --after: unmount, mount
the upper with the kernel (fresh workdir, index=off) and run CMD there. Used to write the
minimal reproductions in /work/notes/findings-engine.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from tests.difftest.runner import KERNEL_OPTS, REMOUNT_OPTS, scratch_dir
from tests.mounting import overlay_mount


def run_side(
    impl: str, setup: str, command: str, lowers: int, base: Path, after: str | None = None
) -> str:
    base.mkdir()
    names = [f"L{i}" for i in range(lowers)]
    for n in (*names, "U", "W"):
        (base / n).mkdir()
    subprocess.run(["bash", "-ec", setup], cwd=base, check=True)
    opts = KERNEL_OPTS if impl == "kernel" else ("allow_other",)
    with overlay_mount(
        impl, [base / n for n in names], base / "M", base / "U", base / "W", opts
    ) as mnt:
        out = subprocess.run(
            ["bash", "-c", command], cwd=mnt, capture_output=True, text=True, check=False
        )
    text = out.stdout + out.stderr
    if after is not None:
        (base / "W2").mkdir()
        with overlay_mount(
            "kernel", [base / n for n in names], base / "M2", base / "U", base / "W2", REMOUNT_OPTS
        ) as mnt:
            out = subprocess.run(
                ["bash", "-c", after], cwd=mnt, capture_output=True, text=True, check=False
            )
        text += "--- kernel mount of that upper (fresh workdir, index=off):\n"
        text += out.stdout + out.stderr
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("setup")
    ap.add_argument("command")
    ap.add_argument("--impl", default="layerfs")
    ap.add_argument("--lowers", type=int, default=1)
    ap.add_argument("--after", help="command to run in a kernel mount of the upper afterwards")
    args = ap.parse_args()
    with scratch_dir() as base:
        k = run_side("kernel", args.setup, args.command, args.lowers, base / "k", args.after)
        o = run_side(args.impl, args.setup, args.command, args.lowers, base / "o", args.after)
    print("--- kernel\n" + k + f"--- {args.impl}\n" + o, end="")
    print("SAME" if k == o else "DIFFERENT")
    return 0 if k == o else 1


if __name__ == "__main__":
    sys.exit(main())
