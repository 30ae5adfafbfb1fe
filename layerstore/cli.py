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
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import StoreError
from .progress import Progress, human
from .store import Store, default_store_dir
from .template import Template

Handler = Callable[[argparse.Namespace], int]
# How a verb opens the store: "read" never changes it (a store that does not exist reads as
# an empty one and is not created); "write" changes an existing one; "create" makes it.
Access = str | Callable[[argparse.Namespace], str]


class UsageError(StoreError):
    """A bad command line; one line for the user (exit code 2)."""


def one_line(text: str) -> str:
    """A message as one line: line breaks (from a library's message, a path) become "; "."""
    return re.sub(r"\s*[\r\n]+\s*", "; ", text).strip("; ") or "error"


def error_line(exc: BaseException) -> str:
    """The one line `layerfs: …` says for an exception reaching a verb's edge."""
    if isinstance(exc, StoreError):
        msg = str(exc)
    elif isinstance(exc, OSError):
        where = f": {exc.filename!s}" if exc.filename else ""
        msg = f"{exc.strerror or exc}{where}"
    elif isinstance(exc, sqlite3.Error):
        msg = f"index error: {exc}"
    elif isinstance(exc, EOFError):
        msg = "unexpected end of input (standard input closed?)"
    elif type(exc).__module__.split(".")[0] in ("httpx", "httpcore"):
        msg = f"registry connection failed: {exc or type(exc).__name__}"
    elif type(exc).__name__ in ("CliError", "MountError"):
        msg = str(exc)
    else:
        msg = f"internal error: {type(exc).__name__}: {exc} (--debug shows where)"
    return one_line(msg)


def store_root(args: argparse.Namespace) -> Path:
    store = getattr(args, "store", None)
    return Path(store) if store else default_store_dir()


def _exists(path: Path) -> bool:
    """Whether `path` exists; True when it cannot be told (someone else's store: opening it
    then says why it is not ours)."""
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def open_store(args: argparse.Namespace, access: str, recover: bool = True) -> Store:
    """The store of `--store` for a verb of the given access (see Access)."""
    root = store_root(args)
    timeout = getattr(args, "timeout", None)
    if access != "create" and not _exists(root / "index.db"):
        return Store(root, readonly=True, missing_ok=True, timeout=timeout)
    # Even a reading verb opens the index read-write (a read-only SQLite connection would
    # leave the WAL files behind); it only skips the recovery.
    return Store(root, recover=recover and access != "read", timeout=timeout)


def _guard(
    fn: Callable[[argparse.Namespace, Store], int], access: Access, recover: bool
) -> Handler:
    """Open the store, run the verb, turn any domain error into one `layerfs: ` line."""

    def handler(args: argparse.Namespace) -> int:
        mode = access(args) if callable(access) else access
        try:
            with open_store(args, mode, recover) as store:
                return fn(args, store)
        except BrokenPipeError:
            raise  # main ends quietly, as `ls | head` does
        except (StoreError, sqlite3.Error, OSError) as exc:
            if getattr(args, "debug", False):
                traceback.print_exc()
            print(f"layerfs: {error_line(exc)}", file=sys.stderr)
            return 2 if isinstance(exc, UsageError) else 1

    return handler


# ---- output: tables, --json, --format ------------------------------------------------------


def add_output_options(
    p: argparse.ArgumentParser, fields: dict[str, str], json_help: str = "JSON output"
) -> None:
    """--format TEMPLATE and --json, the fields listed in the verb's help."""
    p.add_argument(
        "--format",
        metavar="TEMPLATE",
        help="print each record through a Go-style template, e.g. '{{."
        + next(iter(fields))
        + "}}' or '{{json .}}'; 'table ' first aligns columns under a header (fields below)",
    )
    p.add_argument("--json", action="store_true", help=json_help)
    width = max(len(k) for k in fields) + 2
    lines = [f"  .{k:<{width}}{v}" for k, v in fields.items()]
    p.epilog = (
        (p.epilog + "\n\n" if p.epilog else "")
        + "fields (--format, --json):\n"
        + ("\n".join(lines))
    )
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.set_defaults(fields=list(fields))


def template(args: argparse.Namespace) -> Template | None:
    """The verb's --format template, checked against its fields (None without --format)."""
    if not getattr(args, "format", None):
        return None
    if args.json:
        raise UsageError("--format and --json are exclusive")
    t = Template(args.format)
    t.check(args.fields)
    return t


def emit(
    args: argparse.Namespace,
    records: list[dict[str, Any]],
    table: Callable[[], None],
    json_value: Any = None,
) -> None:
    """Print records as --format says, as JSON (--json: `json_value`, else the records), or
    as the verb's own table."""
    t = template(args)
    if t is not None:
        for line in t.lines(records):
            print(line)
    elif args.json:
        print(json.dumps(records if json_value is None else json_value, indent=2))
    else:
        table()


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
    from .reference import local_name
    from .sources import source_images

    tags = [local_name(t) for t in args.tag or []]  # a bad name fails before any work
    images = source_images(args.source, args.platform)
    progress = Progress(quiet=args.quiet)
    res = import_source(store, images, tags, progress)
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


IMAGE_FIELDS = {
    "Id": "image ID (sha256:…)",
    "Repository": "repository of this row's name (<none> when untagged)",
    "Tag": "tag of this row's name",
    "Digest": "manifest digest of this repository (<none> when not known)",
    "RepoTags": "every NAME:TAG of the image",
    "RepoDigests": "every NAME@DIGEST of the image",
    "Created": "creation time from the image config",
    "CreatedSince": "creation time, relative (2 days ago)",
    "Size": "size of its layers in bytes",
    "HumanSize": "size, e.g. 7.8MB",
    "Platform": "OS/ARCH[/VARIANT]",
}


def _image_rows(store: Store, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One record per name of each image (untagged images once), as the table's rows;
    `images REPO[:TAG]` keeps the rows of that repository (and tag)."""
    want_repo = want_tag = None
    if args.reference:
        from .reference import parse_reference

        last = args.reference.rsplit("/", 1)[-1]
        ref = parse_reference(args.reference)
        want_repo, want_tag = ref.name, ref.tag if ":" in last else None
    rows = []
    for image in store.image_ids():
        rec = _image_record(store, image)
        for name in rec["RepoTags"] or ["<none>:<none>"]:
            repo, _, tag = name.rpartition(":")
            if want_repo is not None and (repo != want_repo or want_tag not in (None, tag)):
                continue
            digest = "<none>"
            for d in rec["RepoDigests"]:
                if d.split("@")[0] == repo:
                    digest = d.split("@")[1]
            rows.append(
                {
                    **rec,
                    "Repository": repo,
                    "Tag": tag,
                    "Digest": digest,
                    "CreatedSince": _ago(rec["Created"]),
                    "HumanSize": human(rec["Size"]),
                }
            )
    return rows


def cmd_images(args: argparse.Namespace, store: Store) -> int:
    rows = _image_rows(store, args)
    if args.quiet:
        seen: dict[str, None] = {}
        for r in rows:
            seen.setdefault(r["Id"] if args.no_trunc else _short(r["Id"]))
        for image_id in seen:
            print(image_id)
        return 0

    def table() -> None:
        head = ["REPOSITORY", "TAG"] + (["DIGEST"] if args.digests else [])
        out = [head + ["IMAGE ID", "CREATED", "SIZE"]]
        for r in rows:
            row = [r["Repository"], r["Tag"]] + ([r["Digest"]] if args.digests else [])
            image_id = r["Id"] if args.no_trunc else _short(r["Id"])
            out.append(row + [image_id, r["CreatedSince"], r["HumanSize"]])
        _table(out)

    # --json: one object per image (all its names), as `podman images --format json`.
    per_image = {r["Id"]: {k: r[k] for k in _image_record_keys} for r in rows}
    emit(args, rows, table, json_value=list(per_image.values()))
    return 0


_image_record_keys = ("Id", "RepoTags", "RepoDigests", "Created", "Size", "Platform")


INSPECT_FIELDS = {
    "Id": "image ID",
    "RepoTags": "names",
    "RepoDigests": "NAME@DIGEST names",
    "Created": "creation time",
    "Author": "author from the config",
    "Architecture": "CPU architecture",
    "Variant": "architecture variant",
    "Os": "operating system",
    "Config": "the config's `config` (Env, Cmd, Entrypoint, Labels, …)",
    "RootFS": "Type and Layers (DiffIDs, bottom first)",
    "Size": "size of its layers in bytes",
    "ManifestDigest": "manifest digest",
}


def cmd_inspect(args: argparse.Namespace, store: Store) -> int:
    out = []
    template(args)  # a bad --format fails before any lookup
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
    emit(args, out, lambda: print(json.dumps(out, indent=4)))
    return 0


HISTORY_FIELDS = {
    "Id": "image ID on the newest step, <missing> on the others",
    "Created": "time of the step",
    "CreatedSince": "time of the step, relative",
    "CreatedBy": "command of the step",
    "Size": "bytes its layer adds (0 for a step without a layer)",
    "HumanSize": "size, e.g. 1.2MB",
    "Comment": "comment",
    "EmptyLayer": "true when the step made no layer",
}


def cmd_history(args: argparse.Namespace, store: Store) -> int:
    image = store.resolve(args.image)
    cfg = store.image_config(image)
    layers = store.image_layers(image)
    hist = [h for h in cfg.get("history") or [] if isinstance(h, dict)] or [{} for _ in layers]
    li = 0
    records: list[dict[str, Any]] = []
    for h in hist:
        size = 0
        empty = bool(h.get("empty_layer"))
        if not empty and li < len(layers):
            size = layers[li].tar_size
            li += 1
        created = str(h.get("created", ""))
        records.append(
            {
                "Id": "<missing>",
                "Created": created,
                "CreatedSince": _ago(created),
                "CreatedBy": str(h.get("created_by", "")),
                "Size": size,
                "HumanSize": human(size),
                "Comment": str(h.get("comment", "")),
                "EmptyLayer": empty,
            }
        )
    records.reverse()
    if records:
        records[0]["Id"] = image

    def table() -> None:
        rows = [["IMAGE", "CREATED", "CREATED BY", "SIZE", "COMMENT"]]
        for r in records:
            by = r["CreatedBy"]
            if not args.no_trunc and len(by) > 45:
                by = by[:44] + "…"
            shown = r["Id"] if r["Id"] == "<missing>" or args.no_trunc else _short(r["Id"])
            rows.append([shown, r["CreatedSince"], by, r["HumanSize"], r["Comment"]])
        _table(rows)

    emit(args, records, table)
    return 0


def cmd_tag(args: argparse.Namespace, store: Store) -> int:
    store.tag(args.source, args.target)
    return 0


def cmd_rmi(args: argparse.Namespace, store: Store) -> int:
    for ref in args.image:
        for line in store.rmi(ref, force=args.force):
            print(line)
    return 0


LAYER_FIELDS = {
    "DiffID": "digest of the uncompressed layer",
    "Digest": "digest of the compressed blob",
    "MediaType": "media type of the blob",
    "CompressedSize": "blob bytes",
    "Size": "uncompressed tar bytes",
    "Files": "entries",
    "Images": "IDs of the images using it",
}


def cmd_layers(args: argparse.Namespace, store: Store) -> int:
    layers = store.image_layers(args.image) if args.image else store.all_layers()
    records: list[dict[str, Any]] = [
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
    ]

    def table() -> None:
        rows = [["DIFF ID", "DIGEST", "COMPRESSED", "SIZE", "FILES", "IMAGES"]]
        for r in records:
            rows.append(
                [
                    r["DiffID"].removeprefix("sha256:")[:12],
                    r["Digest"].removeprefix("sha256:")[:12],
                    human(r["CompressedSize"]),
                    human(r["Size"]),
                    str(r["Files"]),
                    str(len(r["Images"])),
                ]
            )
        _table(rows)

    emit(args, records, table)
    return 0


def _pascal(key: str) -> str:
    return "".join(part.capitalize() for part in key.split("_"))


def cmd_df(args: argparse.Namespace, store: Store) -> int:
    d = store.df()
    if args.json:
        print(json.dumps({_pascal(k): v for k, v in d.items()}, indent=2))
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
    for diff, why in r.kept:
        print(f"Kept layer {diff}: no image uses it, but it is {', '.join(why)}")
    kept = f"; kept {len(r.kept)} layers in use by mounts" if r.kept else ""
    print(
        f"{verb} {len(r.layers)} layers, {r.contents} contents ({human(r.bytes)}), "
        f"{r.orphans} orphan files, {r.stale_tmp} stale temp dirs{kept}"
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


def add_timeout(p: argparse.ArgumentParser) -> None:
    """--timeout for a verb that may wait for the store's lock (held by an import or gc)."""
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up waiting for another process's import or gc after SECONDS "
        "(default: wait, saying for whom)",
    )


def add_store_verb(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    fn: Callable[[argparse.Namespace, Store], int],
    help: str,
    *,
    access: Access = "write",
    recover: bool = True,
    examples: str = "",
    description: str = "",
) -> argparse.ArgumentParser:
    """Add verb `name` whose handler gets the opened store (`--store DIR`) and whose domain
    errors become one `layerfs: ` line; every store-ring CLI module registers through this.
    `access`: see Access; `examples`: command lines shown at the end of its --help."""
    p = sub.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=f"examples:\n{examples}" if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help=STORE_HELP)
    p.set_defaults(func=_guard(fn, access, recover))
    return p


STORE_HELP = (
    "layer store (default: $LAYERFS_STORE, else the XDG data dir; /var/lib/layerfs as root)"
)
IMAGE_HELP = "an image: NAME[:TAG], NAME@sha256:DIGEST, an image ID or a unique ID prefix"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the store's verbs on the `layerfs` parser."""
    verb = functools.partial(add_store_verb, sub)

    p = verb(
        "import",
        cmd_import,
        "import an image from a directory or archive into the store",
        access="create",
        examples="  layerfs import oci:./layout:v1 --tag app:1\n"
        "  layerfs import docker-archive:saved.tar\n"
        "  layerfs import oci-archive:img.tar --platform linux/arm64",
    )
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="oci:DIR[:REF] (OCI layout), oci-archive:FILE[:REF], docker-archive:FILE[:REF] "
        "(`docker save`), or a plain path to any of them",
    )
    p.add_argument("--tag", "-t", action="append", metavar="NAME[:TAG]", help="also tag it NAME")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="pick from an image index")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    add_timeout(p)

    p = verb(
        "images",
        cmd_images,
        "list images",
        access="read",
        examples="  layerfs images\n  layerfs images alpine\n  layerfs images -q\n"
        "  layerfs images --format 'table {{.Repository}}\\t{{.Tag}}\\t{{.HumanSize}}'",
    )
    p.add_argument(
        "reference",
        nargs="?",
        metavar="REPOSITORY[:TAG]",
        help="only the images of this repository (and tag)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="only image IDs, one per image")
    p.add_argument("--digests", action="store_true", help="show repo digests")
    p.add_argument("--no-trunc", action="store_true", help="full image IDs")
    add_output_options(p, IMAGE_FIELDS, "JSON: one object per image (all its names)")

    p = verb(
        "inspect",
        cmd_inspect,
        "show images' details as JSON",
        access="read",
        examples="  layerfs inspect alpine\n  layerfs inspect --format '{{.Id}} {{.Os}}' app:1",
    )
    p.add_argument("image", nargs="+", metavar="IMAGE", help=IMAGE_HELP)
    add_output_options(p, INSPECT_FIELDS, "JSON (the default)")

    p = verb(
        "history",
        cmd_history,
        "show the steps that made an image, newest first",
        access="read",
        examples="  layerfs history alpine --no-trunc",
    )
    p.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    p.add_argument("--no-trunc", action="store_true", help="full commands and IDs")
    add_output_options(p, HISTORY_FIELDS)

    p = verb(
        "tag",
        cmd_tag,
        "give an image another name",
        examples="  layerfs tag alpine:3.20 localhost:5000/base:1",
    )
    p.add_argument("source", metavar="IMAGE", help=IMAGE_HELP)
    p.add_argument(
        "target",
        metavar="NAME[:TAG]",
        help="the new name, as pull and push read references (lowercase repository)",
    )

    p = verb(
        "rmi",
        cmd_rmi,
        "remove image names (the image with its last name); gc frees the space",
        examples="  layerfs rmi app:1\n  layerfs rmi -f 3f9c1a2b4d5e",
    )
    p.add_argument("image", nargs="+", metavar="IMAGE", help=IMAGE_HELP)
    p.add_argument(
        "--force",
        "-f",
        action="store_true",
        help="remove even if several tags or mounted read-only (gc keeps what a mount uses); "
        "only untag if a container uses it",
    )

    p = verb(
        "layers",
        cmd_layers,
        "list layers (all, or one image's, bottom first)",
        access="read",
        examples="  layerfs layers alpine",
    )
    p.add_argument("image", nargs="?", metavar="IMAGE", help=IMAGE_HELP)
    add_output_options(p, LAYER_FIELDS)

    p = verb(
        "df",
        cmd_df,
        "show logical vs stored bytes",
        access="read",
        examples="  layerfs df\n  layerfs df --json",
    )
    p.add_argument("--json", action="store_true", help="JSON output")

    p = verb(
        "unpack",
        cmd_unpack,
        "materialise an image's merged rootfs into DIR",
        access="read",
        examples="  layerfs unpack alpine ./rootfs",
    )
    p.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    p.add_argument("dir", metavar="DIR", help="where to write the tree (created; must be empty)")

    p = verb(
        "gc",
        cmd_gc,
        "remove layers and contents that no image and no mount uses",
        recover=False,  # gc cleans leftovers itself, and counts them the same in a dry run
        examples="  layerfs gc -n\n  layerfs gc --timeout 30",
    )
    p.add_argument("--dry-run", "-n", action="store_true", help="only say what would go")
    add_timeout(p)

    p = verb(
        "fsck",
        cmd_fsck,
        "check the store (refcounts, missing and orphan contents); runs beside mounts",
        recover=False,
        examples="  layerfs fsck --full",
    )
    p.add_argument("--full", action="store_true", help="also re-hash every content")
    add_timeout(p)
