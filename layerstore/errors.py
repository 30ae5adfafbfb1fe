"""Domain errors of the layer store: each carries one human-readable line for the CLI."""

from __future__ import annotations


class StoreError(Exception):
    """Base class: anything the store refuses or cannot do. `str(exc)` is one line."""


class SourceError(StoreError):
    """The image source is missing, unreadable, or its JSON (index, manifest, config) is bad."""


class ImageNotFound(StoreError):
    """An IMAGE reference names nothing in the store (or is ambiguous)."""


class LayerError(StoreError):
    """A layer blob was refused: digest or DiffID mismatch, bad compression, hostile tar entry."""


class IntegrityError(StoreError):
    """The store itself is inconsistent (found by fsck or while reading)."""
