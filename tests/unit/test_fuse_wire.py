"""The request loop's wire format without a mount: requests written into a SEQPACKET socket
(one message per request, like /dev/fuse), replies read back and decoded."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from pathlib import Path
from typing import Any

import trio

from unionfs import fuse_wire as w
from unionfs.core.fs import UnionFS
from unionfs.core.layers import DirLayer
from unionfs.fuse_ops import NEGATIVE_TIMEOUT, Operations

ROOT = 1


def _request(opcode: int, unique: int, nodeid: int, body: bytes = b"") -> bytes:
    return (
        w.IN_HEADER.pack(w.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 1, 0, 0) + body
    )


def _serve(tmp_path: Path, requests: list[bytes], patch: Any = None) -> list[bytes]:
    """Serve `requests` through a Wire over a one-layer union of `tmp_path / "l"`."""
    fs = UnionFS([DirLayer(os.fsencode(tmp_path / "l"))], None)
    ops = Operations(fs)
    ops.mountpoint = None  # no readahead to widen: there is no mount
    if patch is not None:
        patch(fs)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for req in requests:
            theirs.send(req)
        theirs.shutdown(socket.SHUT_WR)  # the loop ends at the end of the stream
        trio.run(w.Wire(ops, ours.fileno(), 0).run)
        theirs.setblocking(False)
        replies = []
        while True:
            try:
                replies.append(theirs.recv(1 << 20))
            except BlockingIOError:
                return replies
    finally:
        ours.close()
        theirs.close()
        fs.close()


def _tree(tmp_path: Path) -> None:
    (tmp_path / "l" / "d").mkdir(parents=True)
    (tmp_path / "l" / "f").write_bytes(b"12345")
    for i in range(40):
        (tmp_path / "l" / "d" / f"entry-{i:02d}").write_bytes(b"x")


def _header(reply: bytes) -> tuple[int, int, int]:
    length, error, unique = w.OUT_HEADER.unpack_from(reply)
    assert length == len(reply)
    return length, error, unique


def test_lookup_answers_an_entry_and_caches_absence(tmp_path: Path) -> None:
    _tree(tmp_path)
    replies = _serve(
        tmp_path,
        [_request(w.LOOKUP, 7, ROOT, b"f\0"), _request(w.LOOKUP, 8, ROOT, b"nope\0")],
    )
    assert len(replies) == 2
    _len, error, unique = _header(replies[0])
    assert (error, unique) == (0, 7)
    fields = w.ENTRY_REPLY.unpack(replies[0])
    nodeid, ino, size, mode = fields[3], fields[9], fields[10], fields[18]
    assert nodeid == ino != 0
    assert size == 5 and stat.S_ISREG(mode)
    assert fields[20] == os.getuid()  # uid
    neg = w.ENTRY_REPLY.unpack(replies[1])
    assert neg[1:4] == (0, 8, 0)  # no error, unique 8, nodeid 0: "no such name"
    assert neg[5] == int(NEGATIVE_TIMEOUT)  # entry_valid


def test_an_unexpected_error_answers_eio_and_the_loop_goes_on(tmp_path: Path) -> None:
    _tree(tmp_path)

    def broken(fs: UnionFS) -> None:
        def getattr_fails(ino: Any) -> Any:
            raise RuntimeError("a bug")

        fs.getattr = getattr_fails  # type: ignore[method-assign]

    replies = _serve(
        tmp_path,
        [_request(w.GETATTR, 3, ROOT, bytes(16)), _request(w.LOOKUP, 4, ROOT, b"f\0")],
        broken,
    )
    assert [_header(r)[1:] for r in replies] == [(-errno.EIO, 3), (0, 4)]


def test_listing_offsets_are_cookies_that_resume(tmp_path: Path) -> None:
    """READDIRPLUS without OPENDIR: a small buffer takes a few entries; asking again from the
    last cookie gives the rest, each name once, "." and ".." first."""
    _tree(tmp_path)
    lookup = _serve(tmp_path, [_request(w.LOOKUP, 1, ROOT, b"d\0")])[0]
    assert _header(lookup)[1] == 0
    d_ino = w.ENTRY_REPLY.unpack(lookup)[3]  # stable: derived from the host inode

    def read(off: int, size: int) -> list[tuple[bytes, int]]:
        """A fresh daemon: look `d` up, then read it from `off` into `size` bytes."""
        body = struct.pack("<QQIIQII", 0, off, size, 0, 0, 0, 0)
        reqs = [_request(w.LOOKUP, 1, ROOT, b"d\0"), _request(w.READDIRPLUS, 2, d_ino, body)]
        reply = _serve(tmp_path, reqs)[1]
        _len, error, _u = _header(reply)
        assert error == 0
        out, pos = [], w.OUT_HEADER.size
        while pos < len(reply):
            pos += w.ENTRY_OUT.size
            _ino, off_next, namelen, _type = w.DIRENT.unpack_from(reply, pos)
            pos += w.DIRENT.size
            out.append((reply[pos : pos + namelen], off_next))
            pos += namelen + (-namelen % 8)
        return out

    first = read(0, 4096)
    assert [n for n, _o in first[:2]] == [b".", b".."]
    assert 2 < len(first) < 42  # a page holds some of the 40 entries, not all
    rest = read(first[-1][1], 1 << 16)
    names = [n for n, _o in first[2:] + rest]
    assert sorted(names) == sorted(f"entry-{i:02d}".encode() for i in range(40))
    cookies = [o for _n, o in first[2:] + rest]
    assert cookies == sorted(cookies) and len(set(cookies)) == 40
    assert read(cookies[-1], 1 << 16) == []  # the end


def test_names_with_one_hash_get_consecutive_cookies(monkeypatch: Any) -> None:
    """Two names whose hashes collide (forced here: one hash for all) still get distinct,
    increasing offsets, each name once, in a stable order."""

    class OneHash:
        @staticmethod
        def xxh64_intdigest(name: bytes) -> int:
            return 4 << 2 if name != b"z" else 2 << 2

    monkeypatch.setattr(w, "xxhash", OneHash)
    names = [b"a", b"c", b"b", b"z"]
    listing = w._Listing(w.Fh(0), names)
    assert names == [b"z", b"a", b"b", b"c"]  # the core's handle reads in cookie order
    assert listing.cookies == [5, 7, 8, 9]
