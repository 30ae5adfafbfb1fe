"""Layer tars from real producers (GNU tar in every format, bsdtar, Python's tarfile) and
hand-damaged ones, for comparing layerfs's reading with Go's (tests/store/test_go_oracle.py).

Every builder returns the tar's bytes; `corpus(work)` builds them all (as root: the source
trees hold devices, foreign owners and set-id bits)."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

from layerstore.ocibuild import d, f, hard, layer_tar, sym

LONG_DIR = "long-" + "d" * 70
LONG_FILE = "file-" + "f" * 120
SPARSE_SIZE = 3 << 20
BIG_UID = 3_000_000  # more than 7 octal digits: base-256 in GNU headers, a PAX record in posix
OLD_MTIME = -86_400 * 400  # before 1970: base-256 in GNU headers


def _write(path: Path, data: bytes, mode: int = 0o644, mtime: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    if mtime is not None:
        os.utime(path, ns=(mtime * 1_000_000_000, mtime * 1_000_000_000))


def _sparse(path: Path, fragments: int) -> None:
    """A file of SPARSE_SIZE bytes with `fragments` data runs and holes between them."""
    with open(path, "wb") as fh:
        fh.truncate(SPARSE_SIZE)
        step = SPARSE_SIZE // (fragments + 1)
        for i in range(1, fragments + 1):
            fh.seek(i * step)
            fh.write(f"fragment {i}\n".encode() * 300)


def source_tree(root: Path, rich: bool) -> Path:
    """A tree every format can hold; `rich` adds what only gnu/posix/pax hold (long names,
    non-UTF-8 names, big ids, times before 1970, xattrs, sparse files)."""
    root.mkdir(parents=True)
    _write(root / "etc" / "motd", b"hello from a layer\n")
    _write(root / "bin" / "tool", b"#!/bin/sh\necho tool\n" * 50, 0o755)
    _write(root / "bin" / "suid", b"set-uid\n", 0o4755)
    _write(root / "empty", b"")
    _write(root / "data" / "block", bytes(range(256)) * 40)  # 10240 bytes: whole blocks
    os.link(root / "etc" / "motd", root / "etc" / "motd.hard")
    os.symlink("motd", root / "etc" / "motd.sym")
    os.symlink("/nowhere/at/all", root / "dangling")
    (root / "tmp").mkdir(mode=0o1777)
    os.chmod(root / "tmp", 0o1777)
    (root / "private").mkdir()
    os.chmod(root / "private", 0o700)
    _write(root / "private" / "owned", b"someone else's\n")
    os.chown(root / "private" / "owned", 1000, 100)
    os.mkfifo(root / "fifo")
    os.mknod(root / "null", 0o20666, os.makedev(1, 3))
    if rich:
        _write(root / LONG_DIR / LONG_FILE, b"a long path\n")
        _write(root / "caf\xc3\xa9-\xc3\xbc", b"utf-8 name\n")
        _write(Path(os.fsdecode(bytes(root) + b"/raw-\xff\xfe")), b"not utf-8\n")
        _write(root / "big-owner", b"big uid\n")
        os.chown(root / "big-owner", BIG_UID, BIG_UID + 1)
        _write(root / "old", b"before 1970\n", mtime=OLD_MTIME)
        _write(root / "xattrs", b"with xattrs\n")
        os.setxattr(root / "xattrs", "user.comment", b"hello")
        os.setxattr(root / "xattrs", "user.empty", b"")
        _sparse(root / "sparse", 2)
        _sparse(root / "sparse-many", 9)  # > 4 runs: old GNU sparse extension headers
    for p in sorted(root.rglob("*"), reverse=True):
        if not p.is_symlink():
            os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    return root


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, errors="replace", check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")


def gnu_tar(src: Path, out: Path, fmt: str, *opts: str) -> bytes:
    _run(["tar", f"--format={fmt}", "--numeric-owner", *opts, "-C", str(src), "-cf", str(out), "."])
    return out.read_bytes()


def bsdtar(src: Path, out: Path, fmt: str, *opts: str) -> bytes:
    _run(
        ["bsdtar", "--format", fmt, "--numeric-owner", *opts, "-C", str(src), "-cf", str(out), "."]
    )
    return out.read_bytes()


def python_tar(src: Path, fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, errors="surrogateescape") as tf:
        tf.add(src, arcname=".")
    return buf.getvalue()


# ---- damage, by hand -------------------------------------------------------------------


def _chksum(blk: bytearray) -> None:
    blk[148:156] = b" " * 8
    blk[148:156] = b"%06o\0 " % sum(blk)


def _headers(tar: bytes) -> list[int]:
    """Offsets of every header block of a tar (tarfile's reading of it, uncompressed)."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        out = []
        for ti in tf:
            out.append(ti.offset)
        return out


def _end_of_data(tar: bytes) -> int:
    """Where the last member's data ends (no padding, no end-of-archive marker)."""
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r:") as tf:
        last = tf.getmembers()[-1]
        return last.offset_data + (last.size if last.isreg() else 0)


def base256(tar: bytes) -> bytes:
    """Every size, uid, gid and mtime field in GNU base-256 (Go reads it in any format)."""
    out = bytearray(tar)
    for off in _headers(tar):
        blk = out[off : off + 512]
        for start, length in ((108, 8), (116, 8), (124, 12), (136, 12)):
            raw = bytes(blk[start : start + length]).strip(b" \0")
            value = int(raw, 8) if raw and not raw[0] & 0x80 else 0
            blk[start : start + length] = b"\x80" + value.to_bytes(length - 1, "big")
        _chksum(blk)
        out[off : off + 512] = blk
    return bytes(out)


def header(name: bytes, typ: bytes, size: int = 0, **fields: bytes) -> bytes:
    """One ustar header block, hand-made (fields by byte offset name: linkname, mode...)."""
    blk = bytearray(512)
    blk[0 : len(name)] = name
    blk[100:108] = fields.get("mode", b"0000644\0")
    blk[108:116] = fields.get("uid", b"0000000\0")
    blk[116:124] = fields.get("gid", b"0000000\0")
    blk[124:136] = fields.get("sizef", b"%011o\0" % size)
    blk[136:148] = fields.get("mtime", b"%011o\0" % 1_600_000_000)
    blk[156:157] = typ
    link = fields.get("linkname", b"")
    blk[157 : 157 + len(link)] = link
    blk[257:265] = fields.get("magic", b"ustar\x0000")
    _chksum(blk)
    return bytes(blk)


def member(name: bytes, typ: bytes, data: bytes = b"", pad: bool = True, **fields: bytes) -> bytes:
    body = data + (bytes(-len(data) % 512) if pad else b"")
    return header(name, typ, len(data), **fields) + body


def pax(records: list[tuple[bytes, bytes]], typ: bytes = b"x") -> bytes:
    """A PAX header member ('x', or 'g' for a global one) holding `records` in order."""
    body = b""
    for k, v in records:
        rec = b" " + k + b"=" + v + b"\n"
        n = len(rec) + 1
        while len(b"%d" % n) + len(rec) != n:
            n = len(b"%d" % n) + len(rec)
        body += b"%d" % n + rec
    return member(b"PaxHeaders/x", typ, body)


EOF = bytes(1024)


def _sparse_pax_10(data_runs: list[tuple[int, bytes]], size: int, extra: bytes = b"") -> bytes:
    """A PAX 1.0 sparse member by hand: the map in the data, then the runs' bytes (+ `extra`)."""
    amap = b"%d\n" % len(data_runs) + b"".join(b"%d\n%d\n" % (o, len(b)) for o, b in data_runs)
    amap += bytes(-len(amap) % 512)
    body = amap + b"".join(b for _, b in data_runs) + extra
    recs = [
        (b"GNU.sparse.major", b"1"),
        (b"GNU.sparse.minor", b"0"),
        (b"GNU.sparse.name", b"sparse-by-hand"),
        (b"GNU.sparse.realsize", b"%d" % size),
    ]
    return pax(recs) + member(b"GNUSparseFile.0/sparse-by-hand", b"0", body)


def damaged() -> dict[str, bytes]:
    """Tars real producers write when they cut corners, and some no producer should write."""
    files = [d("a"), f("a/one", b"first file\n" * 30), f("a/two", b"x" * 700)]
    whole = layer_tar(files)
    cases: dict[str, bytes] = {
        "no-eof-marker": layer_tar(files, eof_marker=False),
        "unpadded-last-member": whole[: _end_of_data(whole)],
        "half-padded-last-member": whole[: _end_of_data(whole) + 100],
        "one-zero-block": layer_tar(files, eof_marker=False) + bytes(512),
        "garbage-after-eof": whole + b"trailing garbage \xff" * 100,
        "zeros-after-eof": whole + bytes(1 << 20),
        "zero-block-then-header": layer_tar(files, eof_marker=False)
        + bytes(512)
        + member(b"late", b"0", b"late\n"),
        "truncated-data": whole[: _end_of_data(whole) - 10],
        "truncated-header": layer_tar(files, eof_marker=False) + header(b"cut", b"0")[:300],
        "bad-checksum": whole[:148] + b"0000000\0" + whole[156:],
        "empty": b"",
        "only-eof": EOF,
        "base256-numbers": base256(layer_tar(files, fmt=tarfile.GNU_FORMAT)),
        "base256-ustar": base256(layer_tar(files, fmt=tarfile.USTAR_FORMAT)),
        "pax-empty-values": pax(
            [
                (b"path", b""),
                (b"linkpath", b""),
                (b"uid", b""),
                (b"gid", b""),
                (b"size", b""),
                (b"mtime", b""),
                (b"SCHILY.xattr.user.kept", b"yes"),
                (b"SCHILY.xattr.user.empty", b""),
                (b"SCHILY.xattr.user.gone", b"set"),
                (b"SCHILY.xattr.user.gone", b""),
            ]
        )
        + member(b"header-name", b"0", b"data of the header's size\n", uid=b"0001750\0")
        + EOF,
        "pax-overrides": pax(
            [
                (b"path", b"from-pax/name"),
                (b"uid", b"123456789"),
                (b"gid", b"+42"),
                (b"mtime", b"-1.5"),
                (b"size", b"5"),
                (b"SCHILY.xattr.user.a", b"\x00\x01binary"),
            ]
        )
        + member(b"header-name", b"0", b"12345")
        + EOF,
        "pax-global-ignored": pax([(b"path", b"global-path"), (b"uid", b"7")], b"g")
        + member(b"after-global", b"0", b"g\n")
        + EOF,
        "pax-then-eof": layer_tar(files, eof_marker=False) + pax([(b"path", b"never")]),
        "pax-bad-record": pax([(b"mtime", b"1e3")]) + member(b"x", b"0", b"x") + EOF,
        "pax-bad-uid": pax([(b"uid", b"12 3")]) + member(b"x", b"0", b"x") + EOF,
        "pax-header-over-1MiB": pax([(b"comment", b"c" * (1 << 20))])
        + member(b"x", b"0", b"x")
        + EOF,
        "gnu-longname-beats-pax": pax([(b"path", b"pax-path")])
        + member(b"././@LongLink", b"L", b"gnu-long-name\0")
        + member(b"short", b"0", b"which name?\n")
        + EOF,
        "dir-with-size-has-no-data": member(b"dir/", b"5", sizef=b"%011o\0" % 1024)
        + member(b"dir/file", b"0", b"after the directory header\n")
        + EOF,
        "symlink-with-size": header(b"sym", b"2", sizef=b"%011o\0" % 600, linkname=b"target")
        + member(b"file", b"0", b"next\n")
        + EOF,
        "rega-slash-is-dir": member(b"olddir/", b"\0") + member(b"olddir/f", b"\0", b"v7\n") + EOF,
        "contiguous-file": member(b"cont", b"7", b"type 7 is a regular file\n") + EOF,
        "v7-header": member(b"v7file", b"0", b"v7\n", magic=bytes(8)) + EOF,
        "octal-with-spaces": member(b"spaced", b"0", b"s", mode=b"  644   ", uid=b" 1750 \0\0")
        + EOF,
        "bad-octal": member(b"bad", b"0", b"b", mode=b"0000x44\0") + EOF,
        "negative-size": header(b"neg", b"0", sizef=b"\xff" * 12) + EOF,
        "sparse-pax-1.0-by-hand": _sparse_pax_10([(1000, b"A" * 600), (5000, b"B" * 10)], 9000)
        + EOF,
        "sparse-unreferenced-data": _sparse_pax_10([(10, b"A" * 5)], 100, b"extra") + EOF,
        "sparse-beyond-size": _sparse_pax_10([(90, b"A" * 50)], 100) + EOF,
        "same-path-twice": layer_tar(
            [
                f("x", b"first\n"),
                f("x", b"second wins\n", mode=0o600),
                d("dir"),
                f("dir/child", b"c"),
                f("dir", b"a file replaces the directory\n"),
                f("file-then-dir", b"f"),
                d("file-then-dir", mode=0o711),
                f("file-then-dir/inside", b"i"),
                sym("file-then-link", "x"),
                f("file-then-link", b"not a link any more\n"),
                d("dir-twice", mode=0o700),
                f("dir-twice/kept", b"k"),
                d("dir-twice", mode=0o750),
            ]
        ),
        "unknown-type-with-data": member(b"volume-label", b"V", b"skipped data\n" * 50)
        + member(b"after", b"0", b"after an unknown type\n")
        + EOF,
        "hardlinks-and-replaced-targets": layer_tar(
            [
                f("t", b"old content\n"),
                hard("l", "t"),
                f("t", b"new content\n", mode=0o600),
                f("t2", b"old t2\n"),
                hard("l2", "t2"),
                hard("l3", "l2"),
                d("t2"),
                f("t2/x", b"x"),
                f("chain", b"chain\n"),
                hard("chain.1", "chain"),
                hard("chain.2", "chain.1"),
            ]
        ),
        "parents-never-appear": layer_tar(
            [f("p/q/r/deep", b"deep\n"), sym("s/t/link", "../../p"), hard("h/i/hard", "p/q/r/deep")]
        ),
    }
    return cases


NO_SPECIAL = ("--exclude=./fifo", "--exclude=./null")  # v7 holds no fifo and no device


def corpus(work: Path) -> dict[str, bytes]:
    """Every case by name: real producers, then the hand-made ones."""
    common = source_tree(work / "common", rich=False)
    rich = source_tree(work / "rich", rich=True)
    out = work / "out.tar"
    xattrs = ("--xattrs", "--xattrs-include=*")
    builders: dict[str, Callable[[], bytes]] = {
        "gnutar-gnu": lambda: gnu_tar(rich, out, "gnu", "--sparse"),
        "gnutar-oldgnu": lambda: gnu_tar(rich, out, "oldgnu", "--sparse"),
        "gnutar-posix": lambda: gnu_tar(rich, out, "posix", *xattrs),
        "gnutar-posix-sparse-0.0": lambda: gnu_tar(rich, out, "posix", "--sparse-version=0.0"),
        "gnutar-posix-sparse-0.1": lambda: gnu_tar(rich, out, "posix", "--sparse-version=0.1"),
        "gnutar-posix-sparse-1.0": lambda: gnu_tar(rich, out, "posix", "--sparse-version=1.0"),
        "gnutar-ustar": lambda: gnu_tar(common, out, "ustar"),
        "gnutar-v7": lambda: gnu_tar(common, out, "v7", *NO_SPECIAL),
        "bsdtar-pax": lambda: bsdtar(rich, out, "pax", "--xattrs"),
        "bsdtar-paxr": lambda: bsdtar(rich, out, "paxr", "--xattrs"),
        "bsdtar-ustar": lambda: bsdtar(common, out, "ustar"),
        "bsdtar-gnutar": lambda: bsdtar(rich, out, "gnutar"),
        "bsdtar-v7": lambda: bsdtar(common, out, "v7", *NO_SPECIAL),
        "python-pax": lambda: python_tar(rich, tarfile.PAX_FORMAT),
        "python-gnu": lambda: python_tar(rich, tarfile.GNU_FORMAT),
        "python-ustar": lambda: python_tar(common, tarfile.USTAR_FORMAT),
    }
    cases = {name: build() for name, build in builders.items()}
    cases.update(damaged())
    return cases


# Every case's name: the tests are parametrized before the corpus is built.
PRODUCERS = (
    "gnutar-gnu", "gnutar-oldgnu", "gnutar-posix", "gnutar-posix-sparse-0.0",
    "gnutar-posix-sparse-0.1", "gnutar-posix-sparse-1.0", "gnutar-ustar", "gnutar-v7",
    "bsdtar-pax", "bsdtar-paxr", "bsdtar-ustar", "bsdtar-gnutar", "bsdtar-v7",
    "python-pax", "python-gnu", "python-ustar",
)  # fmt: skip
# Go's reader refuses these (and so must we).
REFUSED = (
    "zero-block-then-header", "truncated-data", "truncated-header", "bad-checksum",
    "pax-bad-record", "pax-bad-uid", "pax-header-over-1MiB", "bad-octal", "negative-size",
    "sparse-unreferenced-data", "sparse-beyond-size",
)  # fmt: skip
READABLE_BY_HAND = (
    "no-eof-marker", "unpadded-last-member", "half-padded-last-member", "one-zero-block",
    "garbage-after-eof", "zeros-after-eof", "empty", "only-eof", "base256-numbers",
    "base256-ustar", "pax-empty-values", "pax-overrides", "pax-global-ignored", "pax-then-eof",
    "gnu-longname-beats-pax", "dir-with-size-has-no-data", "symlink-with-size",
    "rega-slash-is-dir", "contiguous-file", "v7-header", "octal-with-spaces",
    "sparse-pax-1.0-by-hand", "same-path-twice", "parents-never-appear", "unknown-type-with-data",
    "hardlinks-and-replaced-targets",
)  # fmt: skip
READABLE = PRODUCERS + READABLE_BY_HAND
CASES = READABLE + REFUSED
# Go reads these, but umoci refuses a member type in them: old GNU sparse (S), contiguous (7),
# a global header (g; docker and containerd skip it, as we do), an unknown type (V: docker
# refuses it too; we skip it with a warning).
UMOCI_REFUSES = (
    "gnutar-gnu", "gnutar-oldgnu", "contiguous-file", "pax-global-ignored",
    "unknown-type-with-data",
)  # fmt: skip
