"""The `selections` table and per-example explanations, written atomically per selection, and their readers.

- ``selections``: one row per picked example (rank = selection order) of each (model, method,
  target, budget); a rewrite of the same key replaces it.
- ``selection_explanations``: the top val examples behind each pick of the score-based methods.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import duckdb
import numpy as np
import pandas as pd

from selection.common import files
from selection.common.db import transaction
from selection.data import export, pool_store

SELECTION_DDL = (
    """CREATE TABLE IF NOT EXISTS selections (
        model VARCHAR NOT NULL, method VARCHAR NOT NULL, target VARCHAR NOT NULL, budget INTEGER NOT NULL,
        example_id VARCHAR NOT NULL, rank INTEGER NOT NULL, score DOUBLE,
        pool_version VARCHAR NOT NULL, run_id VARCHAR, code_version VARCHAR, created_at TIMESTAMPTZ
    )""",
    """CREATE TABLE IF NOT EXISTS selection_explanations (
        model VARCHAR NOT NULL, method VARCHAR NOT NULL, target VARCHAR NOT NULL, budget INTEGER NOT NULL,
        example_id VARCHAR NOT NULL, reason_rank INTEGER NOT NULL, val_example_id VARCHAR, val_task VARCHAR,
        val_subtask VARCHAR, normalized_influence DOUBLE
    )""",
)


@dataclass(frozen=True)
class Selection:
    model: str
    method: str
    target: str  # a task name, or "all" for multi-target methods
    example_ids: list[str]  # in selection order
    scores: list[float | None]
    pool_version: str
    # The size the run asked for (selection.checks compares it with the stored rows); None: the picks.
    budget: int | None = None

    def __post_init__(self) -> None:
        if self.budget is None:
            object.__setattr__(self, "budget", len(self.example_ids))
        if len(self.example_ids) != len(self.scores):
            raise ValueError("one score per selected example is required (None where a method has none)")
        if len(set(self.example_ids)) != len(self.example_ids):
            raise ValueError(f"selection {self.method}/{self.target} repeats examples")
        if not self.example_ids:
            raise ValueError(f"selection {self.method}/{self.target} is empty")


def ensure_selection_tables(con: duckdb.DuckDBPyConnection) -> None:
    for ddl in SELECTION_DDL:
        con.execute(ddl)


def write_selections(
    con: duckdb.DuckDBPyConnection,
    selections: Sequence[Selection],
    explanations: pd.DataFrame | None = None,
    run_id: str | None = None,
    code_version: str | None = None,
) -> int:
    """Replace each (model, method, target, budget) selection with the new one, in one transaction."""
    ensure_selection_tables(con)
    now = datetime.now(UTC)
    frame = pd.DataFrame(
        [
            (
                s.model,
                s.method,
                s.target,
                s.budget,
                example_id,
                rank,
                None if score is None or not np.isfinite(score) else float(score),
                s.pool_version,
                run_id,
                code_version,
                now,
            )
            for s in selections
            for rank, (example_id, score) in enumerate(zip(s.example_ids, s.scores))
        ],
        columns=[
            "model",
            "method",
            "target",
            "budget",
            "example_id",
            "rank",
            "score",
            "pool_version",
            "run_id",
            "code_version",
            "created_at",
        ],
    )
    keys = pd.DataFrame(  # noqa: F841  (DuckDB reads it by name in the SQL)
        [(s.model, s.method, s.target, s.budget) for s in selections], columns=["model", "method", "target", "budget"]
    )
    with transaction(con):
        for table in ("selections", "selection_explanations"):
            con.execute(
                f"DELETE FROM {table} t WHERE EXISTS (SELECT 1 FROM keys k WHERE k.model = t.model "
                "AND k.method = t.method AND k.target = t.target AND k.budget = t.budget)"
            )
        con.execute("INSERT INTO selections SELECT * FROM frame")
        if explanations is not None and len(explanations):
            con.execute(
                "INSERT INTO selection_explanations SELECT model, method, target, budget, example_id, reason_rank, "
                "val_example_id, val_task, val_subtask, normalized_influence FROM explanations"
            )
    return len(frame)


@dataclass(frozen=True)
class StoredSelection:
    """The key of one stored selection, and the pool version it was picked from."""

    method: str
    target: str
    budget: int
    pool_version: str


def latest_selections(
    con: duckdb.DuckDBPyConnection, model: str, targets: Sequence[str], methods: Sequence[str] | None
) -> list[StoredSelection]:
    """The most recent selection per (method, target) of a model, among `targets` and `methods` (None: all)."""
    ensure_selection_tables(con)
    rows = con.execute(
        """SELECT method, target, budget, any_value(pool_version) FROM selections WHERE model = ?
           GROUP BY method, target, budget
           QUALIFY row_number() OVER (PARTITION BY method, target ORDER BY max(created_at) DESC) = 1
           ORDER BY method, target""",
        [model],
    ).fetchall()
    return [StoredSelection(*r) for r in rows if r[1] in targets and (methods is None or r[0] in methods)]


def selected_ids(con: duckdb.DuckDBPyConnection, model: str, selection: StoredSelection) -> list[str]:
    """The example ids of a stored selection, in selection order."""
    ensure_selection_tables(con)
    return [
        r[0]
        for r in con.execute(
            "SELECT example_id FROM selections WHERE model = ? AND method = ? AND target = ? AND budget = ? "
            "ORDER BY rank",
            [model, selection.method, selection.target, selection.budget],
        ).fetchall()
    ]


@dataclass(frozen=True)
class RunTargetCounts:
    """What one run stored for one target of a (model, method) selection."""

    target: str
    n_rows: int
    n_distinct: int  # distinct example ids
    budget: int  # the stored budget
    n_not_in_pool: int  # ids missing from the pool version they were selected from


def run_target_counts(con: duckdb.DuckDBPyConnection, model: str, method: str, run_id: str) -> list[RunTargetCounts]:
    """Per target (in target order), the counts of the (model, method) selection rows `run_id` wrote."""
    ensure_selection_tables(con)
    pool_store.ensure_pool_tables(con)
    rows = con.execute(
        f"""SELECT s.target, count(*), count(DISTINCT s.example_id), any_value(s.budget),
                   count(*) FILTER (WHERE NOT EXISTS (
                       SELECT 1 FROM pool p JOIN pool_versions v ON v.pool_version = s.pool_version
                       WHERE p.example_id = s.example_id AND {pool_store.member_at_seq_sql("p", "v.seq")}))
            FROM selections s WHERE s.model = ? AND s.method = ? AND s.run_id = ? GROUP BY s.target ORDER BY 1""",
        [model, method, run_id],
    ).fetchall()
    return [RunTargetCounts(*row) for row in rows]


def export_jsonl(con: duckdb.DuckDBPyConnection, path, example_ids: Sequence[str]) -> None:
    """Selected examples in selection order, each in its source's own format, with id and source."""
    frame = pd.DataFrame({"example_id": list(example_ids), "rank": range(len(example_ids))})  # noqa: F841  (DuckDB reads it by name in the SQL)
    rows = con.execute(
        "SELECT f.example_id, p.source, p.format, p.messages FROM frame f "
        "JOIN pool p USING (example_id) ORDER BY f.rank"
    ).fetchall()
    if len(rows) != len(example_ids):
        raise ValueError(f"{len(example_ids) - len(rows)} selected ids are missing from the pool; cannot export")
    with open(files.confined(path), "w", encoding="utf-8") as handle:
        for example_id, source, fmt, messages in rows:
            record = export.to_source_format(json.loads(messages), fmt)
            handle.write(json.dumps({"id": example_id, "source": source, **record}, ensure_ascii=False) + "\n")
