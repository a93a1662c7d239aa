"""DuckDB access and the `lineage` table.

DuckDB allows one writing process per file. Materializations run in several processes
(multiprocess executor, concurrent runs), so every access opens a short-lived connection
and retries with jittered exponential backoff while another process holds the lock.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb

LOCK_ERROR_MARKERS = ("could not set lock", "conflicting lock", "database is locked")

LINEAGE_DDL = """
CREATE TABLE IF NOT EXISTS lineage (
    run_id VARCHAR NOT NULL,
    asset_key VARCHAR NOT NULL,
    partition_key VARCHAR,
    code_version VARCHAR,
    started_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ NOT NULL,
    inputs JSON NOT NULL,
    outputs JSON NOT NULL,
    metrics JSON NOT NULL
)
"""


def is_lock_error(error: BaseException) -> bool:
    return isinstance(error, duckdb.Error) and any(m in str(error).lower() for m in LOCK_ERROR_MARKERS)


@contextlib.contextmanager
def connect_with_retry(
    path: Path | str, *, read_only: bool = False, timeout_s: float = 600.0, initial_delay_s: float = 0.05
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open `path`, waiting (not failing) while another process holds the write lock."""
    deadline = time.monotonic() + timeout_s
    delay = initial_delay_s
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.Error as error:
            if not is_lock_error(error) or time.monotonic() + delay > deadline:
                raise
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)
    try:
        yield con
    finally:
        con.close()


@dataclass
class LineageRecord:
    run_id: str
    asset_key: str
    partition_key: str | None
    code_version: str | None
    started_at: datetime
    finished_at: datetime | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def write_lineage(con: duckdb.DuckDBPyConnection, record: LineageRecord) -> None:
    con.execute(LINEAGE_DDL)
    finished = record.finished_at or datetime.now(timezone.utc)
    con.execute(
        "INSERT INTO lineage VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            record.run_id,
            record.asset_key,
            record.partition_key,
            record.code_version,
            record.started_at,
            finished,
            json.dumps(record.inputs, sort_keys=True, default=str),
            json.dumps(record.outputs, sort_keys=True, default=str),
            json.dumps(record.metrics, sort_keys=True, default=str),
        ],
    )


class LineageStore(dg.ConfigurableResource):
    """The embedded DuckDB file holding pool, targets, selections and lineage tables."""

    db_path: str
    lock_timeout_s: float = 600.0
    # DuckDB's default cache is 80% of RAM; a cap keeps large ingests memory-flat.
    memory_limit: str = "1GB"

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.db_path).parent.mkdir(parents=True, exist_ok=True)
        with connect_with_retry(self.db_path, read_only=read_only, timeout_s=self.lock_timeout_s) as con:
            con.execute(f"SET memory_limit = '{self.memory_limit}'")
            yield con

    def record(self, record: LineageRecord) -> None:
        with self.connect() as con:
            write_lineage(con, record)
