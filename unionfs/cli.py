"""The `layerfs` command: one argparse tree whose sub-commands are registered by each ring."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import NoReturn, cast

from layerstore.cli import STORE_HELP, UsageError, error_line

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]

EXAMPLES = """\
examples:
  layerfs pull alpine:3.20
  layerfs import oci-archive:app.tar --tag app:1
  layerfs mount alpine:3.20 /mnt/alpine          # prints the new upper's name
  layerfs ps -a
  layerfs images --format '{{.Repository}}:{{.Tag}}'
  layerfs --store /srv/layers images -q
  layerfs overlay -o lowerdir=/lower,upperdir=/up,workdir=/work /mnt/merged

`layerfs COMMAND --help` explains a command, with examples."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line (raised, printed by main)."""

    def error(self, message: str) -> NoReturn:
        verb = self.prog.removeprefix("layerfs").strip()
        bad = re.match(r"argument COMMAND: invalid choice: ('.*?')", message)
        if bad:
            message = f"unknown command {bad.group(1)}"
        where = f"{verb}: " if verb else ""
        hint = f"layerfs {verb} --help" if verb else "layerfs --help"
        raise UsageError(f"{where}{message} (see `{hint}`)")


def _registrars() -> list[Registrar]:
    """Every module that contributes sub-commands; each exposes `add_commands(subparsers)`.

    A sub-command sets `func=handler` with `handler(args) -> int` (the exit code).
    """
    from layerstore import cli as store_cli
    from layerstore import image_cli as store_image_cli
    from layerstore import registry_cli
    from unionfs import complete, image_cli, overlay_cli

    return [
        overlay_cli.add_commands,
        store_cli.add_commands,
        image_cli.add_commands,
        store_image_cli.add_commands,
        registry_cli.add_commands,
        complete.add_commands,
    ]


DEBUG_HELP = "show tracebacks of errors; with mount/overlay -f also the daemon's request log"


def _common_options(p: argparse.ArgumentParser) -> None:
    """--store and --debug after the verb too (as podman and docker take them). SUPPRESS: a
    value given before the verb stays unless the verb's own option overrides it."""
    have = {s for a in p._actions for s in a.option_strings}
    if "--store" not in have:
        p.add_argument("--store", metavar="DIR", default=argparse.SUPPRESS, help=STORE_HELP)
    if "--debug" not in have:
        flags = ["--debug"] if "-d" in have else ["-d", "--debug"]
        p.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("layerfs")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="layerfs",
        description="Mount OCI and Docker images (or plain directories) as an overlay, in Python.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--store", metavar="DIR", help=STORE_HELP)
    parser.add_argument("-d", "--debug", action="store_true", help=DEBUG_HELP)
    parser.add_argument("--version", action="version", version=f"layerfs {version()}")
    # Parser is an ArgumentParser: the registrars' type holds for its sub-parsers.
    sub = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND"),
    )
    sub.required = True
    for add in _registrars():
        add(sub)
    for p in sub.choices.values():
        _common_options(p)
    return parser


def _std_fds() -> None:
    """Give closed standard descriptors /dev/null: otherwise the next file opened (the store's
    lock, an index) would become fd 0, 1 or 2 and take output meant for a terminal."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:  # lower ones were open: only then can null differ from fd
                os.dup2(null, fd)
                os.close(null)


def _die_of_sigpipe() -> int:
    """The reader of our output went away (`layerfs images | head -1`): end as `ls` does,
    quietly and killed by SIGPIPE, so a shell sees the same status."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGPIPE)
    return 128 + signal.SIGPIPE  # not reached


def main(argv: Sequence[str] | None = None) -> int:
    _std_fds()
    debug = False
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        debug = bool(getattr(args, "debug", False))
        args.debug = debug
        handler: Callable[[argparse.Namespace], int] = args.func
        code = handler(args)
        if sys.stdout is not None:
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except UsageError as exc:
        print(f"layerfs: {error_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _die_of_sigpipe()
    except KeyboardInterrupt:
        print("layerfs: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last net: one line, the traceback only with --debug
        if debug:
            traceback.print_exc()
        print(f"layerfs: {error_line(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
