"""LESS step 3: checkpoint-weighted cosine influence of every pool example on every target val example."""

import dagster as dg
from pydantic import Field, field_validator, model_validator

from assets.common import LineageTracker, code_version
from assets.gradients import RECIPE_DESCRIPTION
from assets.partitions import MODEL_DIMENSION, model_partitions, shard_partitions
from resources.lineage import LineageStore
from resources.model_store import ModelStore
from resources.settings import StorageSettings
from selection.common.markdown import markdown_table
from selection.data import pool_store, target_store
from selection.influence import diagnostics, influence_store, projection, recipes, scores
from selection.train import checkpoints


class InfluenceConfig(dg.Config):
    recipe: str = Field(default=recipes.DEFAULT_RECIPE, description=RECIPE_DESCRIPTION)
    dim: int = Field(default=projection.DEFAULT_DIM, description="Which projection dim of the datastore to use")
    mode: str | None = Field(default=None, description="Projection mode of the datastore to use (None: the recipe's)")
    seed: int = Field(default=0, description="Projection seed of the datastore to use")
    train_transform: str | None = Field(
        default=None,
        description="Train-feature transform of the datastore to use (train_gradients' train_transform; None: "
        "the recipe's)",
    )
    loss_tokens: str | None = Field(
        default=None,
        description="Loss tokens of the datastore to use (the gradient assets' loss_tokens; None: the recipe's)",
    )
    dropped_directions: int | None = Field(
        default=None,
        description="Remove the train pool's mean and this many top principal directions from train and val "
        "features before the cosine (0: LESS's plain cosine; None: the recipe's, 8 in the default one); the "
        "metadata says why",
    )

    @field_validator("recipe")
    @classmethod
    def _check_recipe(cls, recipe: str) -> str:
        return recipes.check_recipe(recipe)

    # Refused when the config is read: no store of such a dim can exist.
    @model_validator(mode="after")
    def _check_projection(self) -> "InfluenceConfig":
        projection.check_dim(self.dim, self.resolved().mode)
        return self

    def resolved(self) -> recipes.FeatureRecipe:
        """The settings this run uses: the recipe's, with the single fields given in their place (the same
        resolution as the gradient assets', so one recipe reads the stores it wrote)."""
        return recipes.resolve(
            self.recipe,
            loss_tokens=self.loss_tokens,
            train_transform=self.train_transform,
            mode=self.mode,
            dropped_directions=self.dropped_directions,
        )


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
    recipe = config.resolved()
    key = influence_store.FeatureKey(
        mode=recipe.mode,
        dim=config.dim,
        seed=config.seed,
        train_transform=recipe.train_transform,
        loss_tokens=recipe.loss_tokens,
    )
    with lineage.connect() as con:
        warmup = checkpoints.latest_run_checkpoints(con, spec.name, "warmup")
        run_key = str(warmup["run_key"].iloc[0])
        try:
            train = influence_store.latest_stores(con, spec.name, run_key, "train", key)
            target = influence_store.latest_stores(con, spec.name, run_key, "target", key)
        except ValueError as error:
            raise ValueError(
                f"{error} (influence_scores resolved recipe {recipe.recipe!r} with overrides "
                f"{recipe.overrides or 'none'} to {recipe.settings()}: give the gradient assets the same recipe "
                "and fields)"
            ) from error
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
            dropped_directions=recipe.dropped_directions,
            recipe=recipe.recipe,
            recipe_overrides=recipe.overrides,
        )
    )
    record = run.record
    with lineage.connect() as con:
        influence_store.record_influence(con, record)
        collapse = diagnostics.assess_collapse(
            con, spec.name, run_key, key, record.dropped_directions, record.scored_diagnostics
        )
    if collapse.informative is False:
        context.log.warning(f"influence scores follow collapsed features: {collapse.reason}")
    # What ran: a small pool lowers the configured count of directions (the run's log says so).
    ran = {**recipe.settings(), "dropped_directions": record.dropped_directions}
    tracker.add_file("scores", run.scores_path)
    per_task = run.per_task
    metrics = {
        "warmup_run_key": record.warmup_run_key,
        "recipe": recipe.recipe,
        "recipe_overrides": recipe.overrides,
        "recipe_settings": ran,
        "mode": recipe.mode,
        "train_transform": recipe.train_transform,
        "loss_tokens": recipe.loss_tokens,
        "dropped_directions": record.dropped_directions,
        "scores_informative": collapse.informative,
        "scored_diagnostics": record.scored_diagnostics,
        **collapse.metadata(),
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
            **{
                name: dg.MetadataValue.json(value) if isinstance(value, dict) else value
                for name, value in scores.feature_recipe(
                    recipe.mode,
                    recipe.train_transform,
                    recipe.loss_tokens,
                    record.dropped_directions,
                    recipe.recipe,
                    recipe.overrides,
                ).items()
            },
            # What ran: a small pool lowers the configured count (the run's log says so).
            "dropped_directions": dg.MetadataValue.int(record.dropped_directions),
            **{
                name: dg.MetadataValue.bool(value) if isinstance(value, bool) else value
                for name, value in collapse.metadata().items()
                if value is not None
            },
            **({} if collapse.informative is None else {"scores_informative": collapse.informative}),
            "scores_informative_reason": collapse.reason,
            "n_train": dg.MetadataValue.int(record.n_train),
            "n_val": dg.MetadataValue.int(record.n_val),
            "checkpoint_weights": dg.MetadataValue.json(record.weights),
            "scores_path": dg.MetadataValue.path(str(run.scores_path)),
            "per_task": dg.MetadataValue.md(markdown_table(per_task.round(4).to_dict("records"))),
        },
    )
