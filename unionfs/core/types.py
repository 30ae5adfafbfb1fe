"""Vocabulary shared by the union engine: inode numbers, entry kinds and layer entries."""

from __future__ import annotations

import enum
import os
import stat
from dataclasses import dataclass
from typing import NewType

Ino = NewType("Ino", int)
Fh = NewType("Fh", int)

ROOT_INO = Ino(1)


class Kind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"
    SOCKET = "socket"
    WHITEOUT = "whiteout"


_FMT_TO_KIND = {
    stat.S_IFREG: Kind.FILE,
    stat.S_IFDIR: Kind.DIR,
    stat.S_IFLNK: Kind.SYMLINK,
    stat.S_IFCHR: Kind.CHAR,
    stat.S_IFBLK: Kind.BLOCK,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCKET,
}


def kind_of_mode(mode: int) -> Kind:
    return _FMT_TO_KIND[stat.S_IFMT(mode)]


# Values: Stat, Entry, Resolved and fs.Attributes are never changed once made (use
# dataclasses.replace), but are not frozen: a frozen dataclass's __init__ sets each field
# through object.__setattr__, several times the cost, and a directory read makes one of
# each per entry.
@dataclass(slots=True)
class Stat:
    """The attributes the union reports for an object (st_ino is decided by the inode table)."""

    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    host_ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stat:
        # Positional: this runs for every object a layer reports.
        return cls(
            st.st_mode,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_blocks,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        )


@dataclass(slots=True)
class Entry:
    """One name in one layer, whiteout spellings already normalised.

    `kind` WHITEOUT means the name deletes lower entries; `opaque` (directories) hides every
    lower child; `redirect` (directories) is where lower layers keep this directory's
    contents: an absolute path from the root (b"/a/b") or a name in the same parent.
    """

    name: bytes
    kind: Kind
    st: Stat | None
    opaque: bool = False
    redirect: bytes | None = None
    origin: tuple[int, int] | None = None  # (layer number, host ino) recorded on copy-up
