"""DuckDB tables of the evaluation stage: `evaluation_runs`, `evaluation_rows`, `comparison`.

Takes an open connection (the caller owns locking and retries). Each function creates the
tables it touches; a multi-statement write happens in one transaction.

- ``evaluation_runs``: one row per checkpoint (or the base model) an evaluation run scored, with
  the path of its result file.
- ``evaluation_rows``: one row per scored test row: enough to recompute every delta and interval.
- ``comparison``: the latest comparison table of each model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import duckdb
import pandas as pd

from selection import selection_store
from selection.common import names
from selection.common.db import transaction
from selection.train import checkpoints

if TYPE_CHECKING:
    from selection.evaluate.evaluation import EvalResult

EVALUATION_DDL = (
    """CREATE TABLE IF NOT EXISTS evaluation_runs (
    model VARCHAR, name VARCHAR, stage VARCHAR, run_key VARCHAR, method VARCHAR, target VARCHAR, budget INTEGER,
    result_path VARCHAR, summary JSON, run_id VARCHAR, created_at TIMESTAMPTZ, seed INTEGER)""",
    "ALTER TABLE evaluation_runs ADD COLUMN IF NOT EXISTS seed INTEGER",  # tables made before seeds
    """CREATE TABLE IF NOT EXISTS evaluation_rows (
    model VARCHAR, run_id VARCHAR, name VARCHAR, seed INTEGER, run_key VARCHAR, task VARCHAR, subtask VARCHAR,
    example_id VARCHAR, nll DOUBLE, correct BOOLEAN, truncated BOOLEAN, gold_letter VARCHAR, predicted_letter VARCHAR,
    reject_reason VARCHAR, generation_correct BOOLEAN)""",
)


def ensure_evaluation_tables(con: duckdb.DuckDBPyConnection) -> None:
    for ddl in EVALUATION_DDL:
        con.execute(ddl)


def current_finetunes(con: duckdb.DuckDBPyConnection, model: str) -> pd.DataFrame:
    """The checkpoints of each current selection's latest finetuning (one budget per method and target): one per seed.

    The latest checkpoint of a (method, target) lists the seeds of its materialization in its config; each of
    those seeds' latest checkpoint with the same training settings is taken. Checkpoints recorded before seeds
    were (no `seeds` in the config) stand alone.
    """
    checkpoints.ensure_checkpoint_tables(con)
    current = pd.DataFrame(  # noqa: F841  (DuckDB reads it by name in the SQL)
        [(s.method, s.target, s.budget) for s in selection_store.latest_selections(con, model, ["all"], None)],
        columns=["method", "target", "budget"],
    )
    frame = con.execute(
        """SELECT c.* FROM checkpoints c JOIN current USING (method, target, budget)
           WHERE c.model = ? AND c.stage = 'finetune'
           ORDER BY c.method, c.target, c.created_at DESC, c.epoch DESC""",
        [model],
    ).df()
    chosen = []
    for (method, target), group in frame.groupby(["method", "target"], sort=True):
        latest = group.iloc[0]
        config = json.loads(latest["config"])
        seeds = config.get("seeds")
        if seeds is None:
            chosen.append(latest)
            continue
        settings = {k: v for k, v in config.get("training", {}).items() if k != "seed"}
        for seed in seeds:
            same = [
                row
                for _, row in group.iterrows()
                if row["seed"] == seed
                and {k: v for k, v in json.loads(row["config"]).get("training", {}).items() if k != "seed"} == settings
            ]
            if not same:
                raise ValueError(
                    f"{method}/{target}: the latest finetuning (seeds {seeds}) has no checkpoint for "
                    f"seed {seed}; rematerialize finetuned_checkpoints"
                )
            chosen.append(same[0])
    return pd.DataFrame(chosen, columns=frame.columns).reset_index(drop=True)


@dataclass(frozen=True)
class EvaluatedCheckpoint:
    """What one evaluation scored: the base model (no `run_key`) or a finetuned checkpoint."""

    name: str  # "base", or "<method>/<target>"
    seed: int | None = None
    run_key: str | None = None
    method: str | None = None
    target: str | None = None
    budget: int | None = None

    @property
    def stage(self) -> str:
        return "base" if self.run_key is None else "finetune"


def _row_frame(result: EvalResult, model: str, run_id: str, checkpoint: EvaluatedCheckpoint) -> pd.DataFrame:
    """The `evaluation_rows` of one evaluated checkpoint (an unscored NLL is NULL)."""
    frame = pd.DataFrame.from_records(
        [
            (
                model,
                run_id,
                checkpoint.name,
                checkpoint.seed,
                checkpoint.run_key,
                r.task,
                r.subtask,
                r.example_id,
                None if math.isnan(r.nll) else r.nll,
                r.correct,
                r.truncated,
                r.gold_letter,
                r.predicted_letter,
                r.reject_reason,
                r.generation_correct,
            )
            for r in result.rows
        ],
        columns=[
            "model",
            "run_id",
            "name",
            "seed",
            "run_key",
            "task",
            "subtask",
            "example_id",
            "nll",
            "correct",
            "truncated",
            "gold_letter",
            "predicted_letter",
            "reject_reason",
            "generation_correct",
        ],
    )
    frame["seed"] = frame["seed"].astype("Int64")
    frame["nll"] = frame["nll"].astype("float64")
    for column in ("correct", "generation_correct"):
        frame[column] = frame[column].astype("boolean")
    return frame


def record_evaluation(
    con: duckdb.DuckDBPyConnection,
    model: str,
    run_id: str,
    checkpoint: EvaluatedCheckpoint,
    result_path: str,
    result: EvalResult,
) -> None:
    """One checkpoint's `evaluation_runs` row and its `evaluation_rows`, together."""
    ensure_evaluation_tables(con)
    row_frame = _row_frame(result, model, run_id, checkpoint)  # noqa: F841  (DuckDB reads it by name in the SQL)
    with transaction(con):
        con.execute(
            "INSERT INTO evaluation_runs (model, name, stage, run_key, method, target, budget, result_path, "
            "summary, run_id, created_at, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?)",
            [
                model,
                checkpoint.name,
                checkpoint.stage,
                checkpoint.run_key,
                checkpoint.method,
                checkpoint.target,
                checkpoint.budget,
                result_path,
                json.dumps(result.summary()),
                run_id,
                checkpoint.seed,
            ],
        )
        con.execute("INSERT INTO evaluation_rows BY NAME SELECT * FROM row_frame")


@dataclass(frozen=True)
class StoredResult:
    name: str
    seed: int | None
    result_path: str


def latest_evaluation(con: duckdb.DuckDBPyConnection, model: str) -> list[StoredResult]:
    """The result files of a model's latest evaluation run, by name then seed (empty: never evaluated)."""
    ensure_evaluation_tables(con)
    rows = con.execute(
        """SELECT name, seed, result_path FROM evaluation_runs WHERE model = ? AND run_id = (
               SELECT run_id FROM evaluation_runs WHERE model = ? ORDER BY created_at DESC LIMIT 1)
           ORDER BY name, seed""",
        [model, model],
    ).fetchall()
    return [StoredResult(*row) for row in rows]


def evaluated_training_examples(con: duckdb.DuckDBPyConnection, model: str) -> dict[str, list[str]]:
    """The examples each finetuned checkpoint of the model's latest evaluation trained on (all seeds), by name."""
    ensure_evaluation_tables(con)
    checkpoints.ensure_checkpoint_tables(con)
    rows = con.execute(
        """SELECT r.name, list(DISTINCT e.example_id ORDER BY e.example_id)
           FROM evaluation_runs r JOIN checkpoint_examples e
             ON e.model = r.model AND e.stage = r.stage AND e.run_key = r.run_key
           WHERE r.model = ? AND r.run_key IS NOT NULL AND r.run_id = (
               SELECT run_id FROM evaluation_runs WHERE model = ? ORDER BY created_at DESC LIMIT 1)
           GROUP BY r.name ORDER BY r.name""",
        [model, model],
    ).fetchall()
    return {name: list(example_ids) for name, example_ids in rows}


@dataclass(frozen=True)
class SharedTrainingSet:
    """Evaluated checkpoints (by name) that were finetuned on exactly the same examples."""

    names: tuple[str, ...]
    n_examples: int


def shared_training_sets(con: duckdb.DuckDBPyConnection, model: str) -> list[SharedTrainingSet]:
    """Groups of two or more names in the model's latest evaluation whose checkpoints trained on one example set.

    Two methods can pick the same examples (on a small pool, LESS's top-k and its per-task round
    robin often coincide); their figures then agree by construction, and a reader must be told.
    """
    by_examples: dict[tuple[str, ...], list[str]] = {}
    for name, example_ids in evaluated_training_examples(con, model).items():
        by_examples.setdefault(tuple(example_ids), []).append(name)
    return [
        SharedTrainingSet(tuple(names), len(example_ids))
        for example_ids, names in by_examples.items()
        if len(names) > 1
    ]


@dataclass(frozen=True)
class ScoredTestRows:
    """The test rows one checkpoint was scored on in one evaluation run."""

    rows: list[str]  # distinct `task/example_id`, sorted
    n_scored: int  # scored rows, repeats included


def scored_test_rows(con: duckdb.DuckDBPyConnection, model: str, run_id: str) -> dict[str, ScoredTestRows]:
    """The test rows evaluation `run_id` of `model` scored, by checkpoint run key ("base": the base model)."""
    rows = con.execute(
        """SELECT coalesce(run_key, 'base'),
                  list(DISTINCT task || '/' || example_id ORDER BY task || '/' || example_id), count(*)
           FROM evaluation_rows WHERE model = ? AND run_id = ? GROUP BY 1 ORDER BY 1""",
        [model, run_id],
    ).fetchall()
    return {key: ScoredTestRows(list(test_rows), n) for key, test_rows, n in rows}


def replace_comparison(con: duckdb.DuckDBPyConnection, model: str, comparison_frame: pd.DataFrame) -> None:
    """Replace the model's `comparison` rows with `comparison_frame`."""
    con.execute("CREATE TABLE IF NOT EXISTS comparison AS SELECT ''::VARCHAR AS model, * FROM comparison_frame LIMIT 0")
    # A table made by an earlier version lacks the interval columns: add them (older rows read NULL).
    existing = {
        r[0] for r in con.execute("SELECT column_name FROM duckdb_columns() WHERE table_name = 'comparison'").fetchall()
    }
    for column, column_type, *_ in con.execute("DESCRIBE SELECT * FROM comparison_frame").fetchall():
        if column not in existing:
            # The frame's columns are interpolated into the statement: each must be a plain identifier.
            names.check_identifier(column, "comparison column")
            con.execute(f'ALTER TABLE comparison ADD COLUMN "{column}" {column_type}')
    with transaction(con):
        con.execute("DELETE FROM comparison WHERE model = ?", [model])
        con.execute("INSERT INTO comparison BY NAME SELECT ? AS model, * FROM comparison_frame", [model])
