"""The influence stage's lineage tables: `gradient_stores`, `feature_diagnostics`, `influence_runs`.

Takes an open connection (the caller owns locking and retries).

- `gradient_stores`: one row per feature store (checkpoint x kind x projector x shard) with where
  it lives; `shard` is the Dagster shard (`03-of-08`) of a train store, NULL for target stores.
- `feature_diagnostics`: the collapse statistics of each store (`selection.influence.diagnostics`).
- `influence_runs`: one row per score matrix written, with its columns and checkpoint weights.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from selection.common.db import transaction
from selection.data.tokenization import LESS_LOSS_TOKENS
from selection.influence.datastore import FeatureStore
from selection.influence.gradients import LITERAL_LESS_TRANSFORM

STORE_TABLE_DDL = """CREATE TABLE IF NOT EXISTS gradient_stores (
    model VARCHAR, kind VARCHAR, warmup_run_key VARCHAR, epoch INTEGER, avg_lr DOUBLE, store_id VARCHAR,
    directory VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT, n_rows INTEGER, created_at TIMESTAMPTZ,
    shard VARCHAR, n_excluded INTEGER, transform VARCHAR, loss_tokens VARCHAR
)"""
# Tables made before stores had shards, excluded counts, transforms or loss tokens.
STORE_TABLE_MIGRATIONS = (
    "ALTER TABLE gradient_stores ADD COLUMN IF NOT EXISTS shard VARCHAR",
    "ALTER TABLE gradient_stores ADD COLUMN IF NOT EXISTS n_excluded INTEGER",
    # NULL on rows made before the transform was recorded: those train stores hold LESS's `adam`.
    "ALTER TABLE gradient_stores ADD COLUMN IF NOT EXISTS transform VARCHAR",
    # NULL on rows made before: those stores hold gradients of the response tokens (LESS's).
    "ALTER TABLE gradient_stores ADD COLUMN IF NOT EXISTS loss_tokens VARCHAR",
)
# Tables made while the shard column was called `part` keep their rows under the new name.
_RENAME_PART = "ALTER TABLE gradient_stores RENAME COLUMN part TO shard"

DIAGNOSTICS_DDL = """CREATE TABLE IF NOT EXISTS feature_diagnostics (
    store_id VARCHAR, model VARCHAR, kind VARCHAR, warmup_run_key VARCHAR, epoch INTEGER, part VARCHAR,
    mode VARCHAR, dim INTEGER, seed BIGINT, warmup_steps INTEGER, n_rows INTEGER, mean_feature_norm DOUBLE,
    mean_pairwise_cosine DOUBLE, saturated_share DOUBLE, collapsed BOOLEAN, created_at TIMESTAMPTZ
)"""

INFLUENCE_DDL = """CREATE TABLE IF NOT EXISTS influence_runs (
    model VARCHAR, scores_dir VARCHAR, warmup_run_key VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT,
    n_train INTEGER, n_val INTEGER, columns JSON, weights JSON, pool_version VARCHAR, created_at TIMESTAMPTZ,
    train_transform VARCHAR, loss_tokens VARCHAR, dropped_directions INTEGER
)"""
# Runs recorded before the feature recipe was: NULL (LESS's adam, response tokens, nothing removed).
INFLUENCE_MIGRATIONS = (
    "ALTER TABLE influence_runs ADD COLUMN IF NOT EXISTS train_transform VARCHAR",
    "ALTER TABLE influence_runs ADD COLUMN IF NOT EXISTS loss_tokens VARCHAR",
    "ALTER TABLE influence_runs ADD COLUMN IF NOT EXISTS dropped_directions INTEGER",
    # NULL on runs recorded before recipes and before features were diagnosed as scored.
    "ALTER TABLE influence_runs ADD COLUMN IF NOT EXISTS recipe VARCHAR",
    "ALTER TABLE influence_runs ADD COLUMN IF NOT EXISTS recipe_overrides JSON",
    "ALTER TABLE influence_runs ADD COLUMN IF NOT EXISTS scored_diagnostics JSON",
)


def _has_column(con: Any, table: str, column: str) -> bool:
    (count,) = con.execute(
        "SELECT count(*) FROM information_schema.columns WHERE table_catalog = current_database() "
        "AND table_schema = current_schema() AND table_name = ? AND column_name = ?",
        [table, column],
    ).fetchone()
    return bool(count)


def ensure_store_table(con: Any) -> None:
    """`gradient_stores`, created or brought up to the current columns."""
    con.execute(STORE_TABLE_DDL)
    # Only a table from before the rename: one that somehow has both keeps its `shard` column.
    if _has_column(con, "gradient_stores", "part") and not _has_column(con, "gradient_stores", "shard"):
        con.execute(_RENAME_PART)
    for migration in STORE_TABLE_MIGRATIONS:
        con.execute(migration)


def record_diagnostics(con: Any, rows: Sequence[dict[str, Any]]) -> None:
    """Replace the diagnostics of the given stores (``store_id`` plus the table's other columns but ``created_at``)."""
    con.execute(DIAGNOSTICS_DDL)
    for row in rows:
        con.execute("DELETE FROM feature_diagnostics WHERE store_id = ?", [row["store_id"]])
        con.execute(
            "INSERT INTO feature_diagnostics VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [
                row["store_id"],
                row["model"],
                row["kind"],
                row["warmup_run_key"],
                row["epoch"],
                row["part"],
                row["mode"],
                row["dim"],
                row["seed"],
                row["warmup_steps"],
                row["n_rows"],
                row["mean_feature_norm"],
                row["mean_pairwise_cosine"],
                row["saturated_share"],
                row["collapsed"],
            ],
        )


def record_stores(
    con: Any,
    *,
    model: str,
    kind: str,
    warmup_run_key: str,
    epoch: int,
    avg_lr: float,
    stores: Sequence[FeatureStore],
    diagnostics: Sequence[dict[str, Any]],
) -> None:
    """Replace the `gradient_stores` rows of one checkpoint's stores and their diagnostics, in one transaction."""
    ensure_store_table(con)
    frame = pd.DataFrame(
        [
            (
                model,
                kind,
                warmup_run_key,
                epoch,
                avg_lr,
                s.store_id,
                str(s.directory),
                s.manifest["projection"]["mode"],
                s.dim,
                s.manifest["projection"]["seed"],
                len(s),
                pd.Timestamp.now(tz="UTC"),
                s.part,
                len(s.excluded()),
                s.transform,
                s.loss_tokens,
            )
            for s in stores
        ],
        columns=[
            "model",
            "kind",
            "warmup_run_key",
            "epoch",
            "avg_lr",
            "store_id",
            "directory",
            "mode",
            "dim",
            "seed",
            "n_rows",
            "created_at",
            "shard",
            "n_excluded",
            "transform",
            "loss_tokens",
        ],
    )
    con.register("_gradient_store_rows", frame)
    try:
        with transaction(con):
            con.execute("DELETE FROM gradient_stores WHERE store_id IN (SELECT store_id FROM _gradient_store_rows)")
            con.execute("INSERT INTO gradient_stores BY NAME SELECT * FROM _gradient_store_rows")
            record_diagnostics(con, diagnostics)
    finally:
        con.unregister("_gradient_store_rows")


@dataclass(frozen=True)
class FeatureKey:
    """Which recorded features an influence run reads: projection mode, dim and seed, the
    train-feature transform (target features have none) and whose loss the gradients are of."""

    mode: str
    dim: int
    seed: int
    train_transform: str
    loss_tokens: str = LESS_LOSS_TOKENS

    def query_parameters(self) -> list:
        """Parameters of the store queries' `mode = ? AND dim = ? AND seed = ? AND (... transform ...)
        AND coalesce(loss_tokens, ?) = ?` conditions, in that order (NULL reads as LESS's setting)."""
        return [
            self.mode,
            self.dim,
            self.seed,
            LITERAL_LESS_TRANSFORM,
            self.train_transform,
            LESS_LOSS_TOKENS,
            self.loss_tokens,
        ]


def latest_stores(con: Any, model: str, warmup_run_key: str, kind: str, key: FeatureKey) -> pd.DataFrame:
    """Latest store per (epoch, shard) of the given features (epoch, shard, avg_lr, directory); shard is
    '' for unsharded stores. Raises when there is none."""
    ensure_store_table(con)
    frame = con.execute(
        """SELECT epoch, coalesce(shard, '') AS shard, avg_lr, directory FROM gradient_stores
           WHERE model = ? AND warmup_run_key = ? AND kind = ? AND mode = ? AND dim = ? AND seed = ?
             -- train stores of another transform never mix in (NULL: recorded before transforms, LESS's adam)
             AND (kind <> 'train' OR coalesce(transform, ?) = ?)
             AND coalesce(loss_tokens, ?) = ?
           QUALIFY row_number() OVER (PARTITION BY epoch, coalesce(shard, '') ORDER BY created_at DESC) = 1
           ORDER BY epoch, shard""",
        [model, warmup_run_key, kind, *key.query_parameters()],
    ).df()
    if frame.empty:
        transform = f", train transform {key.train_transform}" if kind == "train" else ""
        transform += f", loss tokens {key.loss_tokens}"
        raise ValueError(
            f"no {kind} gradients for model {model!r}, warmup run {warmup_run_key}, mode {key.mode}, dim {key.dim}, "
            f"seed {key.seed}{transform}; materialize {kind}_gradients with the same settings first"
        )
    return frame


def store_dims(con: Any, model: str, kind: str, shard: str | None, warmup_run_key: str) -> list[tuple[str, int]]:
    """(directory, recorded dim) of every store of one shard (None: unsharded) of a warmup run."""
    ensure_store_table(con)
    return con.execute(
        "SELECT directory, dim FROM gradient_stores WHERE model = ? AND kind = ? AND coalesce(shard, '') = ? "
        "AND warmup_run_key = ? ORDER BY directory",
        [model, kind, shard or "", warmup_run_key],
    ).fetchall()


def latest_diagnostics(con: Any, model: str, warmup_run_key: str, key: FeatureKey) -> list[tuple]:
    """Latest diagnostics per (kind, epoch, shard) of one feature setting: (kind, epoch, shard or '',
    warmup_steps, n_rows, mean_feature_norm, mean_pairwise_cosine, collapsed), targets first. Stores of
    another train transform or other loss tokens are left out (diagnostics without a store row are kept)."""
    con.execute(DIAGNOSTICS_DDL)
    ensure_store_table(con)
    return con.execute(
        """SELECT d.kind, d.epoch, coalesce(d.part, '') AS part, d.warmup_steps, d.n_rows, d.mean_feature_norm,
                  d.mean_pairwise_cosine, d.collapsed
           FROM feature_diagnostics d LEFT JOIN gradient_stores s ON s.store_id = d.store_id
           WHERE d.model = ? AND d.warmup_run_key = ? AND d.mode = ? AND d.dim = ? AND d.seed = ?
             AND (s.store_id IS NULL OR (
                 (d.kind <> 'train' OR coalesce(s.transform, ?) = ?) AND coalesce(s.loss_tokens, ?) = ?))
           QUALIFY row_number() OVER (PARTITION BY d.kind, d.epoch, coalesce(d.part, '') ORDER BY d.created_at DESC) = 1
           ORDER BY d.kind DESC, d.epoch, part""",
        [model, warmup_run_key, *key.query_parameters()],
    ).fetchall()


@dataclass(frozen=True)
class InfluenceRecord:
    """One `influence_runs` row: a score matrix and what it was computed from."""

    model: str
    scores_dir: str
    warmup_run_key: str
    mode: str
    dim: int
    seed: int
    n_train: int
    n_val: int
    columns: list[dict[str, str]]  # per score column: task, subtask, val_example_id
    weights: list[float]  # per checkpoint
    pool_version: str
    train_transform: str = LITERAL_LESS_TRANSFORM
    loss_tokens: str = LESS_LOSS_TOKENS
    dropped_directions: int = 0  # the pool's top directions removed before the cosine
    recipe: str | None = None  # the feature recipe the config named
    recipe_overrides: dict[str, Any] | None = None  # field -> {"recipe": its value, "ran": the given one}
    # {"train": [...], "target": [...]}: collapse of the features as scored, per checkpoint
    scored_diagnostics: dict[str, Any] | None = None


def ensure_influence_table(con: Any) -> None:
    con.execute(INFLUENCE_DDL)
    for migration in INFLUENCE_MIGRATIONS:
        con.execute(migration)


def record_influence(con: Any, record: InfluenceRecord) -> None:
    ensure_influence_table(con)
    con.execute(
        "INSERT INTO influence_runs (model, scores_dir, warmup_run_key, mode, dim, seed, n_train, n_val, columns, "
        "weights, pool_version, created_at, train_transform, loss_tokens, dropped_directions, recipe, "
        "recipe_overrides, scored_diagnostics) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?, ?, ?, ?, ?, ?)",
        [
            record.model,
            record.scores_dir,
            record.warmup_run_key,
            record.mode,
            record.dim,
            record.seed,
            record.n_train,
            record.n_val,
            json.dumps(record.columns),
            json.dumps(record.weights),
            record.pool_version,
            record.train_transform,
            record.loss_tokens,
            record.dropped_directions,
            record.recipe,
            None if record.recipe_overrides is None else json.dumps(record.recipe_overrides),
            None if record.scored_diagnostics is None else json.dumps(record.scored_diagnostics),
        ],
    )


def latest_influence(con: Any, model: str) -> dict:
    """The most recent influence run of a model, with its score columns (task, subtask, val id)."""
    ensure_influence_table(con)
    row = con.execute(
        "SELECT scores_dir, columns, n_train, n_val, pool_version, warmup_run_key, mode, dim, seed, "
        "coalesce(train_transform, ?), coalesce(loss_tokens, ?), coalesce(dropped_directions, 0), recipe, "
        "recipe_overrides, scored_diagnostics "
        "FROM influence_runs WHERE model = ? ORDER BY created_at DESC LIMIT 1",
        [LITERAL_LESS_TRANSFORM, LESS_LOSS_TOKENS, model],
    ).fetchone()
    if row is None:
        raise ValueError(f"no influence scores for model {model!r}; materialize influence_scores first")
    return {
        "scores_dir": row[0],
        "columns": json.loads(row[1]),
        "n_train": row[2],
        "n_val": row[3],
        "pool_version": row[4],
        "warmup_run_key": row[5],
        "mode": row[6],
        "dim": row[7],
        "seed": row[8],
        "train_transform": row[9],
        "loss_tokens": row[10],
        "dropped_directions": row[11],
        "recipe": row[12],
        "recipe_overrides": None if row[13] is None else json.loads(row[13]),
        "scored_diagnostics": None if row[14] is None else json.loads(row[14]),
    }
