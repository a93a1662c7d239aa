"""LESS step 3: checkpoint-weighted cosine influence of every pool example on every target val example."""

import json

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, code_version, markdown_table, read_targets
from orchestration.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import ModelStore
from resources.settings import StorageSettings
from selection import checkpoints, influence, projection

INFLUENCE_DDL = """CREATE TABLE IF NOT EXISTS influence_runs (
    model VARCHAR, scores_dir VARCHAR, warmup_run_key VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT,
    n_train INTEGER, n_val INTEGER, columns JSON, weights JSON, pool_version VARCHAR, created_at TIMESTAMPTZ
)"""


class InfluenceConfig(dg.Config):
    dim: int = Field(default=projection.DEFAULT_DIM, description="Which projection dim of the datastore to use")
    mode: str = Field(default=projection.DEFAULT_MODE, description="Projection mode of the datastore to use")
    seed: int = Field(default=0, description="Projection seed of the datastore to use")


def latest_influence(con, model: str) -> dict:
    """The most recent influence run of a model, with its score columns (task, subtask, val id)."""
    con.execute(INFLUENCE_DDL)
    row = con.execute(
        "SELECT scores_dir, columns, n_train, n_val, pool_version FROM influence_runs WHERE model = ? "
        "ORDER BY created_at DESC LIMIT 1",
        [model],
    ).fetchone()
    if row is None:
        raise ValueError(f"no influence scores for model {model!r}; materialize influence_scores first")
    return {"scores_dir": row[0], "columns": json.loads(row[1]), "n_train": row[2], "n_val": row[3],
            "pool_version": row[4]}


def pool_version_containing(con, example_ids: list[str]) -> str:
    """The earliest pool version that holds every given id: the version these scores were computed from."""
    frame = pd.DataFrame({"example_id": example_ids})
    (seq,) = con.execute(
        "SELECT max(p.first_seen_seq) FROM frame f JOIN pool p USING (example_id)").fetchall()[0]
    (version,) = con.execute("SELECT pool_version FROM pool_versions WHERE seq = ?", [seq]).fetchall()[0]
    return version


def _stores(con, model: str, run_key: str, kind: str, config: InfluenceConfig) -> pd.DataFrame:
    frame = con.execute(
        """SELECT epoch, avg_lr, directory FROM gradient_stores WHERE model = ? AND warmup_run_key = ? AND kind = ?
           AND mode = ? AND dim = ? AND seed = ? QUALIFY row_number() OVER (PARTITION BY epoch ORDER BY created_at DESC) = 1
           ORDER BY epoch""",
        [model, run_key, kind, config.mode, config.dim, config.seed],
    ).df()
    if frame.empty:
        raise ValueError(
            f"no {kind} gradients for model {model!r}, warmup run {run_key}, mode {config.mode}, dim {config.dim}, "
            f"seed {config.seed}; materialize {kind}_gradients with the same settings first"
        )
    return frame


@dg.asset(
    partitions_def=model_partitions,
    deps=["train_gradients", "target_gradients", "target_tasks"],
    group_name="less",
    code_version=code_version("selection.influence", "selection.less"),
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
    if list(train["epoch"]) != list(target["epoch"]) or list(train["epoch"]) != list(warmup["epoch"]):
        raise ValueError(
            f"checkpoints differ: warmup {list(warmup['epoch'])}, train {list(train['epoch'])}, "
            f"target {list(target['epoch'])}; rematerialize the gradient assets"
        )
    columns = [{"task": t, "subtask": s, "val_example_id": i} for t, s, i, _ in val_rows]
    target_stores = [influence.open_store(d) for d in target["directory"]]
    with_features = set(target_stores[0].ids())
    dropped = [c for c in columns if c["val_example_id"] not in with_features]
    if dropped:
        context.log.warning(f"{len(dropped)} val examples have no gradient features (no target tokens after "
                            f"truncation) and are left out: {[c['val_example_id'] for c in dropped][:10]}")
        columns = [c for c in columns if c["val_example_id"] in with_features]
    if not columns:
        raise ValueError("no target val example has gradient features; check target_gradients' skipped examples")
    out_dir = settings.subdir("scores", spec.name, f"{run_key}-{config.mode}-d{config.dim}-s{config.seed}")
    result = influence.compute_influence(
        [influence.open_store(d) for d in train["directory"]],
        target_stores,
        list(train["avg_lr"]),
        [c["val_example_id"] for c in columns],
        out_dir,
    )
    scores, _ = influence.load_scores(out_dir)
    weights = [float(w) for w in np.asarray(train["avg_lr"]) / np.sum(train["avg_lr"])]
    with lineage.connect() as con:
        pool_version = pool_version_containing(con, result.train_ids)
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
        "warmup_run_key": run_key, "n_train": len(result.train_ids), "n_val": result.n_val, "checkpoint_weights": weights,
        "pool_version": pool_version, "dropped_val_examples": [c["val_example_id"] for c in dropped],
        "scores_dir": str(out_dir), "mean_influence_by_task": dict(zip(per_task["task"], per_task["mean_influence"])),
    }
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "n_train": dg.MetadataValue.int(len(result.train_ids)),
            "n_val": dg.MetadataValue.int(result.n_val),
            "checkpoint_weights": dg.MetadataValue.json(weights),
            "scores_path": dg.MetadataValue.path(str(result.scores_path)),
            "per_task": dg.MetadataValue.md(markdown_table(per_task.round(4).to_dict("records"))),
        },
    )
