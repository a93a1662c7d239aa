"""raw_pool / target_tasks assets through Dagster, with resources injected per test."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets.pool import raw_pool, target_tasks
from resources import build_resources


@pytest.fixture
def resources(tmp_path: Path) -> dict:
    return build_resources(home=str(tmp_path / "home"), env="ci")


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _materialize(assets, resources, run_config=None, instance=None) -> dg.ExecuteInProcessResult:
    return dg.materialize(assets, resources=resources, run_config=run_config, instance=instance)


def test_raw_pool_accounts_for_every_record_and_writes_lineage(tmp_path: Path, resources: dict) -> None:
    source = _write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"instruction": "Say hi", "input": "", "output": "hi"},
            {"prompt": "Say hi", "completion": "hi"},  # same conversation -> duplicate
            "{not json",
            {"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]},
            {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        ],
    )
    config = {"ops": {"raw_pool": {"config": {"sources": [{"path": str(source)}]}}}}
    result = _materialize([raw_pool], resources, config)
    assert result.success
    metadata = result.asset_materializations_for_node("raw_pool")[0].metadata
    assert metadata["n_read"].value == 5
    assert metadata["n_total"].value == 2
    assert metadata["n_rejected"].value == 2
    assert metadata["n_duplicates"].value == 1
    with duckdb.connect(resources["lineage"].db_path) as con:
        (asset_key, outputs, metrics) = con.execute("SELECT asset_key, outputs, metrics FROM lineage").fetchone()
        rejects = con.execute("SELECT line_no, reason FROM pool_rejects ORDER BY line_no").fetchall()
    assert asset_key == "raw_pool"
    assert json.loads(metrics)["n_total"] == 2
    assert "table:pool" in json.loads(outputs)
    assert [line for line, _ in rejects] == [3, 4]
    assert all(reason for _, reason in rejects)


def test_refresh_adds_rows_and_skips_unchanged_sources(tmp_path: Path, resources: dict) -> None:
    first = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": "a", "completion": "b"}])
    second = _write_jsonl(
        tmp_path / "b.jsonl", [{"prompt": "c", "completion": "d"}, {"prompt": "a", "completion": "b"}]
    )
    one = {"ops": {"raw_pool": {"config": {"sources": [{"path": str(first)}]}}}}
    both = {"ops": {"raw_pool": {"config": {"sources": [{"path": str(first)}, {"path": str(second)}]}}}}
    with dg.instance_for_test() as instance:
        v1 = _materialize([raw_pool], resources, one, instance).asset_materializations_for_node("raw_pool")[0]
        v2 = _materialize([raw_pool], resources, both, instance).asset_materializations_for_node("raw_pool")[0]
    assert v1.metadata["n_total"].value == 1
    assert v2.metadata["n_new"].value == 1
    assert v2.metadata["n_total"].value == 2
    assert v2.metadata["n_duplicates"].value == 1  # b.jsonl repeats a.jsonl's conversation
    assert v1.metadata["pool_version"].value != v2.metadata["pool_version"].value


def test_builtin_pool_and_targets_never_overlap(resources: dict) -> None:
    result = _materialize([raw_pool, target_tasks], resources)
    assert result.success
    with duckdb.connect(resources["lineage"].db_path) as con:
        sources = dict(con.execute("SELECT source, count(*) FROM pool GROUP BY source").fetchall())
        overlap = con.execute("SELECT count(*) FROM targets JOIN pool USING (example_id)").fetchone()[0]
        splits = dict(con.execute("SELECT split, count(*) FROM targets GROUP BY split").fetchall())
        lineage_assets = {r[0] for r in con.execute("SELECT asset_key FROM lineage").fetchall()}
    assert set(sources) == {"alpaca_eval", "arena_hard", "mmlu", "humaneval", "champ"}
    assert overlap == 0
    assert splits["val"] > 0 and splits["test"] > 0
    assert lineage_assets == {"raw_pool", "target_tasks"}


def test_bad_source_path_fails_with_a_clear_error(tmp_path: Path, resources: dict) -> None:
    config = {"ops": {"raw_pool": {"config": {"sources": [{"path": str(tmp_path / "missing.jsonl")}]}}}}
    with pytest.raises(Exception, match="missing.jsonl"):
        _materialize([raw_pool], resources, config)
