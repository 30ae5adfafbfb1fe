"""CLI verbs that talk to an OCI registry: pull, push, login."""

from __future__ import annotations

import argparse
import functools
import getpass
import sys

from .cli import add_store_verb
from .errors import StoreError
from .progress import Progress
from .store import Store


def cmd_pull(args: argparse.Namespace, store: Store) -> int:
    from .ingest import import_source
    from .registry import RegistryClient, load_credentials, parse_reference, registry_image
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
    return 0


def cmd_push(args: argparse.Namespace, store: Store) -> int:
    from .registry import RegistryClient, load_credentials, parse_reference
    from .registry_push import push_image

    if args.chunk_size is not None and args.chunk_size < 1:
        raise StoreError("--chunk-size must be at least 1 (KiB)")
    ref = parse_reference(args.ref)
    progress = Progress(quiet=args.quiet)
    creds = load_credentials(ref.host)
    with RegistryClient(ref, insecure=args.insecure, credentials=creds) as client:
        client.actions = "pull,push"
        progress.line(f"The push refers to repository [{ref.name}]")
        chunk = args.chunk_size * 1024 if args.chunk_size else None
        res = push_image(store, args.image, client, progress.line, chunk)
    progress.line(f"{ref.tag}: digest: {res.digest} size: {res.size}")
    return 0


def cmd_login(args: argparse.Namespace) -> int:
    from .registry import (
        _HOST_RE,
        DOCKER_HUB,
        Reference,
        RegistryClient,
        _auth_key,
        check_login,
        save_credentials,
    )

    try:
        host = _auth_key(args.server) if args.server else DOCKER_HUB
        if not _HOST_RE.fullmatch(host):
            raise StoreError(f"login: bad registry host {args.server!r}")
        if args.password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        elif args.password is not None:
            password = args.password
        else:
            password = getpass.getpass("Password: ")
        if not args.username or not password:
            raise StoreError("login needs a username and a password")
        ref = Reference(host, "library/x", None, None)
        with RegistryClient(ref, args.insecure, (args.username, password)) as client:
            check_login(client)
        path = save_credentials(host, args.username, password)
    except StoreError as exc:
        print(f"layerfs: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"layerfs: {exc.strerror or exc}: {exc.filename or ''}", file=sys.stderr)
        return 1
    print(f"Login Succeeded (credentials saved in {path})")
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the registry verbs on the `layerfs` parser."""
    verb = functools.partial(add_store_verb, sub)

    p = verb(
        "pull",
        cmd_pull,
        "pull an image from a registry ([HOST[:PORT]/]REPO[:TAG|@sha256:DIGEST]); "
        "credentials from $REGISTRY_AUTH_FILE or ~/.docker/config.json",
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", help="pick from an image index")
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP (the default only for localhost and 127.0.0.1)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=3,
        metavar="N",
        help="download at most N layers at once (default 3)",
    )

    p = verb("push", cmd_push, "push an image to a registry as [HOST[:PORT]/]REPO[:TAG]")
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("ref", metavar="REF")
    p.add_argument(
        "--chunk-size",
        type=int,
        metavar="KIB",
        help="upload blobs in chunks of KIB KiB (default: each blob in one request)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plain HTTP (the default only for localhost and 127.0.0.1)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")

    p = sub.add_parser(
        "login",
        help="check credentials with a registry and save them in the auth file",
        description="check credentials with a registry and save them in $REGISTRY_AUTH_FILE "
        "(else $DOCKER_CONFIG/config.json, else ~/.docker/config.json)",
    )
    p.add_argument("server", nargs="?", metavar="HOST[:PORT]", help="default: docker.io")
    p.add_argument("--username", "-u", required=True)
    p.add_argument("--password", "-p", help="(visible to other users: prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--insecure", action="store_true", help="plain HTTP")
    p.set_defaults(func=cmd_login)
