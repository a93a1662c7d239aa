"""End to end on a tiny random model: pool -> warmup -> gradients -> influence -> selections."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets import ALL_CHECKS, ASSET_MODULES
from assets.partitions import DEFAULT_MODEL
from orchestration.jobs import refresh_steps
from resources import build_resources
from tests.fakes import TinyModelStore

DIM = 64


def _pool_file(path: Path, n: int) -> Path:
    topics = ["add", "sort", "poem", "capital", "translate", "code"]
    lines = [
        {
            "instruction": f"Task {i}: {topics[i % len(topics)]} something number {i * 7}",
            "input": "",
            "output": f"Answer {i} about {topics[i % len(topics)]} " + "x" * (i % 9),
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _targets_file(path: Path) -> Path:
    lines = []
    for task in ("math", "writing"):
        lines += [
            {
                "task": task,
                "subtask": subtask,
                "prompt": f"{task} {subtask} question {i}",
                "completion": f"{task} answer {i}",
            }
            for subtask in ("a", "b")
            for i in range(3)
        ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture
def run_config(tmp_path: Path) -> dict:
    grad = {"dims": [DIM], "mode": "fast", "seed": 0, "shard_size": 7}
    return {
        "ops": {
            "raw_pool": {"config": {"sources": [{"path": str(_pool_file(tmp_path / "pool.jsonl", 30))}]}},
            "target_tasks": {
                "config": {"files": [{"path": str(_targets_file(tmp_path / "targets.jsonl"))}], "n_val": 2}
            },
            "warmup_checkpoints": {"config": {"fraction": 0.4, "epochs": 2, "batch_size": 4, "learning_rate": 1e-3}},
            "train_gradients": {"config": grad},
            "target_gradients": {"config": grad},
            "influence_scores": {"config": {"dim": DIM, "mode": "fast", "seed": 0}},
            **{
                f"{m}_selection": {"config": {"budget": 5}}
                for m in ("less", "bids", "round_robin", "random", "kmq", "rds")
            },
            "clusters": {"config": {"k_candidates": [2, 3, 4]}},
            "finetuned_checkpoints": {"config": {"epochs": 1, "batch_size": 4}},
            "evaluation": {"config": {"max_test_per_task": 3}},
            "kmq_iterative_selection": {"config": {"budget": 6, "n_rounds": 3, "max_new_tokens": 4}},
        }
    }


def materialize_refresh(assets: list, resources: dict, run_config: dict, instance) -> list[dg.ExecuteInProcessResult]:
    """The three refresh jobs of orchestration/jobs.py, each with its share of the run config:
    per model, then one run per (model, shard), then per model."""
    asset_graph = dg.Definitions(assets=assets, resources=resources).resolve_asset_graph()
    results = []
    for _, selection, key in refresh_steps(DEFAULT_MODEL):
        names = {asset_key.to_user_string() for asset_key in selection.resolve(asset_graph)}
        config = {"ops": {name: value for name, value in run_config["ops"].items() if name in names}}
        result = dg.materialize(
            assets, selection=selection, resources=resources, run_config=config, partition_key=key, instance=instance
        )
        assert result.success, (selection, key)
        results.append(result)
    return results


def test_tiny_pipeline_end_to_end(tmp_path: Path, run_config: dict) -> None:
    resources = {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    assets = [*dg.load_assets_from_modules(ASSET_MODULES), *ALL_CHECKS]
    with dg.instance_for_test() as instance:
        first = materialize_refresh(assets, resources, run_config, instance)
        checks = [c for result in first for c in result.get_asset_check_evaluations()]
        assert checks and all(c.passed for c in checks)
        shards = [r.asset_materializations_for_node("train_gradients")[0].metadata for r in first[1:-1]]
        assert sum(m["n_stored"].value + m["n_skipped_no_target"].value for m in shards) == 30
        assert all(m["n_examples"].value < 30 for m in shards)  # each shard holds only its part of the pool
        # A second refresh reuses stored checkpoints and features.
        again = materialize_refresh(assets, resources, run_config, instance)
        for result in again[1:-1]:
            assert result.asset_materializations_for_node("train_gradients")[0].metadata["n_computed"].value == 0
        # The pool grows: influence refuses to score a pool its shards have not seen, names the shards to rerun.
        grown = {
            "ops": {
                "raw_pool": {
                    "config": {
                        "sources": [
                            run_config["ops"]["raw_pool"]["config"]["sources"][0],
                            {"path": str(_pool_file(tmp_path / "more.jsonl", 34))},
                        ]
                    }
                }
            }
        }
        assert dg.materialize(
            assets,
            selection=dg.AssetSelection.assets("raw_pool"),
            resources=resources,
            run_config=grown,
            instance=instance,
        ).success
        stale = dg.materialize(
            assets,
            selection=dg.AssetSelection.assets("influence_scores"),
            resources=resources,
            run_config={"ops": {"influence_scores": run_config["ops"]["influence_scores"]}},
            partition_key=DEFAULT_MODEL,
            instance=instance,
            raise_on_error=False,
        )
        assert not stale.success
        error = next(e for e in stale.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error
        message = error.message + (error.cause.message if error.cause else "")
        assert "4 pool examples have no gradient features yet" in message
        assert "rematerialize train_gradients for shards" in message
    with duckdb.connect(resources["lineage"].db_path) as con:
        by_method = dict(
            con.execute("SELECT method || '/' || target, count(*) FROM selections GROUP BY ALL").fetchall()
        )
        why = con.execute("SELECT count(*), count(DISTINCT val_task) FROM selection_explanations").fetchone()
        lineage_assets = {r[0] for r in con.execute("SELECT DISTINCT asset_key FROM lineage").fetchall()}
        rounds = con.execute(
            "SELECT round, json_array_length(new_example_ids) FROM kmq_rounds ORDER BY round"
        ).fetchall()
        finetuned = dict(
            con.execute(
                "SELECT c.method || '/' || c.target, count(*) FROM checkpoints c JOIN checkpoint_examples e "
                "USING (model, stage, run_key) WHERE c.stage = 'finetune' GROUP BY ALL"
            ).fetchall()
        )
        compared = con.execute("SELECT count(*) FROM comparison").fetchone()[0]
        trained = con.execute("SELECT count(*) FROM checkpoint_examples").fetchone()[0]
        inputs = json.loads(
            con.execute(
                "SELECT inputs FROM lineage WHERE asset_key = 'influence_scores' ORDER BY finished_at LIMIT 1"
            ).fetchone()[0]
        )
    assert by_method == {
        "less/math": 5,
        "less/writing": 5,
        "less/all": 5,
        "bids/all": 5,
        "round_robin/all": 5,
        "random/all": 5,
        "kmq/all": 5,
        "kmq_iterative/all": 6,
        "rds/math": 5,
        "rds/writing": 5,
        "rds/all": 5,
        "full/all": 30,
    }
    assert why[0] > 0 and why[1] == 2
    assert {"raw_pool", "warmup_checkpoints", "train_gradients", "influence_scores", "bids_selection"} <= lineage_assets
    assert rounds == [(0, 2), (1, 2), (2, 2)]
    assert finetuned == {
        "less/all": 5,
        "bids/all": 5,
        "round_robin/all": 5,
        "random/all": 5,
        "kmq/all": 5,
        "kmq_iterative/all": 6,
        "rds/all": 5,
        "full/all": 30,
    }
    assert compared == 9 * 2  # base + eight finetuned checkpoints, two tasks
    assert trained == 12 + 66  # 40% of 30 warmup examples, and the finetuned selections
    assert inputs["train_gradients"]["data_version"] is not None
