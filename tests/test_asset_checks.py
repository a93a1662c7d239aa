"""Each data check passes on a good input and fails, naming the problem, on a broken one."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pytest

from selection import checks, selection_store
from selection.data import pool_store
from selection.data.ingest import SourceSpec
from selection.diversity.embeddings import EmbeddingCache
from selection.evaluate.evaluation_store import ensure_evaluation_tables
from selection.influence.datastore import FeatureStore


@pytest.fixture
def con(tmp_path: Path):
    pool = tmp_path / "pool.jsonl"
    records = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(6)]
    records += [records[0], {"prompt": "no completion"}]  # a duplicate and a reject
    pool.write_text("".join(json.dumps(r) + "\n" for r in records))
    with duckdb.connect(str(tmp_path / "lineage.duckdb")) as con:
        pool_store.ingest_sources(con, [SourceSpec(path=pool)])
        yield con


def _select(con, model: str, ids: list[str], budget: int, run_id: str) -> None:
    version = pool_store.latest_pool_version(con)[0]
    selection_store.write_selections(
        con, [selection_store.Selection(model, "less", "all", ids, [1.0] * len(ids), version, budget)], run_id=run_id
    )


@pytest.mark.parametrize(
    "break_it, problem",
    [
        (None, None),
        ("DELETE FROM selections WHERE rank = 2", "2 rows (stored budget 3), requested budget 3"),
        (
            "INSERT INTO selections SELECT * REPLACE (7 AS rank) FROM selections WHERE rank = 0",
            "1 duplicate example ids",
        ),
        ("UPDATE selections SET example_id = 'not-in-the-pool' WHERE rank = 1", "1 ids not in the pool version"),
    ],
)
def test_selection_check(con, break_it: str | None, problem: str | None) -> None:
    ids = pool_store.pool_ids(con)
    _select(con, "model-a", ids[:3], 3, "run-a")
    _select(con, "model-b", ids[:2], 3, "run-b")  # another model's bad selection is not this check's business
    if break_it:
        con.execute(f"{break_it} AND model = 'model-a'" if "WHERE" in break_it else break_it)
    outcome = checks.check_selection(con, "model-a", "less", 3, "run-a")
    assert outcome.passed == (problem is None), outcome.description
    assert problem is None or problem in outcome.description
    assert not checks.check_selection(con, "model-b", "less", 3, "run-b").passed  # 2 rows for budget 3


def test_selection_check_compares_with_the_requested_budget_not_the_rows(con) -> None:
    ids = pool_store.pool_ids(con)
    _select(con, "m", ids[:3], 3, "run")
    assert checks.check_selection(con, "m", "less", 3, "run").passed
    assert "requested budget 4" in checks.check_selection(con, "m", "less", 4, "run").description
    assert "stored no less selection" in checks.check_selection(con, "m", "less", 3, "another-run").description


def _store(tmp_path: Path, rows: np.ndarray, dim: int = 8) -> str:
    store = FeatureStore(
        tmp_path / "store", "model-fp", "run-epoch_1", "train", {"mode": "fast", "dim": dim, "seed": 0}, part="00-of-04"
    )
    store.write_chunk([f"id{i}" for i in range(len(rows))], rows.astype(np.float16))
    return str(store.directory)


def _unit(n: int, dim: int = 8) -> np.ndarray:
    rows = np.random.default_rng(0).normal(size=(n, dim))
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_feature_store_check(tmp_path: Path) -> None:
    good = _store(tmp_path / "good", _unit(5))
    assert checks.check_feature_stores([(good, 8)], "train").passed
    assert "recorded dim 16" in checks.check_feature_stores([(good, 16)], "train").description
    assert "no feature store recorded" in checks.check_feature_stores([], "train").description
    nan = _unit(5)
    nan[1, 3] = np.nan
    assert "1 rows hold NaN" in checks.check_feature_stores([(_store(tmp_path / "nan", nan), 8)], "train").description
    long = _unit(5)
    long[2] *= 1.01  # 1% off: far beyond float16 rounding
    outcome = checks.check_feature_stores([(_store(tmp_path / "long", long), 8)], "train")
    assert "1 rows with L2 norm off 1" in outcome.description
    # A chunk changed on disk after its commit is a failed check naming the file, not a crash.
    np.save(Path(good) / "shard-00000.npy", _unit(5)[::-1].astype(np.float16))
    assert "shard-00000.npy" in checks.check_feature_stores([(good, 8)], "train").description


def test_embedding_check(tmp_path: Path) -> None:
    ids = [f"id{i}" for i in range(5)]
    good = EmbeddingCache(tmp_path / "good", "encoder-fp", "user_turns", 8)
    good.add(ids, _unit(5).astype(np.float32))
    assert checks.check_embeddings(good, ids).passed
    assert "1 pool examples have no embedding" in checks.check_embeddings(good, [*ids, "id9"]).description
    bad = EmbeddingCache(tmp_path / "bad", "encoder-fp", "user_turns", 8)
    bad.add(ids, (2 * _unit(5)).astype(np.float32))
    assert "5 rows with L2 norm off 1" in checks.check_embeddings(bad, ids).description


def test_pool_accounting_check(con) -> None:
    outcome = checks.check_pool_accounting(con)
    assert outcome.passed, outcome.description
    con.execute("DELETE FROM pool_rejects")
    assert "0 rows in pool_rejects, 1 recorded" in checks.check_pool_accounting(con).description
    con.execute("UPDATE pool_sources SET n_read = n_read + 1")
    assert "!= read 9" in checks.check_pool_accounting(con).description


def test_evaluation_check(con) -> None:
    ensure_evaluation_tables(con)

    def scored(run_key: str | None, rows: list[str]) -> None:
        for example_id in rows:
            con.execute(
                "INSERT INTO evaluation_rows (model, run_id, name, run_key, task, example_id) "
                "VALUES ('m', 'run', ?, ?, 't', ?)",
                [run_key or "base", run_key, example_id],
            )

    scored(None, ["a", "b"])
    scored("ft1", ["a", "b"])
    assert checks.check_evaluation(con, "m", "run", ["ft1"]).passed
    assert "checkpoint ft2 was not evaluated" in checks.check_evaluation(con, "m", "run", ["ft1", "ft2"]).description
    scored("ft2", ["a", "c"])
    assert "ft2: 2 test rows differ" in checks.check_evaluation(con, "m", "run", ["ft1", "ft2"]).description
