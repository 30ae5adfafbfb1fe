"""`layerfs mount/umount/ps/which`: an image of the store mounted under a (named) upper."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
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
from layerstore.containers import Container, MountRecord
from layerstore.errors import StoreError
from layerstore.model import EntryKind
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


def _shared_lock(root: Path) -> int:
    """Hold the store's lock shared for the mount's life: gc waits instead of removing the
    layers of a mounted image. The fd is inherited by the daemon."""
    fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


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
) -> tuple[str, StoreView, Container | None, Path | None, Path | None]:
    """Resolve the image and the upper; nothing is created until every check passed."""
    if args.ro and (args.upper or args.work):
        raise CliError("--ro takes no --upper/--work")
    if (args.upper is None) != (args.work is None):
        raise CliError("--upper and --work go together")
    if args.name and args.upper:
        raise CliError("--name and --upper are exclusive")
    if args.name:
        containers.check_name(args.name)
    with _open_store(root) as store:
        image = store.resolve(args.image)
        ids = [layer.id for layer in reversed(store.image_layers(image))]
        view = StoreView.prepare(store, ids, dispatch=_trio_dispatch)
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
    return image, view, container, upper, work


def cmd_mount(args: argparse.Namespace) -> int:
    from unionfs.daemon import MountError, check_mountpoint
    from unionfs.fuse import mount as fuse_mount

    root = _store_root(args)
    mountpoint = os.path.realpath(args.mountpoint)
    try:
        _presentation(args)  # bad values fail before anything is made
        shared = _shared_options(args.options)
        fuse_mount.parse(shared.fuse)  # MountError for a bad combination, before anything
        image, view, container, upper, work = _prepare(args, root)
        check_mountpoint(Path(mountpoint))
        lock_fd = _shared_lock(root)
        fresh = False
        if not args.ro and container is None and upper is None:
            name = args.name or containers.fresh_name(root, args.image)
            container = containers.create(root, name, image, args.image)
            fresh = True
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
        record = MountRecord(
            mountpoint=mountpoint,
            pid=0,
            image=image,
            name=container.name if container is not None else None,
            upper=str(upper) if upper is not None and not args.ro else None,
            work=str(work) if work is not None and not args.ro else None,
            readonly=bool(args.ro),
            ref=args.image,
        )
        announce = fresh and not args.name and container is not None
        try:
            if args.foreground and announce:
                print(record.name, flush=True)
            try:
                code = _serve(args, root, record, layers, upper, work, shared)
            finally:
                os.close(lock_fd)  # the daemon holds its own copy
            if announce and not args.foreground:
                print(record.name)  # once the mount is live
            return code
        except (CliError, MountError):
            if fresh and container is not None:
                # Never mounted: do not leave an unused container behind.
                shutil.rmtree(container.root, ignore_errors=True)
            raise
    except (CliError, StoreError, MountError) as exc:
        print(f"layerfs: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"layerfs: {exc.filename or args.mountpoint}: {exc.strerror}", file=sys.stderr)
        return 1


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
    STORE/mounts/<hash>.log); the mount record is written once the mount is live, by the
    serving process, and removed when it ends."""
    from unionfs.daemon import Hooks, serve

    root = root.absolute()  # the daemon works from "/"
    log_path = None
    if not args.foreground:
        containers.mounts_dir(root).mkdir(parents=True, exist_ok=True)
        log_path = containers.record_path(root, record.mountpoint).with_suffix(".log")

    def mounted(pid: int) -> None:
        containers.write_record(root, replace(record, pid=pid))

    def ended() -> None:
        containers.remove_record(root, record.mountpoint, os.getpid())
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
        deadline = time.monotonic() + UMOUNT_WAIT
        while containers.pid_alive(rec.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        containers.remove_record(root, mountpoint)
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


def _status(rec: MountRecord) -> str:
    alive = containers.pid_alive(rec.pid)
    mounted = mountinfo.is_mount_point(rec.mountpoint)
    if alive and mounted:
        return "running"
    if mounted:
        return "dead"  # daemon gone, mount left: `layerfs umount` cleans it
    return "gone"


def cmd_ps(args: argparse.Namespace) -> int:
    root = _store_root(args)
    rows = []
    for rec in containers.all_records(root):
        status = _status(rec)
        if status == "gone":
            # Neither daemon nor mount: nothing left to clean but the record.
            containers.remove_record(root, rec.mountpoint, rec.pid)
            if not args.all:
                continue
        rows.append((rec, status))
    if args.json:
        import json
        from dataclasses import asdict

        print(json.dumps([{**asdict(r), "status": s} for r, s in rows], indent=2))
        return 0
    table = [("IMAGE", "NAME", "MOUNTPOINT", "PID", "STATUS")]
    for rec, status in rows:
        table.append(
            (
                rec.ref or rec.image.removeprefix("sha256:")[:12],
                rec.name or "-",
                rec.mountpoint,
                str(rec.pid),
                status + (" (ro)" if rec.readonly else ""),
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(4)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[4])
    return 0


def cmd_which(args: argparse.Namespace) -> int:
    root = _store_root(args)
    path = os.fsencode(args.path).strip(b"/")
    try:
        with _open_store(root) as store:
            layers = list(reversed(store.image_layers(args.image)))
            view = StoreView(root, [layer.id for layer in layers])
            try:
                found = _which(view, path)
            finally:
                view.close()
    except (CliError, StoreError) as exc:
        print(f"layerfs: {exc}", file=sys.stderr)
        return 1
    if found is None:
        print(f"layerfs: {args.path}: not in image {args.image}", file=sys.stderr)
        return 1
    provider, merged, hidden = found
    n = len(layers)
    print(f"{layers[provider].diff_id}  layer {n - provider}/{n}  provides")
    for li in merged:
        print(f"{layers[li].diff_id}  layer {n - li}/{n}  merged (directory)")
    for li in hidden:
        print(f"{layers[li].diff_id}  layer {n - li}/{n}  shadowed")
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


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def store_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", metavar="DIR", help="layer store (default: $LAYERFS_STORE)")

    p = subparsers.add_parser(
        "mount",
        help="mount an image of the store under a writable upper",
        description="Mount IMAGE's layers from the store at MOUNTPOINT under a writable upper: "
        "a named one kept in the store (--name; a fresh name is made and printed when neither "
        "--name nor --upper is given), or --upper/--work directories; --ro for none.",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--name", help="named upper kept in the store (made on first use)")
    p.add_argument("--upper", metavar="DIR", help="upper directory (with --work)")
    p.add_argument("--work", metavar="DIR", help="work directory, same filesystem as --upper")
    p.add_argument("--ro", action="store_true", help="read-only (with --name: the container)")
    p.add_argument("-f", dest="foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="debug log (with -f)")
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
    store_opt(p)
    p.set_defaults(func=cmd_mount)

    p = subparsers.add_parser("umount", help="unmount an image mount (also a dead one)")
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    store_opt(p)
    p.set_defaults(func=cmd_umount)

    p = subparsers.add_parser("ps", help="list image mounts (image, name, mount point, pid)")
    p.add_argument("-a", "--all", action="store_true", help="also records of vanished mounts")
    p.add_argument("--json", action="store_true", help="JSON output")
    store_opt(p)
    p.set_defaults(func=cmd_ps)

    p = subparsers.add_parser("rm", help="remove named uppers (containers) and their changes")
    p.add_argument("names", metavar="NAME", nargs="+")
    store_opt(p)
    p.set_defaults(func=cmd_rm)

    p = subparsers.add_parser("which", help="the layer providing a path, and those it shadows")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("path", metavar="PATH")
    store_opt(p)
    p.set_defaults(func=cmd_which)
