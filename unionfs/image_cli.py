"""`layerfs mount/umount/ps/which`: an image of the store mounted under a (named) upper."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from layerstore import containers, mountinfo
from layerstore.cli import IMAGE_HELP, _ago, add_output_options, emit, error_line, template
from layerstore.containers import Container, MountRecord
from layerstore.errors import StoreError
from layerstore.model import EntryKind
from layerstore.progress import human
from layerstore.store import Store, default_store_dir
from unionfs.core import override
from unionfs.core.idmap import IdMap, IdMapError, Presentation
from unionfs.core.layers import DirLayer, Layer
from unionfs.core.storelayer import StoreView

if TYPE_CHECKING:
    from unionfs.mount_options import Shared

UMOUNT_WAIT = 10.0  # bounded wait for a daemon to exit after its mount went away


class CliError(Exception):
    """One line for the user."""


def _store_root(args: argparse.Namespace) -> Path:
    return Path(args.store) if args.store else default_store_dir()


def _open_store(root: Path) -> Store:
    if not (root / "index.db").exists():
        raise CliError(f"no layer store at {root} (import an image first)")
    return Store(root, readonly=True)


def _trio_dispatch(fn: Callable[[], Any]) -> Any:
    """Run `fn` on the trio thread (the core's SQLite connection lives there)."""
    import trio

    return trio.from_thread.run_sync(fn)


def _init_upper_root(upper: Path, view: StoreView) -> None:
    """A fresh upper's root takes the image root's attributes (the merged root shows the
    upper's, as kernel overlayfs does)."""
    root = view.layers[0].root() if view.layers else None
    if root is None or root.st is None:
        return
    st = root.st
    if os.geteuid() != 0:
        # Rootless: the owner/mode the daemon cannot give the directory go in its override.
        fd = os.open(upper, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            ov = override.Override(st.uid, st.gid, st.mode & 0o7777)
            override.record(fd, b"", ov, fresh=True)
        finally:
            os.close(fd)
    else:
        os.chown(upper, st.uid, st.gid)
        os.chmod(upper, st.mode & 0o7777)
    os.utime(upper, ns=(st.atime_ns, st.mtime_ns))


def _shared_options(extra: list[str] | None) -> Shared:
    """`-o` options, checked as `overlay` checks them; CliError for a refused or unknown one."""
    from unionfs.mount_options import OptionError, Shared

    shared = Shared()
    try:
        for text in extra or []:
            shared.take_all(text)
    except OptionError as exc:
        raise CliError(str(exc)) from None
    return shared


def _presentation(args: argparse.Namespace) -> Presentation:
    """--squash, --uidmap, --gidmap -> how owners are shown; CliError when bad."""
    try:
        return Presentation(
            uids=IdMap.parse(args.uidmap) if args.uidmap else None,
            gids=IdMap.parse(args.gidmap) if args.gidmap else None,
            squash_uid=os.getuid() if args.squash else None,
            squash_gid=os.getgid() if args.squash else None,
        )
    except IdMapError as exc:
        raise CliError(str(exc)) from None


def _prepare(
    args: argparse.Namespace, root: Path
) -> tuple[str, StoreView, Container | None, Path | None, Path | None, tuple[str, ...]]:
    """Resolve the image and the upper; nothing is created until every check passed. Also
    returns the image's DiffIDs (what the mount's registration pins)."""
    if args.ro and (args.upper or args.work):
        raise CliError("--ro takes no --upper/--work")
    if (args.upper is None) != (args.work is None):
        raise CliError("--upper and --work go together")
    if args.name and args.upper:
        raise CliError("--name and --upper are exclusive")
    if args.rm and (args.name or args.upper or args.ro):
        raise CliError("--rm removes the fresh upper made for this mount: not with --name, "
                       "--upper or --ro")  # fmt: skip
    if args.name:
        containers.check_name(args.name)
    with _open_store(root) as store:
        image = store.resolve(args.image)
        layers = store.image_layers(image)
        ids = [layer.id for layer in reversed(layers)]
        view = StoreView.prepare(store, ids, dispatch=_trio_dispatch)
        diff_ids = tuple(layer.diff_id for layer in layers)
    container: Container | None = None
    upper = work = None
    if args.name:
        container = containers.load(root, args.name)
        if container is None and args.ro:
            raise CliError(f"no such container: {args.name}")
        if container is not None and container.image != image:
            raise CliError(
                f"container {args.name} belongs to image {container.image[:19]} "
                f"({container.ref}), not {args.image}"
            )
        live = containers.find_mounted(root, args.name)
        if live is not None:
            raise CliError(f"container {args.name} is already mounted at {live.mountpoint}")
    elif args.upper:
        upper, work = Path(args.upper).resolve(), Path(args.work).resolve()
    return image, view, container, upper, work, diff_ids


def cmd_mount(args: argparse.Namespace) -> int:
    from unionfs.daemon import MountError, check_mountpoint
    from unionfs.fuse import mount as fuse_mount

    root = _store_root(args)
    mountpoint = os.path.realpath(args.mountpoint)
    try:
        _presentation(args)  # bad values fail before anything is made
        shared = _shared_options(args.options)
        fuse_mount.parse(shared.fuse)  # MountError for a bad combination, before anything
        check_mountpoint(Path(mountpoint))
        with _open_store(root):
            pass  # a missing store, or someone else's, says so before anything is locked
        fresh = False
        # Registered under the pin lock: from here on gc keeps the image's layers (even if
        # the image is removed) while this process or the daemon lives.
        with containers.pin_lock(root):
            image, view, container, upper, work, diff_ids = _prepare(args, root)
            if not args.ro and container is None and upper is None:
                name = args.name or containers.fresh_name(root, args.image)
                container = containers.create(root, name, image, args.image)
                fresh = True
            record = MountRecord(
                mountpoint=mountpoint,
                pid=os.getpid(),
                image=image,
                name=container.name if container is not None else None,
                upper=str(container.upper if container else upper) if not args.ro else None,
                work=str(container.work if container else work) if not args.ro else None,
                readonly=bool(args.ro),
                ref=args.image,
                layers=diff_ids,
                started=containers.proc_start(os.getpid()),
                rm=bool(args.rm),
            )
            containers.write_record(root, record)
        try:
            layers: list[Layer] = list(view.layers)
            if container is not None:
                if fresh:
                    _init_upper_root(container.upper, view)
                if args.ro:
                    # A read-only view of the container: its upper as the top layer.
                    top = DirLayer(os.fsencode(container.upper))
                    top.overrides = os.geteuid() != 0  # a rootless upper: show its metadata
                    layers.insert(0, top)
                else:
                    upper, work = container.upper, container.work
            announce = fresh and not args.name and container is not None
            if args.foreground and announce:
                print(record.name, flush=True)
            code = _serve(args, root, record, layers, upper, work, shared)
            if announce and not args.foreground:
                print(record.name)  # once the mount is live
            return code
        except (CliError, MountError):
            # Never mounted: no registration, and no unused fresh container, left behind.
            containers.remove_record(root, mountpoint)
            if fresh and container is not None:
                shutil.rmtree(container.root, ignore_errors=True)
            raise
        except BaseException:
            containers.remove_record(root, mountpoint, os.getpid())
            raise
    except (CliError, StoreError, MountError) as exc:
        print(f"layerfs: {error_line(exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"layerfs: {exc.filename or args.mountpoint}: {exc.strerror}", file=sys.stderr)
        return 1


def _mount_ended(root: Path, record: MountRecord) -> None:
    """The daemon's mount is gone: a `--rm` upper goes, then the registration."""
    if record.rm and record.name is not None:
        try:
            containers.remove(root, record.name)
        except StoreError as exc:
            print(f"layerfs: {exc}", file=sys.stderr)
    containers.remove_record(root, record.mountpoint, os.getpid())


def _serve(
    args: argparse.Namespace,
    root: Path,
    record: MountRecord,
    layers: list[Layer],
    upper: Path | None,
    work: Path | None,
    shared: Shared,
) -> int:
    """Serve the mount (daemon.serve: in the foreground, or detached with its log in
    STORE/mounts/<hash>.log). The registration written by cmd_mount passes to the serving
    process once the mount is live, and goes (with a `--rm` upper) when it ends."""
    from unionfs.daemon import Hooks, serve

    root = root.absolute()  # the daemon works from "/"
    log_path = None
    if not args.foreground:
        containers.mounts_dir(root).mkdir(parents=True, exist_ok=True)
        log_path = containers.record_path(root, record.mountpoint).with_suffix(".log")

    def mounted(pid: int) -> None:
        containers.write_record(root, replace(record, pid=pid, started=containers.proc_start(pid)))

    def ended() -> None:
        _mount_ended(root, record)
        with contextlib.suppress(OSError):
            if log_path is not None and log_path.stat().st_size == 0:
                log_path.unlink()  # nothing to tell: no file left behind

    return serve(
        layers,
        None if args.ro else upper,
        None if args.ro else work,
        Path(record.mountpoint),
        shared.fuse,
        args.foreground,
        debug=args.debug,
        presentation=_presentation(args),
        policy=shared.policy(),
        log_path=log_path,
        hooks=Hooks(mounted=mounted, ended=ended),
    )


# ---- umount, ps, which -------------------------------------------------------------------


def _unmount(mountpoint: str) -> str | None:
    """Unmount; None when done, else the reason."""
    err = ""
    for cmd in (["fusermount3", "-u", "-q", mountpoint], ["umount", mountpoint]):
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except FileNotFoundError:
            continue
        if not mountinfo.is_mount_point(mountpoint):
            return None
        err = err or proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else err
    return err or "it is busy"


def _fstype(mountpoint: str) -> str:
    """The filesystem type of the mount at `mountpoint` ('' if none), from mountinfo."""
    found = mountinfo.mount_at(mountpoint)
    return found.fstype if found is not None else ""


def cmd_umount(args: argparse.Namespace) -> int:
    root = _store_root(args)
    mountpoint = os.path.realpath(args.mountpoint)
    rec = containers.read_record(root, mountpoint)
    mounted = mountinfo.is_mount_point(mountpoint)
    if not mounted and rec is None:
        print(f"layerfs: {args.mountpoint} is not mounted", file=sys.stderr)
        return 1
    if mounted and rec is None and _fstype(mountpoint) != "fuse.layerfs":
        print(f"layerfs: {args.mountpoint} is not a layerfs mount", file=sys.stderr)
        return 1
    if mounted:
        reason = _unmount(mountpoint)
        if reason is not None:
            print(f"layerfs: cannot unmount {args.mountpoint}: {reason}", file=sys.stderr)
            return 1
    if rec is not None:
        # The daemon leaves once its mount is gone; wait for it, bounded, so the upper is
        # complete when we return.
        limit = UMOUNT_WAIT if args.timeout is None else args.timeout
        deadline = time.monotonic() + limit
        said = False
        while containers.record_live(rec) and time.monotonic() < deadline:
            if not said and time.monotonic() > deadline - limit + 1:
                said = True
                print(
                    f"layerfs: waiting for the daemon of {args.mountpoint} (pid {rec.pid}) to "
                    f"finish writing (at most {limit:g}s, --timeout)...",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(0.02)
        if containers.record_live(rec):
            print(
                f"layerfs: unmounted {args.mountpoint}, but its daemon (pid {rec.pid}) is still "
                f"writing after {limit:g}s (--timeout)",
                file=sys.stderr,
            )
            return 1
        containers.remove_record(root, mountpoint)
        if rec.rm and rec.name is not None and containers.load(root, rec.name) is not None:
            containers.remove(root, rec.name)  # the daemon died before it could
    containers.record_path(root, mountpoint).with_suffix(".log").unlink(missing_ok=True)
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    """Remove named uppers (containers) and their changes; a mounted one is refused."""
    root = _store_root(args)
    status = 0
    for name in args.names:
        try:
            if containers.load(root, name) is None:
                raise CliError(f"no such container: {name}")
            rec = containers.find_mounted(root, name)
            if rec is not None:
                raise CliError(f"container {name} is mounted at {rec.mountpoint}: umount it first")
            containers.remove(root, name)
        except (CliError, StoreError) as exc:
            print(f"layerfs: {exc}", file=sys.stderr)
            status = 1
            continue
        print(name)
    return status


PS_FIELDS = {
    "Name": "container (named upper) name; empty for a read-only or --upper mount",
    "Image": "the image as given to mount",
    "ImageId": "image ID",
    "Status": "running, starting, dead (daemon gone, mount left) or unmounted",
    "Mountpoint": "where it is mounted (empty when unmounted)",
    "Pid": "the daemon's pid (0 when unmounted)",
    "ReadOnly": "true for --ro",
    "Upper": "upper directory",
    "Size": "bytes in the upper",
    "HumanSize": "size, e.g. 1.2MB",
    "Created": "when the upper was made",
    "CreatedSince": "when the upper was made, relative",
    "Rm": "true for mount --rm (removed at umount)",
}


def _tree_bytes(path: str | None) -> int:
    """Bytes of the files under `path` (a hard-linked file once); what cannot be read counts
    nothing."""
    total = 0
    seen: set[tuple[int, int]] = set()
    stack = [path] if path else []
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                        continue
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z") if t else ""


def _ps_record(
    rec: MountRecord | None, box: Container | None, status: str, root: Path
) -> dict[str, object]:
    upper = str(box.upper) if box is not None else (rec.upper if rec is not None else None)
    size = _tree_bytes(upper)
    created = _iso(box.created) if box is not None else ""
    return {
        "Name": box.name if box is not None else (rec.name if rec and rec.name else ""),
        "Image": (rec.ref if rec is not None and rec.ref else box.ref if box else "")
        or (rec.image if rec else box.image if box else ""),
        "ImageId": rec.image if rec is not None else box.image if box is not None else "",
        "Status": status,
        "Mountpoint": rec.mountpoint if rec is not None else "",
        "Pid": rec.pid if rec is not None else 0,
        "ReadOnly": bool(rec.readonly) if rec is not None else False,
        "Upper": upper or "",
        "Size": size,
        "HumanSize": human(size),
        "Created": created,
        "CreatedSince": _ago(created) if created else "",
        "Rm": bool(rec.rm) if rec is not None else False,
    }


def cmd_ps(args: argparse.Namespace) -> int:
    root = _store_root(args)
    template(args)  # a bad --format fails first
    records: list[dict[str, object]] = []
    shown: set[str] = set()
    for rec in containers.all_records(root):
        status = containers.mount_status(rec)
        if status == "gone":
            # Neither daemon nor mount: nothing left to clean but the record.
            containers.remove_record(root, rec.mountpoint, rec.pid)
            continue
        box = containers.load(root, rec.name) if rec.name else None
        records.append(_ps_record(rec, box, status, root))
        if rec.name:
            shown.add(rec.name)
    if args.all:
        for box in containers.all_containers(root):
            if box.name not in shown:
                records.append(_ps_record(None, box, "unmounted", root))

    def table() -> None:
        rows = [("NAME", "IMAGE", "SIZE", "CREATED", "STATUS", "PID", "MOUNTPOINT")]
        for r in records:
            image = str(r["Image"])
            if image.startswith("sha256:"):
                image = image[7:19]
            status = str(r["Status"]) + (" (ro)" if r["ReadOnly"] else "")
            rows.append(
                (
                    str(r["Name"]) or "-",
                    image,
                    str(r["HumanSize"]),
                    str(r["CreatedSince"]) or "-",
                    status + (" --rm" if r["Rm"] else ""),
                    str(r["Pid"] or "-"),
                    str(r["Mountpoint"]) or "-",
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())

    emit(args, records, table)
    return 0


WHICH_FIELDS = {
    "Path": "the path asked for",
    "DiffID": "the layer's DiffID",
    "Layer": "its position, 1 = the bottom layer",
    "Layers": "how many layers the image has",
    "Role": "provides, merged (a directory merged into it) or shadowed (hidden by it)",
}


def cmd_which(args: argparse.Namespace) -> int:
    root = _store_root(args)
    path = os.fsencode(args.path).strip(b"/")
    try:
        template(args)
        with _open_store(root) as store:
            layers = list(reversed(store.image_layers(args.image)))
            view = StoreView(root, [layer.id for layer in layers])
            try:
                found = _which(view, path)
            finally:
                view.close()
    except (CliError, StoreError) as exc:
        print(f"layerfs: {error_line(exc)}", file=sys.stderr)
        return 1
    if found is None:
        print(f"layerfs: {args.path}: not in image {args.image}", file=sys.stderr)
        return 1
    provider, merged, hidden = found
    n = len(layers)
    roles = [(provider, "provides")] + [(li, "merged") for li in merged]
    roles += [(li, "shadowed") for li in hidden]
    records = [
        {"Path": args.path, "DiffID": layers[li].diff_id, "Layer": n - li, "Layers": n,
         "Role": role}
        for li, role in roles
    ]  # fmt: skip
    words = {"provides": "provides", "merged": "merged (directory)", "shadowed": "shadowed"}

    def table() -> None:
        for r in records:
            print(f"{r['DiffID']}  layer {r['Layer']}/{n}  {words[str(r['Role'])]}")

    emit(args, records, table)
    return 0


def _which(view: StoreView, path: bytes) -> tuple[int, list[int], list[int]] | None:
    """Resolve `path` as the mount would: (the layer index providing it, the lower layers
    merged into it when it is a directory, the lower layers whose entry it hides)."""
    from unionfs.core.errors import FsError
    from unionfs.core.fs import UnionFS
    from unionfs.core.types import ROOT_INO

    fs = UnionFS(view.layers, None)
    node = fs.root
    for comp in path.split(b"/") if path else []:
        try:
            node = fs.node(fs.lookup(node.ino, comp).ino)
        except FsError:
            return None
    if not node.lower:
        return None
    provider = node.lower[0][0]
    merged = [li for li, _ in node.lower[1:]]
    if node.ino == ROOT_INO:
        return provider, merged, []
    parent, _, name = path.rpartition(b"/")
    found = view.entries(b"/" + parent, name)
    hidden = [
        li
        for li, e in sorted(found.items())
        if li > provider and li not in merged and e.kind is not EntryKind.WHITEOUT
    ]
    return provider, merged, hidden


def _verb(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    help: str,
    examples: str,
    description: str = "",
) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=description or help[0].upper() + help[1:] + ".",
        epilog=f"examples:\n{examples}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = _verb(
        sub,
        "mount",
        "mount an image of the store under a writable upper",
        "  layerfs mount alpine:3.20 /mnt/a               # a fresh upper; its name is printed\n"
        "  layerfs mount --name dev alpine:3.20 /mnt/a    # the upper `dev`, kept across mounts\n"
        "  layerfs mount --rm alpine:3.20 /mnt/a          # the upper goes at umount\n"
        "  layerfs mount --ro app:1 /mnt/app\n"
        "  layerfs mount --upper ./u --work ./w app:1 /mnt/app",
        description="Mount IMAGE's layers from the store at MOUNTPOINT under a writable upper: "
        "a named one kept in the store (--name; a fresh name is made and printed when neither "
        "--name nor --upper is given), or --upper/--work directories; --ro for none. Returns "
        "once the mount is live; `layerfs umount MOUNTPOINT` ends it.",
    )
    p.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an empty directory to mount on")
    p.add_argument("--name", help="named upper kept in the store (made on first use)")
    p.add_argument("--upper", metavar="DIR", help="upper directory (with --work)")
    p.add_argument("--work", metavar="DIR", help="work directory, same filesystem as --upper")
    p.add_argument("--ro", action="store_true", help="read-only (with --name: the container)")
    p.add_argument(
        "--rm", action="store_true", help="remove the fresh upper when the mount ends (umount)"
    )
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument(
        "-d",
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug log (with -f on stderr, else in the mount's log)",
    )
    p.add_argument("-o", dest="options", action="append", metavar="OPTS", help="FUSE options")
    p.add_argument(
        "--squash",
        action="store_true",
        help="show every file as owned by the mounting user (who may then change anything "
        "it owns by appearance; what is stored does not change)",
    )
    p.add_argument(
        "--uidmap",
        action="append",
        metavar="C:H:N",
        help="show container uids C..C+N-1 as host uids H..; repeatable; unmapped: 65534",
    )
    p.add_argument("--gidmap", action="append", metavar="C:H:N", help="as --uidmap, for gids")
    p.set_defaults(func=cmd_mount)

    p = _verb(
        sub,
        "umount",
        "unmount an image mount (also one whose daemon died)",
        "  layerfs umount /mnt/a",
    )
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="where the image is mounted")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help=f"wait at most SECONDS for the daemon to finish (default {UMOUNT_WAIT:g})",
    )
    p.set_defaults(func=cmd_umount)

    p = _verb(
        sub,
        "ps",
        "list image mounts; with -a every upper (container), mounted or not",
        "  layerfs ps\n  layerfs ps -a --format '{{.Name}} {{.Status}} {{.HumanSize}}'",
    )
    p.add_argument("-a", "--all", action="store_true", help="also uppers that are not mounted")
    add_output_options(p, PS_FIELDS)
    p.set_defaults(func=cmd_ps)

    p = _verb(
        sub,
        "rm",
        "remove named uppers (containers) and their changes",
        "  layerfs rm dev",
    )
    p.add_argument("names", metavar="NAME", nargs="+", help="a container (see `layerfs ps -a`)")
    p.set_defaults(func=cmd_rm)

    p = _verb(
        sub,
        "which",
        "show the layer providing a path, and the layers it shadows",
        "  layerfs which alpine /etc/os-release",
    )
    p.add_argument("image", metavar="IMAGE", help=IMAGE_HELP)
    p.add_argument("path", metavar="PATH", help="a path in the image, e.g. /etc/passwd")
    add_output_options(p, WHICH_FIELDS)
    p.set_defaults(func=cmd_which)
