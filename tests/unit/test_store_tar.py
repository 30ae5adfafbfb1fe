"""Unit tests of the layer tar reader and path canonicalisation (no store, no subprocess)."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerstore.errors import LayerError
from layerstore.model import EntryKind
from layerstore.ocibuild import M, d, f, hard, layer_tar, sym, wh
from layerstore.paths import ancestors, normalize, show, split
from layerstore.tarstream import read_layer


def entries(tar: bytes) -> list[tuple[bytes, EntryKind, bytes | None]]:
    out = []
    for e, fobj in read_layer(io.BytesIO(tar)):
        data = fobj.read() if fobj is not None else None
        out.append((e.path, e.kind, data))
    return out


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (b".", b"/"),
        (b"./", b"/"),
        (b"a", b"/a"),
        (b"./a/b/", b"/a/b"),
        (b"a//b/./c", b"/a/b/c"),
        (b"a/../b", b"/b"),
        (b"\xff\xfe/x", b"/\xff\xfe/x"),
    ],
)
def test_normalize_accepts(raw: bytes, want: bytes) -> None:
    assert normalize(raw) == want


@pytest.mark.parametrize("raw", [b"/etc/passwd", b"..", b"../x", b"a/../../x", b"./../x"])
def test_normalize_refuses_escapes(raw: bytes) -> None:
    with pytest.raises(LayerError, match="entry"):
        normalize(raw)


def test_split_and_ancestors() -> None:
    assert split(b"/") == (b"", b"")
    assert split(b"/a") == (b"/", b"a")
    assert split(b"/a/b/c") == (b"/a/b", b"c")
    assert ancestors(b"/a/b/c") == [b"/a", b"/a/b"]
    assert ancestors(b"/a") == []


def test_kinds_modes_ids_and_devices() -> None:
    tar = layer_tar(
        [
            d("bin", mode=0o755),
            f("bin/su", b"suid", mode=0o4755, uid=0, gid=0),
            f("home/u/f", b"x", uid=123456, gid=654321, mode=0o2640),
            sym("bin/sh", "/bin/busybox"),
            hard("bin/su2", "bin/su"),
            M("dev/null", tarfile.CHRTYPE, mode=0o666, devmajor=1, devminor=3),
            M("dev/sda", tarfile.BLKTYPE, mode=0o660, devmajor=8, devminor=0),
            M("run/fifo", tarfile.FIFOTYPE, mode=0o600),
            d("tmp", mode=0o1777),
        ]
    )
    got = {e.path: e for e, _ in read_layer(io.BytesIO(tar))}
    assert got[b"/bin/su"].mode == 0o4755
    assert got[b"/home/u/f"].uid == 123456 and got[b"/home/u/f"].gid == 654321
    assert got[b"/home/u/f"].mode == 0o2640
    assert got[b"/bin/sh"].kind == EntryKind.SYMLINK and got[b"/bin/sh"].link == b"/bin/busybox"
    assert got[b"/bin/su2"].kind == EntryKind.HARDLINK and got[b"/bin/su2"].link == b"/bin/su"
    assert got[b"/dev/null"].kind == EntryKind.CHAR and got[b"/dev/null"].rdev == (1, 3)
    assert got[b"/dev/sda"].kind == EntryKind.BLOCK and got[b"/dev/sda"].rdev == (8, 0)
    assert got[b"/run/fifo"].kind == EntryKind.FIFO
    assert got[b"/tmp"].mode == 0o1777


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_long_and_non_utf8_names(fmt: int) -> None:
    long = "d/" + "x" * 200 + "/" + "y" * 150
    bad = b"caf\xe9/\xff\xfename"
    tar = layer_tar([f(long, b"long"), f(bad, b"bad"), sym("l", "t" * 300)], fmt=fmt)
    got = entries(tar)
    assert (b"/" + long.encode(), EntryKind.FILE, b"long") in got
    assert (b"/" + bad, EntryKind.FILE, b"bad") in got
    links = {e.path: e.link for e, _ in read_layer(io.BytesIO(tar))}
    assert links[b"/l"] == b"t" * 300


def test_pax_xattrs_and_mtime_precision() -> None:
    tar = layer_tar(
        [
            f(
                "a",
                b"x",
                pax={
                    "SCHILY.xattr.user.comment": "hello",
                    "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                    "mtime": "1600000000.123456789",
                },
            )
        ]
    )
    ((e, _),) = list(read_layer(io.BytesIO(tar)))
    assert dict(e.xattrs) == {
        b"user.comment": b"hello",
        b"security.capability": b"\x01\x00\x00\x02",
    }
    assert e.mtime_ns == 1600000000_123456789


def test_whiteouts_converted_at_the_boundary() -> None:
    tar = layer_tar([wh("etc/gone"), f("etc/.wh..wh..opq"), f("x/.wh..wh.plnk"), d("etc")])
    got = [(e.path, e.kind, e.opaque) for e, _ in read_layer(io.BytesIO(tar))]
    assert got == [
        (b"/etc/gone", EntryKind.WHITEOUT, False),
        (b"/etc", EntryKind.DIR, True),
        (b"/etc", EntryKind.DIR, False),
    ]


def test_no_end_of_archive_marker_is_accepted() -> None:
    tar = layer_tar([d("a"), f("a/b", b"data" * 300)], eof_marker=False)
    assert entries(tar) == [(b"/a", EntryKind.DIR, None), (b"/a/b", EntryKind.FILE, b"data" * 300)]


def test_empty_stream_is_an_empty_layer() -> None:
    assert entries(b"") == []


@pytest.mark.parametrize(
    ("member", "needle"),
    [
        (f("../evil", b"x"), "escapes"),
        (f("a/../../evil", b"x"), "escapes"),
        (f("/etc/passwd", b"x"), "absolute"),
        (hard("x", "../outside"), "escapes"),
        (wh("a/.."), "whiteout"),
    ],
)
def test_hostile_names_are_refused_with_the_entry_named(member: M, needle: str) -> None:
    with pytest.raises(LayerError, match=needle):
        entries(layer_tar([member]))


def test_truncated_member_data_is_refused() -> None:
    tar = layer_tar([f("big", b"z" * 5000)])
    with pytest.raises((LayerError, tarfile.TarError)):
        entries(tar[:2048])


_name = st.binary(min_size=1, max_size=40).filter(
    lambda b: (
        b"/" not in b and b"\0" not in b and b not in (b".", b"..") and not b.startswith(b".wh.")
    )
)


@settings(deadline=None, max_examples=60)
@given(
    files=st.dictionaries(
        st.lists(_name, min_size=1, max_size=4).map(tuple),
        st.tuples(
            st.binary(max_size=300),
            st.integers(0, 0o7777),
            st.integers(0, 2**32 - 1),
            st.integers(0, 2**32 - 1),
        ),
        max_size=12,
    ),
    fmt=st.sampled_from([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]),
    eof=st.booleans(),
)
def test_roundtrip_of_random_names_modes_and_ids(
    files: dict[tuple[bytes, ...], tuple[bytes, int, int, int]], fmt: int, eof: bool
) -> None:
    # A path may not also be a directory of another path: keep leaves only.
    leaves = {p: v for p, v in files.items() if not any(q[: len(p)] == p and q != p for q in files)}
    members = [
        f(b"/".join(p), data, mode=mode, uid=uid, gid=gid)
        for p, (data, mode, uid, gid) in leaves.items()
    ]
    got = {}
    for e, fobj in read_layer(io.BytesIO(layer_tar(members, fmt=fmt, eof_marker=eof))):
        got[e.path] = (fobj.read() if fobj else b"", e.mode, e.uid, e.gid)
    assert got == {b"/" + b"/".join(p): v for p, v in leaves.items()}


def test_huge_metadata_header_is_refused_before_it_is_read() -> None:
    # A PAX header claiming 1 GiB: tarfile would read it all into memory.
    hdr = tarfile.TarInfo("PaxHeaders/x")
    hdr.type = tarfile.XHDTYPE
    hdr.size = 1 << 30
    tar = hdr.tobuf(format=tarfile.USTAR_FORMAT) + b"30 path=" + b"a" * 100
    with pytest.raises(LayerError, match="metadata header"):
        entries(tar)


@pytest.mark.parametrize(
    "member",
    [
        f("u", b"x", pax={"uid": str(1 << 40)}),
        f("g", b"x", pax={"gid": str(1 << 32)}),
        M("dev", tarfile.CHRTYPE, devmajor=1),
    ],
)
def test_ids_out_of_range_are_refused(member: M) -> None:
    if member.name == "dev":
        # ustar can not even carry a big device number: forge one with a GNU base-256 field
        tar = bytearray(layer_tar([member], fmt=tarfile.GNU_FORMAT))
        tar[329:337] = b"\x80" + (1 << 40).to_bytes(7, "big")
        tar[148:156] = b"        "
        tar[148:156] = b"%06o\0 " % sum(tar[:512])
        member_tar = bytes(tar)
    else:
        member_tar = layer_tar([member])
    with pytest.raises(LayerError, match="out of range"):
        entries(member_tar)


@pytest.mark.parametrize(
    ("member", "needle"),
    [
        (f("t", b"x", pax={"mtime": "10000000000"}), "time out of range"),
        (sym("s", "x", pax={"linkpath": "a\0b"}), "NUL in PAX linkpath"),
        (sym("s", ""), "invalid symlink target"),
        (f("x", b"x", pax={"SCHILY.xattr.": "v"}), "invalid xattr name"),
    ],
)
def test_values_unpack_could_not_apply_are_refused(member: M, needle: str) -> None:
    with pytest.raises(LayerError, match=needle):
        entries(layer_tar([member]))


@given(st.binary(max_size=40))
def test_a_path_in_a_message_stays_on_one_printable_line(raw: bytes) -> None:
    shown = show(raw)
    assert shown.isprintable()  # no line break, control, bidi override or unassigned point
    if shown == raw.decode("utf-8", "replace"):
        assert raw.decode("utf-8").isprintable()  # only a clean name is shown as it is


def test_show_escapes_controls_and_undecodable_bytes_and_keeps_the_rest() -> None:
    assert show(b"/etc/caf\xc3\xa9") == "/etc/café"
    assert show(b"/a\nb\x1b[2J\x7f") == "/a\\x0ab\\x1b[2J\\x7f"
    assert show(b"\xc2\x85\xff") == "\\x85\\xff"  # U+0085 (NEL), then a byte that is no UTF-8
    assert show("a\u202eb".encode()) == "a\\u202eb"  # a right-to-left override
