"""LESS step 3: checkpoint-weighted cosine influence of every pool example on every target val example."""

import json

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, code_version, markdown_table, read_targets
from assets.gradients import ensure_store_table
from assets.partitions import MODEL_DIMENSION, model_partitions, shard_partitions
from resources.lineage import LineageStore
from resources.model_store import ModelStore
from resources.settings import StorageSettings
from selection.data import pool_store
from selection.influence import datastore, scores as influence, projection
from selection.train import checkpoints, preflight
from selection.influence.datastore import FeatureStore
from selection.influence.gradients import DEFAULT_TRAIN_TRANSFORM, LITERAL_LESS_TRANSFORM, transform_why

INFLUENCE_DDL = """CREATE TABLE IF NOT EXISTS influence_runs (
    model VARCHAR, scores_dir VARCHAR, warmup_run_key VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT,
    n_train INTEGER, n_val INTEGER, columns JSON, weights JSON, pool_version VARCHAR, created_at TIMESTAMPTZ
)"""


class InfluenceConfig(dg.Config):
    dim: int = Field(default=projection.DEFAULT_DIM, description="Which projection dim of the datastore to use")
    mode: str = Field(default=projection.DEFAULT_MODE, description="Projection mode of the datastore to use")
    seed: int = Field(default=0, description="Projection seed of the datastore to use")
    train_transform: str = Field(default=DEFAULT_TRAIN_TRANSFORM,
                                 description="Train-feature transform of the datastore to use (train_gradients' "
                                 "train_transform)")


def latest_influence(con, model: str) -> dict:
    """The most recent influence run of a model, with its score columns (task, subtask, val id)."""
    con.execute(INFLUENCE_DDL)
    row = con.execute(
        "SELECT scores_dir, columns, n_train, n_val, pool_version, warmup_run_key, mode, dim, seed FROM influence_runs "
        "WHERE model = ? ORDER BY created_at DESC LIMIT 1",
        [model],
    ).fetchone()
    if row is None:
        raise ValueError(f"no influence scores for model {model!r}; materialize influence_scores first")
    return {"scores_dir": row[0], "columns": json.loads(row[1]), "n_train": row[2], "n_val": row[3],
            "pool_version": row[4], "warmup_run_key": row[5], "mode": row[6], "dim": row[7], "seed": row[8]}


def _stores(con, model: str, run_key: str, kind: str, config: InfluenceConfig) -> pd.DataFrame:
    """Latest store per (epoch, part) of the given settings; part is '' for unsharded stores."""
    ensure_store_table(con)
    frame = con.execute(
        """SELECT epoch, coalesce(part, '') AS part, avg_lr, directory FROM gradient_stores
           WHERE model = ? AND warmup_run_key = ? AND kind = ? AND mode = ? AND dim = ? AND seed = ?
             -- train stores of another transform never mix in (NULL: recorded before transforms, LESS's adam)
             AND (kind <> 'train' OR coalesce(transform, ?) = ?)
           QUALIFY row_number() OVER (PARTITION BY epoch, coalesce(part, '') ORDER BY created_at DESC) = 1
           ORDER BY epoch, part""",
        [model, run_key, kind, config.mode, config.dim, config.seed, LITERAL_LESS_TRANSFORM, config.train_transform],
    ).df()
    if frame.empty:
        transform = f", train transform {config.train_transform}" if kind == "train" else ""
        raise ValueError(
            f"no {kind} gradients for model {model!r}, warmup run {run_key}, mode {config.mode}, dim {config.dim}, "
            f"seed {config.seed}{transform}; materialize {kind}_gradients with the same settings first"
        )
    return frame


def _train_parts(frame: pd.DataFrame, model: str, epochs: list[int]) -> list[list[str]]:
    """Per epoch, the directories of every shard of the current shard layout, in shard order."""
    shards = shard_partitions.get_partition_keys()
    have = {(int(e), p): d for e, p, d in frame[["epoch", "part", "directory"]].itertuples(index=False)}
    missing = sorted({shard for epoch in epochs for shard in shards if (epoch, shard) not in have})
    if missing:
        raise ValueError(
            f"train_gradients of model {model!r} lack shards {missing} for the latest warmup run; materialize them, "
            f"e.g. dagster asset materialize -m orchestration.definitions --select train_gradients "
            f"--partition '{model}|{missing[0]}'"
        )
    return [[have[(epoch, shard)] for shard in shards] for epoch in epochs]


def _check_pool_covered(con, parts: list[FeatureStore]) -> set[str]:
    """Every current pool example has features or a recorded reason for having none; returns those ids."""
    covered: set[str] = set()
    for part in parts:
        covered |= part.covered()
    uncovered = [example_id for example_id in pool_store.pool_ids(con) if example_id not in covered]
    if uncovered:
        _, count = datastore.parse_shard_key(parts[0].part)
        shards = sorted({datastore.shard_key(datastore.shard_of(i, count), count) for i in uncovered})
        raise ValueError(
            f"{len(uncovered)} pool examples have no gradient features yet (the pool grew after their shards ran), "
            f"e.g. {uncovered[:3]}; rematerialize train_gradients for shards {shards}"
        )
    return covered


@dg.asset(
    partitions_def=model_partitions,
    deps=[
        # Every shard of this model's train features.
        dg.AssetDep("train_gradients",
                    partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=MODEL_DIMENSION)),
        "target_gradients", "target_tasks",
    ],
    group_name="less",
    code_version=code_version("selection.influence.scores", "selection.less"),
    description="Score matrix [n_train, n_val] on disk (float32 memmap): sum over checkpoints of lr-weighted cosine.",
)
def influence_scores(
    context: dg.AssetExecutionContext,
    config: InfluenceConfig,
    settings: StorageSettings,
    lineage: LineageStore,
    model_store: ModelStore,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        warmup = checkpoints.latest_run_checkpoints(con, spec.name, "warmup")
        run_key = str(warmup["run_key"].iloc[0])
        train = _stores(con, spec.name, run_key, "train", config)
        target = _stores(con, spec.name, run_key, "target", config)
        val_rows = read_targets(con, "val")
        epochs = [int(e) for e in warmup["epoch"]]
        train_epochs = sorted(set(int(e) for e in train["epoch"]))
        if train_epochs != epochs or [int(e) for e in target["epoch"]] != epochs:
            raise ValueError(
                f"checkpoints differ: warmup {epochs}, train {train_epochs}, target {list(target['epoch'])}; "
                "rematerialize the gradient assets"
            )
        train_parts = [[influence.open_store(d) for d in directories]
                       for directories in _train_parts(train, spec.name, epochs)]
        _check_pool_covered(con, train_parts[0])
        # Every current example is covered, so the scores cover the latest version (rows superseded
        # since the shards ran may have scores too; selections leave them out).
        pool_version = pool_store.latest_pool_version(con)[0]
        avg_lrs = [float(train[train["epoch"] == epoch]["avg_lr"].iloc[0]) for epoch in epochs]
    columns = [{"task": t, "subtask": s, "val_example_id": i} for t, s, i, _ in val_rows]
    target_stores = [influence.open_store(d) for d in target["directory"]]
    with_features = set(target_stores[0].ids())
    # Refused before any scoring: a task whose val examples all lack features would drop out.
    preflight.check_val_usable([(c["task"], c["val_example_id"]) for c in columns], with_features,
                               "none has gradient features in target_gradients")
    dropped = [c for c in columns if c["val_example_id"] not in with_features]
    if dropped:
        context.log.warning(f"{len(dropped)} val examples have no gradient features (no target tokens after "
                            f"truncation) and are left out: {[c['val_example_id'] for c in dropped][:10]}")
        columns = [c for c in columns if c["val_example_id"] in with_features]
    # Only the parent is created here: compute_influence moves the finished folder into place.
    # LESS's own transform keeps the folder name it always had; others are named in it.
    transform_tag = "" if config.train_transform == LITERAL_LESS_TRANSFORM else f"{config.train_transform}-"
    out_dir = (settings.subdir("scores", spec.name)
               / f"{run_key}-{transform_tag}{config.mode}-d{config.dim}-s{config.seed}")
    result = influence.compute_influence(
        train_parts,
        target_stores,
        avg_lrs,
        [c["val_example_id"] for c in columns],
        out_dir,
    )
    scores, _ = influence.load_scores(out_dir)
    weights = [float(w) for w in np.asarray(avg_lrs) / np.sum(avg_lrs)]
    with lineage.connect() as con:
        con.execute(INFLUENCE_DDL)
        con.execute(
            "INSERT INTO influence_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [spec.name, str(out_dir), run_key, config.mode, config.dim, config.seed, len(result.train_ids),
             result.n_val, json.dumps(columns), json.dumps(weights), pool_version],
        )
    tracker.add_file("scores", result.scores_path)
    per_task = (
        pd.DataFrame(columns).assign(mean=np.asarray(scores).mean(axis=0)).groupby("task")["mean"]
        .agg(["count", "mean"]).reset_index().rename(columns={"count": "val_examples", "mean": "mean_influence"})
    )
    metrics = {
        "warmup_run_key": run_key, "train_transform": config.train_transform,
        "n_train": len(result.train_ids), "n_val": result.n_val, "checkpoint_weights": weights,
        "pool_version": pool_version, "dropped_val_examples": [c["val_example_id"] for c in dropped],
        "scores_dir": str(out_dir), "mean_influence_by_task": dict(zip(per_task["task"], per_task["mean_influence"])),
    }
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "train_transform": config.train_transform,
            "train_transform_why": transform_why(config.train_transform) or "as in LESS",
            "n_train": dg.MetadataValue.int(len(result.train_ids)),
            "n_val": dg.MetadataValue.int(result.n_val),
            "checkpoint_weights": dg.MetadataValue.json(weights),
            "scores_path": dg.MetadataValue.path(str(result.scores_path)),
            "per_task": dg.MetadataValue.md(markdown_table(per_task.round(4).to_dict("records"))),
        },
    )
