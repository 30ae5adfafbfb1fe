"""Merge rules: which layers provide a name, and the merged listing of a directory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from unionfs.core.layers import Layer, join, split
from unionfs.core.types import Entry, Kind

Source = tuple[int, bytes]  # (lower layer index, path inside that layer)


@dataclass(frozen=True)
class Resolved:
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
) -> Resolved | None:
    """Resolve `name` in a merged directory; None when it does not exist (or is whited out).

    `parent_upper` is the directory's upper path (None when it has no upper copy),
    `parent_lower` its contributing lower directories.
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
            absolute, t = _split_redirect(e.redirect)
            if absolute:
                targets = [(lj, t) for lj in range(li + 1, len(lowers))]
            else:
                targets = [(lj, join(split(p)[0], t)) for lj, p in targets[i:]]
            i = 0
    if uentry is None and not found:
        return None
    return Resolved(Kind.DIR, uentry, tuple(found), first)


def lower_positive(lowers: Sequence[Layer], parent_lower: Sequence[Source], name: bytes) -> bool:
    """Does any lower layer provide `name` (so that removing it needs a whiteout)?"""
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
) -> list[bytes]:
    """Names visible in a merged directory, each once, upper first then lower layers."""
    seen: dict[bytes, bool] = {}
    if upper is not None and upper_path is not None:
        for n, wh in upper.names(upper_path).items():
            seen[n] = wh
    for li, lp in lower:
        for n, wh in lowers[li].names(lp).items():
            if n not in seen:
                seen[n] = wh
    return [n for n, wh in seen.items() if not wh]
