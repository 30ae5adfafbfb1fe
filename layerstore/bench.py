"""Store benchmark (not a test): import time against `umoci unpack`, stored vs logical bytes.

Run: .venv/bin/python -m layerstore.bench [--files N] [--rounds R] [--json]
Builds two gzip OCI images sharing a base layer (N small files + a few large ones each), then
times, interleaved (order alternating) and R times each, caches dropped before each (when
root), `layerfs import` into a fresh store and `umoci unpack` of the same image, and reports
medians; finally imports both images into one store and reports logical bytes (every image's
files), bytes after layer dedup and bytes stored. (scripts/bench.py's import row is the
heavier case: 100,000 files of random bytes in 3 layers.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .ocibuild import Img, d, f, layer_tar, write_oci
from .store import Store


def _layer(tag: str, n: int, shared_every: int) -> bytes:
    members = [d(tag)]
    for i in range(n):
        # every `shared_every`-th file has the same bytes in both images (file-level dedup)
        body = b"common %d\n" % i if i % shared_every == 0 else f"{tag} {i}\n".encode()
        members.append(f(f"{tag}/f{i}", body * 64))
    members += [f(f"{tag}/big{j}", os.urandom(4 << 20)) for j in range(2)]
    return layer_tar(members)


def _drop_caches() -> None:
    """Cold page cache for each timed run, as scripts/bench.py does (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def _timed(cmd: list[str]) -> float:
    _drop_caches()
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--files", type=int, default=5000, help="small files per layer")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    layerfs = [sys.executable, "-m", "unionfs"]
    umoci = shutil.which("umoci")
    with tempfile.TemporaryDirectory(prefix="layerfs-bench-") as tmp_s:
        tmp = Path(tmp_s)
        base = _layer("base", args.files, 1)
        write_oci(
            tmp / "img",
            Img([base, _layer("a", args.files, 3)], ref="a"),
            Img([base, _layer("b", args.files, 3)], ref="b"),
        )
        ours: list[float] = []
        theirs: list[float] = []
        for r in range(args.rounds):
            for tool in ("layerfs", "umoci") if r % 2 == 0 else ("umoci", "layerfs"):
                if tool == "layerfs":
                    store = tmp / f"store{r}"
                    ours.append(_timed([*layerfs, "import", "-q", "--store", str(store),
                                        f"oci:{tmp / 'img'}:a"]))  # fmt: skip
                    shutil.rmtree(store)
                elif umoci:
                    bundle = tmp / f"bundle{r}"
                    theirs.append(_timed([umoci, "unpack", "--image", f"{tmp / 'img'}:a",
                                          str(bundle)]))  # fmt: skip
                    shutil.rmtree(bundle)
        store = tmp / "both"
        for ref in ("a", "b"):
            subprocess.run([*layerfs, "import", "-q", "--store", str(store),
                            f"oci:{tmp / 'img'}:{ref}"], check=True)  # fmt: skip
        with Store(store) as s:
            df = s.df()
    result = {
        "files_per_layer": args.files,
        "rounds": args.rounds,
        "layerfs_import_s": statistics.median(ours),
        "umoci_unpack_s": statistics.median(theirs) if theirs else None,
        "logical_bytes": df["logical_bytes"],
        "after_layer_dedup_bytes": df["layers_bytes"],
        "stored_bytes": df["stored_bytes"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    u = result["umoci_unpack_s"]
    ratio = f" ({result['layerfs_import_s'] / u:.2f}x umoci)" if u else ""
    print(f"image: 2 layers x ({args.files} small files + 2 x 4 MiB), gzip; median of "
          f"{args.rounds}")  # fmt: skip
    print(f"layerfs import: {result['layerfs_import_s']:.2f} s{ratio}")
    print(f"umoci unpack:   {u:.2f} s" if u else "umoci unpack:   (umoci not installed)")
    print(
        f"two images sharing the base layer: logical {df['logical_bytes']:,} B, after layer "
        f"dedup {df['layers_bytes']:,} B, stored {df['stored_bytes']:,} B "
        f"({df['stored_bytes'] / max(df['logical_bytes'], 1):.0%} of logical)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
