"""DuckDB access and the `lineage` table.

DuckDB allows one writing process per file. Materializations run in several processes
(multiprocess executor, concurrent runs), so every access opens a short-lived connection
and retries with jittered exponential backoff while another process holds the lock.

Creating the file is the one moment that lock does not cover: a process opening the file
while another is still writing its header gets "not a valid DuckDB database file". So the
file is created once, with the `lineage` table, under an exclusive lock on a sidecar file
(`<db>.init.lock`) and moved into place atomically; schema migrations run under the same
lock. Writers then only insert, and check that their row is there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import pydantic

from resources.settings import HOME_ENV_VAR
from selection.common import files
from selection.common.names import check_memory_limit

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
    metrics JSON NOT NULL,
    status VARCHAR NOT NULL DEFAULT 'success'
)
"""
# Files created before a column existed get it here (run once per process, under the init lock).
LINEAGE_MIGRATIONS = ("ALTER TABLE lineage ADD COLUMN IF NOT EXISTS status VARCHAR DEFAULT 'success'",)
LINEAGE_STATUSES = ("success", "failed")


# Files DuckDB opens next to the database (its write-ahead log and spill folder), and ours.
_SIDE_FILES = (".wal", ".init.lock")
_SIDE_FOLDERS = (".tmp",)


def check_database_files(path: Path | str) -> Path:
    """Refuse a database whose file or side files could send DuckDB's writes elsewhere.

    DuckDB follows a symlink at ``<db>.wal`` and overwrites its target, so the database file,
    its WAL and our init lock must be regular files (or absent), its spill folder a real folder,
    and none may resolve outside the storage root; a '?' in the path is refused because DuckDB
    reads it as the start of connection options. Checked before every connect.
    """
    path = Path(path)
    if "?" in str(path):
        raise ValueError(
            f"DuckDB file {path}: the path contains '?', which DuckDB reads as the start of connection "
            f"options; set {HOME_ENV_VAR} (the storage root) to a path without '?'"
        )
    for candidate, kind in (
        [(path, "file")]
        + [(Path(f"{path}{s}"), "file") for s in _SIDE_FILES]
        + [(Path(f"{path}{s}"), "folder") for s in _SIDE_FOLDERS]
    ):
        if not os.path.lexists(candidate):
            files.confined(candidate)
            continue
        mode = os.lstat(candidate).st_mode
        expected = stat.S_ISREG(mode) if kind == "file" else stat.S_ISDIR(mode)
        if stat.S_ISLNK(mode) or not expected:
            what = "a symlink" if stat.S_ISLNK(mode) else "not a regular " + kind
            raise ValueError(
                f"DuckDB {'file' if candidate == path else 'side ' + kind} {candidate} is {what}; DuckDB would "
                f"write through it. Remove it (the storage root must hold only the files the pipeline made)"
            )
        files.confined(candidate)
    return path


def is_lock_error(error: BaseException) -> bool:
    return isinstance(error, duckdb.Error) and any(m in str(error).lower() for m in LOCK_ERROR_MARKERS)


@contextlib.contextmanager
def connect_with_retry(
    path: Path | str,
    *,
    read_only: bool = False,
    timeout_s: float = 600.0,
    initial_delay_s: float = 0.05,
    create_missing: bool = True,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open `path`, waiting (not failing) while another process holds the write lock.

    A missing file is first created whole (see the module docstring), never opened half-written."""
    if create_missing and not read_only:
        create_database(path, timeout_s=timeout_s)  # checks the database's files first
    else:
        check_database_files(path)
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


@contextlib.contextmanager
def init_lock(db_path: Path | str, timeout_s: float = 600.0) -> Iterator[None]:
    """Exclusive lock on `<db>.init.lock`, which serializes creating and migrating the file."""
    lock_path = Path(f"{db_path}.init.lock")
    check_database_files(db_path)
    files.make_dirs(lock_path.parent)
    deadline = time.monotonic() + timeout_s
    with open(lock_path, "a+b") as handle:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{lock_path} held by another process for over {timeout_s:.0f} s") from None
                time.sleep(0.05 * (0.5 + random.random()))
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_database(path: Path | str, timeout_s: float = 600.0) -> bool:
    """Create the DuckDB file with the lineage table if it does not exist; True if this call created it.

    Built under a temporary name and renamed into place, so other processes see either no
    file or a complete one."""
    path = check_database_files(path)
    if path.exists():  # complete: only ever renamed into place
        return False
    files.make_dirs(path.parent)
    with init_lock(path, timeout_s):
        if path.exists():
            return False
        with files.replacing(path) as temporary:
            con = duckdb.connect(str(temporary))
            try:
                con.execute(LINEAGE_DDL)
                con.execute("CHECKPOINT")
            finally:
                con.close()
            Path(f"{temporary}.wal").unlink(missing_ok=True)  # empty after the checkpoint
        return True


_SCHEMA_READY: set[tuple[str, int]] = set()


def ensure_lineage_schema(path: Path | str, timeout_s: float = 600.0) -> None:
    """Create the file and the `lineage` table and apply migrations, once per process and file."""
    path = check_database_files(path).resolve()  # checked before resolving follows a planted symlink
    created = create_database(path, timeout_s)  # a new file already has the current schema
    if created or (str(path), path.stat().st_ino) in _SCHEMA_READY:
        _SCHEMA_READY.add((str(path), path.stat().st_ino))
        return
    with init_lock(path, timeout_s), connect_with_retry(path, timeout_s=timeout_s, create_missing=False) as con:
        con.execute(LINEAGE_DDL)
        for statement in LINEAGE_MIGRATIONS:
            con.execute(statement)
    _SCHEMA_READY.add((str(path), path.stat().st_ino))


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
    status: str = "success"


def write_lineage(con: duckdb.DuckDBPyConnection, record: LineageRecord) -> None:
    """Insert one row; the table must exist (`ensure_lineage_schema`, done by `LineageStore`)."""
    if record.status not in LINEAGE_STATUSES:
        raise ValueError(f"lineage status {record.status!r} is not one of {LINEAGE_STATUSES}")
    finished = record.finished_at or datetime.now(UTC)
    con.execute(
        "INSERT INTO lineage (run_id, asset_key, partition_key, code_version, started_at, finished_at, "
        "inputs, outputs, metrics, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            record.status,
        ],
    )


def lineage_row_count(
    con: duckdb.DuckDBPyConnection, run_id: str, asset_key: str, partition_key: str | None, status: str | None = None
) -> int:
    """Rows of one (run, asset, partition), optionally of one status."""
    return con.execute(
        "SELECT count(*) FROM lineage WHERE run_id = ? AND asset_key = ? AND partition_key IS NOT DISTINCT FROM ? "
        "AND (CAST(? AS VARCHAR) IS NULL OR status = ?)",
        [run_id, asset_key, partition_key, status, status],
    ).fetchone()[0]


class LineageStore(dg.ConfigurableResource):
    """The embedded DuckDB file holding pool, targets, selections and lineage tables."""

    db_path: str
    lock_timeout_s: float = 600.0
    # DuckDB's default cache is 80% of RAM; a cap keeps large ingests memory-flat.
    memory_limit: str = "1GB"

    @pydantic.field_validator("memory_limit")
    @classmethod
    def _memory_limit_is_a_size(cls, value: str) -> str:
        # Checked when the resource is built, so a bad value fails the run before anything is written.
        return check_memory_limit(value, "LineageStore.memory_limit")

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Every step requires this resource, so this runs at the start of each step process.
        from resources.process import die_with_parent

        die_with_parent()
        files.register_root(Path(self.db_path).parent)
        ensure_lineage_schema(self.db_path, self.lock_timeout_s)

    @contextlib.contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        # The database's folder is the storage root: DuckDB's own files are confined to it too.
        files.register_root(Path(self.db_path).parent)
        files.make_dirs(Path(self.db_path).parent)
        if not read_only:
            ensure_lineage_schema(self.db_path, self.lock_timeout_s)
        with connect_with_retry(self.db_path, read_only=read_only, timeout_s=self.lock_timeout_s) as con:
            con.execute("SET memory_limit = ?", [self.memory_limit])
            yield con

    def record(self, record: LineageRecord) -> None:
        """Write one row, then read it back in a new connection: a row is never silently lost."""
        with self.connect() as con:
            before = lineage_row_count(con, record.run_id, record.asset_key, record.partition_key, record.status)
            write_lineage(con, record)
        with self.connect() as con:
            after = lineage_row_count(con, record.run_id, record.asset_key, record.partition_key, record.status)
        if after != before + 1:
            raise RuntimeError(
                f"lineage row of run {record.run_id} ({record.asset_key}, {record.partition_key}) "
                f"was not stored in {self.db_path}: {before} rows before, {after} after"
            )
