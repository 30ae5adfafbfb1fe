"""`layerfs overlay`: fuse-overlayfs compatible command line (lowerdir/upperdir/workdir)."""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from unionfs.core.idmap import IdMap, IdMapError, Presentation, parse_id
from unionfs.core.layers import DirLayer, Layer
from unionfs.mount_options import OptionError, Shared

_MAP_TRIPLE = re.compile(r"^\d+:\d+:\d+(:\d+:\d+:\d+)*$")


class UsageError(Exception):
    """A bad command line; the message is one line for the user."""


@dataclass
class OverlayOptions:
    lowers: list[Path] = field(default_factory=list)
    upper: Path | None = None
    work: Path | None = None
    shared: Shared = field(default_factory=Shared)  # FUSE and fuse-overlayfs options
    uidmap: list[str] = field(default_factory=list)
    gidmap: list[str] = field(default_factory=list)
    squash_uid: int | None = None
    squash_gid: int | None = None

    def presentation(self) -> Presentation:
        """The owner presentation asked for; UsageError for a bad map."""
        try:
            return Presentation(
                uids=IdMap.parse(self.uidmap) if self.uidmap else None,
                gids=IdMap.parse(self.gidmap) if self.gidmap else None,
                squash_uid=self.squash_uid,
                squash_gid=self.squash_gid,
            )
        except IdMapError as exc:
            raise UsageError(str(exc)) from None


def _split_escaped(text: str, sep: str) -> list[str]:
    """Split on `sep` except where escaped with a backslash (as the kernel accepts)."""
    parts: list[str] = []
    cur: list[str] = []
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            i += 2
            continue
        if c == sep:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur))
    return parts


def _split_options(text: str) -> list[str]:
    # Keep backslashes for the second split (lowerdir paths may escape ':' and ',').
    parts: list[str] = []
    cur = ""
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            cur += text[i : i + 2]
            i += 2
            continue
        if text[i] == ",":
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return [p for p in parts if p]


def parse_options(option_strings: list[str]) -> OverlayOptions:
    out = OverlayOptions()
    last_map: list[str] | None = None
    for text in option_strings:
        for opt in _split_options(text):
            key, eq, value = opt.partition("=")
            if last_map is not None and _MAP_TRIPLE.match(opt):
                # uidmapping=0:1000:1,1:100000:65536 (ranges separated by commas)
                last_map.append(opt)
                continue
            last_map = None
            if key in ("uidmapping", "gidmapping") and eq:
                last_map = out.uidmap if key == "uidmapping" else out.gidmap
                last_map.append(value)
            elif key == "squash_to_uid" and eq:
                out.squash_uid = _parse_id(value, key)
            elif key == "squash_to_gid" and eq:
                out.squash_gid = _parse_id(value, key)
            elif key == "squash_to_root" and not eq:
                out.squash_uid = out.squash_gid = 0
            elif key == "lowerdir" and eq:
                out.lowers = [Path(p) for p in _split_escaped(value, ":") if p]
                if not out.lowers:
                    raise UsageError("lowerdir= needs at least one directory")
            elif key == "upperdir" and eq:
                out.upper = Path(_split_escaped(value, ",")[0])
            elif key == "workdir" and eq:
                out.work = Path(_split_escaped(value, ",")[0])
            else:
                try:
                    out.shared.take(opt)
                except OptionError as exc:
                    raise UsageError(str(exc)) from None
    if not out.lowers:
        raise UsageError("missing -o lowerdir=TOP:...:BOTTOM")
    if (out.upper is None) != (out.work is None):
        raise UsageError("upperdir= and workdir= go together")
    return out


def _parse_id(text: str, what: str) -> int:
    try:
        return parse_id(text, what)
    except IdMapError as exc:
        raise UsageError(str(exc)) from None


def _is_dir(path: Path, what: str) -> os.stat_result:
    try:
        st = path.stat()
    except OSError as exc:
        raise UsageError(f"{what} {path}: {exc.strerror}") from None
    if not path.is_dir():
        raise UsageError(f"{what} {path}: not a directory")
    return st


def _inside(a: Path, b: Path) -> bool:
    ra, rb = a.resolve(), b.resolve()
    return ra == rb or rb in ra.parents


def check_paths(opts: OverlayOptions) -> None:
    for lower in opts.lowers:
        _is_dir(lower, "lowerdir")
    if opts.upper is not None and opts.work is not None:
        ust = _is_dir(opts.upper, "upperdir")
        wst = _is_dir(opts.work, "workdir")
        if ust.st_dev != wst.st_dev:
            raise UsageError(
                f"workdir {opts.work} is not on the same filesystem as upperdir {opts.upper}"
            )
        if _inside(opts.work, opts.upper) or _inside(opts.upper, opts.work):
            raise UsageError("upperdir and workdir must be separate directories, not nested")
        if not os.access(opts.upper, os.W_OK) or not os.access(opts.work, os.W_OK):
            raise UsageError("upperdir and workdir must be writable")


def run_overlay(args: argparse.Namespace) -> int:
    from unionfs.daemon import MountError, serve

    try:
        opts = parse_options(args.options or [])
        presentation = opts.presentation()
        check_paths(opts)
        layers: list[Layer] = []
        for p in opts.lowers:
            layer = DirLayer(os.fsencode(p))
            # Rootless: a lower may be a rootless upper (ours or fuse-overlayfs'): show its
            # override_stat metadata.
            layer.overrides = os.geteuid() != 0
            layers.append(layer)
        return serve(
            layers,
            opts.upper,
            opts.work,
            Path(args.mountpoint),
            opts.shared.fuse,
            args.foreground,
            debug=args.debug,
            presentation=presentation,
            policy=opts.shared.policy(),
        )
    except (UsageError, MountError) as exc:
        print(f"layerfs: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "overlay",
        help="mount directories as an overlay (fuse-overlayfs compatible)",
        description="Mount lower directories (TOP first) under an optional writable upper "
        "directory with Linux overlayfs semantics.",
        epilog="examples:\n"
        "  layerfs overlay -o lowerdir=/l2:/l1,upperdir=/up,workdir=/work /mnt/merged\n"
        "  layerfs overlay -o lowerdir=/ro-a:/ro-b /mnt/view          # read-only\n"
        "  layerfs overlay -f -d -o lowerdir=/l,upperdir=/u,workdir=/w /mnt/m   # debug log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-o",
        dest="options",
        action="append",
        metavar="OPTS",
        help="lowerdir=TOP:...:BOTTOM[,upperdir=U,workdir=W][,squash_to_uid=U,squash_to_gid=G"
        ",squash_to_root,uidmapping=C:H:N[:C:H:N...],gidmapping=...][,FUSE options]",
    )
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-d",
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug log (on stderr with -f, else to syslog)",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    p.set_defaults(func=run_overlay)
