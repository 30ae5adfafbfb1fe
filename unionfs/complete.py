"""Shell completion: `layerfs completion bash|zsh` prints a script whose function asks the
hidden `layerfs __complete` for candidates, read from the parser itself (verbs, options, what
each positional takes), the store (image names, containers) and the registered mounts."""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

FILES, DIRS = "__files__", "__dirs__"  # answers the shell turns into its own path completion

BASH = r"""# bash completion for layerfs. Load it with:  source <(layerfs completion bash)
# or install it:  layerfs completion bash > /etc/bash_completion.d/layerfs
_layerfs() {
    local IFS=$'\n' cur="${COMP_WORDS[COMP_CWORD]}" out
    out=$("${COMP_WORDS[0]}" __complete bash -- "${COMP_LINE:0:COMP_POINT}" 2>/dev/null) \
        || return 0
    case "$out" in
        __files__) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -f -- "$cur")) ;;
        __dirs__) compopt -o filenames 2>/dev/null; COMPREPLY=($(compgen -d -- "$cur")) ;;
        *) COMPREPLY=($out) ;;
    esac
}
complete -F _layerfs layerfs
"""

ZSH = r"""#compdef layerfs
# zsh completion for layerfs. Load it with:  source <(layerfs completion zsh)  (after
# compinit), or install it:  layerfs completion zsh > "${fpath[1]}/_layerfs"
_layerfs() {
    local -a out
    out=("${(@f)$("${words[1]}" __complete zsh -- "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    case "${out[1]}" in
        __files__) _files ;;
        __dirs__) _files -/ ;;
        '') return 1 ;;
        *) compadd -- "${out[@]}" ;;
    esac
}
if [[ "${funcstack[1]}" == _layerfs ]]; then
    _layerfs "$@"
else
    compdef _layerfs layerfs
fi
"""

# What a positional takes, by its metavar (every verb names its arguments this way).
_KINDS = {
    "IMAGE": "image",
    "NAME|MOUNTPOINT": "target",
    "NAME": "container",
    "REPOSITORY[:TAG]": "repository",
    "DIR": DIRS,
    "SOURCE": FILES,
    "DEST": FILES,
    "PATH": FILES,
}
MOUNT_OPTIONS = [
    "lowerdir=", "upperdir=", "workdir=", "allow_other", "allow_root", "ro", "suid", "dev",
    "squash_to_root", "squash_to_uid=", "squash_to_gid=", "uidmapping=", "gidmapping=",
    "fsname=", "subtype=",
]  # fmt: skip


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _visible_verbs(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return [a.dest for a in action._choices_actions]
    return []


def _options(p: argparse.ArgumentParser) -> list[str]:
    out: list[str] = []
    for a in p._actions:
        if a.help == argparse.SUPPRESS:
            continue
        longs = [s for s in a.option_strings if s.startswith("--")]
        out += longs or a.option_strings
    return out


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _value_kind(action: argparse.Action, verb: str | None) -> str:
    if action.dest == "store" or action.metavar == "DIR":
        return DIRS
    if action.dest == "options":
        return "mount-options"
    if action.dest == "upper" or action.dest == "work":
        return DIRS
    if action.dest == "image" and verb in ("diff", "commit"):
        return "image"
    return ""


def _positional_kind(verb: str, action: argparse.Action) -> str:
    if action.choices:
        return "choices"
    meta = action.metavar if isinstance(action.metavar, str) else ""
    if meta == "MOUNTPOINT":
        return "mountpoint" if verb == "umount" else DIRS
    return _KINDS.get(meta, "")


def _store_words(parser: argparse.ArgumentParser, words: list[str]) -> Path:
    from layerstore.store import default_store_dir

    for i, w in enumerate(words):
        if w == "--store" and i + 1 < len(words):
            return Path(words[i + 1])
        if w.startswith("--store="):
            return Path(w.partition("=")[2])
    return default_store_dir()


def _dynamic(kind: str, root: Path) -> list[str]:
    """Image names, repositories, containers or mount points of the store at `root`."""
    from layerstore import containers
    from layerstore.store import Store

    if kind in ("image", "repository"):
        try:
            with Store(root, readonly=True, missing_ok=True) as store:
                names = [t for i in store.image_ids() for t in store.image_info(i).tags]
        except Exception:  # completion never complains
            return []
        if kind == "repository":
            return sorted({n.rpartition(":")[0] for n in names})
        return sorted(names)
    mounts = [r.mountpoint for r in containers.all_records(root)]
    if kind == "mountpoint":
        return sorted(mounts)
    boxes = [c.name for c in containers.all_containers(root)] if root.is_dir() else []
    return sorted(boxes) + (sorted(mounts) if kind == "target" else [])


def candidates(parser: argparse.ArgumentParser, words: list[str]) -> list[str]:
    """What may come at the last of `words` (the words after `layerfs`, the last one being
    typed), already filtered by it; or FILES/DIRS for the shell's own path completion."""
    verbs = _subparsers(parser)
    *before, cur = words or [""]
    verb: str | None = None
    expecting: argparse.Action | None = None
    npos = 0
    dashdash = False
    for w in before:
        if expecting is not None:
            expecting = None
            continue
        p = verbs[verb] if verb else parser
        if w == "--":
            dashdash = True
            continue
        if w.startswith("-") and w != "-" and not dashdash:
            action = p._option_string_actions.get(w.partition("=")[0])
            if action is not None and _takes_value(action) and "=" not in w:
                expecting = action
            continue
        if verb is None:
            verb = w if w in verbs else None
            if verb is None:
                return []
        else:
            npos += 1
    kind = ""
    pool: list[str] = []
    if expecting is not None:
        kind = _value_kind(expecting, verb)
        if expecting.choices:
            pool = [str(c) for c in expecting.choices]
    elif cur.startswith("-") and not dashdash:
        pool = _options(verbs[verb] if verb else parser)
    elif verb is None:
        pool = _visible_verbs(parser)
    else:
        positionals = [a for a in verbs[verb]._actions if not a.option_strings]
        if positionals:
            action = positionals[min(npos, len(positionals) - 1)]
            if npos < len(positionals) or action.nargs in ("+", "*"):
                kind = _positional_kind(verb, action)
                if kind == "choices":
                    pool = [str(c) for c in action.choices or ()]
    if kind in (FILES, DIRS):
        return [kind]
    if kind == "mount-options":
        head, sep, last = cur.rpartition(",")
        return [head + sep + o for o in MOUNT_OPTIONS if o.startswith(last)]
    if kind and kind != "choices":
        pool = _dynamic(kind, _store_words(parser, before))
    return [c for c in pool if c.startswith(cur)]


def _split_line(line: str) -> list[str]:
    """Words of a command line as the shell would give them, the last one possibly empty."""
    for tail in ("", '"', "'"):
        try:
            words = shlex.split(line + tail)
            break
        except ValueError:
            continue
    else:
        words = line.split()
    if not line or line[-1].isspace():
        words.append("")
    return words


def cmd_complete(args: argparse.Namespace) -> int:
    from unionfs.cli import build_parser

    if args.shell == "bash":
        words = _split_line(" ".join(args.words))[1:]
    else:
        words = list(args.words) or [""]
    out = candidates(build_parser(), words)
    if args.shell == "bash" and out not in ([FILES], [DIRS]):
        # bash splits the word being completed at ':' and '=' (COMP_WORDBREAKS): answer
        # with what comes after the last of them.
        cur = words[-1] if words else ""
        cut = max(cur.rfind(":"), cur.rfind("="))
        if cut >= 0:
            out = [c[cut + 1 :] for c in out]
        # bash inserts a candidate as it is: escape what the shell would split or expand.
        out = [re.sub(r"([^\w@%+=:,./-])", r"\\\1", c) for c in out]
    sys.stdout.write("".join(c + "\n" for c in out))
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    sys.stdout.write(BASH if args.shell == "bash" else ZSH)
    return 0


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script for bash or zsh: verbs, options, image names, "
        "containers and mount points complete with TAB.",
        epilog="examples:\n  source <(layerfs completion bash)        # in ~/.bashrc\n"
        '  layerfs completion zsh > "${fpath[1]}/_layerfs"',
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("shell", metavar="SHELL", choices=["bash", "zsh"], help="bash or zsh")
    p.set_defaults(func=cmd_completion)

    p = sub.add_parser("__complete")  # no help=: hidden from the verb list
    p.add_argument("shell", choices=["bash", "zsh"])
    p.add_argument("words", nargs="*")
    p.set_defaults(func=cmd_complete)
