"""The evaluation tables: their migrations, and the comparison table's columns added only as plain identifiers."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from selection.evaluate import evaluation_store


def test_evaluation_runs_made_before_seeds_gain_the_seed_column() -> None:
    with duckdb.connect() as con:
        con.execute(
            "CREATE TABLE evaluation_runs (model VARCHAR, name VARCHAR, stage VARCHAR, run_key VARCHAR, "
            "method VARCHAR, target VARCHAR, budget INTEGER, result_path VARCHAR, summary JSON, "
            "run_id VARCHAR, created_at TIMESTAMPTZ)"
        )
        con.execute(
            "INSERT INTO evaluation_runs (model, name, run_id, result_path, created_at) "
            "VALUES ('m', 'base', 'r', 'old.json', now())"
        )
        runs = evaluation_store.latest_evaluation(con, "m")
    assert runs == [evaluation_store.StoredResult("base", None, "old.json")]


def test_comparison_gains_new_columns_and_replaces_one_model() -> None:
    with duckdb.connect() as con:
        evaluation_store.replace_comparison(con, "a", pd.DataFrame({"method": ["less"], "mean_nll": [1.0]}))
        evaluation_store.replace_comparison(con, "b", pd.DataFrame({"method": ["less"], "mean_nll": [2.0]}))
        evaluation_store.replace_comparison(
            con, "a", pd.DataFrame({"method": ["bids"], "mean_nll": [3.0], "ci_low": [0.5]})
        )
        rows = con.execute("SELECT model, method, mean_nll, ci_low FROM comparison ORDER BY model").fetchall()
    assert rows == [("a", "bids", 3.0, 0.5), ("b", "less", 2.0, None)]  # an older row reads NULL


def test_comparison_refuses_a_column_that_is_not_a_plain_identifier() -> None:
    with duckdb.connect() as con:
        evaluation_store.replace_comparison(con, "a", pd.DataFrame({"method": ["less"]}))
        bad = pd.DataFrame({"method": ["less"], 'x" INTEGER; DROP TABLE comparison; --': [1]})
        with pytest.raises(ValueError, match="not a plain SQL identifier"):
            evaluation_store.replace_comparison(con, "a", bad)
        assert con.execute("SELECT model, method FROM comparison").fetchall() == [("a", "less")]
