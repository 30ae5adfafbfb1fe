"""Kernel caching of directory listings, which pyfuse3 3.5 cannot ask for: a shim on opendir."""

from __future__ import annotations

import ctypes
import inspect
import logging
from typing import Any

import pyfuse3

log = logging.getLogger("layerfs")

# Why: without FOPEN_CACHE_DIR the kernel asks the daemon for every listing again, so a warm
# `ls` of a large directory costs a full READDIRPLUS round (30x the kernel's time, where
# fuse-overlayfs, which sets `cache_readdir`, is served from the page cache). With it (and
# FOPEN_KEEP_CACHE, without which each opendir drops the cache), the kernel keeps the listing
# in the directory's page cache and drops it itself whenever an entry of the directory is
# created, removed or renamed through the mount, or its mtime changes (checked at offset 0).
#
# How: pyfuse3's C callback for OPENDIR copies the kernel's `fuse_file_info` into a
# `_Container`, calls the coroutine function `fuse_opendir_async`, which it looks up in the
# module's globals on each call, and replies with that struct, setting only `fh`. We wrap the
# coroutine function and set the two bits of the struct first. The layout below is pyfuse3
# 3.5.0's (`struct __pyx_obj_7pyfuse3__Container`: PyObject_HEAD, dev_t rdev, struct
# fuse_file_info fi, ...) and libfuse 3's (`int flags` then the bitfield word: writepage,
# direct_io, keep_cache, flush, nonseekable, flock_release, cache_readdir, ...); `install`
# checks what it can and leaves pyfuse3 alone when anything differs.
_PYFUSE3_VERSION = "3.5.0"
_CONTAINER_SIZE = 264
_FI_BITS_OFFSET = 16 + 8 + 4
_KEEP_CACHE = 1 << 2
_CACHE_READDIR = 1 << 6

_installed = False


def _layout_ok() -> bool:
    container: Any = getattr(pyfuse3, "_Container", None)
    orig = getattr(pyfuse3, "fuse_opendir_async", None)
    return (
        pyfuse3.__version__ == _PYFUSE3_VERSION
        and ctypes.sizeof(ctypes.c_void_p) == 8
        and container is not None
        and getattr(container, "__basicsize__", None) == _CONTAINER_SIZE
        and orig is not None
        and inspect.iscoroutinefunction(orig)
    )


def install() -> bool:
    """Make every opendir reply ask the kernel to cache the listing; idempotent. False when
    this pyfuse3 is not the one the shim knows (listings are then not cached)."""
    global _installed
    if _installed:
        return True
    if not _layout_ok():
        log.warning("pyfuse3 %s: directory listings will not be cached", pyfuse3.__version__)
        return False
    orig = pyfuse3.fuse_opendir_async  # type: ignore[attr-defined]  # internal, checked above
    container_type = pyfuse3._Container  # type: ignore[attr-defined]  # internal, checked above

    async def fuse_opendir_async(c: Any) -> None:
        if type(c) is container_type:
            word = ctypes.c_uint32.from_address(id(c) + _FI_BITS_OFFSET)
            word.value |= _KEEP_CACHE | _CACHE_READDIR
        await orig(c)

    pyfuse3.fuse_opendir_async = fuse_opendir_async  # type: ignore[attr-defined]
    _installed = True
    return True
