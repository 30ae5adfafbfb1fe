"""Tar member names to canonical absolute store paths (bytes), refusing escapes."""

from __future__ import annotations

from .errors import LayerError


def normalize(raw: bytes, what: str = "entry") -> bytes:
    """Return the canonical absolute path of a tar name: `b"/"` or `b"/a/b"`.

    `.` and empty components are dropped; `..` pops a component. Refused (LayerError naming the
    entry): absolute names, and any name whose `..` climbs above the layer root.
    """
    if raw.startswith(b"/"):
        raise LayerError(f"{what} {show(raw)}: absolute path refused")
    parts: list[bytes] = []
    for comp in raw.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if not parts:
                raise LayerError(f"{what} {show(raw)}: path escapes the layer root")
            parts.pop()
            continue
        if b"\0" in comp:
            raise LayerError(f"{what} {show(raw)}: NUL byte in name")
        parts.append(comp)
    return b"/" + b"/".join(parts)


def split(path: bytes) -> tuple[bytes, bytes]:
    """Split an absolute canonical path into (parent, name); the root is (b"", b"")."""
    if path == b"/":
        return b"", b""
    parent, _, name = path.rpartition(b"/")
    return (parent or b"/"), name


def join(parent: bytes, name: bytes) -> bytes:
    """Inverse of split()."""
    if parent == b"":
        return b"/"
    if parent == b"/":
        return b"/" + name
    return parent + b"/" + name


def ancestors(path: bytes) -> list[bytes]:
    """Proper ancestors of an absolute path, root first, excluding the root and the path."""
    out: list[bytes] = []
    p = split(path)[0]
    while p not in (b"/", b""):
        out.append(p)
        p = split(p)[0]
    out.reverse()
    return out


def _escape(c: str) -> str:
    o = ord(c)
    return f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}"


def show(path: bytes) -> str:
    """A path for messages, on one printable line, never raising: undecodable bytes and every
    character Python does not call printable (controls, line breaks, bidi overrides, unassigned
    code points) escaped, so that a name from a hostile tar cannot split a message or drive
    or mislead the terminal that shows it."""
    text = path.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)
