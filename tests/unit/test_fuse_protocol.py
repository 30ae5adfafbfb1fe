"""Golden bytes for every FUSE request and reply (unionfs.fuse.protocol), written out by hand
from the kernel's uapi <linux/fuse.h>, not from the module's own layouts. The INIT request
and reply are the bytes a 6.18 kernel and libfuse 3.14 exchanged on this machine."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from unionfs.fuse import protocol as p
from unionfs.fuse.protocol import Opcode

# The kernel writes FUSE messages in the machine's byte order; these bytes are little-endian.
pytestmark = pytest.mark.skipif(sys.byteorder != "little", reason="golden bytes are little-endian")


def h(text: str) -> bytes:
    """Hex with spaces between fields (little endian as written)."""
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


def u32(n: int) -> str:
    return n.to_bytes(4, "little").hex()


def u64(n: int) -> str:
    return (n % (1 << 64)).to_bytes(8, "little").hex()


RW_HEAD = "0300000000000000 0000020000000000 00000200 02000000 adde000000000000 00800000 00000000"
RW_IN = p.ReadIn(3, 0x20000, 0x20000, 2, 0xDEAD, 0x8000)
RELEASE = h("0300000000000000 00800000 01000000 0700000000000000")
LK = h(
    "0300000000000000 1100000000000000 0000000000000000 ffffffffffffff7f 01000000 64000000"
    " 00000000 00000000"
)
CREATE = h("41820000 a4810000 12000000 00000000") + b"new\0"
COPY = h(
    "0300000000000000 0000000000000000 0900000000000000 0400000000000000 1000000000000000"
    " 0010000000000000 0000000000000000"
)
INIT_KERNEL = h("07000000 2d000000 00000200 fbffff73 fd050000") + bytes(44)

# opcode -> (body as the kernel sends it, what it decodes to)
REQUESTS: dict[Opcode, tuple[bytes, Any]] = {
    Opcode.LOOKUP: (b"file\0", b"file"),
    Opcode.FORGET: (h("0500000000000000"), p.ForgetIn(5)),
    Opcode.GETATTR: (h("01000000 00000000 2a00000000000000"), p.GetattrIn(1, 42)),
    Opcode.SETATTR: (
        h(
            "2b000000 00000000 0700000000000000 0010000000000000 0000000000000000"
            " 0000000000000000 ffffffffffffffff 0000000000000000 00000000 ffc99a3b 00000000"
            " a4810000 00000000 e8030000 64000000 00000000"
        ),
        p.SetattrIn(0x2B, 7, 0x1000, 0, 0, -1, 0, 0, 999_999_999, 0, 0o100644, 1000, 100),
    ),
    Opcode.READLINK: (b"", p.Empty()),
    Opcode.SYMLINK: (b"ln\0target\0", p.SymlinkIn(b"ln", b"target")),
    Opcode.MKNOD: (
        h("80210000 03010000 12000000 00000000") + b"dev\0",
        p.MknodIn(0o20600, 0x103, 0o22, b"dev"),
    ),
    Opcode.MKDIR: (h("ed010000 12000000") + b"d\0", p.MkdirIn(0o755, 0o22, b"d")),
    Opcode.UNLINK: (b"x\0", b"x"),
    Opcode.RMDIR: (b"d\0", b"d"),
    Opcode.RENAME: (h("0900000000000000") + b"a\0b\0", p.RenameIn(9, 0, b"a", b"b")),
    Opcode.LINK: (h("0500000000000000") + b"n\0", p.LinkIn(5, b"n")),
    Opcode.OPEN: (h("02800000 01000000"), p.OpenIn(0x8002, 1)),
    Opcode.READ: (h(RW_HEAD), RW_IN),
    Opcode.WRITE: (
        h("0300000000000000 0a00000000000000 05000000 01000000 0000000000000000 01800000 00000000")
        + b"hello",
        (3, 10, 5, 1, 0, 0x8001, b"hello"),
    ),
    Opcode.STATFS: (b"", p.Empty()),
    Opcode.RELEASE: (RELEASE, p.ReleaseIn(3, 0x8000, 1, 7)),
    Opcode.FSYNC: (h("0300000000000000 01000000 00000000"), p.FsyncIn(3, 1)),
    Opcode.SETXATTR: (
        h("03000000 01000000") + b"user.a\0val",
        p.SetxattrIn(3, 1, 0, b"user.a", b"val"),
    ),
    Opcode.GETXATTR: (h("00010000 00000000") + b"user.a\0", p.GetxattrIn(256, b"user.a")),
    Opcode.LISTXATTR: (h("00000000 00000000"), p.ListxattrIn(0)),
    Opcode.REMOVEXATTR: (b"user.a\0", b"user.a"),
    Opcode.FLUSH: (h("0300000000000000 00000000 00000000 0900000000000000"), p.FlushIn(3, 9)),
    Opcode.INIT: (INIT_KERNEL, p.InitIn(7, 45, 0x20000, 0x5FD_73FF_FFFB)),
    Opcode.OPENDIR: (h("00880100 00000000"), p.OpenIn(0x18800, 0)),
    Opcode.READDIR: (h(RW_HEAD), RW_IN),
    Opcode.RELEASEDIR: (RELEASE, p.ReleaseIn(3, 0x8000, 1, 7)),
    Opcode.FSYNCDIR: (h("0300000000000000 00000000 00000000"), p.FsyncIn(3, 0)),
    Opcode.GETLK: (LK, p.LkIn(3, 0x11, 0, (1 << 63) - 1, 1, 100, 0)),
    Opcode.SETLK: (LK, p.LkIn(3, 0x11, 0, (1 << 63) - 1, 1, 100, 0)),
    Opcode.SETLKW: (LK, p.LkIn(3, 0x11, 0, (1 << 63) - 1, 1, 100, 0)),
    Opcode.ACCESS: (h("04000000 00000000"), p.AccessIn(4)),
    Opcode.CREATE: (CREATE, p.CreateIn(0x8241, 0o100644, 0o22, 0, b"new")),
    Opcode.INTERRUPT: (h("1000000000000000"), p.InterruptIn(16)),
    Opcode.BMAP: (h("0700000000000000 00100000 00000000"), p.BmapIn(7, 4096)),
    Opcode.DESTROY: (b"", p.Empty()),
    Opcode.IOCTL: (
        h("0300000000000000 10000000 01540000 0000000000000000 02000000 00000000") + b"ab",
        p.IoctlIn(3, 0x10, 0x5401, 0, 2, 0, b"ab"),
    ),
    Opcode.POLL: (
        h("0300000000000000 5500000000000000 01000000 01000000"),
        p.PollIn(3, 0x55, 1, 1),
    ),
    Opcode.NOTIFY_REPLY: (
        h("0000000000000000 0000000000000000 03000000 00000000 0000000000000000 0000000000000000")
        + b"abc",
        p.NotifyReplyIn(0, 3, b"abc"),
    ),
    Opcode.BATCH_FORGET: (
        h("02000000 00000000 0500000000000000 0100000000000000 0600000000000000 0200000000000000"),
        [(5, 1), (6, 2)],
    ),
    Opcode.FALLOCATE: (
        h("0300000000000000 0000000000000000 0010000000000000 03000000 00000000"),
        p.FallocateIn(3, 0, 4096, 3),
    ),
    Opcode.READDIRPLUS: (h(RW_HEAD), RW_IN),
    Opcode.RENAME2: (
        h("0900000000000000 02000000 00000000") + b"a\0b\0",
        p.RenameIn(9, 2, b"a", b"b"),
    ),
    Opcode.LSEEK: (h("0300000000000000 0a00000000000000 03000000 00000000"), p.LseekIn(3, 10, 3)),
    Opcode.COPY_FILE_RANGE: (COPY, p.CopyFileRangeIn(3, 0, 9, 4, 16, 4096, 0)),
    Opcode.SETUPMAPPING: (
        h("0300000000000000 0000000000000000 0000200000000000 0100000000000000 0000400000000000"),
        p.SetupmappingIn(3, 0, 0x200000, 1, 0x400000),
    ),
    Opcode.REMOVEMAPPING: (
        h("01000000 0000400000000000 0000200000000000"),
        [(0x400000, 0x200000)],
    ),
    Opcode.SYNCFS: (h("0000000000000000"), p.Empty()),
    Opcode.TMPFILE: (CREATE, p.CreateIn(0x8241, 0o100644, 0o22, 0, b"new")),
    Opcode.STATX: (
        h("01000000 00000000 0300000000000000 00000000 ff0f0000"),
        p.StatxIn(1, 3, 0, 0xFFF),
    ),
    Opcode.COPY_FILE_RANGE_64: (COPY, p.CopyFileRangeIn(3, 0, 9, 4, 16, 4096, 0)),
    Opcode.CUSE_INIT: (h("07000000 1f000000 00000200 01000000"), p.InitIn(7, 31, 0x20000, 1)),
}


def request(
    opcode: int, body: bytes, unique: int = 0x77, nodeid: int = 1, ext: bytes = b""
) -> bytes:
    """A whole request as read from /dev/fuse (header written out field by field)."""
    length = 40 + len(body) + len(ext)
    head = h(
        f"{u32(length)} {u32(opcode)} {u64(unique)} {u64(nodeid)} {u32(1000)} {u32(100)}"
        f" {u32(4242)} {(len(ext) // 8).to_bytes(2, 'little').hex()} 0000"
    )
    return head + body + ext


def test_every_opcode_has_a_golden_request() -> None:
    assert set(REQUESTS) == set(Opcode) == set(p.DECODERS)


@pytest.mark.parametrize("opcode", list(Opcode), ids=lambda o: o.name)
def test_request_decodes(opcode: Opcode) -> None:
    body, want = REQUESTS[opcode]
    raw = request(opcode, body)
    header, got = p.decode(raw, len(raw))
    assert header == p.InHeader(len(raw), opcode, 0x77, 1, 1000, 100, 4242, 0)
    if opcode is Opcode.WRITE:
        assert got[:6] == want[:6] and bytes(got.data) == want[6]
    else:
        assert got == want


@pytest.mark.parametrize("opcode", [o for o in Opcode if REQUESTS[o][0]], ids=lambda o: o.name)
def test_a_short_body_is_refused(opcode: Opcode) -> None:
    body, _want = REQUESTS[opcode]
    raw = request(opcode, body[:-1])
    with pytest.raises(p.ProtocolError):
        p.decode(raw, len(raw))


def test_the_header_length_must_match_the_bytes_read() -> None:
    raw = request(Opcode.LOOKUP, b"f\0")
    with pytest.raises(p.ProtocolError, match="header says 42 bytes, 41 were read"):
        p.decode(raw[:-1], 41)
    with pytest.raises(p.ProtocolError, match="header says 42 bytes, 50 were read"):
        p.decode(raw + bytes(8), 50)
    with pytest.raises(p.ProtocolError, match="shorter than its header"):
        p.decode(raw[:39], 39)


def test_extensions_are_cut_off_the_body() -> None:
    # A security context extension (8 bytes) after a MKDIR's own arguments.
    raw = request(Opcode.MKDIR, h("ed010000 12000000") + b"d\0", ext=h("08000000 20000000"))
    header, got = p.decode(raw, len(raw))
    assert header.total_extlen == 1 and got == p.MkdirIn(0o755, 0o22, b"d")
    bad = bytearray(raw)
    bad[36:38] = (9).to_bytes(2, "little")  # 72 bytes of extensions in a 58-byte request
    with pytest.raises(p.ProtocolError, match="extensions"):
        p.decode(bad, len(bad))


def test_an_unknown_opcode_decodes_to_its_raw_body() -> None:
    raw = request(99, b"\1\2\3")
    header, got = p.decode(raw, len(raw))
    assert header.opcode == 99 and got == b"\1\2\3"


def test_setxattr_with_the_extended_header() -> None:
    body = h("03000000 01000000 01000000 00000000") + b"user.a\0val"
    assert p.decode_setxattr(body, ext=True) == p.SetxattrIn(3, 1, 1, b"user.a", b"val")


def test_an_init_before_7_36_has_no_flags2() -> None:
    got = p.decode_init(h("07000000 1f000000 00000200 fbffff33"))
    assert got == p.InitIn(7, 31, 0x20000, 0x33FFFFFB)
    with pytest.raises(p.ProtocolError):  # INIT_EXT promises the 64-byte form
        p.decode_init(h("07000000 2d000000 00000200 fbffff73"))


ATTR = p.Attr(
    ino=0x11,
    size=5,
    blocks=8,
    atime=-1,
    mtime=2,
    ctime=3,
    atimensec=999_999_999,
    mtimensec=5,
    ctimensec=6,
    mode=0o100644,
    nlink=1,
    uid=1000,
    gid=100,
    rdev=0,
    blksize=4096,
    flags=0,
)
ATTR_HEX = (
    "1100000000000000 0500000000000000 0800000000000000 ffffffffffffffff 0200000000000000"
    " 0300000000000000 ffc99a3b 05000000 06000000 a4810000 01000000 e8030000 64000000"
    " 00000000 00100000 00000000"
)


def test_replies_encode() -> None:
    assert p.reply(0x77, b"ab") == h("12000000 00000000 7700000000000000") + b"ab"
    assert p.error_reply(0x77, 2) == h("10000000 feffffff 7700000000000000")
    assert p.out_header(16, -38, 5) == h("10000000 daffffff 0500000000000000")
    entry = p.entry_out(0x11, (86400, 0), (3600, 500), ATTR)
    assert entry == h(
        "1100000000000000 0000000000000000 8051010000000000 100e000000000000 00000000 f4010000"
        + ATTR_HEX
    )
    assert p.attr_out((3600, 500), ATTR) == h("100e000000000000 f4010000 00000000" + ATTR_HEX)
    assert p.open_out(9, p.FOPEN_PASSTHROUGH, 3) == h("0900000000000000 80000000 03000000")
    assert p.open_out(0, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR) == h(
        "0000000000000000 0a000000 00000000"
    )
    assert p.write_out(4096) == h("00100000 00000000")
    assert p.getxattr_out(12) == h("0c000000 00000000")
    assert p.statfs_out(1, 2, 3, 4, 5, 4096, 255, 4096) == h(
        "0100000000000000 0200000000000000 0300000000000000 0400000000000000 0500000000000000"
        " 00100000 ff000000 00100000 00000000" + "00" * 24
    )
    assert p.lk_out(0, 10, 2, 7) == h("0000000000000000 0a00000000000000 02000000 07000000")
    assert p.bmap_out(9) == h("0900000000000000")
    assert p.ioctl_out(-25) == h("e7ffffff 00000000 00000000 00000000")
    assert p.poll_out(5) == h("05000000 00000000")
    assert p.lseek_out(4096) == h("0010000000000000")
    assert p.copy_file_range_out(7) == h("0700000000000000")


def test_statx_reply() -> None:
    times = p.StatxTimes((1, 2), (3, 4), (5, 6), (7, 8))
    got = p.statx_out((1, 0), 0xFFF, 4096, 2, 1000, 100, 0o40755, 0x11, 0, 8, times, (1, 3))
    stamps = "".join(f"{u64(s)} {u32(ns)} 00000000" for s, ns in times)
    assert got == h(
        "0100000000000000 00000000 00000000 0000000000000000 0000000000000000"  # statx_out
        " ff0f0000 00100000 0000000000000000 02000000 e8030000 64000000 ed41 0000"
        " 1100000000000000 0000000000000000 0800000000000000 0000000000000000"
        + stamps
        + " 01000000 03000000 00000000 00000000"
        + "00" * 112
    )
    assert len(got) == 32 + 256


def test_init_reply_as_libfuse_sent_it() -> None:
    """libfuse 3.14's answer to the INIT request above, as captured (with flags2's
    PASSTHROUGH and max_stack_depth 1 that the old daemon wrote into it)."""
    sent = h(
        "07000000 1f000000 00000200 39b04040 0000 0000 00001000 01000000 0001 0000 20000000"
        " 01000000 0000"
    ) + bytes(22)
    out = p.InitOut(
        major=7,
        minor=31,
        max_readahead=0x20000,
        flags=0x4040B039 | p.PASSTHROUGH,
        max_write=1 << 20,
        time_gran=1,
        max_pages=256,
        max_stack_depth=1,
    )
    assert p.init_out(out) == sent
    compat = sent[:4] + h(u32(22)) + sent[8:24]  # before 7.23: the first 24 bytes
    assert p.init_out(out._replace(minor=22)) == compat


def test_directory_entries_are_padded_to_8_bytes() -> None:
    assert p.dirent(0x11, 3, 8, b"abc") == h(
        "1100000000000000 0300000000000000 03000000 08000000"
    ) + b"abc" + bytes(5)
    assert (
        p.dirent(0x11, 3, 4, b"12345678")
        == h("1100000000000000 0300000000000000 08000000 04000000") + b"12345678"
    )
    entry = p.entry_out(0x11, (1, 0), (1, 0), ATTR)
    plus = p.direntplus(entry, 0x11, 3, 8, b"f")
    assert plus == entry + h("1100000000000000 0300000000000000 01000000 08000000") + b"f" + bytes(
        7
    )
    assert len(plus) % 8 == 0


def test_notifications_encode() -> None:
    assert p.notify_inval_inode(5, -1, 0) == h(
        "28000000 02000000 0000000000000000 0500000000000000 ffffffffffffffff 0000000000000000"
    )
    assert (
        p.notify_inval_entry(1, b"name")
        == h("25000000 03000000 0000000000000000 0100000000000000 04000000 00000000") + b"name\0"
    )
    assert (
        p.notify_delete(1, 5, b"n")
        == h(
            "2a000000 06000000 0000000000000000 0100000000000000 0500000000000000 01000000 00000000"
        )
        + b"n\0"
    )
    assert (
        p.notify_store(5, 10, b"xy")
        == h(
            "2a000000 04000000 0000000000000000 0500000000000000 0a00000000000000 02000000 00000000"
        )
        + b"xy"
    )
    assert p.notify_retrieve(9, 5, 0, 4096) == h(
        "30000000 05000000 0000000000000000 0900000000000000 0500000000000000 0000000000000000"
        " 00100000 00000000"
    )
    assert p.notify_poll(0x55) == h("18000000 01000000 0000000000000000 5500000000000000")
    assert p.notify_resend() == h("10000000 07000000 0000000000000000")
    assert p.notify_inc_epoch() == h("10000000 08000000 0000000000000000")
    assert p.notify_prune([5, 6]) == h(
        "30000000 09000000 0000000000000000 02000000 00000000 0000000000000000"
        " 0500000000000000 0600000000000000"
    )


def test_device_ioctls() -> None:
    # _IOW(229, 1, struct fuse_backing_map) and _IOW(229, 2, uint32_t), as the header defines.
    assert p.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert p.DEV_IOC_BACKING_CLOSE == 0x4004E502
    assert p.DEV_IOC_CLONE == 0x8004E500
    assert p.backing_map(7) == h("07000000 00000000 0000000000000000")
