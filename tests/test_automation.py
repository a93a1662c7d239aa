"""Declarative automation of the tiny code location: what a refresh requests, and what it waits for."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import pytest

from assets import ALL_CHECKS
from assets.partitions import DEFAULT_MODEL, model_shard_keys
from resources import build_resources
from selection.registry import METHODS
from tests.fakes import TinyModelStore, run_check
from tests.tiny_definitions import ASSETS

SHARDS = {str(key) for key in model_shard_keys(DEFAULT_MODEL)}


@pytest.fixture
def defs(tmp_path: Path) -> dg.Definitions:
    resources = {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    return dg.Definitions(assets=ASSETS, asset_checks=ALL_CHECKS, resources=resources)


def requested(result) -> dict[str, set]:
    return {
        key.to_user_string(): result.get_requested_partitions(key)
        for key in {r.key for r in result.results}
        if result.get_num_requested(key)
    }


def _materialize(defs: dg.Definitions, instance, asset: str, config: dict) -> None:
    assert dg.materialize(
        [*ASSETS, *ALL_CHECKS],
        selection=dg.AssetSelection.assets(asset),
        resources=defs.resources,
        run_config={"ops": {asset: {"config": config}}},
        instance=instance,
    ).success


def test_a_new_pool_flows_through_the_graph(defs: dg.Definitions, tmp_path: Path) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) + "\n" for i in range(12))
    )
    targets = tmp_path / "targets.jsonl"
    targets.write_text(
        "".join(json.dumps({"task": "t", "prompt": f"target {i}", "completion": f"a {i}"}) + "\n" for i in range(3))
    )
    with dg.instance_for_test() as instance:
        cursor = None

        def tick() -> dict[str, set]:
            nonlocal cursor
            result = dg.evaluate_automation_conditions(defs, instance, cursor=cursor)
            cursor = result.cursor
            return requested(result)

        assert tick() == {}  # nothing to start from, and no weekly tick yet
        _materialize(defs, instance, "raw_pool", {"sources": [{"path": str(pool)}]})
        # What reads the pool alone and can run in one run with its parents.
        assert tick() == {
            "embeddings": {None},
            "clusters": {None},
            "warmup_checkpoints": {DEFAULT_MODEL},
            "full_selection": {DEFAULT_MODEL},
        }
        assert tick() == {}  # nothing changed since
        _materialize(defs, instance, "target_tasks", {"files": [{"path": str(targets)}], "n_val": 2})
        assert tick() == {"rds_selection": {DEFAULT_MODEL}}  # target_gradients waits for the warmup
        # The runs requested above finish: the next step of the refresh is requested.
        for asset in ("embeddings", "clusters"):
            _report(instance, asset)
        _report(instance, "warmup_checkpoints", DEFAULT_MODEL)
        assert tick() == {
            "train_gradients": SHARDS,
            "target_gradients": {DEFAULT_MODEL},
            "kmq_selection": {DEFAULT_MODEL},
            "kmq_iterative_selection": {DEFAULT_MODEL},
        }
        _report(instance, "target_gradients", DEFAULT_MODEL)
        for shard in SHARDS:
            _report(instance, "train_gradients", shard)
        scored = ("less_selection", "bids_selection", "round_robin_selection", "random_selection")
        assert tick() == {name: {DEFAULT_MODEL} for name in ("influence_scores", *scored)}  # one run
        _report(instance, "influence_scores", DEFAULT_MODEL)
        for method in METHODS:
            instance.report_runless_asset_event(
                dg.AssetMaterialization(method.asset, partition=DEFAULT_MODEL, metadata={"budget": 5})
            )
        downstream = {name: {DEFAULT_MODEL} for name in ("finetuned_checkpoints", "evaluation", "comparison_report")}
        before_check = cursor
        assert tick() == downstream
        # The LESS selection's blocking check fails (this materialization stored no rows): nothing that
        # reads that partition is requested.
        assert not run_check(defs, instance, "less_selection", "less_selection_is_valid", DEFAULT_MODEL).passed
        cursor = before_check
        assert tick() == {}


def test_the_weekly_tick_refreshes_the_roots_and_what_runs_with_them(defs: dg.Definitions) -> None:
    saturday = datetime(2026, 3, 7, 12, tzinfo=UTC)
    sunday = datetime(2026, 3, 8, 3, 1, tzinfo=UTC)  # just past WEEKLY_REFRESH_CRON (Sunday 03:00 UTC)
    with dg.instance_for_test() as instance:
        first = dg.evaluate_automation_conditions(defs, instance, evaluation_time=saturday)
        assert first.total_requested == 0
        weekly = dg.evaluate_automation_conditions(defs, instance, evaluation_time=sunday, cursor=first.cursor)
        # Unpartitioned like the roots, so in the same run; the per-model assets follow on later ticks.
        assert requested(weekly) == {
            "raw_pool": {None},
            "target_tasks": {None},
            "embeddings": {None},
            "clusters": {None},
        }
        later = dg.evaluate_automation_conditions(
            defs, instance, evaluation_time=sunday + timedelta(hours=1), cursor=weekly.cursor
        )
        assert later.total_requested == 0


def _report(instance, asset: str, partition: str | None = None) -> None:
    """A materialization as if a run outside this test had made it (its checks did not run: not failed)."""
    instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))


def test_influence_waits_until_every_shard_is_newer_than_the_warmup(defs: dg.Definitions) -> None:
    influence = dg.AssetSelection.assets("influence_scores")
    shards = sorted(SHARDS)
    with dg.instance_for_test() as instance:
        cursor = None

        def tick() -> set:
            nonlocal cursor
            result = dg.evaluate_automation_conditions(defs, instance, asset_selection=influence, cursor=cursor)
            cursor = result.cursor
            return result.get_requested_partitions(dg.AssetKey("influence_scores"))

        assert tick() == set()
        for asset, partition in [
            ("raw_pool", None),
            ("target_tasks", None),
            ("warmup_checkpoints", DEFAULT_MODEL),
            ("target_gradients", DEFAULT_MODEL),
        ]:
            _report(instance, asset, partition)
        for _ in range(2):  # a first refresh, then a new warmup that makes every shard stale
            for shard in shards[:-1]:
                _report(instance, "train_gradients", shard)
                assert tick() == set(), shard  # another shard is missing or older than the warmup
            _report(instance, "train_gradients", shards[-1])
            assert tick() == {DEFAULT_MODEL}
            assert tick() == set()  # nothing changed since
            _report(instance, "warmup_checkpoints", DEFAULT_MODEL)
