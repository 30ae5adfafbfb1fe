"""CLI verbs that talk to an OCI registry: pull, push, login, logout."""

from __future__ import annotations

import argparse
import functools
import getpass
import sys

from .cli import add_store_verb, add_timeout, error_line
from .errors import StoreError
from .progress import Progress
from .store import Store


def cmd_pull(args: argparse.Namespace, store: Store) -> int:
    from .ingest import import_source
    from .reference import parse_reference
    from .registry import RegistryClient, load_credentials, registry_image
    from .registry_fetch import Prefetcher
    from .sources import host_platform, parse_platform

    if args.jobs < 1:
        raise StoreError("--jobs must be at least 1")
    ref = parse_reference(args.ref)
    want = parse_platform(args.platform) if args.platform else host_platform()
    progress = Progress(quiet=args.quiet)
    creds = load_credentials(ref.host)
    with RegistryClient(ref, insecure=args.insecure, credentials=creds) as client:
        pulled = registry_image(client, want)
        progress.line(f"{ref.tag or pulled.digest}: Pulling from {ref.repo}")
        have = {lr.diff_id for lr in pulled.image.layers if store.layer_by_diff_id(lr.diff_id)}
        # shared(): gc/recovery leave the spool dir alone (the importer takes it again)
        with store.shared(), Prefetcher(client, store.tmp_dir, args.jobs) as fetch:
            fetch.start(pulled.image, have)
            res = import_source(store, [pulled.image], [], progress)
    progress.line(f"Digest: {pulled.digest}")
    shown = f"{ref.name}:{ref.tag}" if ref.tag else f"{ref.name}@{pulled.digest}"
    if res.new_layers:
        progress.line(f"Status: Downloaded newer image for {shown}")
    else:
        progress.line(f"Status: Image is up to date for {shown}")
    progress.line(f"Image ID: {pulled.image.config_digest}")
    if args.quiet:
        print(shown)  # as `docker pull -q`: the reference, for scripts
    return 0


def cmd_push(args: argparse.Namespace, store: Store) -> int:
    from .reference import parse_reference
    from .registry import RegistryClient, load_credentials
    from .registry_push import push_image

    if args.chunk_size is not None and args.chunk_size < 1:
        raise StoreError("--chunk-size must be at least 1 (KiB)")
    ref = parse_reference(args.ref if args.ref is not None else _own_name(store, args.image))
    progress = Progress(quiet=args.quiet)
    creds = load_credentials(ref.host)
    with RegistryClient(ref, insecure=args.insecure, credentials=creds) as client:
        client.actions = "pull,push"
        progress.line(f"The push refers to repository [{ref.name}]")
        chunk = args.chunk_size * 1024 if args.chunk_size else None
        res = push_image(store, args.image, client, progress.line, chunk)
    progress.line(f"{ref.tag}: digest: {res.digest} size: {res.size}")
    return 0


def _own_name(store: Store, image: str) -> str:
    """`push IMAGE` with no REF: the image's own name, which IMAGE must be (not an ID)."""
    from .reference import local_name

    resolved = store.resolve(image)
    try:
        name = local_name(image)
    except StoreError:
        name = ""
    if name not in store.image_info(resolved).tags:
        raise StoreError(
            f"push: {image} is not a name of the image: give where to push it "
            f"(layerfs push {image} [HOST[:PORT]/]REPO[:TAG])"
        )
    return name


def _server(args: argparse.Namespace) -> str:
    from .reference import _HOST_RE, DOCKER_HUB
    from .registry import _auth_key

    host = _auth_key(args.server) if args.server else DOCKER_HUB
    if not _HOST_RE.fullmatch(host):
        raise StoreError(f"bad registry host {args.server!r}")
    return host


def _ask(prompt: str, what: str, secret: bool = False) -> str:
    """Ask on the terminal, as docker login does; one-line error without one."""
    if sys.stdin is None or not sys.stdin.isatty():
        hint = "--password-stdin" if secret else "-u USER"
        raise StoreError(f"login: no {what} given and no terminal to ask on (use {hint})")
    return getpass.getpass(prompt) if secret else input(prompt).strip()


def cmd_login(args: argparse.Namespace) -> int:
    from .reference import Reference
    from .registry import RegistryClient, check_login, save_credentials

    try:
        host = _server(args)
        if args.password_stdin and args.password is not None:
            raise StoreError("login: --password and --password-stdin are exclusive")
        if args.password_stdin and not args.username:
            raise StoreError("login: --password-stdin needs --username")
        user = args.username or _ask("Username: ", "username")
        if args.password_stdin:
            if sys.stdin is None:
                raise StoreError("login: --password-stdin, but standard input is closed")
            password = sys.stdin.read(1 << 16).rstrip("\r\n")
        elif args.password is not None:
            password = args.password
        else:
            password = _ask("Password: ", "password", secret=True)
        if not user or not password:
            raise StoreError("login needs a username and a password")
        ref = Reference(host, "library/x", None, None)
        with RegistryClient(ref, args.insecure, (user, password)) as client:
            check_login(client)
        path = save_credentials(host, user, password)
    except (StoreError, OSError, EOFError) as exc:
        print(f"layerfs: {error_line(exc)}", file=sys.stderr)
        return 1
    print(f"Login Succeeded (credentials saved in {path})")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from .registry import auth_file, remove_credentials

    try:
        host = _server(args)
        if remove_credentials(host):
            print(f"Removing login credentials for {host} (from {auth_file()})")
        else:
            print(f"Not logged in to {host}")
    except (StoreError, OSError) as exc:
        print(f"layerfs: {error_line(exc)}", file=sys.stderr)
        return 1
    return 0


REF_HELP = "[HOST[:PORT]/]REPO[:TAG|@sha256:DIGEST]; docker.io when no host is given"


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the registry verbs on the `layerfs` parser."""
    verb = functools.partial(add_store_verb, sub)
    insecure = "plain HTTP (the default only for localhost and 127.0.0.1)"

    p = verb(
        "pull",
        cmd_pull,
        "pull an image from a registry; credentials from $REGISTRY_AUTH_FILE or "
        "~/.docker/config.json",
        access="create",
        examples="  layerfs pull alpine:3.20\n  layerfs pull -q localhost:5000/app:1\n"
        "  layerfs pull --platform linux/arm64 debian@sha256:…",
    )
    p.add_argument("ref", metavar="REF", help=REF_HELP)
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="pick from an image index")
    p.add_argument("--insecure", action="store_true", help=insecure)
    p.add_argument(
        "--quiet", "-q", action="store_true", help="no progress; print only the reference"
    )
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=3,
        metavar="N",
        help="download at most N layers at once (default 3)",
    )
    add_timeout(p)

    p = verb(
        "push",
        cmd_push,
        "push an image to a registry",
        examples="  layerfs push localhost:5000/app:1          # to its own name\n"
        "  layerfs push app:1 localhost:5000/team/app:1",
    )
    p.add_argument("image", metavar="IMAGE", help="the image (NAME[:TAG], ID, …)")
    p.add_argument(
        "ref",
        metavar="REF",
        nargs="?",
        help="where to push: [HOST[:PORT]/]REPO[:TAG] (default: IMAGE, which must be a name)",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        metavar="KIB",
        help="upload blobs in chunks of KIB KiB (default: each blob in one request)",
    )
    p.add_argument("--insecure", action="store_true", help=insecure)
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    add_timeout(p)

    p = sub.add_parser(
        "login",
        help="check credentials with a registry and save them in the auth file",
        description="Check credentials with a registry and save them in $REGISTRY_AUTH_FILE "
        "(else $DOCKER_CONFIG/config.json, else ~/.docker/config.json). Without -u or a "
        "password, asks on the terminal.",
        epilog="examples:\n  layerfs login localhost:5000\n"
        '  echo "$TOKEN" | layerfs login -u ci --password-stdin registry.example.com',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("server", nargs="?", metavar="HOST[:PORT]", help="default: docker.io")
    p.add_argument("--username", "-u", help="(asked when not given)")
    p.add_argument("--password", "-p", help="(visible to other users: prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--insecure", action="store_true", help="plain HTTP")
    p.set_defaults(func=cmd_login)

    p = sub.add_parser(
        "logout",
        help="remove a registry's credentials from the auth file",
        description="Remove a registry's credentials from the auth file login writes.",
        epilog="examples:\n  layerfs logout localhost:5000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("server", nargs="?", metavar="HOST[:PORT]", help="default: docker.io")
    p.set_defaults(func=cmd_logout)
