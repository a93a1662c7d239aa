"""DuckDB storage of target tasks: tables `targets` and `target_rejects`.

Takes an open connection (the caller owns locking and retries). `write_targets`
replaces both tables' contents in one transaction, so readers see the old targets or
the new ones, never a mix.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import duckdb
import pandas as pd

from selection.common.db import transaction
from selection.data.formats import canonical_json, reason_code
from selection.data.targets import SPLITS, TargetReject, TargetRow

TARGETS_DDL = """
CREATE TABLE IF NOT EXISTS targets (
    task VARCHAR NOT NULL,
    subtask VARCHAR NOT NULL,
    split VARCHAR NOT NULL,
    example_id VARCHAR NOT NULL,
    messages JSON NOT NULL,
    split_rank INTEGER NOT NULL,
    source_file VARCHAR NOT NULL,
    line_no INTEGER NOT NULL
)
"""
TARGET_REJECTS_DDL = """
CREATE TABLE IF NOT EXISTS target_rejects (
    file VARCHAR NOT NULL,
    line_no INTEGER NOT NULL,
    reason VARCHAR NOT NULL,
    raw VARCHAR NOT NULL
)
"""
TARGET_COLUMNS = ("task", "subtask", "split", "example_id", "messages", "split_rank", "source_file", "line_no")
REJECT_COLUMNS = ("file", "line_no", "reason", "raw")


def ensure_target_tables(con: duckdb.DuckDBPyConnection) -> None:
    con.execute(TARGETS_DDL)
    con.execute(TARGET_REJECTS_DDL)


def read_targets(con: duckdb.DuckDBPyConnection, split: str = "val") -> list[tuple[str, str, str, list[dict]]]:
    """(task, subtask, example_id, messages) of one split, in a stable order."""
    rows = con.execute(
        "SELECT task, subtask, example_id, messages FROM targets WHERE split = ? ORDER BY task, subtask, split_rank",
        [split],
    ).fetchall()
    if not rows:
        raise ValueError(f"no `{split}` targets; materialize target_tasks first")
    return [(task, subtask, example_id, json.loads(messages)) for task, subtask, example_id, messages in rows]


def read_target_rows(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str, str, str, list[dict]]]:
    """(task, subtask, split, example_id, messages) of every stored target row, both splits (empty if none)."""
    ensure_target_tables(con)
    rows = con.execute(
        "SELECT task, subtask, split, example_id, messages FROM targets ORDER BY task, subtask, split, split_rank"
    ).fetchall()
    return [
        (task, subtask, split, example_id, json.loads(messages)) for task, subtask, split, example_id, messages in rows
    ]


def _version_of_keys(keys: Iterable[tuple[str, str, str, str]]) -> str:
    lines = sorted("\t".join(key) for key in keys)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()[:16]


def targets_version(rows: Iterable[TargetRow]) -> str:
    """Content version of a target set: hash of its sorted (task, subtask, split, id) rows."""
    return _version_of_keys((row.task, row.subtask, row.split, row.example_id) for row in rows)


def stored_targets_version(con: duckdb.DuckDBPyConnection) -> str | None:
    """:func:`targets_version` of the stored `targets` table, None when it holds no row."""
    ensure_target_tables(con)
    keys = con.execute("SELECT task, subtask, split, example_id FROM targets").fetchall()
    return _version_of_keys(keys) if keys else None


def _insert(con: duckdb.DuckDBPyConnection, table: str, columns: Sequence[str], records: list[tuple[Any, ...]]) -> None:
    if not records:
        return
    frame = pd.DataFrame.from_records(records, columns=list(columns))
    con.register("_incoming", frame)
    try:
        con.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM _incoming")
    finally:
        con.unregister("_incoming")


def write_targets(
    con: duckdb.DuckDBPyConnection,
    rows: Sequence[TargetRow],
    rejects: Sequence[TargetReject] = (),
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """Replace `targets` and `target_rejects` atomically; return a summary for run metadata."""
    bad_splits = {row.split for row in rows} - set(SPLITS)
    if bad_splits:
        raise ValueError(f"target rows with unknown split(s) {sorted(bad_splits)}; expected {SPLITS}")
    identities = Counter((row.task, row.example_id) for row in rows)
    repeated = [key for key, count in identities.items() if count > 1]
    if repeated:
        raise ValueError(f"{len(repeated)} example(s) appear twice in one task, e.g. {repeated[0]}")
    target_records = [
        (r.task, r.subtask, r.split, r.example_id, canonical_json(r.messages), r.split_rank, r.file, r.line_no)
        for r in rows
    ]
    reject_records = [(r.file, r.line_no, r.reason, r.raw) for r in rejects]

    ensure_target_tables(con)
    with transaction(con):
        con.execute("DELETE FROM targets")
        con.execute("DELETE FROM target_rejects")
        _insert(con, "targets", TARGET_COLUMNS, target_records)
        _insert(con, "target_rejects", REJECT_COLUMNS, reject_records)
    return summarize_targets(rows, rejects, warnings)


def summarize_targets(
    rows: Sequence[TargetRow], rejects: Sequence[TargetReject] = (), warnings: Sequence[str] = ()
) -> dict[str, Any]:
    """Counts per task and split, subtasks per task, rejects by reason code, warnings."""
    per_task: dict[str, dict[str, Any]] = defaultdict(lambda: {"val": 0, "test": 0, "subtasks": set()})
    for row in rows:
        per_task[row.task][row.split] += 1
        per_task[row.task]["subtasks"].add(row.subtask)
    tasks = {
        task: {"val": counts["val"], "test": counts["test"], "subtasks": len(counts["subtasks"])}
        for task, counts in sorted(per_task.items())
    }
    return {
        "n_targets": len(rows),
        "n_val": sum(task["val"] for task in tasks.values()),
        "n_test": sum(task["test"] for task in tasks.values()),
        "tasks": tasks,
        "n_rejects": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(reason_code(r.reason) for r in rejects).items())),
        "warnings": list(warnings),
        "targets_version": targets_version(rows),
    }
