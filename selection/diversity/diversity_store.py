"""DuckDB tables of the diversity stage: `embedding_runs`, `clusters`, `quality_scores`, `kmq_rounds`.

Takes an open connection (the caller owns locking and retries). Each function creates the
table it touches; replacing writes (`clusters` of a pool version, `kmq_rounds` of a model and
budget) happen in one transaction, so a failure never leaves half a table.

- ``embedding_runs``: one row per embeddings materialization; the latest names the cache to read.
- ``clusters``: the cluster of every example of a pool version.
- ``quality_scores``: a scorer's score per example, keyed by the scorer's fingerprint (NULL:
  unscorable); a cache shared by every kMQ run with that scorer.
- ``kmq_rounds``: iterative kMQ's rounds (weights, feedback) of the latest run per model and budget.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import duckdb
import numpy as np
import pandas as pd

from selection.common.db import transaction

EMBEDDING_RUNS_DDL = """CREATE TABLE IF NOT EXISTS embedding_runs (
    pool_version VARCHAR, cache_dir VARCHAR, encoder_fingerprint VARCHAR, mode VARCHAR, dim INTEGER, n_rows INTEGER,
    created_at TIMESTAMPTZ)"""
CLUSTERS_DDL = """CREATE TABLE IF NOT EXISTS clusters (
    pool_version VARCHAR, encoder_fingerprint VARCHAR, k INTEGER, example_id VARCHAR, cluster INTEGER)"""
QUALITY_DDL = """CREATE TABLE IF NOT EXISTS quality_scores (
    scorer_fingerprint VARCHAR, example_id VARCHAR, score DOUBLE, scorer JSON)"""
ROUNDS_DDL = """CREATE TABLE IF NOT EXISTS kmq_rounds (
    model VARCHAR, budget INTEGER, round INTEGER, weights JSON, cluster_scores JSON, updated_weights JSON,
    new_example_ids JSON, feedback JSON, run_id VARCHAR, created_at TIMESTAMPTZ)"""


# ------------------------------------------------------------------ embedding_runs


class EmbeddingRun(NamedTuple):
    """Where the latest embeddings are cached and what made them."""

    cache_dir: str
    encoder_fingerprint: str
    mode: str
    dim: int


def record_embedding_run(con: duckdb.DuckDBPyConnection, pool_version: str, run: EmbeddingRun, n_rows: int) -> None:
    con.execute(EMBEDDING_RUNS_DDL)
    con.execute(
        "INSERT INTO embedding_runs VALUES (?, ?, ?, ?, ?, ?, now())",
        [pool_version, run.cache_dir, run.encoder_fingerprint, run.mode, run.dim, n_rows],
    )


def latest_embeddings(con: duckdb.DuckDBPyConnection) -> EmbeddingRun:
    con.execute(EMBEDDING_RUNS_DDL)
    row = con.execute(
        "SELECT cache_dir, encoder_fingerprint, mode, dim FROM embedding_runs ORDER BY created_at DESC LIMIT 1"
    ).fetchone()
    if row is None:
        raise ValueError("no embeddings stored; materialize embeddings first")
    return EmbeddingRun(*row)


# ------------------------------------------------------------------ clusters


def replace_clusters(
    con: duckdb.DuckDBPyConnection,
    pool_version: str,
    encoder_fingerprint: str,
    k: int,
    example_ids: Sequence[str],
    labels: np.ndarray,
) -> None:
    """The clusters of ``pool_version``, replacing any stored for it."""
    frame = pd.DataFrame(
        {
            "pool_version": pool_version,
            "encoder_fingerprint": encoder_fingerprint,
            "k": k,
            "example_id": list(example_ids),
            "cluster": np.asarray(labels).astype(int),
        }
    )
    con.execute(CLUSTERS_DDL)
    con.register("_incoming_clusters", frame)
    try:
        with transaction(con):
            con.execute("DELETE FROM clusters WHERE pool_version = ?", [pool_version])
            con.execute("INSERT INTO clusters SELECT * FROM _incoming_clusters")
    finally:
        con.unregister("_incoming_clusters")


def cluster_labels(con: duckdb.DuckDBPyConnection, pool_version: str) -> dict[str, int]:
    """Cluster by example id for ``pool_version`` (empty when it was never clustered)."""
    con.execute(CLUSTERS_DDL)
    return dict(
        con.execute("SELECT example_id, cluster FROM clusters WHERE pool_version = ?", [pool_version]).fetchall()
    )


# ------------------------------------------------------------------ quality_scores


def quality_scores(con: duckdb.DuckDBPyConnection, scorer_fingerprint: str) -> dict[str, float | None]:
    """Every stored score of one scorer by example id (None: the scorer could not score it)."""
    con.execute(QUALITY_DDL)
    return dict(
        con.execute(
            "SELECT example_id, score FROM quality_scores WHERE scorer_fingerprint = ?", [scorer_fingerprint]
        ).fetchall()
    )


def add_quality_scores(
    con: duckdb.DuckDBPyConnection,
    scorer_fingerprint: str,
    example_ids: Sequence[str],
    scores: np.ndarray,
    scorer_description: dict[str, Any],
) -> None:
    """Append one scorer's scores (NaN is stored as NULL)."""
    frame = pd.DataFrame(
        {
            "scorer_fingerprint": scorer_fingerprint,
            "example_id": list(example_ids),
            "score": scores,
            "scorer": json.dumps(scorer_description, default=str),
        }
    )
    con.execute(QUALITY_DDL)
    con.register("_incoming_scores", frame)
    try:
        con.execute("INSERT INTO quality_scores SELECT * FROM _incoming_scores")
    finally:
        con.unregister("_incoming_scores")


# ------------------------------------------------------------------ kmq_rounds


@dataclass(frozen=True)
class KmqRoundRow:
    """One iterative kMQ round, JSON-ready (None where a value was not computed)."""

    round: int
    weights: list[float]
    cluster_scores: list[float | None] | None
    updated_weights: list[float] | None
    new_example_ids: list[str]
    feedback: dict[str, Any] | None


def replace_kmq_rounds(
    con: duckdb.DuckDBPyConnection, model: str, budget: int, rows: Sequence[KmqRoundRow], run_id: str
) -> None:
    """The rounds of one model and budget, replacing the previous run's."""
    con.execute(ROUNDS_DDL)
    with transaction(con):
        con.execute("DELETE FROM kmq_rounds WHERE model = ? AND budget = ?", [model, budget])
        for row in rows:
            con.execute(
                "INSERT INTO kmq_rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                [
                    model,
                    budget,
                    row.round,
                    json.dumps(row.weights),
                    json.dumps(row.cluster_scores),
                    json.dumps(row.updated_weights),
                    json.dumps(row.new_example_ids),
                    json.dumps(row.feedback, default=str),
                    run_id,
                ],
            )
