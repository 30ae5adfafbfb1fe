"""CLI verbs that make and ship images from uppers: diff, commit, export."""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from .cli import (
    IMAGE_HELP,
    UsageError,
    add_output_options,
    add_store_verb,
    add_timeout,
    emit,
    template,
)
from .errors import StoreError
from .reference import local_name
from .store import Store


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def resolve_target(store: Store, target: str) -> tuple[Path, str]:
    """(upper dir, image id) of `NAME|MOUNTPOINT` (notes/ISSUE4-CONTRACT.md): a directory
    with an active mount record, else a container name kept in the store."""
    if os.path.isdir(target):
        for p in {os.path.abspath(target), os.path.realpath(target)}:
            key = hashlib.sha256(p.encode("utf-8", "surrogateescape")).hexdigest()
            rec = _read_json(store.root / "mounts" / f"{key}.json")
            if rec is not None and rec.get("image"):
                if rec.get("upper"):
                    return Path(str(rec["upper"])), str(rec["image"])
                if rec.get("name"):  # a read-only mount of a container: its upper
                    return store.root / "containers" / str(rec["name"]) / "upper", str(rec["image"])
                raise StoreError(f"{target}: a read-only mount with no upper: nothing changed")
    if "/" not in target and target not in ("", ".", ".."):
        cdir = store.root / "containers" / target
        cfg = _read_json(cdir / "config.json")
        if cfg is not None and cfg.get("image"):
            return cdir / "upper", str(cfg["image"])
    raise StoreError(f"{target}: neither a layerfs mount point nor a container name")


def _upper_and_image(args: argparse.Namespace, store: Store) -> tuple[Path, str]:
    if args.upper is not None:
        if args.image is None:
            raise StoreError("--upper needs --image (the image the upper was made over)")
        if args.target is not None:
            raise StoreError("give either NAME|MOUNTPOINT or --upper DIR --image IMAGE")
        return Path(args.upper), args.image
    if args.target is None:
        raise StoreError("give NAME|MOUNTPOINT or --upper DIR --image IMAGE")
    return resolve_target(store, args.target)


def cmd_diff(args: argparse.Namespace, store: Store) -> int:
    from .commit import iter_diff

    if args.upper is None and args.target is not None and args.image is not None:
        raise StoreError("--image goes with --upper")
    t = template(args)
    upper, image = _upper_and_image(args, store)
    if t is None and not args.json:
        # Names are bytes: written as they are (-z: NUL-terminated, for names with newlines).
        end = b"\0" if args.zero else b"\n"
        out = sys.stdout.buffer
        for line in iter_diff(store, upper, image):
            out.write(os.fsencode(line) + end)
        out.flush()
        return 0
    records = []
    for line in iter_diff(store, upper, image):
        kind, _, path = line.partition(" ")
        records.append({"Kind": kind, "Path": path})
    emit(args, records, lambda: None)
    return 0


DIFF_FIELDS = {
    "Kind": "A (added), C (changed) or D (deleted)",
    "Path": "the path in the image (a name that is not UTF-8 keeps its bytes as \\udcXX)",
}


def cmd_commit(args: argparse.Namespace, store: Store) -> int:
    from .commit import commit_upper

    if args.upper is not None:
        # `commit --upper U --image I NEWNAME`: the only positional is the new name.
        if args.newname is not None:
            raise StoreError("give either NAME|MOUNTPOINT or --upper DIR --image IMAGE")
        args.newname, args.target = args.target, None
    if args.newname is None:
        raise UsageError("commit: missing NEWNAME[:TAG]")
    local_name(args.newname)  # a bad name fails before the upper is read
    upper, image = _upper_and_image(args, store)
    res = commit_upper(
        store,
        upper,
        image,
        args.newname,
        message=args.message,
        compression="zstd" if args.zstd else "gzip",
        allow_empty=args.allow_empty,
    )
    for w in res.warnings:
        print(f"layerfs: warning: {w}", file=sys.stderr)
    if res.image is None:
        print(
            "layerfs: nothing to commit: the upper has no changes "
            "(--allow-empty commits an empty layer)",
            file=sys.stderr,
        )
        return 1
    if res.empty:
        print("committed an empty layer (--allow-empty)", file=sys.stderr)
    for n in res.names:
        print(f"Committed image: {n}", file=sys.stderr)
    print(res.image)
    return 0


def cmd_export(args: argparse.Namespace, store: Store) -> int:
    from .export import export_image

    def warn(msg: str) -> None:
        print(f"layerfs: warning: {msg}", file=sys.stderr)

    dest = export_image(store, args.image, args.dest, warn)
    print(f"Exported {args.image} to {dest}", file=sys.stderr)
    return 0


TARGET_HELP = "a container name (see `layerfs ps -a`) or the mount point of an image mount"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register diff, commit and export on the `layerfs` parser."""
    verb = functools.partial(add_store_verb, sub)

    p = verb(
        "diff",
        cmd_diff,
        "list what an upper changed: A added, C changed, D deleted",
        access="read",
        examples="  layerfs diff mybox\n  layerfs diff -z /mnt/app | xargs -0 -n1 echo",
    )
    p.add_argument("target", nargs="?", metavar="NAME|MOUNTPOINT", help=TARGET_HELP)
    p.add_argument("--upper", metavar="DIR", help="a plain upper directory (with --image)")
    p.add_argument("--image", metavar="IMAGE", help="the image the upper was made over")
    p.add_argument(
        "-z", dest="zero", action="store_true", help="end each line with NUL, not newline"
    )
    add_output_options(p, DIFF_FIELDS)

    p = verb(
        "commit",
        cmd_commit,
        "commit an upper's changes as a new layer and image",
        examples="  layerfs commit mybox app:2 -m 'add config'\n"
        "  layerfs commit --upper ./upper --image alpine:3.20 app:2",
    )
    p.add_argument("target", nargs="?", metavar="NAME|MOUNTPOINT", help=TARGET_HELP)
    p.add_argument(
        "newname", nargs="?", metavar="NEWNAME[:TAG]", help="name of the new image (tag latest)"
    )
    p.add_argument("--upper", metavar="DIR", help="a plain upper directory (with --image)")
    p.add_argument("--image", metavar="IMAGE", help="the image the upper was made over")
    p.add_argument("-m", "--message", metavar="MSG", help="history comment")
    p.add_argument("--zstd", action="store_true", help="compress the layer with zstd (not gzip)")
    p.add_argument("--allow-empty", action="store_true", help="commit even with no changes")
    add_timeout(p)

    p = verb(
        "export",
        cmd_export,
        "write an image out as an OCI layout or archive, or a docker-save archive",
        access="read",
        examples="  layerfs export app:1 oci:./layout:1\n"
        "  layerfs export app:1 docker-archive:app.tar:app:1",
    )
    p.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    p.add_argument(
        "dest",
        metavar="DEST",
        help="oci:DIR[:TAG], oci-archive:FILE[:TAG] or docker-archive:FILE[:NAME:TAG]",
    )
