"""Presentation of owners: uid/gid maps (container <-> host ids) and squashing.

Stored ids (image, upper, overrides) are container ids; a mount shows host ids. A map is
a list of ranges CONTAINER:HOST:COUNT (as fuse-overlayfs' uidmapping= and a user
namespace's uid_map); a container id no range covers shows as the overflow id 65534.
Squashing shows every object as one uid/gid (fuse-overlayfs' squash_to_uid/gid/root) and
does not change what is stored: chown through a squashed mount still stores the ids asked
for (mapped back when there is a map).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from unionfs.core.types import Stat

OVERFLOW_ID = 65534
MAX_ID = (1 << 32) - 1


@dataclass(frozen=True)
class IdRange:
    container: int
    host: int
    count: int


class IdMapError(ValueError):
    """A map or squash value that cannot be used; the message is one line for the user."""


def parse_ranges(text: str) -> tuple[IdRange, ...]:
    """`C:H:N[:C:H:N...]` (also `,`-separated triples) -> ranges; IdMapError when bad."""
    fields = text.replace(",", ":").split(":")
    if not text or len(fields) % 3 != 0:
        raise IdMapError(f"bad id map {text!r}: want CONTAINER:HOST:COUNT[:C:H:N...]")
    ranges = []
    for i in range(0, len(fields), 3):
        try:
            c, h, n = (int(f, 10) for f in fields[i : i + 3])
        except ValueError:
            raise IdMapError(f"bad id map {text!r}: ids and counts are decimal numbers") from None
        if c < 0 or h < 0 or n <= 0 or c + n - 1 > MAX_ID or h + n - 1 > MAX_ID:
            raise IdMapError(f"bad id map {text!r}: range {c}:{h}:{n} is out of bounds")
        ranges.append(IdRange(c, h, n))
    return tuple(ranges)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


class IdMap:
    """Container <-> host ids through ranges that overlap neither side."""

    def __init__(self, ranges: tuple[IdRange, ...]) -> None:
        for i, a in enumerate(ranges):
            for b in ranges[i + 1 :]:
                if _overlap((a.container, a.count), (b.container, b.count)) or _overlap(
                    (a.host, a.count), (b.host, b.count)
                ):
                    raise IdMapError(
                        f"id map ranges {a.container}:{a.host}:{a.count} and "
                        f"{b.container}:{b.host}:{b.count} overlap"
                    )
        self.ranges = ranges

    @classmethod
    def parse(cls, texts: list[str]) -> IdMap:
        ranges: tuple[IdRange, ...] = ()
        for text in texts:
            ranges += parse_ranges(text)
        return cls(ranges)

    def to_host(self, cid: int) -> int:
        for r in self.ranges:
            if r.container <= cid < r.container + r.count:
                return r.host + cid - r.container
        return OVERFLOW_ID

    def to_container(self, hid: int) -> int | None:
        for r in self.ranges:
            if r.host <= hid < r.host + r.count:
                return r.container + hid - r.host
        return None


def parse_id(text: str, what: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise IdMapError(f"bad {what} {text!r}: want a decimal id") from None
    if not 0 <= value <= MAX_ID:
        raise IdMapError(f"bad {what} {text!r}: out of range")
    return value


@dataclass(frozen=True)
class Presentation:
    """How stored ids are shown and how ids from the kernel are stored."""

    uids: IdMap | None = None
    gids: IdMap | None = None
    squash_uid: int | None = None
    squash_gid: int | None = None

    @property
    def identity(self) -> bool:
        return (
            self.uids is None
            and self.gids is None
            and self.squash_uid is None
            and (self.squash_gid is None)
        )

    def show(self, st: Stat) -> Stat:
        uid, gid = st.uid, st.gid
        if self.squash_uid is not None:
            uid = self.squash_uid
        elif self.uids is not None:
            uid = self.uids.to_host(uid)
        if self.squash_gid is not None:
            gid = self.squash_gid
        elif self.gids is not None:
            gid = self.gids.to_host(gid)
        if uid == st.uid and gid == st.gid:
            return st
        return dataclasses.replace(st, uid=uid, gid=gid)

    def store_uid(self, hid: int) -> int | None:
        """The container uid to store for host uid `hid`; None when no range maps it."""
        return hid if self.uids is None else self.uids.to_container(hid)

    def store_gid(self, hid: int) -> int | None:
        return hid if self.gids is None else self.gids.to_container(hid)
