"""What the handlers honour of a mount's `-o` options (fuse-overlayfs' timeout=, noxattrs=,
static_nlink, fsync= and volatile)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Policy:
    timeout: float | None = None  # timeout=S: every entry and attribute, and "no such name"
    xattrs: bool = True  # noxattrs=1: the xattr calls answer ENOSYS (callers: EOPNOTSUPP)
    static_nlink: bool = False  # directories report st_nlink 1
    fsync: bool = True  # fsync=0 / volatile: fsync and fsyncdir do nothing
