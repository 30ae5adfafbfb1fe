"""The FUSE session and the union's handlers without a mount: requests written into a
SEQPACKET socket (one message per request, like /dev/fuse), replies read back and decoded."""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from tests.unit.test_fuse_protocol import INIT_KERNEL, REQUESTS, request
from unionfs.core.fs import UnionFS
from unionfs.core.layers import DirLayer
from unionfs.core.types import Fh
from unionfs.fuse import handlers as hd
from unionfs.fuse import protocol as p
from unionfs.fuse.handlers import Handlers
from unionfs.fuse.policy import Policy
from unionfs.fuse.protocol import Opcode
from unionfs.fuse.session import WANT, Options, Session

ROOT = 1


def _serve(
    tmp_path: Path,
    requests: list[bytes],
    patch: Callable[[UnionFS], None] | None = None,
    options: Options | None = None,
    during: Callable[[Handlers], Any] | None = None,
    policy: Policy | None = None,
) -> list[bytes]:
    """Serve `requests` through a Session over a one-layer union of `tmp_path / "l"`, until
    the end of the stream; the replies in the order written. `during(handlers)`, if given,
    runs as a task beside the loop first (e.g. holding the lock)."""
    fs = UnionFS([DirLayer(os.fsencode(tmp_path / "l"))], None)
    handlers = Handlers(fs, policy)
    if patch is not None:
        patch(fs)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        for req in requests:
            theirs.send(req)
        theirs.shutdown(socket.SHUT_WR)  # the loop ends at the end of the stream
        session = Session(ours.fileno(), handlers, options)

        async def main() -> None:
            async with trio.open_nursery() as nursery:
                if during is not None:
                    await nursery.start(during, handlers)
                await session.run()

        trio.run(main)
        theirs.setblocking(False)
        replies = []
        while True:
            try:
                replies.append(theirs.recv(1 << 21))
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
    length, error, unique = p.OUT_HEADER.unpack_from(reply)
    assert length == len(reply)
    return length, error, unique


def _req(opcode: int, unique: int, nodeid: int, body: bytes = b"", uid: int = 0) -> bytes:
    return (
        p.IN_HEADER.pack(p.IN_HEADER.size + len(body), opcode, unique, nodeid, uid, 0, 1, 0, 0)
        + body
    )


def test_lookup_answers_an_entry_and_caches_absence(tmp_path: Path) -> None:
    _tree(tmp_path)
    replies = _serve(
        tmp_path,
        [_req(Opcode.LOOKUP, 7, ROOT, b"f\0"), _req(Opcode.LOOKUP, 8, ROOT, b"nope\0")],
    )
    assert len(replies) == 2
    _len, error, unique = _header(replies[0])
    assert (error, unique) == (0, 7)
    fields = p.ENTRY_OUT.unpack_from(replies[0], 16)
    nodeid, ino, size, mode, uid = fields[0], fields[6], fields[7], fields[15], fields[17]
    assert nodeid == ino != 0
    assert size == 5 and stat.S_ISREG(mode)
    assert uid == os.getuid()
    assert _header(replies[1])[1:] == (0, 8)
    neg = p.ENTRY_OUT.unpack_from(replies[1], 16)
    assert neg[0] == 0  # nodeid 0: "no such name"
    assert neg[2] == int(hd.NEGATIVE_TIMEOUT)  # entry_valid


def test_an_unexpected_error_answers_eio_and_the_loop_goes_on(tmp_path: Path) -> None:
    _tree(tmp_path)

    def broken(fs: UnionFS) -> None:
        def getattr_fails(ino: Any) -> Any:
            raise RuntimeError("a bug")

        fs.getattr = getattr_fails  # type: ignore[method-assign]

    replies = _serve(
        tmp_path,
        [_req(Opcode.GETATTR, 3, ROOT, bytes(16)), _req(Opcode.LOOKUP, 4, ROOT, b"f\0")],
        broken,
    )
    assert [_header(r)[1:] for r in replies] == [(-errno.EIO, 3), (0, 4)]


def test_a_malformed_request_answers_eio_and_the_loop_goes_on(tmp_path: Path) -> None:
    _tree(tmp_path)
    bad_len = bytearray(_req(Opcode.LOOKUP, 5, ROOT, b"f\0"))
    bad_len[0:4] = (99).to_bytes(4, "little")  # more than was written
    no_nul = _req(Opcode.LOOKUP, 6, ROOT, b"f")
    replies = _serve(tmp_path, [bytes(bad_len), no_nul, _req(Opcode.LOOKUP, 7, ROOT, b"f\0")])
    assert [_header(r)[1:] for r in replies] == [(-errno.EIO, 5), (-errno.EIO, 6), (0, 7)]


def test_every_opcode_is_answered_once_or_never_as_it_must(tmp_path: Path) -> None:
    """One request of every opcode the kernel may send (the golden bodies): exactly one
    reply each, none for FORGET, BATCH_FORGET, INTERRUPT and NOTIFY_REPLY. DESTROY is
    answered and ends the session: a request after it is not read."""
    _tree(tmp_path)
    order = [o for o in Opcode if o is not Opcode.DESTROY]
    reqs = [request(op, REQUESTS[op][0], unique=100 + i) for i, op in enumerate(order)]
    replies = _serve(tmp_path, reqs)
    answered: dict[int, int] = {}
    for r in replies:
        _len, err, unique = _header(r)
        if unique == 0:
            continue  # a notification (a failed rename invalidates its parents' attributes)
        assert unique not in answered, f"two replies to {order[unique - 100].name}"
        answered[unique] = err
    silent = {Opcode.FORGET, Opcode.BATCH_FORGET, Opcode.INTERRUPT, Opcode.NOTIFY_REPLY}
    assert {order[u - 100] for u in answered} == set(order) - silent
    errors = {order[u - 100]: -e for u, e in answered.items()}
    for op in (Opcode.IOCTL, Opcode.POLL, Opcode.GETLK, Opcode.BMAP, Opcode.STATX,
               Opcode.COPY_FILE_RANGE, Opcode.TMPFILE, Opcode.FLUSH):  # fmt: skip
        assert errors[op] == errno.ENOSYS, op.name
    assert errors[Opcode.INIT] == 0
    assert errors[Opcode.STATFS] == 0 and errors[Opcode.FSYNCDIR] == 0
    replies = _serve(tmp_path, [_req(Opcode.DESTROY, 5, 0), _req(Opcode.LOOKUP, 6, ROOT, b"f\0")])
    assert [_header(r)[1:] for r in replies] == [(0, 5)]


def test_init_is_negotiated_by_the_session(tmp_path: Path) -> None:
    _tree(tmp_path)
    after: list[int] = []
    replies = _serve(
        tmp_path,
        [request(Opcode.INIT, INIT_KERNEL, unique=2)],
        options=Options(after_init=lambda: after.append(1)),
    )
    assert len(replies) == 1 and _header(replies[0])[1:] == (0, 2)
    major, minor, ra, flags, _bg, _ct, max_write, gran, pages, _al, flags2, depth = (
        struct.unpack_from("<IIIIHHIIHHII", replies[0], 16)
    )
    assert (major, minor, ra, max_write, gran, pages) == (7, 40, 0x20000, 1 << 20, 1, 256)
    kernel = 0x5FD_73FF_FFFB
    assert flags | flags2 << 32 == WANT & kernel
    assert not flags2 & (p.PASSTHROUGH >> 32) and depth == 0  # not asked for
    assert after == [1]
    replies = _serve(
        tmp_path, [request(Opcode.INIT, INIT_KERNEL, unique=2)], options=Options(passthrough=True)
    )
    flags2, depth = struct.unpack_from("<II", replies[0], 16 + 32)
    assert flags2 & (p.PASSTHROUGH >> 32) and depth == 1


def test_allow_root_refuses_other_users(tmp_path: Path) -> None:
    """deny_others (allow_root): the owner and root are served, anyone else gets EACCES
    except for requests that continue an open file."""
    _tree(tmp_path)
    read = p.READ_IN.pack(0, 0, 4096, 0, 0, 0, 0)
    reqs = [
        _req(Opcode.LOOKUP, 1, ROOT, b"f\0", uid=1000),  # the owner
        _req(Opcode.LOOKUP, 2, ROOT, b"f\0", uid=0),  # root
        _req(Opcode.LOOKUP, 3, ROOT, b"f\0", uid=1001),  # someone else
        _req(Opcode.READDIRPLUS, 4, ROOT, read, uid=1001),  # no OPENDIR was checked
        _req(Opcode.READ, 5, ROOT, read, uid=1001),  # follows an OPEN (fh 0: EBADF here)
    ]
    replies = _serve(tmp_path, reqs, options=Options(deny_others=True, owner=1000))
    got = [_header(r)[1:] for r in replies]
    assert got[:4] == [(0, 1), (0, 2), (-errno.EACCES, 3), (-errno.EACCES, 4)]
    assert got[4][1] == 5 and got[4][0] != -errno.EACCES
    # Without allow_root nobody is refused here (the kernel decides who reaches us).
    replies = _serve(tmp_path, reqs[2:4], options=Options(owner=1000))
    assert [_header(r)[1] for r in replies] == [0, 0]


def test_an_interrupt_gives_up_a_request_waiting_for_the_lock(tmp_path: Path) -> None:
    """A GETATTR that finds the core busy waits for the lock; an INTERRUPT for it answers
    EINTR at once, and a request after it is served when the lock is free."""
    _tree(tmp_path)

    async def hold(handlers: Handlers, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with handlers.lock:
            task_status.started()
            await trio.sleep(0.2)  # bounded: the requests below are all queued by then

    replies = _serve(
        tmp_path,
        [
            _req(Opcode.GETATTR, 10, ROOT, bytes(16)),
            _req(Opcode.INTERRUPT, 11, 0, struct.pack("<Q", 10)),
            _req(Opcode.GETATTR, 12, ROOT, bytes(16)),
        ],
        during=hold,
    )
    assert [_header(r)[1:] for r in replies] == [(-errno.EINTR, 10), (0, 12)]


def test_listing_offsets_are_cookies_that_resume(tmp_path: Path) -> None:
    """READDIRPLUS without OPENDIR: a small buffer takes a few entries; asking again from the
    last cookie gives the rest, each name once, "." and ".." first."""
    _tree(tmp_path)
    lookup = _serve(tmp_path, [_req(Opcode.LOOKUP, 1, ROOT, b"d\0")])[0]
    assert _header(lookup)[1] == 0
    d_ino = p.ENTRY_OUT.unpack_from(lookup, 16)[0]  # stable: derived from the host inode

    def read(off: int, size: int) -> list[tuple[bytes, int]]:
        """A fresh daemon: look `d` up, then read it from `off` into `size` bytes."""
        body = p.READ_IN.pack(0, off, size, 0, 0, 0, 0)
        reqs = [_req(Opcode.LOOKUP, 1, ROOT, b"d\0"), _req(Opcode.READDIRPLUS, 2, d_ino, body)]
        reply = _serve(tmp_path, reqs)[1]
        _len, error, _u = _header(reply)
        assert error == 0
        out, pos = [], p.OUT_HEADER.size
        while pos < len(reply):
            pos += p.ENTRY_OUT.size
            _ino, off_next, namelen, _type = p.DIRENT.unpack_from(reply, pos)
            pos += p.DIRENT.size
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


def test_names_with_one_hash_get_consecutive_cookies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two names whose hashes collide (forced here: one hash for all) still get distinct,
    increasing offsets, each name once, in a stable order."""

    class OneHash:
        @staticmethod
        def xxh64_intdigest(name: bytes) -> int:
            return 4 << 2 if name != b"z" else 2 << 2

    monkeypatch.setattr(hd, "xxhash", OneHash)
    names = [b"a", b"c", b"b", b"z"]
    listing = hd.Listing(Fh(0), names)
    assert names == [b"z", b"a", b"b", b"c"]  # the core's handle reads in cookie order
    assert listing.cookies == [5, 7, 8, 9]


def test_errno_of_is_the_one_place_failures_become_errnos(caplog: pytest.LogCaptureFixture) -> None:
    from unionfs.core.errors import FsError

    assert hd.errno_of(FsError(errno.EXDEV)) == errno.EXDEV
    assert hd.errno_of(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
    assert hd.errno_of(ValueError("a bug")) == errno.EIO
    assert "unexpected error" in caplog.text


def test_the_policy_of_fuse_overlayfs_options(tmp_path: Path) -> None:
    """timeout= sets every validity, noxattrs=1 answers the xattr calls ENOSYS,
    static_nlink shows directories with one link, fsync=0 makes fsync succeed at once (here
    on a handle that does not exist, which fsync otherwise refuses)."""
    _tree(tmp_path)
    fsync = p.FSYNC_IN.pack(99, 0, 0)
    reqs = [
        _req(Opcode.LOOKUP, 1, ROOT, b"d\0"),
        _req(Opcode.LOOKUP, 2, ROOT, b"nope\0"),
        _req(Opcode.LISTXATTR, 3, ROOT, p.GETXATTR_IN.pack(0, 0)),
        _req(Opcode.GETXATTR, 4, ROOT, p.GETXATTR_IN.pack(0, 0) + b"user.a\0"),
        _req(Opcode.FSYNC, 5, ROOT, fsync),
    ]
    plain = _serve(tmp_path, reqs)
    policy = Policy(timeout=2.5, xattrs=False, static_nlink=True, fsync=False)
    tuned = _serve(tmp_path, reqs, policy=policy)
    d_plain, d_tuned = (p.ENTRY_OUT.unpack_from(r[0], 16) for r in (plain, tuned))
    assert d_plain[2:6] == (int(hd.IMMUTABLE_TIMEOUT),) * 2 + (0, 0)
    assert d_tuned[2:6] == (2, 2, 500_000_000, 500_000_000)  # entry/attr valid, their nsec
    assert d_plain[16] == 2 and d_tuned[16] == 1  # st_nlink of the directory
    assert p.ENTRY_OUT.unpack_from(tuned[1], 16)[2] == 2  # "no such name" for 2.5 s too
    assert [_header(r)[1] for r in plain[2:]] == [0, -errno.ENODATA, -errno.EBADF]
    assert [_header(r)[1] for r in tuned[2:]] == [-errno.ENOSYS, -errno.ENOSYS, 0]
