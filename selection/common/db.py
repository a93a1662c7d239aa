"""One DuckDB transaction for a multi-statement write: the stores' writers use it so a failed
replace never leaves half a table."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """Commit what the block wrote, or roll all of it back if the block raises (the connection
    must not already be in a transaction).

    The block's own error is what the caller sees: when the rollback fails too (DuckDB has
    already aborted the transaction after, say, a full disk), the rollback's error is only
    attached as a note, never raised in place of the cause.
    """
    con.begin()
    try:
        yield con
        con.commit()
    except BaseException as error:
        try:
            con.rollback()
        except duckdb.Error as rollback_error:
            error.add_note(f"(the rollback after this error also failed: {rollback_error})")
        raise
