"""DuckDB lineage store: one row per record with the stable columns, and concurrent writers never fail on the lock."""

from __future__ import annotations

import json
import multiprocessing as mp
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pytest

from resources.lineage import LineageRecord, LineageStore, connect_with_retry, is_lock_error

# Columns that users' queries and the summary read: the lineage table may gain columns but keeps these.
STABLE_COLUMNS = {
    "run_id",
    "asset_key",
    "partition_key",
    "code_version",
    "started_at",
    "finished_at",
    "inputs",
    "outputs",
    "metrics",
}


def _record(run_id: str, i: int) -> LineageRecord:
    return LineageRecord(
        run_id=run_id,
        asset_key="raw_pool",
        partition_key=None,
        code_version="abc",
        started_at=datetime.now(UTC),
        inputs={"upstream": i},
        outputs={"file": {"sha256": "0" * 64}},
        metrics={"i": i},
    )


def _writer(db_path: str, worker: int, n_rows: int, barrier) -> None:
    store = LineageStore(db_path=db_path, lock_timeout_s=120)
    barrier.wait()
    for i in range(n_rows):
        # Hold the lock a little while writing, as a real asset would.
        with store.connect() as con:
            con.execute("CREATE TABLE IF NOT EXISTS scratch (w INT, i INT)")
            con.execute("INSERT INTO scratch SELECT ?, ? FROM range(2000)", [worker, i])
        store.record(_record(f"run-{worker}", i))


def test_lineage_row_has_stable_columns(tmp_path: Path) -> None:
    store = LineageStore(db_path=str(tmp_path / "lineage.duckdb"))
    store.record(_record("r1", 7))
    with store.connect() as con:
        columns = {row[0] for row in con.execute("DESCRIBE lineage").fetchall()}
        inputs, metrics = con.execute("SELECT inputs, metrics FROM lineage").fetchone()
    assert columns >= STABLE_COLUMNS
    assert json.loads(inputs) == {"upstream": 7}
    assert json.loads(metrics) == {"i": 7}


def test_concurrent_writer_processes_all_succeed(tmp_path: Path) -> None:
    db_path = str(tmp_path / "lineage.duckdb")
    n_workers, n_rows = 4, 6
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(n_workers)
    workers = [ctx.Process(target=_writer, args=(db_path, w, n_rows, barrier)) for w in range(n_workers)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=180)
    assert [w.exitcode for w in workers] == [0] * n_workers
    with duckdb.connect(db_path) as con:
        per_run = dict(con.execute("SELECT run_id, count(*) FROM lineage GROUP BY run_id").fetchall())
    assert per_run == {f"run-{w}": n_rows for w in range(n_workers)}


def test_lock_held_by_another_process_times_out_with_the_lock_error(tmp_path: Path) -> None:
    db_path = tmp_path / "held.duckdb"
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(db_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(duckdb.Error) as raised, connect_with_retry(db_path, timeout_s=0.5):
            pass
        assert is_lock_error(raised.value)
    finally:
        release.set()
        holder.join(timeout=60)


def _hold_lock(db_path: str, ready, release) -> None:
    con = duckdb.connect(db_path)
    ready.set()
    release.wait(60)
    con.close()
