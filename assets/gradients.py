"""LESS step 2: the gradient datastore (projected, L2-normalized fp16 features in memory-mapped chunks).

`train_gradients` is partitioned by (model, shard): each partition computes the pool examples
whose id hashes to its shard (`selection.influence.datastore.shard_of`), so a run launcher or executor
can spread shards over machines. It streams the pool in chunks of `chunk_size` examples
(read, tokenize, compute, write; `selection.influence.features`), so its memory does not grow with the pool.
`target_gradients` (a few val examples) is partitioned by model only.
"""

from collections.abc import Callable
from typing import Any

import dagster as dg
from pydantic import Field, field_validator, model_validator

from assets.common import LineageTracker, code_version
from assets.partitions import MODEL_DIMENSION, SHARD_DIMENSION, model_partitions, model_shard_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection.common.markdown import markdown_table
from selection.data import target_store
from selection.influence import features, projection, recipes

GRADIENT_CODE = code_version(
    "selection.influence.gradients",
    "selection.influence.projection",
    "selection.influence.datastore",
    "selection.data.tokenization",
    "selection.train.checkpoints",
    "selection.influence.diagnostics",
    "selection.influence.features",
    "selection.common.arrays",
    "selection.influence.recipes",
)

RECIPE_DESCRIPTION = (
    "Feature recipe: 'default' (sequence loss, sgd train features, 'fast' projection, 8 common directions "
    "removed at scoring) or 'less-paper' (LESS's: response loss, adam, 'exact', none removed). A single "
    "setting given explicitly (loss_tokens, train_transform, mode, dropped_directions) wins over the recipe; "
    "the metadata records the recipe, the settings that ran and which fields overrode it. Give "
    "train_gradients, target_gradients and influence_scores the same recipe."
)


class GradientConfig(dg.Config):
    dims: list[int] = Field(
        default=[projection.DEFAULT_DIM],
        description="Projection dims (one pass fills all): positive, each listed once; multiples of 4 in mode 'fast'",
    )
    recipe: str = Field(default=recipes.DEFAULT_RECIPE, description=RECIPE_DESCRIPTION)
    mode: str | None = Field(
        default=None,
        description="None: the recipe's. 'fast' (the default recipe's: sparse sign, passed the fidelity bar "
        "against 'exact'; the metadata says why), 'exact' (LESS's dense Rademacher, generated on the CPU) "
        "or 'device' (the same dense Rademacher generated on the compute device: for 7B-scale LoRA dims)",
    )
    seed: int = Field(default=0, description="Projection seed; stores of different seeds never mix")
    chunk_size: int = Field(default=512, description="Examples per chunk read from the pool and per file on disk")
    shard_size: int | None = Field(
        default=None, description="Deprecated name of chunk_size (a shard is a train_gradients partition)"
    )
    train_transform: str | None = Field(
        default=None,
        description="None: the recipe's. train_gradients only (target features are always plain gradients): "
        "'sgd' (the default recipe's: the raw gradient, the LESS paper's ablation; the metadata says why), "
        "'adam' (LESS's literal Adam step), 'adam_no_momentum' (Adam's preconditioner without the shared "
        "momentum) or 'adam_bias_corrected'. Stores of different transforms never mix; influence_scores reads "
        "the one its own (resolved) train_transform names.",
    )
    loss_tokens: str | None = Field(
        default=None,
        description="None: the recipe's. Whose loss the per-example gradients are of, for train and target "
        "alike: 'sequence' (the default recipe's: every token, prompt included; the metadata says why) or "
        "'response' (LESS's: the answer only). Give train_gradients, target_gradients and influence_scores "
        "the same value.",
    )

    # Run configs written before the rename still work: `shard_size` is read as `chunk_size`.
    @model_validator(mode="before")
    @classmethod
    def _chunk_size_alias(cls, values: Any) -> Any:
        if not isinstance(values, dict) or values.get("shard_size") is None:
            return values
        values = dict(values)
        old = values.pop("shard_size")
        if values.setdefault("chunk_size", old) != old:
            raise ValueError(
                f"chunk_size {values['chunk_size']} and its deprecated name shard_size {old} differ; "
                "give chunk_size only"
            )
        return values

    @field_validator("recipe")
    @classmethod
    def _check_recipe(cls, recipe: str) -> str:
        return recipes.check_recipe(recipe)

    # Refused when the config is read, before the model loads (each dim is its own store).
    @model_validator(mode="after")
    def _check_projection(self) -> "GradientConfig":
        projection.check_dims(self.dims, self.resolved().mode)
        return self

    def resolved(self) -> recipes.FeatureRecipe:
        """The settings this run uses: the recipe's, with the single fields given in their place."""
        return recipes.resolve(
            self.recipe, loss_tokens=self.loss_tokens, train_transform=self.train_transform, mode=self.mode
        )


def _result(tracker: LineageTracker, metrics: dict) -> dg.MaterializeResult:
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "warmup_run_key": metrics["warmup_run_key"],
            "part": metrics["part"] or "all",
            "recipe": metrics["recipe"],
            "recipe_overrides": dg.MetadataValue.json(metrics["recipe_overrides"]),
            "recipe_why": metrics["recipe_why"],
            "mode": metrics["mode"],
            "mode_why": metrics["mode_why"] or "as in LESS",
            "transform": metrics["transform"],
            "transform_why": metrics["transform_why"] or "as in LESS",
            "loss_tokens": metrics["loss_tokens"],
            "loss_tokens_why": metrics["loss_tokens_why"] or "as in LESS",
            # Removed at scoring (influence_scores), not here: the recipe's count, behind the reasons above.
            "dropped_directions": dg.MetadataValue.int(metrics["dropped_directions"]),
            "dropped_directions_why": metrics["dropped_directions_why"] or "as in LESS",
            "dims": dg.MetadataValue.json(metrics["dims"]),
            "n_examples": dg.MetadataValue.int(metrics["n_examples"]),
            "n_stored": dg.MetadataValue.int(metrics["n_stored"]),
            "n_computed": dg.MetadataValue.int(metrics["n_computed"]),
            "n_skipped_no_target": dg.MetadataValue.int(metrics["n_skipped_no_target"]),
            "examples_per_s": dg.MetadataValue.float(float(metrics["examples_per_s"] or 0.0)),
            "checkpoints": dg.MetadataValue.md(markdown_table(metrics["checkpoints"])),
            "features_collapsed": dg.MetadataValue.bool(metrics["features_collapsed"]),
            "feature_diagnostics": dg.MetadataValue.md(
                markdown_table(
                    [
                        {
                            "epoch": c["epoch"],
                            "dim": c["dim"],
                            "warmup_steps": c["warmup_steps"],
                            "rows": c["n_rows"],
                            "mean_feature_norm": _rounded(c["mean_feature_norm"]),
                            "mean_pairwise_cosine": _rounded(c["mean_pairwise_cosine"]),
                            "saturated_share": _rounded(c["saturated_share"]),
                            "collapsed": c["collapsed"],
                        }
                        for c in metrics["feature_diagnostics"]
                    ]
                )
            ),
            # Examples tokenized by this run (none when every feature was already stored).
            "truncation": dg.MetadataValue.md(markdown_table(metrics["truncation_by_group"])),
        },
    )


def _recipe_metrics(kind: str, recipe: recipes.FeatureRecipe) -> dict[str, Any]:
    """The recipe, what overrode it and the reasons, built from the settings that ran. Target features are
    plain gradients whatever the recipe's train transform, so only train features carry its reason; the
    dropped directions are the recipe's (influence_scores removes them and records the count that ran)."""
    metadata = recipe.metadata()
    whys = recipes.whys(recipe.loss_tokens, recipe.train_transform, recipe.mode, recipe.dropped_directions)
    if kind != "train":
        metadata["recipe_overrides"] = {k: v for k, v in metadata["recipe_overrides"].items() if k != "train_transform"}
        whys["transform_why"] = ""
    return {
        "recipe": metadata["recipe"],
        "recipe_overrides": metadata["recipe_overrides"],
        "recipe_settings": recipe.settings(),
        "dropped_directions": recipe.dropped_directions,
        **whys,
    }


def _rounded(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _pool_shard(context: dg.AssetExecutionContext, lineage: LineageStore) -> features.FeatureExamples:
    return features.pool_shard_examples(lineage.connect, context.partition_key.keys_by_dimension[SHARD_DIMENSION])


def _target_val(context: dg.AssetExecutionContext, lineage: LineageStore) -> features.FeatureExamples:
    with lineage.connect() as con:
        rows = target_store.read_targets(con, "val")
    return features.target_val_examples(rows)


def _model(context: dg.AssetExecutionContext) -> str:
    key = context.partition_key
    return key.keys_by_dimension[MODEL_DIMENSION] if isinstance(key, dg.MultiPartitionKey) else key


def build_gradient_asset(
    kind: str,
    partitions_def: dg.PartitionsDefinition,
    upstream: str,
    examples_of: Callable[[dg.AssetExecutionContext, LineageStore], features.FeatureExamples],
    description: str,
) -> dg.AssetsDefinition:
    """`train_gradients` (Adam features of one pool shard) and `target_gradients` (SGD features of val targets)."""

    @dg.asset(
        name=f"{kind}_gradients",
        partitions_def=partitions_def,
        deps=["warmup_checkpoints", upstream],
        group_name="less",
        pool="accelerator",
        code_version=GRADIENT_CODE,
        description=description,
    )
    def _gradients(
        context: dg.AssetExecutionContext,
        config: GradientConfig,
        settings: StorageSettings,
        lineage: LineageStore,
        model_store: ModelStore,
        device: DeviceSettings,
    ) -> dg.MaterializeResult:
        tracker = LineageTracker(context, lineage)
        examples = examples_of(context, lineage)
        recipe = config.resolved()
        run = features.compute_gradient_features(
            features.FeatureRequest(
                kind=kind,
                spec=model_store.spec(_model(context)),
                examples=examples,
                settings=features.FeatureSettings(
                    dims=list(config.dims),
                    mode=recipe.mode,
                    seed=config.seed,
                    chunk_size=config.chunk_size,
                    train_transform=recipe.train_transform,
                    loss_tokens=recipe.loss_tokens,
                ),
                root=settings.path("gradients"),
                models=model_store,
                device=device,
                connect=lineage.connect,
                log=context.log,
            )
        )
        for label, directory in run.files.items():
            tracker.add_file(label, directory)
        return _result(tracker, {**run.as_metrics(), **examples.metrics, **_recipe_metrics(kind, recipe)})

    return _gradients


train_gradients = build_gradient_asset(
    "train",
    model_shard_partitions,
    "raw_pool",
    _pool_shard,
    "Per-example LoRA gradients of one shard of the pool at every warmup checkpoint, transformed by "
    "`train_transform` (default 'sgd'; 'adam' is LESS's Adam step) of the `loss_tokens` loss, projected. "
    "One partition per (model, shard).",
)
target_gradients = build_gradient_asset(
    "target",
    model_partitions,
    "target_tasks",
    _target_val,
    "Plain (SGD) per-example LoRA gradients of the target val examples at every warmup checkpoint, projected.",
)
