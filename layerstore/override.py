"""Metadata a rootless upper keeps in `user.*` xattrs: the override_stat value (owner, mode,
file type, device numbers) and privileged xattrs stored under a `user.` prefix.

An unprivileged process cannot chown, make device nodes or set `trusted.*` xattrs, so a
rootless upper records them as xattrs (containers/storage's convention, also read by
fuse-overlayfs):

- `user.containers.override_stat` = `UID:GID:MODE[:TYPE]`. MODE is octal; type bits in it
  are ignored (some writers put st_mode there, e.g. `0:0:40755`): without TYPE the object's
  own type counts. TYPE is one of file, dir, symlink, pipe, socket, char-MAJ-MIN,
  block-MAJ-MIN. `user.fuseoverlayfs.override_stat` (fuse-overlayfs' own name, 3 fields) is
  read when the first is absent. These are the engine's rules too (unionfs.core.override):
  the mount shows what commit writes.
- A device node the user could not make is a regular empty file carrying TYPE char/block.
  A symlink, fifo or socket cannot carry a `user.*` xattr: when one needs an override (its
  owner is not the daemon's) it is a regular file carrying TYPE symlink/pipe/socket, whose
  content is the link target for a symlink (the engine's "stand-ins").
- `user.layerfs.xattr.NAME` holds the xattr NAME (e.g. `trusted.x`); fuse-overlayfs'
  `user.containers.override_NAME` is read the same way.

Nothing here touches FUSE: the engine and `commit` share these rules.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

OVERRIDE_XATTR = b"user.containers.override_stat"
FUSEOVERLAYFS_XATTR = b"user.fuseoverlayfs.override_stat"
# Read in this order; the first present wins.
OVERRIDE_XATTRS = (OVERRIDE_XATTR, FUSEOVERLAYFS_XATTR)
XATTR_PREFIX = b"user.layerfs.xattr."
CONTAINERS_XATTR_PREFIX = b"user.containers.override_"
# Private to overlay implementations: never shown, never committed. (`security.selinux` is a
# host label, not image content.)
PRIVATE_XATTRS = (
    b"trusted.overlay.",
    b"user.overlay.",
    b"user.layerfs.",
    b"user.fuseoverlayfs.",
    b"security.fuseoverlayfs.",
    b"user.containers.",
    b"security.selinux",
)

_TYPES = {
    b"file": stat.S_IFREG,
    b"dir": stat.S_IFDIR,
    b"symlink": stat.S_IFLNK,
    b"pipe": stat.S_IFIFO,
    b"socket": stat.S_IFSOCK,
}
_NAMES = {v: k for k, v in _TYPES.items()}
# Types a regular file of a rootless upper may stand for (its override says which).
STAND_INS = (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK)


class OverrideError(ValueError):
    """A malformed override value; the message quotes it."""


@dataclass(frozen=True)
class Override:
    """Owner, permission bits (suid/sgid/sticky included), and optionally the file type
    (`stat.S_IF*`; None: the object's own) and device number of an upper object."""

    uid: int
    gid: int
    mode: int
    fmt: int | None = None
    rdev: int = 0

    def encode(self) -> bytes:
        """The 4-field value (`UID:GID:0MODE:TYPE`); 3 fields when the type is unknown."""
        head = b"%d:%d:0%o" % (self.uid, self.gid, self.mode & 0o7777)
        if self.fmt is None:
            return head
        if self.fmt in (stat.S_IFCHR, stat.S_IFBLK):
            kind = b"char" if self.fmt == stat.S_IFCHR else b"block"
            typ = b"%s-%d-%d" % (kind, os.major(self.rdev), os.minor(self.rdev))
        else:
            typ = _NAMES[self.fmt]
        return head + b":" + typ


def parse(value: bytes) -> Override:
    """Parse an override_stat value (see the module docstring); OverrideError if malformed."""
    text = value.rstrip(b"\0").strip()
    parts = text.split(b":")
    if len(parts) not in (3, 4):
        raise OverrideError(f"bad override_stat value {value!r}")
    try:
        uid, gid, mode = int(parts[0]), int(parts[1]), int(parts[2], 8)
    except ValueError:
        raise OverrideError(f"bad override_stat value {value!r}") from None
    if uid < 0 or gid < 0 or uid >= 1 << 32 or gid >= 1 << 32 or mode < 0 or mode > 0o177777:
        raise OverrideError(f"bad override_stat value {value!r}")
    fmt: int | None = None
    rdev = 0
    if len(parts) == 4:
        typ = parts[3]
        if typ in _TYPES:
            fmt = _TYPES[typ]
        else:
            kind, _, nums = typ.partition(b"-")
            major, _, minor = nums.partition(b"-")
            if kind not in (b"char", b"block") or not major.isdigit() or not minor.isdigit():
                raise OverrideError(f"bad override_stat type in {value!r}")
            fmt = stat.S_IFCHR if kind == b"char" else stat.S_IFBLK
            rdev = os.makedev(int(major), int(minor))
    return Override(uid, gid, mode & 0o7777, fmt, rdev)


def read(path: bytes) -> Override | None:
    """The override of `path` (never following a symlink), or None when it has none.
    OverrideError if the value is malformed; OSError other than "no such xattr" propagates."""
    for name in OVERRIDE_XATTRS:
        try:
            value = os.getxattr(path, name, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
                continue  # EPERM: user.* on a symlink or special file cannot exist
            raise
        return parse(value)
    return None


@dataclass(frozen=True)
class Meta:
    """What an upper object stands for: file type, permission bits, owner, device number."""

    fmt: int
    mode: int
    uid: int
    gid: int
    rdev: int


def effective(st: os.stat_result, ov: Override | None) -> Meta:
    """`st` with the override applied. The type changes only where a rootless upper can hold
    a stand-in: a regular file standing for a device, symlink, fifo or socket. A type the
    object cannot be (a directory said to be a file) is ignored: the object on disk decides."""
    fmt = stat.S_IFMT(st.st_mode)
    if ov is None:
        return Meta(fmt, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_rdev)
    rdev = st.st_rdev
    if fmt == stat.S_IFREG and ov.fmt in STAND_INS:
        fmt = ov.fmt
    if fmt in (stat.S_IFCHR, stat.S_IFBLK) and ov.fmt == fmt:
        rdev = ov.rdev
    return Meta(fmt, ov.mode, ov.uid, ov.gid, rdev)


def real_xattr_name(name: bytes) -> bytes | None:
    """The xattr an upper's stored name stands for: `user.layerfs.xattr.X` and
    `user.containers.override_X` -> X; an overlay-private name (also behind a prefix) ->
    None; any other name is itself."""
    if name.startswith(XATTR_PREFIX):
        name = name[len(XATTR_PREFIX) :]
    elif name.startswith(CONTAINERS_XATTR_PREFIX) and name not in OVERRIDE_XATTRS:
        name = name[len(CONTAINERS_XATTR_PREFIX) :]
    # A private name stays private even behind a prefix (nothing can smuggle one in).
    if not name or name.startswith(PRIVATE_XATTRS):
        return None
    return name


def real_xattrs(stored: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An upper object's xattrs as the image should carry them (see real_xattr_name), sorted.
    A prefixed copy wins over a real xattr of the same name: it is what was set through the
    mount."""
    out: dict[bytes, bytes] = {}
    prefixed: set[bytes] = set()
    for name, value in stored:
        real = real_xattr_name(name)
        if real is None:
            continue
        if real != name:  # stored under a prefix
            out[real] = value
            prefixed.add(real)
        elif real not in prefixed:
            out[real] = value
    return sorted(out.items())
