"""Gradient tables written by the code before shards existed still work after an upgrade."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest

from assets.influence import InfluenceConfig, _stores, _train_parts
from orchestration.partitions import shard_partitions


def test_old_gradient_stores_table_is_migrated_and_unsharded_train_rows_are_not_used() -> None:
    con = duckdb.connect()
    con.execute(  # as created before shards: no `part`, no `n_excluded`
        "CREATE TABLE gradient_stores (model VARCHAR, kind VARCHAR, warmup_run_key VARCHAR, epoch INTEGER, "
        "avg_lr DOUBLE, store_id VARCHAR, directory VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT, n_rows INTEGER, "
        "created_at TIMESTAMPTZ)")
    con.execute("INSERT INTO gradient_stores VALUES ('m', 'train', 'run', 1, 1e-4, 's', '/old', 'exact', 8192, 0, 10, "
                "now())")
    frame = _stores(con, "m", "run", "train", InfluenceConfig())
    assert list(frame["part"]) == [""]
    # The old single store is not a shard of the current layout: influence asks for the shards instead.
    keys = shard_partitions.get_partition_keys()
    with pytest.raises(ValueError, match=f"lack shards .*--partition 'm\\|{keys[0]}'"):
        _train_parts(frame, "m", [1])
    shards = pd.DataFrame({"epoch": [1] * len(keys), "part": keys, "directory": [f"/new/{k}" for k in keys]})
    assert _train_parts(shards, "m", [1]) == [[f"/new/{k}" for k in keys]]
