"""A loaded library's call to another library's function, redirected: its GOT slot."""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Any

log = logging.getLogger("layerfs")

# Why: libfuse 3.14 and pyfuse3 3.5 lack what the kernel offers (passthrough, fallocate), and
# fill the structures that would carry it themselves. Every call one shared library makes to
# a function of another goes through a pointer in its global offset table; pointing that one
# pointer at our function, for a moment or for good, changes that call and nothing else.
# Only x86-64 ELF libraries, only when the slot holds what we expect (the real function).


def loaded_library(path_test: str) -> tuple[str, int] | None:
    """The file and load address of the loaded library whose real path is `path_test`, or
    whose file name starts with it (from /proc/self/maps)."""
    best: tuple[str, int] | None = None
    if path_test.startswith("/"):
        # The maps name the file by its real path: a module imported through a symlink (a
        # venv reached through a linked directory) has a __file__ that differs from it.
        path_test = os.path.realpath(path_test)
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 6 or not parts[5].startswith("/") or int(parts[2], 16) != 0:
                continue
            path = parts[5]
            if path == path_test or os.path.basename(path).startswith(path_test):
                start = int(parts[0].split("-")[0], 16)
                if best is None or start < best[1]:
                    best = (path, start)
    return best


def got_offset(path: str, symbol: bytes) -> int | None:
    """Offset of the GOT slot through which the ELF64 library `path` calls `symbol`."""
    data = Path(path).read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None  # not a 64-bit little-endian ELF
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    for _name, typ, _flags, _addr, off, size, link, _info, _align, entsize in sections:
        if typ != 4 or entsize != 24:  # SHT_RELA
            continue
        symtab = sections[link]
        strtab = sections[symtab[6]]
        for i in range(size // 24):
            r_offset, r_info, _addend = struct.unpack_from("<QQq", data, off + 24 * i)
            if r_info & 0xFFFFFFFF not in (6, 7):  # R_X86_64_GLOB_DAT, R_X86_64_JUMP_SLOT
                continue
            (st_name,) = struct.unpack_from("<I", data, symtab[4] + 24 * (r_info >> 32))
            name_at = strtab[4] + st_name
            if data[name_at : data.index(b"\0", name_at)] == symbol:
                return int(r_offset)
    return None


class GotSlot:
    """The slot through which a loaded library calls `symbol`, made writable."""

    def __init__(self, slot: ctypes.c_uint64, real: int) -> None:
        self._slot = slot
        self.real = real  # the function the library called before us

    @classmethod
    def find(cls, library: str, symbol: bytes, real: int | None) -> GotSlot | None:
        """The slot of `library` (see `loaded_library`) for `symbol`, which must hold `real`;
        None (logged at debug level) when anything differs."""
        if os.uname().machine != "x86_64" or ctypes.sizeof(ctypes.c_void_p) != 8 or not real:
            return None
        try:
            found = loaded_library(library)
            offset = got_offset(found[0], symbol) if found is not None else None
        except (OSError, ValueError, struct.error, IndexError) as exc:
            log.debug("cannot read %s: %s", library, exc)
            return None
        if found is None or offset is None:
            log.debug("no GOT slot for %s in %s", symbol.decode(), library)
            return None
        addr = found[1] + offset
        slot = ctypes.c_uint64.from_address(addr)
        if slot.value != real:
            log.debug("%s's slot for %s holds something else", found[0], symbol.decode())
            return None
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = addr & ~(mmap.PAGESIZE - 1)
        if libc.mprotect(ctypes.c_void_p(page), mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_WRITE):
            log.debug("mprotect: %s", os.strerror(ctypes.get_errno()))
            return None
        return cls(slot, real)

    def point(self, addr: int) -> None:
        self._slot.value = addr

    def restore(self) -> None:
        self._slot.value = self.real


def address(fn: Any) -> int:
    """The machine address of a ctypes function (foreign or callback)."""
    addr = ctypes.cast(fn, ctypes.c_void_p).value
    assert addr is not None
    return addr
