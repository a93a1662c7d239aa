"""One DuckDB transaction for a multi-statement write: the stores' writers use it so a failed
replace never leaves half a table."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """Commit what the block wrote, or roll all of it back if the block raises (the connection
    must not already be in a transaction)."""
    con.begin()
    try:
        yield con
        con.commit()
    except BaseException:
        con.rollback()
        raise
