"""Gradient tables written by the code before shards existed still work after an upgrade; stores of
different train-feature transforms never mix."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pandas as pd
import pytest

from assets import ALL_CHECKS, ASSET_MODULES
from assets.gradients import GradientConfig
from assets.influence import InfluenceConfig
from assets.partitions import DEFAULT_MODEL, model_shard_keys, shard_partitions
from resources import build_resources
from selection.influence.influence_store import (
    FeatureKey,
    InfluenceRecord,
    ensure_store_table,
    latest_influence,
    latest_stores,
    record_influence,
)
from selection.influence.projection import DEFAULT_DIM
from selection.influence.scores import train_shard_directories
from tests.fakes import TinyModelStore


def _key(
    train_transform: str = "adam", dim: int = DEFAULT_DIM, mode: str = "exact", loss_tokens: str = "response"
) -> FeatureKey:
    return FeatureKey(mode=mode, dim=dim, seed=0, train_transform=train_transform, loss_tokens=loss_tokens)


def test_old_gradient_stores_table_is_migrated_and_unsharded_train_rows_are_not_used() -> None:
    con = duckdb.connect()
    con.execute(  # as created before shards: no `part`, no `n_excluded`
        "CREATE TABLE gradient_stores (model VARCHAR, kind VARCHAR, warmup_run_key VARCHAR, epoch INTEGER, "
        "avg_lr DOUBLE, store_id VARCHAR, directory VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT, n_rows INTEGER, "
        "created_at TIMESTAMPTZ)"
    )
    con.execute(
        "INSERT INTO gradient_stores VALUES ('m', 'train', 'run', 1, 1e-4, 's', '/old', 'exact', 8192, 0, 10, now())"
    )
    frame = latest_stores(con, "m", "run", "train", _key("adam"))
    assert list(frame["shard"]) == [""]
    # Rows from before transforms were recorded hold LESS's adam features: no other transform reads
    # them, the default (sgd) included, and no other loss tokens than LESS's response.
    with pytest.raises(ValueError, match="train transform sgd"):
        latest_stores(con, "m", "run", "train", _key(InfluenceConfig().resolved().train_transform))
    with pytest.raises(ValueError, match="loss tokens sequence"):
        latest_stores(con, "m", "run", "train", _key("adam", loss_tokens="sequence"))
    with pytest.raises(ValueError, match="train transform adam_no_momentum"):
        latest_stores(con, "m", "run", "train", _key("adam_no_momentum"))
    # The old single store is not a shard of the current layout: influence asks for the shards instead.
    keys = shard_partitions.get_partition_keys()
    with pytest.raises(ValueError, match=f"lack shards .*--partition 'm\\|{keys[0]}'"):
        train_shard_directories(frame, "m", [1], keys)
    shards = pd.DataFrame({"epoch": [1] * len(keys), "shard": keys, "directory": [f"/new/{k}" for k in keys]})
    assert train_shard_directories(shards, "m", [1], keys) == [[f"/new/{k}" for k in keys]]


def test_gradient_stores_table_of_the_part_era_keeps_its_rows_under_shard() -> None:
    con = duckdb.connect()
    con.execute(  # as created while the shard column was called `part`
        "CREATE TABLE gradient_stores (model VARCHAR, kind VARCHAR, warmup_run_key VARCHAR, epoch INTEGER, "
        "avg_lr DOUBLE, store_id VARCHAR, directory VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT, n_rows INTEGER, "
        "created_at TIMESTAMPTZ, part VARCHAR, n_excluded INTEGER, transform VARCHAR)"
    )
    con.execute(
        "INSERT INTO gradient_stores VALUES ('m', 'train', 'run', 1, 1e-4, 's', '/new/01', 'fast', 16, 0, 10, "
        "now(), '01-of-04', 0, 'adam')"
    )
    frame = latest_stores(con, "m", "run", "train", _key("adam", dim=16, mode="fast"))
    assert list(frame["shard"]) == ["01-of-04"] and list(frame["directory"]) == ["/new/01"]
    columns = [row[0] for row in con.execute("DESCRIBE gradient_stores").fetchall()]
    assert "shard" in columns and "part" not in columns
    ensure_store_table(con)  # a second run finds nothing to migrate
    assert [row[0] for row in con.execute("DESCRIBE gradient_stores").fetchall()] == columns


def test_stores_of_other_loss_tokens_never_mix() -> None:
    con = duckdb.connect()
    ensure_store_table(con)
    for loss_tokens, directory in (("sequence", "/seq"), ("response", "/resp"), (None, "/old")):
        con.execute(
            "INSERT INTO gradient_stores BY NAME SELECT 'm' AS model, 'target' AS kind, 'run' AS warmup_run_key, "
            "1 AS epoch, 1e-4 AS avg_lr, ? AS store_id, ? AS directory, 'fast' AS mode, 16 AS dim, 0 AS seed, "
            "now() AS created_at, ? AS loss_tokens",
            [directory, directory, loss_tokens],
        )
    # The latest response row is the one written before loss tokens were recorded (NULL: response).
    sequence = latest_stores(con, "m", "run", "target", _key(dim=16, mode="fast", loss_tokens="sequence"))
    response = latest_stores(con, "m", "run", "target", _key(dim=16, mode="fast"))
    assert list(sequence["directory"]) == ["/seq"] and list(response["directory"]) == ["/old"]


def test_influence_runs_of_before_the_feature_recipe_read_as_lesss_own() -> None:
    con = duckdb.connect()
    con.execute(  # as created before the recipe columns
        "CREATE TABLE influence_runs (model VARCHAR, scores_dir VARCHAR, warmup_run_key VARCHAR, mode VARCHAR, "
        "dim INTEGER, seed BIGINT, n_train INTEGER, n_val INTEGER, columns JSON, weights JSON, pool_version VARCHAR, "
        "created_at TIMESTAMPTZ)"
    )
    con.execute("INSERT INTO influence_runs VALUES ('m', '/s', 'run', 'fast', 16, 0, 3, 1, '[]', '[1.0]', 'v1', now())")
    old = latest_influence(con, "m")
    assert (old["train_transform"], old["loss_tokens"], old["dropped_directions"]) == ("adam", "response", 0)
    record_influence(
        con,
        InfluenceRecord(
            model="m", scores_dir="/s2", warmup_run_key="run", mode="fast", dim=16, seed=0, n_train=3, n_val=1,
            columns=[], weights=[1.0], pool_version="v1", train_transform="sgd", loss_tokens="sequence",
            dropped_directions=8,
        ),
    )  # fmt: skip
    new = latest_influence(con, "m")
    assert (new["scores_dir"], new["train_transform"], new["loss_tokens"], new["dropped_directions"]) == (
        "/s2",
        "sgd",
        "sequence",
        8,
    )


def test_gradient_stores_table_with_both_part_and_shard_still_opens() -> None:
    """An older process re-adding `part` after the rename must not make every later read fail."""
    con = duckdb.connect()
    ensure_store_table(con)
    con.execute("ALTER TABLE gradient_stores ADD COLUMN part VARCHAR")
    ensure_store_table(con)  # renaming `part` onto the existing `shard` would raise here
    columns = [row[0] for row in con.execute("DESCRIBE gradient_stores").fetchall()]
    assert "shard" in columns and "part" in columns
    with pytest.raises(ValueError, match="no train gradients for model 'm'"):  # the query runs: nothing stored
        latest_stores(con, "m", "run", "train", _key("adam", dim=16, mode="fast"))


def test_gradient_config_reads_the_deprecated_shard_size_as_chunk_size() -> None:
    """Run configs written before `chunk_size` was named so keep their chunk size; a conflict is refused."""
    assert GradientConfig().chunk_size == 512
    assert GradientConfig(chunk_size=9).chunk_size == 9
    assert GradientConfig(shard_size=7).chunk_size == 7
    assert GradientConfig(shard_size=7, chunk_size=7).chunk_size == 7
    with pytest.raises(ValueError, match="chunk_size 9 and its deprecated name shard_size 7 differ"):
        GradientConfig(shard_size=7, chunk_size=9)


def test_train_gradients_of_another_transform_are_computed_afresh_and_never_mixed(tmp_path: Path) -> None:
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(
            json.dumps(
                {
                    "instruction": f"Question {i} about topic {i % 4}?",
                    "input": "",
                    "output": f"Answer {i} " + "y" * (i % 7),
                }
            )
            + "\n"
            for i in range(16)
        )
    )
    targets = tmp_path / "targets.jsonl"
    targets.write_text(
        "".join(
            json.dumps({"task": "t", "prompt": f"target question {i}", "completion": f"a {i}"}) + "\n" for i in range(3)
        )
    )
    resources = {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    assets = [*dg.load_assets_from_modules(ASSET_MODULES), *ALL_CHECKS]
    grad = {"dims": [16], "mode": "fast", "seed": 0}

    def run(names: list[str], ops: dict, key=None) -> dg.ExecuteInProcessResult:
        result = dg.materialize(
            assets,
            selection=dg.AssetSelection.assets(*names),
            resources=resources,
            run_config={"ops": ops},
            partition_key=key,
            instance=instance,
        )
        assert result.success
        return result

    def train_gradients(transform: str) -> list[dict]:
        return [
            run(["train_gradients"], {"train_gradients": {"config": {**grad, "train_transform": transform}}}, key)
            .asset_materializations_for_node("train_gradients")[0]
            .metadata
            for key in model_shard_keys(DEFAULT_MODEL)
        ]

    OTHER = "adam_no_momentum"
    with dg.instance_for_test() as instance:
        run(["raw_pool"], {"raw_pool": {"config": {"sources": [{"path": str(pool)}]}}})
        run(["target_tasks"], {"target_tasks": {"config": {"files": [{"path": str(targets)}], "n_val": 2}}})
        run(
            ["warmup_checkpoints", "target_gradients"],
            {
                "warmup_checkpoints": {
                    "config": {"fraction": 0.5, "epochs": 1, "batch_size": 4, "learning_rate": 1e-3}
                },
                "target_gradients": {"config": grad},
            },
            DEFAULT_MODEL,
        )
        literal = train_gradients("adam")
        assert sum(m["n_computed"].value for m in literal) > 0
        assert {m["transform"].value for m in literal} == {"adam"}
        assert {m["transform_why"].value for m in literal} == {"as in LESS"}
        # Another transform does not reuse the adam stores: every feature is computed again, in other folders.
        default = train_gradients(OTHER)
        assert [m["n_computed"].value for m in default] == [m["n_computed"].value for m in literal]
        assert {m["transform"].value for m in default} == {OTHER}
        assert all("differs from LESS" in m["transform_why"].value for m in default)
        # ... while the same transform again is reused.
        assert all(m["n_computed"].value == 0 for m in train_gradients("adam"))
        with duckdb.connect(resources["lineage"].db_path, read_only=True) as con:
            stores = con.execute("SELECT transform, directory FROM gradient_stores WHERE kind = 'train'").fetchall()
        by_transform: dict[str, set[str]] = {}
        for transform, directory in stores:
            by_transform.setdefault(transform, set()).add(directory)
        assert set(by_transform) == {"adam", OTHER}
        assert not by_transform["adam"] & by_transform[OTHER]
        # Influence reads the stores of the transform it is told (adam's rows were written last, and are not picked).
        scored = (
            run(
                ["influence_scores"],
                {"influence_scores": {"config": {"dim": 16, "mode": "fast", "seed": 0, "train_transform": OTHER}}},
                DEFAULT_MODEL,
            )
            .asset_materializations_for_node("influence_scores")[0]
            .metadata
        )
        assert scored["train_transform"].value == OTHER
        assert "differs from LESS" in scored["train_transform_why"].value
        with duckdb.connect(resources["lineage"].db_path) as con:
            frame = latest_stores(
                con,
                DEFAULT_MODEL,
                con.execute("SELECT max(warmup_run_key) FROM gradient_stores").fetchone()[0],
                "train",
                _key(OTHER, dim=16, mode="fast", loss_tokens=GradientConfig().resolved().loss_tokens),
            )
        assert set(frame["directory"]) == by_transform[OTHER]
        # The defaults that differ from LESS say so: whole-sequence gradients, common directions removed.
        assert {m["loss_tokens"].value for m in default} == {"sequence"}
        assert all("differs from LESS" in m["loss_tokens_why"].value for m in default)
        # 16 rows of 16 dims: the default 8 is lowered to a quarter of them.
        assert scored["dropped_directions"].value == 4 < InfluenceConfig().resolved().dropped_directions
        assert "differs from LESS" in scored["dropped_directions_why"].value
