"""`--format` templates: the small part of Go's text/template that docker and podman users write.

A template is text with actions in `{{ }}`, run once per record (a JSON object):

- `{{.Field}}`, `{{.Field.Key}}`: a field (names match case-insensitively when unambiguous,
  so `{{.ID}}` and `{{.Id}}` both work); `{{.}}` is the whole record;
- `{{json .}}`, `{{json .Field}}`: as JSON; `{{join .List ", "}}`; `{{upper .X}}`,
  `{{lower .X}}`; `{{len .List}}`;
- a leading `table ` prints a header of the fields' names and aligns the `\\t`-separated
  columns; `\\t` and `\\n` written as two characters are a tab and a newline.

Values print as Go prints them: true/false, lists as `[a b]`, maps as `map[k:v]`.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import StoreError

Record = Mapping[str, Any]
_FUNCS = {"json", "join", "upper", "lower", "len"}
_LABELS = {"HumanSize": "Size", "CreatedSince": "Created", "Id": "ID"}  # docker's headers


class TemplateError(StoreError):
    """A --format template that cannot be parsed or names a field the records do not have."""


def text(value: Any) -> str:
    """A value as Go's template engine prints it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "<no value>"
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{k}:{text(v)}" for k, v in sorted(value.items())) + "]"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(text(v) for v in value) + "]"
    return str(value)


def _key(record: Any, name: str, where: str) -> Any:
    if not isinstance(record, Mapping):
        raise TemplateError(f"template: {where}: {text(record)!r} has no field {name!r}")
    if name in record:
        return record[name]
    folded = [k for k in record if k.lower() == name.lower()]
    if len(folded) == 1:
        return record[folded[0]]
    raise TemplateError(
        f"template: no field .{name} (fields: {', '.join(sorted(record))})"
        if not where
        else f"template: {where}: no field .{name} (keys: {', '.join(sorted(record))})"
    )


@dataclass(frozen=True, slots=True)
class _Path:
    parts: tuple[str, ...]

    def get(self, record: Record) -> Any:
        value: Any = record
        for i, name in enumerate(self.parts):
            value = _key(value, name, "." + ".".join(self.parts[:i]) if i else "")
        return value

    @property
    def label(self) -> str:
        """The header of a `table` column: CreatedSince -> CREATED SINCE."""
        last = self.parts[-1] if self.parts else "."
        last = _LABELS.get(last, last)
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", last).upper()


def _parse_arg(token: str, action: str) -> _Path:
    if token == ".":
        return _Path(())
    if token.startswith("."):
        parts = tuple(token[1:].split("."))
        if not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
            raise TemplateError(f"template: bad field {token!r} in {{{{{action}}}}}")
        return _Path(parts)
    raise TemplateError(f"template: expected a .Field, got {token!r} in {{{{{action}}}}}")


def _action(action: str) -> tuple[Callable[[Record], str], _Path]:
    """One `{{ }}` action -> (render, the field it reads)."""
    try:
        tokens = shlex.split(action, posix=True)
    except ValueError as exc:
        raise TemplateError(f"template: {{{{{action}}}}}: {exc}") from None
    if not tokens:
        raise TemplateError("template: empty action {{}}")
    head, args = tokens[0], tokens[1:]
    if not head.startswith("."):
        if head not in _FUNCS:
            raise TemplateError(
                f"template: unknown function {head!r} (there are {', '.join(sorted(_FUNCS))})"
            )
        want = 2 if head == "join" else 1
        if len(args) != want:
            raise TemplateError(f"template: {head} takes {want} argument(s): {{{{{action}}}}}")
        path = _parse_arg(args[0], action)
        if head == "join":
            sep = args[1]
            return (lambda r: sep.join(text(v) for v in _items(path.get(r), action))), path
        if head == "json":
            return (lambda r: json.dumps(path.get(r), ensure_ascii=False)), path
        if head == "len":
            return (lambda r: str(len(_items(path.get(r), action)))), path
        fold = str.upper if head == "upper" else str.lower
        return (lambda r: fold(text(path.get(r)))), path
    if args:
        raise TemplateError(f"template: unexpected {args[0]!r} in {{{{{action}}}}}")
    path = _parse_arg(head, action)
    return (lambda r: text(path.get(r))), path


def _items(value: Any, action: str) -> Sequence[Any]:
    if isinstance(value, (list, tuple, str, Mapping)):
        return list(value)
    raise TemplateError(f"template: {{{{{action}}}}}: {text(value)!r} is not a list")


def _const(lit: str) -> Callable[[Record], str]:
    return lambda _r: lit


class Template:
    """A compiled --format template."""

    def __init__(self, source: str) -> None:
        src = source.replace("\\t", "\t").replace("\\n", "\n")
        self.table = src.startswith("table ") or src == "table"
        if self.table:
            src = src[len("table") :].lstrip(" ")
        self._parts: list[Callable[[Record], str]] = []
        self.paths: list[_Path] = []
        header: list[str] = []
        pos = 0
        for m in re.finditer(r"\{\{-?\s*(.*?)\s*-?\}\}", src, re.S):
            lit = src[pos : m.start()]
            self._parts.append(_const(lit))
            header.append(lit)
            render, path = _action(m.group(1))
            self._parts.append(render)
            self.paths.append(path)
            header.append(path.label)
            pos = m.end()
        rest = src[pos:]
        if "{{" in rest or "}}" in rest:
            raise TemplateError(f"template: unclosed action in {source!r}")
        self._parts.append(_const(rest))
        header.append(rest)
        self.header = "".join(header)

    def render(self, record: Record) -> str:
        return "".join(part(record) for part in self._parts)

    def check(self, fields: Sequence[str]) -> None:
        """Fail now on a field the records do not have (even when there are no records)."""
        sample = dict.fromkeys(fields)
        for path in self.paths:
            if path.parts:
                _key(sample, path.parts[0], "")

    def lines(self, records: Sequence[Record]) -> list[str]:
        """The output: one line per record (a `table` one with its header, aligned)."""
        out = [self.render(r) for r in records]
        if not self.table:
            return out
        rows = [line.split("\t") for line in [self.header, *out]]
        n = max(len(r) for r in rows)
        widths = [max(len(r[i]) if i < len(r) else 0 for r in rows) for i in range(n)]
        return [
            "   ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows
        ]
