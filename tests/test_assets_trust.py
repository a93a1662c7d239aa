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
        assert less["scores_informative"].value is True and "none of" in less["scores_informative_reason"].value
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
