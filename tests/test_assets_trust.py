"""Gradient and selection assets report truncation per source and whether their features are informative."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import dagster as dg

from assets import ALL_CHECKS, ASSET_MODULES
from assets.partitions import DEFAULT_MODEL, model_shard_keys
from resources import build_resources
from selection.influence import diagnostics
from tests.fakes import TinyModelStore

DIM = 32
GRADIENTS = {"dims": [DIM], "mode": "fast", "seed": 0, "shard_size": 8}


def _files(tmp_path: Path) -> tuple[Path, Path]:
    pool = tmp_path / "pool.jsonl"
    # Every fourth instruction is far longer than the tiny model's max_length (96 tokens).
    pool.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": f"Task {i}: " + ("explain " * 40 if i % 4 == 0 else "add"),
                    "input": "",
                    "output": f"Answer {i} " + "x" * (i % 7),
                }
            )
            + "\n"
            for i in range(30)
        )
    )
    targets = tmp_path / "targets.jsonl"
    targets.write_text(
        "".join(
            json.dumps(
                {
                    "task": task,
                    "subtask": "a",
                    "prompt": f"{task} question {i} " + ("why " * 60 if i == 0 else ""),
                    "completion": f"{task} answer {i}",
                }
            )
            + "\n"
            for task in ("math", "writing")
            for i in range(2)
        )
    )
    return pool, targets


def _metadata(result: dg.ExecuteInProcessResult, node: str) -> dict:
    return result.asset_materializations_for_node(node)[0].metadata


def test_truncation_tables_feature_diagnostics_and_uninformative_scores(tmp_path: Path, monkeypatch) -> None:
    pool, targets = _files(tmp_path)
    resources = {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    assets = [*dg.load_assets_from_modules(ASSET_MODULES), *ALL_CHECKS]
    ops = {
        "raw_pool": {"config": {"sources": [{"path": str(pool)}]}},
        "target_tasks": {"config": {"files": [{"path": str(targets)}], "n_val": 2}},
        "warmup_checkpoints": {"config": {"fraction": 0.4, "epochs": 2, "batch_size": 4, "learning_rate": 1e-3}},
        "train_gradients": {"config": GRADIENTS},
        "target_gradients": {"config": GRADIENTS},
        "influence_scores": {"config": {"dim": DIM, "mode": "fast", "seed": 0}},
        "less_selection": {"config": {"budget": 4}},
        "random_selection": {"config": {"budget": 4}},
    }

    def run(names: tuple[str, ...], key: str) -> dg.ExecuteInProcessResult:
        config = {"ops": {name: ops[name] for name in names}}
        result = dg.materialize(
            assets,
            selection=dg.AssetSelection.assets(*names),
            resources=resources,
            run_config=config,
            partition_key=key,
            instance=instance,
        )
        assert result.success
        return result

    with dg.instance_for_test() as instance:
        warmup = run(("raw_pool", "target_tasks", "warmup_checkpoints", "target_gradients"), DEFAULT_MODEL)
        assert (
            "| source | examples | truncated | prompt_truncated |"
            in _metadata(warmup, "warmup_checkpoints")["truncation"].value
        )
        target = _metadata(warmup, "target_gradients")
        # The long val prompts are cut before their answers: no val row is lost to length.
        assert target["n_skipped_no_target"].value == 0 and target["n_stored"].value == 4
        assert target["truncation"].value.splitlines()[2:] == [
            "| math | 2 | 1 | 1 | 0 | 0 |",
            "| writing | 2 | 1 | 1 | 0 | 0 |",
        ]
        assert "| epoch | dim | warmup_steps |" in target["feature_diagnostics"].value
        assert target["features_collapsed"].value is False
        shards = [
            _metadata(run(("train_gradients",), str(key)), "train_gradients") for key in model_shard_keys(DEFAULT_MODEL)
        ]
        assert sum(m["n_skipped_no_target"].value for m in shards) == 0
        prompt_cut = sum(int(line.split("|")[4]) for m in shards for line in m["truncation"].value.splitlines()[2:])
        assert prompt_cut == 8  # the 8 long instructions, all still stored
        # warmup: 12 examples, batch 4 -> 3 steps per epoch.
        assert "| 1 | 32 | 3 |" in shards[0]["feature_diagnostics"].value
        selected = run(("influence_scores", "less_selection", "random_selection"), DEFAULT_MODEL)
        less = _metadata(selected, "less_selection")
        # Shards of 8 rows are judged (4 target rows are not): the tiny model's train features collapse as
        # stored, and are not collapsed as scored, with the pool's common directions removed.
        assert less["scores_informative"].value is True
        assert "train features as scored (after removing" in less["scores_informative_reason"].value
        assert less["train_features_collapsed"].value is False and less["target_features_collapsed"].value is False
        # The sparse projection differs from LESS's dense one: the gradients and the picks say so, with the figures.
        assert less["feature_recipe"].value["projection_mode"] == "fast"
        assert "sparse sign" in less["feature_recipe"].value["projection_mode_why"]
        assert "0.92 vs 0.90" in shards[0]["mode_why"].value
        assert "scores_informative" not in _metadata(selected, "random_selection")

        # Features judged collapsed (threshold lowered so the tiny shards trip it): flagged at the source and
        # in the selections that use them, with the reason.
        monkeypatch.setattr(diagnostics, "COLLAPSE_MEAN_NORM", -1.0)
        monkeypatch.setattr(diagnostics, "MIN_ROWS_TO_JUDGE", 1)
        shard = run(("train_gradients",), str(model_shard_keys(DEFAULT_MODEL)[1]))
        flagged = _metadata(shard, "train_gradients")
        assert flagged["features_collapsed"].value is True and flagged["n_computed"].value == 0
        warnings = [entry.user_message for entry in instance.all_logs(shard.run_id) if entry.level == logging.WARNING]
        assert any("collapsed onto one direction" in w and "warmup optimizer steps" in w for w in warnings)
        # The default scores have the pool's common directions removed: the collapse is named, not held against them.
        less = _metadata(run(("less_selection",), DEFAULT_MODEL), "less_selection")
        assert less["scores_informative"].value is True
        assert "collapsed onto one direction" in less["scores_informative_reason"].value
        removed = less["feature_recipe"].value["dropped_directions"]
        assert int(removed) > 0 and f"top {removed} directions" in less["scores_informative_reason"].value
        # LESS's plain cosine over the same features is ranked by the collapsed direction.
        ops["influence_scores"]["config"]["dropped_directions"] = 0
        less = _metadata(run(("influence_scores", "less_selection"), DEFAULT_MODEL), "less_selection")
        assert less["scores_informative"].value is False
        assert less["feature_recipe"].value["dropped_directions_why"] == "as in LESS"
        reason = less["scores_informative_reason"].value
        assert "collapsed onto one direction" in reason and "train features of epoch" in reason
        assert "warmup optimizer steps" in reason


def test_less_paper_recipe_runs_lesss_settings_and_records_them(tmp_path: Path) -> None:
    import duckdb

    pool, targets = _files(tmp_path)
    resources = {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    assets = [*dg.load_assets_from_modules(ASSET_MODULES), *ALL_CHECKS]
    gradients = {"dims": [DIM], "seed": 0, "shard_size": 8, "recipe": "less-paper"}
    ops = {
        "raw_pool": {"config": {"sources": [{"path": str(pool)}]}},
        "target_tasks": {"config": {"files": [{"path": str(targets)}], "n_val": 2}},
        "warmup_checkpoints": {"config": {"fraction": 0.4, "epochs": 1, "batch_size": 4, "learning_rate": 1e-3}},
        "train_gradients": {"config": gradients},
        "target_gradients": {"config": gradients},
        "influence_scores": {"config": {"dim": DIM, "seed": 0, "recipe": "less-paper"}},
        "less_selection": {"config": {"budget": 4}},
    }
    less_settings = {"loss_tokens": "response", "train_transform": "adam", "mode": "exact", "dropped_directions": 0}

    def run(names: tuple[str, ...], key: str) -> dg.ExecuteInProcessResult:
        result = dg.materialize(
            assets,
            selection=dg.AssetSelection.assets(*names),
            resources=resources,
            run_config={"ops": {name: ops[name] for name in names}},
            partition_key=key,
            instance=instance,
        )
        assert result.success
        return result

    with dg.instance_for_test() as instance:
        target = _metadata(
            run(("raw_pool", "target_tasks", "warmup_checkpoints", "target_gradients"), DEFAULT_MODEL),
            "target_gradients",
        )
        assert target["recipe"].value == "less-paper" and target["mode"].value == "exact"
        assert target["loss_tokens"].value == "response" and target["recipe_overrides"].value == {}
        assert "all four settings are LESS's own" in target["recipe_why"].value
        for key in model_shard_keys(DEFAULT_MODEL):
            shard = _metadata(run(("train_gradients",), str(key)), "train_gradients")
            assert shard["transform"].value == "adam" and shard["transform_why"].value == "as in LESS"
        selected = run(("influence_scores", "less_selection"), DEFAULT_MODEL)
        scored = _metadata(selected, "influence_scores")
        recipe = _metadata(selected, "less_selection")["feature_recipe"].value
        assert recipe["recipe"] == "less-paper" and recipe["recipe_overrides"] == {}
        assert {k: recipe[k if k != "mode" else "projection_mode"] for k in less_settings} == {
            k: str(v) for k, v in less_settings.items()
        }
        assert "target_features_collapsed" in scored and "train_collapse" in scored
        with duckdb.connect(resources["lineage"].db_path, read_only=True) as con:
            metrics = {
                asset: json.loads(m)
                for asset, m in con.execute(
                    "SELECT asset_key, metrics FROM lineage WHERE asset_key IN "
                    "('influence_scores', 'target_gradients', 'train_gradients') ORDER BY finished_at"
                ).fetchall()
            }
            stores = set(con.execute("SELECT kind, mode, transform, loss_tokens FROM gradient_stores").fetchall())
            run_row = con.execute(
                "SELECT recipe, train_transform, loss_tokens, mode, dropped_directions FROM influence_runs"
            ).fetchall()
        for asset in ("influence_scores", "target_gradients", "train_gradients"):
            assert metrics[asset]["recipe"] == "less-paper" and metrics[asset]["recipe_overrides"] == {}
            assert metrics[asset]["recipe_settings"] == less_settings
        assert "target_collapse" in metrics["influence_scores"]
        assert stores == {("target", "exact", None, "response"), ("train", "exact", "adam", "response")}
        assert run_row == [("less-paper", "adam", "response", "exact", 0)]

        # A single field wins over the recipe, and the override is recorded.
        ops["influence_scores"]["config"]["dropped_directions"] = 4
        scored = _metadata(run(("influence_scores",), DEFAULT_MODEL), "influence_scores")
        assert scored["recipe"].value == "less-paper" and scored["dropped_directions"].value == 4
        assert scored["recipe_overrides"].value == {"dropped_directions": {"recipe": 0, "ran": 4}}
        assert "dropped_directions" in scored["recipe_why"].value
