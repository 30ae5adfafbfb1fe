"""Merge rules: which layers provide a name, and the merged listing of a directory."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from unionfs.core.layers import Layer, join, split
from unionfs.core.types import Entry, Kind

Source = tuple[int, bytes]  # (lower layer index, path inside that layer)

# How many lookups in a merged lower directory before its layers are listed (a lone lookup in
# a huge directory should not read it whole), and how many directories keep their index
# (an index serves the lookups right after a listing or a run of lookups in one directory;
# 4,096 held 13 MiB of a walked 100,000-file image's daemon).
INDEX_AFTER = 2
INDEX_DIRS = 256


class _DirIndex:
    __slots__ = ("positions", "whiteout")

    def __init__(self) -> None:
        # name -> positions (into the directory's sources) of the layers having the name
        self.positions: dict[bytes, tuple[int, ...]] = {}
        # name -> whether the first layer having it has a whiteout (name in first-seen order)
        self.whiteout: dict[bytes, bool] = {}


class LowerIndex:
    """Which lower layers have which name, per merged lower directory.

    A merged directory's lower part is decided by its sources alone (the lower directories
    merged into it, top first) and layers never change, so an index is never stale; it is
    built from one listing per layer and spares every other layer a lookup (in a 100-layer
    stack, 99 misses per name). Sources that keep being asked about are indexed; the others
    are resolved layer by layer.
    """

    def __init__(self, lowers: Sequence[Layer], size: int = INDEX_DIRS) -> None:
        self.lowers = lowers
        self.size = size
        self._dirs: OrderedDict[tuple[Source, ...], _DirIndex] = OrderedDict()
        self._probes: dict[tuple[Source, ...], int] = {}
        # The last answer, by identity: readdir asks with one directory's tuple per entry.
        self._last: tuple[tuple[Source, ...], _DirIndex] | None = None

    def get(self, sources: tuple[Source, ...], *, build: bool = False) -> _DirIndex | None:
        """The index of `sources`: built now when `build`, or when they were asked about
        INDEX_AFTER times; else None."""
        last = self._last
        if last is not None and last[0] is sources:
            return last[1]
        idx = self._dirs.get(sources)
        if idx is not None:
            self._dirs.move_to_end(sources)
            self._last = (sources, idx)
            return idx
        if not build:
            n = self._probes.get(sources, 0) + 1
            if n < INDEX_AFTER:
                if len(self._probes) >= self.size:
                    self._probes.clear()
                self._probes[sources] = n
                return None
        self._probes.pop(sources, None)
        idx = _DirIndex()
        positions, whiteout = idx.positions, idx.whiteout
        for pos, (li, lp) in enumerate(sources):
            for name, wh in self.lowers[li].names(lp).items():
                prev = positions.get(name)
                if prev is None:
                    positions[name] = (pos,)
                    whiteout[name] = wh
                else:
                    positions[name] = (*prev, pos)
        self._dirs[sources] = idx
        if len(self._dirs) > self.size:
            self._dirs.popitem(last=False)
        self._last = (sources, idx)
        if not build:
            # Built because lookups keep coming here (a listing reads the entries itself).
            for li, lp in sources:
                ahead = getattr(self.lowers[li], "stat_ahead", None)
                if ahead is not None:
                    ahead(lp)
        return idx


@dataclass(slots=True)
class Resolved:  # a value (see types.Stat)
    """What a merged name is.

    `upper` is the upper entry when the upper provides the object. For directories `lower`
    lists every lower directory merged into it, top first (empty when the upper one is
    opaque); for a non-directory from a lower layer it is that one layer.
    """

    kind: Kind
    upper: Entry | None
    lower: tuple[Source, ...]
    lower_entry: Entry | None  # the entry of lower[0]

    @property
    def is_dir(self) -> bool:
        return self.kind is Kind.DIR

    @property
    def top(self) -> Entry:
        top = self.upper if self.upper is not None else self.lower_entry
        assert top is not None
        return top


def _split_redirect(redirect: bytes) -> tuple[bool, bytes]:
    if redirect.startswith(b"/"):
        return True, redirect.strip(b"/")
    return False, redirect


def _lower_targets(
    nlowers: int, parent_lower: Sequence[Source], name: bytes, redirect: bytes | None, after: int
) -> list[Source]:
    """Where lower layers below index `after` keep the directory called `name`."""
    if redirect is None:
        return [(li, join(lp, name)) for li, lp in parent_lower if li > after]
    absolute, target = _split_redirect(redirect)
    if absolute:
        return [(li, target) for li in range(after + 1, nlowers)]
    return [(li, join(lp, target)) for li, lp in parent_lower if li > after]


def _lookup_path(layer: Layer, path: bytes) -> Entry | None:
    parent, name = split(path)
    if not name:
        return layer.root()
    return layer.lookup(parent, name)


def resolve_child(
    upper: Layer | None,
    lowers: Sequence[Layer],
    parent_upper: bytes | None,
    parent_lower: Sequence[Source],
    name: bytes,
    index: LowerIndex | None = None,
) -> Resolved | None:
    """Resolve `name` in a merged directory; None when it does not exist (or is whited out).

    `parent_upper` is the directory's upper path (None when it has no upper copy),
    `parent_lower` its contributing lower directories. With `index`, only the lower layers
    having the name are asked.
    """
    uentry: Entry | None = None
    if upper is not None and parent_upper is not None:
        uentry = upper.lookup(parent_upper, name)
        if uentry is not None:
            if uentry.kind is Kind.WHITEOUT:
                return None
            if uentry.kind is not Kind.DIR:
                return Resolved(uentry.kind, uentry, (), None)
            if uentry.opaque:
                return Resolved(Kind.DIR, uentry, (), None)
    redirect = uentry.redirect if uentry is not None else None
    # positions[k]: where targets[k] is in parent_lower, while targets are the indexed ones
    positions: tuple[int, ...] | None = None
    if redirect is None and index is not None and parent_lower:
        idx = index.get(tuple(parent_lower))
        if idx is not None:
            positions = idx.positions.get(name, ())
    if positions is not None:
        if uentry is None:
            if not positions:
                return None
            # The common case first: a lower non-directory (one lookup, no list of targets).
            li, lp = parent_lower[positions[0]]
            e = lowers[li].lookup(lp, name)
            if e is not None and e.kind is not Kind.DIR and e.kind is not Kind.WHITEOUT:
                return Resolved(e.kind, None, ((li, join(lp, name)),), e)
        targets = [(parent_lower[p][0], join(parent_lower[p][1], name)) for p in positions]
    else:
        targets = _lower_targets(len(lowers), parent_lower, name, redirect, -1)
    found: list[Source] = []
    first: Entry | None = None
    i = 0
    while i < len(targets):
        li, path = targets[i]
        i += 1
        e = _lookup_path(lowers[li], path)
        if e is None:
            continue
        if e.kind is Kind.WHITEOUT:
            break
        if e.kind is not Kind.DIR:
            if uentry is None and not found:
                return Resolved(e.kind, None, ((li, path),), e)
            break
        found.append((li, path))
        if first is None:
            first = e
        if e.opaque:
            break
        if e.redirect is not None:
            rest = targets[i:]
            if positions is not None:
                # The redirect names another directory: every lower layer may have it.
                rest = [(lj, join(lp, name)) for lj, lp in parent_lower[positions[i - 1] + 1 :]]
                positions = None
            absolute, t = _split_redirect(e.redirect)
            if absolute:
                targets = [(lj, t) for lj in range(li + 1, len(lowers))]
            else:
                targets = [(lj, join(split(p)[0], t)) for lj, p in rest]
            i = 0
    if uentry is None and not found:
        return None
    return Resolved(Kind.DIR, uentry, tuple(found), first)


def lower_positive(
    lowers: Sequence[Layer],
    parent_lower: Sequence[Source],
    name: bytes,
    index: LowerIndex | None = None,
) -> bool:
    """Does any lower layer provide `name` (so that removing it needs a whiteout)?"""
    idx = index.get(tuple(parent_lower)) if index is not None and parent_lower else None
    if idx is not None:
        wh = idx.whiteout.get(name)
        return wh is not None and not wh
    for li, lp in parent_lower:
        e = lowers[li].lookup(lp, name)
        if e is None:
            continue
        return e.kind is not Kind.WHITEOUT
    return False


def merged_names(
    upper: Layer | None,
    lowers: Sequence[Layer],
    upper_path: bytes | None,
    lower: Sequence[Source],
    index: LowerIndex | None = None,
) -> list[bytes]:
    """Names visible in a merged directory, each once, upper first then lower layers.
    With `index`, the lower directories' index is built (lookups of the names follow)."""
    seen: dict[bytes, bool] = {}
    if upper is not None and upper_path is not None:
        for n, wh in upper.names(upper_path).items():
            seen[n] = wh
    idx = index.get(tuple(lower), build=True) if index is not None and lower else None
    if idx is not None:
        if not seen:
            return [n for n, wh in idx.whiteout.items() if not wh]
        for n, wh in idx.whiteout.items():
            if n not in seen:
                seen[n] = wh
        return [n for n, wh in seen.items() if not wh]
    for li, lp in lower:
        for n, wh in lowers[li].names(lp).items():
            if n not in seen:
                seen[n] = wh
    return [n for n, wh in seen.items() if not wh]
