"""Index rows back to entries (layerstore.index.entry_from_row): the same Entry as the
dataclass's own constructor makes, through a real SQLite round trip."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerstore.index import ENTRY_COLS, INSERT_ENTRY, entry_from_row, entry_row, schema_sql
from layerstore.model import Entry, EntryKind

_names = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b)
_entries = st.builds(
    Entry,
    parent=st.sampled_from([b"", b"/", b"/etc", b"/usr/lib"]),
    name=_names,
    kind=st.sampled_from(list(EntryKind)),
    mode=st.integers(0, 0o7777),
    uid=st.integers(0, 2**32 - 1),
    gid=st.integers(0, 2**32 - 1),
    size=st.integers(0, 2**40),
    mtime_ns=st.integers(-(2**62), 2**62),
    rdev=st.none() | st.tuples(st.integers(0, 4095), st.integers(0, 2**20)),
    link=st.none() | st.binary(max_size=20),
    content=st.none() | st.text("0123456789abcdef", min_size=32, max_size=32),
    opaque=st.booleans(),
    nlink=st.integers(1, 100),
    implicit=st.booleans(),
    xattrs=st.lists(st.tuples(_names, st.binary(max_size=8)), max_size=2).map(tuple),
)


@pytest.fixture(scope="module")
def conn(tmp_path_factory: pytest.TempPathFactory) -> sqlite3.Connection:
    c = sqlite3.connect(Path(tmp_path_factory.mktemp("index")) / "index.db")
    c.executescript(schema_sql())
    return c


@settings(max_examples=300, deadline=None)
@given(e=_entries)
def test_a_row_reads_back_as_the_entry_that_was_written(conn: sqlite3.Connection, e: Entry) -> None:
    conn.execute("DELETE FROM entries")
    conn.execute(INSERT_ENTRY, entry_row(1, e))
    row = conn.execute(f"SELECT {ENTRY_COLS} FROM entries").fetchone()
    back = entry_from_row(row, e.xattrs)
    assert back == e
    assert hash(back) == hash(e)
    assert type(back) is Entry and type(back.kind) is EntryKind
    assert back.path == e.path
    with pytest.raises(AttributeError):
        back.mode = 1  # type: ignore[misc]  # still frozen


def test_an_unknown_kind_is_refused() -> None:
    row = (b"/", b"x", 42, 0o644, 0, 0, 0, 0, None, None, None, None, 0, 1, 0, 0)
    with pytest.raises(ValueError):
        entry_from_row(row)
