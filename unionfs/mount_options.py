"""The `-o` options `overlay` and `mount` share: FUSE options, fuse-overlayfs' behaviour
options and kernel overlayfs' values; each one is honoured or refused with one line."""

from __future__ import annotations

from dataclasses import dataclass, field

from unionfs.fuse.mount import is_fuse_option
from unionfs.fuse.policy import Policy

# default_permissions is always on: the kernel checks permissions against what the mount
# shows (fsname and subtype may be overridden).
FUSE_DEFAULTS = ("default_permissions", "fsname=layerfs", "subtype=layerfs")


class OptionError(Exception):
    """A refused or unknown option; the message is one line for the user."""


# Values that name what layerfs always does (kernel overlayfs' and fuse-overlayfs' options):
# accepted, since they ask for exactly that.
OUR_BEHAVIOUR = {
    "redirect_dir=on",  # renamed lower directories get a redirect
    "index=on",  # lower hard links stay together after a copy-up
    "metacopy=off",  # copy-up copies the data
    "xino=on", "xino=auto",  # inode numbers unique across layers and persistent
    "nfs_export=off",
    "noacl",  # the kernel is never asked to enforce POSIX ACLs
    "writeback=0",  # no writeback cache
    "fast_ino=0",  # inode numbers are computed, never taken from the host as they are
    "xattr_permissions=2",  # a rootless upper keeps metadata in user.containers.override_stat
}  # fmt: skip
# Options whose other values ask for what layerfs does not do: refused, with the reason.
REFUSED = {
    "redirect_dir": "layerfs always renames lower directories with redirects (redirect_dir=on)",
    "index": "layerfs keeps lower hard links together after a copy-up, as index=on",
    "metacopy": "layerfs always copies the data up (metacopy=off)",
    "xino": "layerfs always gives unique, persistent inode numbers (xino=on)",
    "nfs_export": "layerfs cannot be exported over NFS (nfs_export=off)",
    "uuid": "layerfs keeps no file handles, so no uuid",
    "userxattr": "a rootless upper is written in fuse-overlayfs' format (.wh. whiteouts and "
    "user.containers.override_stat), not with user.overlay.* xattrs",
    "writeback": "layerfs does not use the FUSE writeback cache (writeback=0)",
    "fast_ino": "layerfs computes its inode numbers (fast_ino=0)",
    "xattr_permissions": "a rootless upper keeps metadata in user.containers.override_stat "
    "(xattr_permissions=2)",
    "threaded": "layerfs serves requests in one event loop, with worker threads for slow ones",
    "plugins": "layerfs has no data-source plugins",
}


@dataclass
class Shared:
    """What the shared options asked for."""

    fuse: list[str] = field(default_factory=lambda: list(FUSE_DEFAULTS))
    timeout: float | None = None
    xattrs: bool = True
    static_nlink: bool = False
    fsync: bool = True

    def policy(self) -> Policy:
        return Policy(self.timeout, self.xattrs, self.static_nlink, self.fsync)

    def take_all(self, text: str) -> None:
        """A comma-separated list (as `-o` gives it)."""
        for opt in text.split(","):
            if opt:
                self.take(opt)

    def take(self, opt: str) -> None:
        """Apply one option (NAME or NAME=VALUE); OptionError when it is refused or unknown."""
        key, eq, value = opt.partition("=")
        if is_fuse_option(opt):
            if key in ("fsname", "subtype"):
                self.fuse = [f for f in self.fuse if not f.startswith(key + "=")]
            if opt not in self.fuse:
                self.fuse.append(opt)
        elif key == "static_nlink" and not eq:
            self.static_nlink = True
        elif key == "noxattrs" and eq:
            self.xattrs = _int(opt, value) == 0  # fuse-overlayfs: any other value turns off
        elif key == "fsync" and eq:
            self.fsync = _int(opt, value) != 0
        elif key == "volatile" and not eq:
            self.fsync = False  # fuse-overlayfs reads volatile as fsync=0
        elif key == "timeout" and eq:
            try:
                self.timeout = float(value)
            except ValueError:
                raise OptionError(f"mount option {opt!r}: a number of seconds expected") from None
            if not 0 <= self.timeout < 1e9:
                raise OptionError(f"mount option {opt!r}: out of range")
        elif opt in OUR_BEHAVIOUR:
            return
        elif key in REFUSED:
            raise OptionError(f"mount option {opt!r} is not supported: {REFUSED[key]}")
        else:
            raise OptionError(f"unknown mount option {opt!r}")


def _int(opt: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise OptionError(f"mount option {opt!r}: a number expected") from None
