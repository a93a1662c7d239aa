"""LESS step 3: checkpoint-weighted cosine influence of every pool example on every target val example."""

import dagster as dg
from pydantic import Field, model_validator

from assets.common import LineageTracker, code_version
from assets.partitions import MODEL_DIMENSION, model_partitions, shard_partitions
from resources.lineage import LineageStore
from resources.model_store import ModelStore
from resources.settings import StorageSettings
from selection.common.markdown import markdown_table
from selection.data import pool_store, target_store
from selection.influence import directions, influence_store, projection, scores
from selection.influence.gradients import DEFAULT_LOSS_TOKENS, DEFAULT_TRAIN_TRANSFORM
from selection.train import checkpoints


class InfluenceConfig(dg.Config):
    dim: int = Field(default=projection.DEFAULT_DIM, description="Which projection dim of the datastore to use")
    mode: str = Field(default=projection.DEFAULT_MODE, description="Projection mode of the datastore to use")
    seed: int = Field(default=0, description="Projection seed of the datastore to use")
    train_transform: str = Field(
        default=DEFAULT_TRAIN_TRANSFORM,
        description="Train-feature transform of the datastore to use (train_gradients' train_transform)",
    )
    loss_tokens: str = Field(
        default=DEFAULT_LOSS_TOKENS,
        description="Loss tokens of the datastore to use (the gradient assets' loss_tokens)",
    )
    dropped_directions: int = Field(
        default=directions.DEFAULT_DROPPED_DIRECTIONS,
        description="Remove the train pool's mean and this many top principal directions from train and val "
        "features before the cosine (0: LESS's plain cosine); the metadata says why",
    )

    # Refused when the config is read: no store of such a dim can exist.
    @model_validator(mode="after")
    def _check_projection(self) -> "InfluenceConfig":
        projection.check_dim(self.dim, self.mode)
        return self


@dg.asset(
    partitions_def=model_partitions,
    deps=[
        # Every shard of this model's train features.
        dg.AssetDep(
            "train_gradients",
            partition_mapping=dg.MultiToSingleDimensionPartitionMapping(partition_dimension_name=MODEL_DIMENSION),
        ),
        "target_gradients",
        "target_tasks",
    ],
    group_name="less",
    code_version=code_version("selection.influence.scores", "selection.influence.directions", "selection.less"),
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
    key = influence_store.FeatureKey(
        mode=config.mode,
        dim=config.dim,
        seed=config.seed,
        train_transform=config.train_transform,
        loss_tokens=config.loss_tokens,
    )
    with lineage.connect() as con:
        warmup = checkpoints.latest_run_checkpoints(con, spec.name, "warmup")
        run_key = str(warmup["run_key"].iloc[0])
        train = influence_store.latest_stores(con, spec.name, run_key, "train", key)
        target = influence_store.latest_stores(con, spec.name, run_key, "target", key)
        val_rows = target_store.read_targets(con, "val")
        pool_ids = pool_store.pool_ids(con)
        pool_version = pool_store.latest_pool_version(con)[0]
    run = scores.score_influence(
        scores.InfluenceRequest(
            model=spec.name,
            key=key,
            warmup=warmup,
            train=train,
            target=target,
            val_rows=val_rows,
            pool_ids=pool_ids,
            pool_version=pool_version,
            shards=shard_partitions.get_partition_keys(),
            scores_root=settings.path("scores", spec.name),
            warn=context.log.warning,
            dropped_directions=config.dropped_directions,
        )
    )
    record = run.record
    with lineage.connect() as con:
        influence_store.record_influence(con, record)
    tracker.add_file("scores", run.scores_path)
    per_task = run.per_task
    metrics = {
        "warmup_run_key": record.warmup_run_key,
        "train_transform": config.train_transform,
        "loss_tokens": config.loss_tokens,
        "dropped_directions": record.dropped_directions,
        "n_train": record.n_train,
        "n_val": record.n_val,
        "checkpoint_weights": record.weights,
        "pool_version": record.pool_version,
        "dropped_val_examples": run.dropped_val_ids,
        "scores_dir": record.scores_dir,
        "mean_influence_by_task": dict(zip(per_task["task"], per_task["mean_influence"])),
    }
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            **scores.feature_recipe(config.mode, config.train_transform, config.loss_tokens, record.dropped_directions),
            # What ran: a small pool lowers the configured count (the run's log says so).
            "dropped_directions": dg.MetadataValue.int(record.dropped_directions),
            "n_train": dg.MetadataValue.int(record.n_train),
            "n_val": dg.MetadataValue.int(record.n_val),
            "checkpoint_weights": dg.MetadataValue.json(record.weights),
            "scores_path": dg.MetadataValue.path(str(run.scores_path)),
            "per_task": dg.MetadataValue.md(markdown_table(per_task.round(4).to_dict("records"))),
        },
    )
