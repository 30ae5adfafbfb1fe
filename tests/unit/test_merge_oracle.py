"""Merge rules against an oracle: random layer stacks vs applying the layers in order."""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from unionfs.core.fs import UnionFS
from unionfs.core.layers import DirLayer
from unionfs.core.types import ROOT_INO, Ino

NAMES = (b"a", b"b", b"c")
# fwh: a file and a `.wh.` whiteout of the same name in one layer (the entry wins there,
# the whiteout still hides the layers below).
KINDS = ("file", "dir", "odir", "wh", "fwh", "none")


@dataclass(frozen=True)
class Spec:
    """One layer entry: kind in file, dir, odir (opaque dir), wh (whiteout), fwh."""

    path: bytes
    kind: str
    data: bytes = b""
    spelling: str = "oci"  # whiteouts and opaque markers: "oci" (.wh.) or "native"


def _layer(depth: int, prefix: bytes, tag: str) -> st.SearchStrategy[list[Spec]]:
    @st.composite
    def build(draw: st.DrawFn) -> list[Spec]:
        out: list[Spec] = []
        for name in NAMES:
            path = prefix + name
            kind = draw(st.sampled_from(KINDS if depth > 0 else ("file", "wh", "fwh", "none")))
            spelling = draw(st.sampled_from(("oci", "native")))
            if kind == "none":
                continue
            out.append(Spec(path, kind, f"{tag}:{path.decode()}".encode(), spelling))
            if kind in ("dir", "odir"):
                out.extend(draw(_layer(depth - 1, path + b"/", tag)))
        return out

    return build()


def stacks() -> st.SearchStrategy[list[list[Spec]]]:
    """1-4 layers, TOP first."""
    return st.integers(1, 4).flatmap(
        lambda n: st.tuples(*[_layer(2, b"", f"L{i}") for i in range(n)]).map(list)
    )


def build(root: Path, specs: list[Spec], native_ok: bool) -> None:
    broot = os.fsencode(root)
    for s in specs:
        p = os.path.join(broot, s.path)
        native = s.spelling == "native" and native_ok
        if s.kind in ("file", "fwh"):
            with open(p, "wb") as f:
                f.write(s.data)
            if s.kind == "fwh":
                head, tail = os.path.split(p)
                open(os.path.join(head, b".wh." + tail), "wb").close()
        elif s.kind in ("dir", "odir"):
            os.mkdir(p)
            if s.kind == "odir":
                if native:
                    os.setxattr(p, b"trusted.overlay.opaque", b"y")
                else:
                    open(os.path.join(p, b".wh..wh..opq"), "wb").close()
        elif s.kind == "wh":
            if native:
                os.mknod(p, stat.S_IFCHR, os.makedev(0, 0))
            else:
                head, tail = os.path.split(p)
                open(os.path.join(head, b".wh." + tail), "wb").close()


def _under(path: bytes, top: bytes) -> bool:
    return path == top or path.startswith(top + b"/")


def reference(layers: list[list[Spec]]) -> dict[bytes, bytes | None]:
    """Apply layers bottom to top: path -> file data (None for directories)."""
    tree: dict[bytes, bytes | None] = {}
    for layer in reversed(layers):
        # A layer's whiteouts and opaque markers act on the layers below it only.
        for s in layer:
            if s.kind in ("wh", "fwh"):
                tree = {p: v for p, v in tree.items() if not _under(p, s.path)}
            elif s.kind == "odir":
                tree = {p: v for p, v in tree.items() if not (_under(p, s.path) and p != s.path)}
        for s in layer:
            if s.kind in ("file", "fwh"):
                tree = {p: v for p, v in tree.items() if not _under(p, s.path)}
                tree[s.path] = s.data
            elif s.kind in ("dir", "odir"):
                if s.path in tree and tree[s.path] is not None:
                    del tree[s.path]
                tree[s.path] = None
    return tree


def observe(fs: UnionFS) -> dict[bytes, bytes | None]:
    out: dict[bytes, bytes | None] = {}

    def walk(ino: Ino, prefix: bytes) -> None:
        fh = fs.opendir(ino)
        try:
            entries = []
            start = 0
            while batch := fs.readdir(fh, start):
                entries.extend(batch)
                start = batch[-1][2]
        finally:
            fs.releasedir(fh)
        names = [name for name, _, _ in entries]
        assert len(names) == len(set(names)), f"duplicate names in {prefix!r}: {names}"
        for name, attrs, _ in entries:
            path = prefix + name
            assert fs.lookup(ino, name).ino == attrs.ino
            if stat.S_ISDIR(attrs.st.mode):
                out[path] = None
                walk(attrs.ino, path + b"/")
            else:
                fh2, _ = fs.open(attrs.ino, os.O_RDONLY)
                try:
                    out[path] = os.pread(fs.read_fd(fh2), 1 << 16, 0)
                finally:
                    fs.release(fh2)

    walk(ROOT_INO, b"")
    return out


@settings(deadline=None, max_examples=150)
@given(stacks())
def test_merged_view_equals_layers_applied_in_order(layers: list[list[Spec]]) -> None:
    native_ok = os.geteuid() == 0
    with tempfile.TemporaryDirectory() as tmp:
        roots = []
        for i, specs in enumerate(layers):
            root = Path(tmp) / f"l{i}"
            root.mkdir()
            build(root, specs, native_ok)
            roots.append(root)
        fs = UnionFS([DirLayer(os.fsencode(r)) for r in roots], None)
        try:
            assert observe(fs) == reference(layers)
        finally:
            fs.close()
            for layer in fs.lowers:
                assert isinstance(layer, DirLayer)
                layer.close()
