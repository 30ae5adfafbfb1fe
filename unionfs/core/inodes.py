"""Inode table: merged objects (Node) keyed by stable, never-reused inode numbers."""

from __future__ import annotations

import errno
import itertools
from dataclasses import dataclass

from unionfs.core.errors import FsError
from unionfs.core.resolve import Source
from unionfs.core.types import ROOT_INO, Entry, Ino

Key = tuple[int, int]  # (layer number: 0 upper, i+1 lower i; host st_ino)

# Deeper than any real tree (PATH_MAX allows 2048 levels): a longer parent chain is a bug.
MAX_DEPTH = 1 << 16
_LAYER_SHIFT = 48
_MAX_LAYER = (1 << 14) - 2
_FRESH_BASE = 1 << 62


def derive_ino(key: Key) -> Ino | None:
    """The inode number of an object, from where it comes from: stable across copy-up (the
    origin is recorded in the upper) and across remounts. None when it does not fit."""
    num, host = key
    if num > _MAX_LAYER or host >= 1 << _LAYER_SHIFT or host < 0:
        return None
    return Ino(((num + 1) << _LAYER_SHIFT) | host)


@dataclass(eq=False, slots=True)
class Node:
    """One merged object the kernel knows. A directory has one (parent, name); a
    non-directory has a primary name plus `aliases` (hard links seen in this mount)."""

    ino: Ino
    key: Key
    is_dir: bool
    parent: Node | None
    name: bytes
    upper: bool = False  # the upper holds this object (at its merged path)
    lower: tuple[Source, ...] = ()
    lower_entry: Entry | None = None
    lookups: int = 0
    opens: int = 0
    unlinked: bool = False
    # Opened for kernel passthrough at least once: what the kernel cached of this inode
    # from other opens may be stale since (the kernel wrote the host file directly).
    passed_through: bool = False
    # Made through this mount as an empty file and never given security.capability since:
    # the kernel's question before every write (may it drop file capabilities?) is answered
    # without a system call.
    no_caps: bool = False
    # A tuple, replaced on change: most nodes have none, and an empty list per node was
    # 56 bytes each of a 100,000-file image's daemon.
    aliases: tuple[tuple[Node, bytes], ...] = ()

    def path(self) -> bytes:
        parts: list[bytes] = []
        node: Node | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
            if len(parts) > MAX_DEPTH:
                raise FsError(errno.ELOOP, "directory loop")
        return b"/".join(reversed(parts))

    def is_ancestor_of(self, other: Node) -> bool:
        node: Node | None = other
        for _ in range(MAX_DEPTH):
            if node is None:
                return False
            if node is self:
                return True
            node = node.parent
        raise FsError(errno.ELOOP, "directory loop")


class InodeTable:
    """Nodes by inode number. Numbers come from `derive_ino`; when a number is still held
    by a dead object (a host inode reused after unlink) or does not fit, a fresh number from
    a separate range is used, so a number never names two objects in one mount."""

    def __init__(self) -> None:
        self.nodes: dict[Ino, Node] = {}
        self.by_key: dict[Key, Ino] = {}
        self.secondary: dict[tuple[Key, Ino, bytes], Ino] = {}
        self._fresh = itertools.count(_FRESH_BASE)

    def get(self, ino: Ino) -> Node | None:
        return self.nodes.get(ino)

    def add_root(self, node: Node) -> None:
        assert node.ino == ROOT_INO
        self.nodes[ROOT_INO] = node
        self.by_key[node.key] = ROOT_INO

    def find(self, key: Key, is_dir: bool) -> Node | None:
        ino = self.by_key.get(key)
        if ino is None:
            return None
        node = self.nodes.get(ino)
        if node is None or node.unlinked or node.is_dir != is_dir:
            return None
        return node

    def new(self, key: Key, is_dir: bool, parent: Node | None, name: bytes) -> Node:
        ino = self.by_key.get(key)
        if ino is None or ino in self.nodes:
            ino = derive_ino(key)
            if ino is None or ino in self.nodes:
                ino = Ino(next(self._fresh))
        node = Node(ino=ino, key=key, is_dir=is_dir, parent=parent, name=name)
        self.nodes[ino] = node
        self.by_key[key] = ino
        return node

    def new_secondary(self, key: Key, parent: Node, name: bytes) -> Node:
        """A second place showing the directory `key` (a lower directory that a redirect
        also shows elsewhere): its own node and number, so that the tree stays a tree."""
        where = (key, parent.ino, name)
        ino = self.secondary.get(where)
        node = self.nodes.get(ino) if ino is not None else None
        if node is None or node.unlinked:
            ino = Ino(next(self._fresh))
            node = Node(ino=ino, key=key, is_dir=True, parent=parent, name=name)
            self.nodes[ino] = node
            self.secondary[where] = ino
        return node

    def drop_if_unused(self, node: Node) -> None:
        if node.ino == ROOT_INO or node.lookups > 0 or node.opens > 0:
            return
        if self.nodes.get(node.ino) is node:
            del self.nodes[node.ino]
        if self.by_key.get(node.key) == node.ino and node.unlinked:
            del self.by_key[node.key]
