"""The `layerfs` command: one argparse tree whose sub-commands are registered by each ring."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


def _registrars() -> list[Registrar]:
    """Every module that contributes sub-commands; each exposes `add_commands(subparsers)`.

    A sub-command sets `func=handler` with `handler(args) -> int` (the exit code).
    """
    found: list[Registrar] = []
    for modname in (
        "unionfs.overlay_cli",
        "layerstore.cli",
        "unionfs.image_cli",
        "layerstore.image_cli",
        "layerstore.registry_cli",
    ):
        try:
            module = __import__(modname, fromlist=["add_commands"])
        except ModuleNotFoundError as exc:
            if exc.name != modname:
                raise
            continue
        found.append(module.add_commands)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layerfs",
        description="Mount OCI and Docker images (or plain directories) as an overlay, in Python.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in _registrars():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    try:
        return handler(args)
    except KeyboardInterrupt:
        print("layerfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
