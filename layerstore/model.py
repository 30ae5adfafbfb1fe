"""Records shared by the store and its readers: Entry (a name in a layer), LayerInfo, ImageInfo."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class EntryKind(enum.IntEnum):
    """What a name in a layer is. Values are stored in `entries.kind`: never renumber."""

    FILE = 1
    DIR = 2
    SYMLINK = 3
    HARDLINK = 4  # another name of a FILE of the same layer (`Entry.link` is its path)
    CHAR = 5
    BLOCK = 6
    FIFO = 7
    SOCKET = 8
    WHITEOUT = 9  # hides the name in lower layers (converted from `.wh.NAME`)


@dataclass(frozen=True)
class Entry:
    """One name of one layer, as stored in the index.

    Paths are bytes. `parent` is the absolute path of the containing directory (`b"/"` for
    top-level names, `b"/etc"` for `/etc/passwd`); the layer's root directory itself has
    `parent == b""` and `name == b""`.

    For HARDLINK entries, `link` is the absolute path of the first name of the inode in the
    same layer, and mode/uid/gid/size/mtime/content/xattrs are copied from it. `nlink` is the
    number of names the inode has in this layer (1 for unlinked files, directories too).
    `content` is the store content key of FILE and HARDLINK entries (None for others).
    `opaque` is only ever True for directories: lower layers' children are hidden.
    `implicit` marks a directory the tar never listed (a missing parent), made 0755 root:root.
    """

    parent: bytes
    name: bytes
    kind: EntryKind
    mode: int  # permission bits including setuid/setgid/sticky; no file-type bits
    uid: int
    gid: int
    size: int  # bytes of content for FILE/HARDLINK, len(link) for SYMLINK, else 0
    mtime_ns: int
    rdev: tuple[int, int] | None = None  # (major, minor) for CHAR and BLOCK
    link: bytes | None = None  # symlink target (verbatim) or hard link target path
    content: str | None = None
    opaque: bool = False
    nlink: int = 1
    implicit: bool = False
    xattrs: tuple[tuple[bytes, bytes], ...] = field(default=())

    @property
    def path(self) -> bytes:
        """Absolute path of this entry (`b"/"` for the root)."""
        if self.parent == b"":
            return b"/"
        if self.parent == b"/":
            return b"/" + self.name
        return self.parent + b"/" + self.name


@dataclass(frozen=True)
class LayerInfo:
    """A layer in the store. `id` is the internal number used by the read API and entries."""

    id: int
    diff_id: str  # sha256:… of the uncompressed tar
    blob_digest: str  # sha256:… of the blob as first imported (== diff_id when uncompressed)
    media_type: str
    blob_size: int
    tar_size: int
    files: int  # number of entries (names) in the layer, whiteouts included
    logical_bytes: int  # sum of regular-file sizes, each inode once
    new_bytes: int  # content bytes this layer added to the store when imported


@dataclass(frozen=True)
class ImageInfo:
    """An image in the store. `id` is the config digest (docker's image ID)."""

    id: str
    manifest_digest: str
    tags: tuple[str, ...]
    repo_digests: tuple[str, ...]
    created: str
    size: int  # sum of the layers' uncompressed tar sizes
    imported: float
    platform: str
