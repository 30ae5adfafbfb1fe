"""CLI verbs of the layer store: import, images, inspect, history, tag, rmi, layers, df,
unpack, gc, fsck."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import re
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import StoreError
from .progress import Progress, human
from .store import Store, default_store_dir

Handler = Callable[[argparse.Namespace], int]


def _store(args: argparse.Namespace) -> Store:
    return Store(Path(args.store) if args.store else default_store_dir())


def _guard(fn: Callable[[argparse.Namespace, Store], int]) -> Handler:
    """Open the store, run the verb, turn any domain error into one `layerfs: ` line."""

    def handler(args: argparse.Namespace) -> int:
        try:
            with _store(args) as store:
                return fn(args, store)
        except StoreError as exc:
            print(f"layerfs: {exc}", file=sys.stderr)
            return 1
        except sqlite3.Error as exc:
            print(f"layerfs: index error: {exc}", file=sys.stderr)
            return 1
        except OSError as exc:
            where = f" {exc.filename!s}" if exc.filename else ""
            print(f"layerfs: {exc.strerror or exc}{':' if where else ''}{where}", file=sys.stderr)
            return 1

    return handler


def _short(image: str) -> str:
    return image.removeprefix("sha256:")[:12]


def _ago(created: str) -> str:
    if not created:
        return "N/A"
    # Go writes 1-9 fraction digits; Python 3.11 parses only 3 or 6: normalise to 6.
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?", created)
    if m is None:
        return created
    frac = (m.group(2) or "0")[:6].ljust(6, "0")
    zone = m.group(3) or "+00:00"
    try:
        t = dt.datetime.fromisoformat(f"{m.group(1)}.{frac}{'+00:00' if zone == 'Z' else zone}")
    except ValueError:
        return created
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    secs = (dt.datetime.now(dt.UTC) - t).total_seconds()
    for unit, n in (("years", 365 * 86400), ("months", 30 * 86400), ("days", 86400),
                    ("hours", 3600), ("minutes", 60)):  # fmt: skip
        if secs >= 2 * n:
            return f"{int(secs // n)} {unit} ago"
    return "About a minute ago" if secs >= 60 else "Less than a minute ago"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


# ---- verbs ---------------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace, store: Store) -> int:
    from .ingest import import_source
    from .sources import source_images

    images = source_images(args.source, args.platform)
    progress = Progress(quiet=args.quiet)
    res = import_source(store, images, args.tag or [], progress)
    for image, names in res.images:
        if names:
            for n in names:
                progress.line(f"Loaded image: {n}")
        else:
            progress.line(f"Loaded image ID: {image}")
    return 0


def _image_record(store: Store, image: str) -> dict[str, Any]:
    info = store.image_info(image)
    return {
        "Id": info.id,
        "RepoTags": list(info.tags),
        "RepoDigests": list(info.repo_digests),
        "Created": info.created,
        "Size": info.size,
        "Platform": info.platform,
    }


def cmd_images(args: argparse.Namespace, store: Store) -> int:
    ids = store.image_ids()
    if args.json:
        print(json.dumps([_image_record(store, i) for i in ids], indent=2))
        return 0
    head = ["REPOSITORY", "TAG"] + (["DIGEST"] if args.digests else [])
    rows = [head + ["IMAGE ID", "CREATED", "SIZE"]]
    for image in ids:
        info = store.image_info(image)
        names = list(info.tags) or ["<none>:<none>"]
        for name in names:
            repo, _, tag = name.rpartition(":")
            digest = "<none>"
            for d in info.repo_digests:
                if d.split("@")[0] == repo:
                    digest = d.split("@")[1]
            row = [repo, tag] + ([digest] if args.digests else [])
            rows.append(row + [_short(image), _ago(info.created), human(info.size)])
    _table(rows)
    return 0


def cmd_inspect(args: argparse.Namespace, store: Store) -> int:
    out = []
    for ref in args.image:
        image = store.resolve(ref)
        cfg = store.image_config(image)
        info = store.image_info(image)
        out.append(
            {
                "Id": image,
                "RepoTags": list(info.tags),
                "RepoDigests": list(info.repo_digests),
                "Created": cfg.get("created", ""),
                "Author": cfg.get("author", ""),
                "Architecture": cfg.get("architecture", ""),
                "Variant": cfg.get("variant", ""),
                "Os": cfg.get("os", ""),
                "Config": cfg.get("config") or {},
                "RootFS": {
                    "Type": (cfg.get("rootfs") or {}).get("type", "layers"),
                    "Layers": [layer.diff_id for layer in store.image_layers(image)],
                },
                "Size": info.size,
                "ManifestDigest": info.manifest_digest,
            }
        )
    print(json.dumps(out, indent=4))
    return 0


def cmd_history(args: argparse.Namespace, store: Store) -> int:
    image = store.resolve(args.image)
    cfg = store.image_config(image)
    layers = store.image_layers(image)
    hist = [h for h in cfg.get("history") or [] if isinstance(h, dict)] or [{} for _ in layers]
    rows = [["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]]
    li = 0
    entries = []
    for h in hist:
        size = 0
        if not h.get("empty_layer") and li < len(layers):
            size = layers[li].tar_size
            li += 1
        by = str(h.get("created_by", ""))
        if not args.no_trunc and len(by) > 45:
            by = by[:44] + "…"
        entries.append([str(h.get("created", "")), by, human(size), str(h.get("comment", ""))])
    for i, (created, by, hsize, comment) in enumerate(reversed(entries)):
        rows.append([_short(image) if i == 0 else "<missing>", _ago(created), by, hsize, comment])
    _table(rows)
    return 0


def cmd_tag(args: argparse.Namespace, store: Store) -> int:
    store.tag(args.source, args.target)
    return 0


def cmd_rmi(args: argparse.Namespace, store: Store) -> int:
    for ref in args.image:
        for line in store.rmi(ref, force=args.force):
            print(line)
    return 0


def cmd_layers(args: argparse.Namespace, store: Store) -> int:
    layers = store.image_layers(args.image) if args.image else store.all_layers()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "DiffID": lay.diff_id,
                        "Digest": lay.blob_digest,
                        "MediaType": lay.media_type,
                        "CompressedSize": lay.blob_size,
                        "Size": lay.tar_size,
                        "Files": lay.files,
                        "Images": store.layer_users(lay.id),
                    }
                    for lay in layers
                ],
                indent=2,
            )
        )
        return 0
    rows = [["DIFF ID", "DIGEST", "COMPRESSED", "SIZE", "FILES", "IMAGES"]]
    for lay in layers:
        rows.append(
            [
                lay.diff_id.removeprefix("sha256:")[:12],
                lay.blob_digest.removeprefix("sha256:")[:12],
                human(lay.blob_size),
                human(lay.tar_size),
                str(lay.files),
                str(len(store.layer_users(lay.id))),
            ]
        )
    _table(rows)
    return 0


def cmd_df(args: argparse.Namespace, store: Store) -> int:
    d = store.df()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(f"Images:              {d['images']}")
    print(f"Layers:              {d['layers']} ({d['unused_layers']} unused, gc reclaims them)")
    print(f"Files (entries):     {d['entries']}, distinct contents {d['contents']}")
    print(f"Logical bytes:       {human(d['logical_bytes'])} (every image's files)")
    print(f"Saved by layer dedup:{human(d['saved_by_layer_dedup']):>10}")
    print(f"Saved by file dedup: {human(d['saved_by_file_dedup']):>10}")
    print(f"Stored bytes:        {human(d['stored_bytes'])} + index {human(d['index_bytes'])}")
    return 0


def cmd_unpack(args: argparse.Namespace, store: Store) -> int:
    from .unpack import unpack

    unpack(store, args.image, Path(args.dir), Progress().warn)
    return 0


def cmd_gc(args: argparse.Namespace, store: Store) -> int:
    r = store.gc(dry_run=args.dry_run)
    verb = "Would remove" if args.dry_run else "Removed"
    for diff in r.layers:
        print(f"{verb} layer {diff}")
    print(
        f"{verb} {len(r.layers)} layers, {r.contents} contents ({human(r.bytes)}), "
        f"{r.orphans} orphan files, {r.stale_tmp} stale temp dirs"
    )
    return 0


def cmd_fsck(args: argparse.Namespace, store: Store) -> int:
    problems = store.fsck(full=args.full)
    for p in problems:
        print(p)
    if problems:
        print(f"layerfs: fsck found {len(problems)} problems", file=sys.stderr)
        return 1
    print("store is consistent" + (" (all contents re-hashed)" if args.full else ""))
    return 0


def add_store_verb(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    fn: Callable[[argparse.Namespace, Store], int],
    help: str,
) -> argparse.ArgumentParser:
    """Add verb `name` whose handler gets the opened store (`--store DIR`) and whose domain
    errors become one `layerfs: ` line; every store-ring CLI module registers through this."""
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument(
        "--store",
        metavar="DIR",
        help="store directory (default: $LAYERFS_STORE, else the XDG data dir, "
        "/var/lib/layerfs as root)",
    )
    p.set_defaults(func=_guard(fn))
    return p


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the store's verbs on the `layerfs` parser."""
    verb = functools.partial(add_store_verb, sub)

    p = verb("import", cmd_import, "import an image (oci:DIR[:REF], oci-archive:FILE[:REF], "
             "docker-archive:FILE[:REF], or a path)")  # fmt: skip
    p.add_argument("source")
    p.add_argument("--tag", "-t", action="append", metavar="NAME", help="also tag it NAME")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="pick from an image index")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")

    p = verb("images", cmd_images, "list images")
    p.add_argument("--digests", action="store_true", help="show repo digests")
    p.add_argument("--json", action="store_true", help="JSON output")

    p = verb("inspect", cmd_inspect, "show an image's details as JSON")
    p.add_argument("image", nargs="+")

    p = verb("history", cmd_history, "show an image's history")
    p.add_argument("image")
    p.add_argument("--no-trunc", action="store_true")

    p = verb("tag", cmd_tag, "give an image another name")
    p.add_argument("source")
    p.add_argument("target")

    p = verb("rmi", cmd_rmi, "remove image names (the image with its last name); gc frees space")
    p.add_argument("image", nargs="+")
    p.add_argument(
        "--force",
        "-f",
        action="store_true",
        help="remove even if several tags; untag only if a container uses it",
    )

    p = verb("layers", cmd_layers, "list layers (all, or one image's, bottom first)")
    p.add_argument("image", nargs="?")
    p.add_argument("--json", action="store_true")

    p = verb("df", cmd_df, "show logical vs stored bytes")
    p.add_argument("--json", action="store_true")

    p = verb("unpack", cmd_unpack, "materialise an image's merged rootfs into DIR")
    p.add_argument("image")
    p.add_argument("dir")

    p = verb("gc", cmd_gc, "remove unused layers and contents")
    p.add_argument("--dry-run", "-n", action="store_true")

    p = verb("fsck", cmd_fsck, "check the store (refcounts, missing and orphan contents)")
    p.add_argument("--full", action="store_true", help="also re-hash every content")
