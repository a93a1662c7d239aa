"""Asset checks: find what the checked materialization wrote, run the check in `selection.checks` on it.

A check of a partitioned asset is partitioned the same way and evaluates the partition that was
materialized, so a bad selection for one model fails (and, being blocking, holds back) only that
model's downstream partitions. Every check is blocking: the automation conditions wait for them
(orchestration/automation.py), and a run skips the assets downstream of a failed one.
"""

import dagster as dg

from assets.partitions import MODEL_DIMENSION, SHARD_DIMENSION, model_partitions, model_shard_partitions
from resources.lineage import LineageStore
from selection import checks, registry
from selection.data import pool_store
from selection.diversity import embeddings
from selection.diversity.diversity_store import latest_embeddings
from selection.evaluate import evaluation_store
from selection.influence import influence_store
from selection.train import checkpoints


def _latest_materialization(context: dg.AssetCheckExecutionContext) -> dg.EventLogRecord:
    """The materialization being checked: the latest one of the check's asset and partition."""
    key = context.check_specs[0].asset_key
    partitions = [context.partition_key] if context.has_partition_key else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=partitions), limit=1
    ).records
    if not records:
        raise ValueError(f"{key.to_user_string()} {partitions or ''} was never materialized; nothing to check")
    return records[0]


def _result(outcome: checks.CheckOutcome) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed,
        description=outcome.description,
        metadata={"problems": dg.MetadataValue.json(outcome.problems)},
    )


def selection_check(method: registry.SelectionMethod) -> dg.AssetChecksDefinition:
    """The blocking check of a registered method's selection asset."""

    @dg.asset_check(
        asset=method.asset,
        name=f"{method.asset}_is_valid",
        partitions_def=model_partitions,
        blocking=True,
        description="Size equals the requested budget (materialization metadata), no duplicate ids, "
        "every id in the pool version it was selected from",
    )
    def _check(context: dg.AssetCheckExecutionContext, lineage: LineageStore) -> dg.AssetCheckResult:
        record = _latest_materialization(context)
        budget = record.asset_materialization.metadata["budget"].value
        with lineage.connect() as con:
            return _result(checks.check_selection(con, context.partition_key, method.name, budget, record.run_id))

    return _check


def _gradient_stores(lineage: LineageStore, model: str, kind: str, shard: str | None) -> list[tuple[str, int]]:
    """(directory, recorded dim) of the stores of a model's latest warmup run (what influence reads)."""
    with lineage.connect() as con:
        run_key = str(checkpoints.latest_run_checkpoints(con, model, "warmup")["run_key"].iloc[0])
        return influence_store.store_dims(con, model, kind, shard, run_key)


UNIT_ROWS = "Rows have the dim recorded for their store, no NaN or inf, and L2 norm 1 within float16 rounding"


def _unit_rows_check(kind: str, partitions_def: dg.PartitionsDefinition) -> dg.AssetChecksDefinition:
    """The blocking check of the `{kind}_gradients` feature stores of the checked model (and shard, if partitioned
    by one)."""

    @dg.asset_check(
        asset=f"{kind}_gradients",
        name=f"{kind}_features_are_unit_rows",
        partitions_def=partitions_def,
        blocking=True,
        description=UNIT_ROWS,
    )
    def _check(context: dg.AssetCheckExecutionContext, lineage: LineageStore) -> dg.AssetCheckResult:
        keys = getattr(context.partition_key, "keys_by_dimension", {MODEL_DIMENSION: context.partition_key})
        model, shard = keys[MODEL_DIMENSION], keys.get(SHARD_DIMENSION)
        scope = model if shard is None else f"{model} shard {shard}"
        stores = _gradient_stores(lineage, model, kind, shard)
        return _result(checks.check_feature_stores(stores, f"{kind} features of {scope}: {UNIT_ROWS}"))

    return _check


train_features_check = _unit_rows_check("train", model_shard_partitions)
target_features_check = _unit_rows_check("target", model_partitions)


@dg.asset_check(asset="embeddings", name="embeddings_are_unit_rows", blocking=True, description=UNIT_ROWS)
def embeddings_check(lineage: LineageStore) -> dg.AssetCheckResult:
    with lineage.connect() as con:
        cache_dir, fingerprint, mode, dim = latest_embeddings(con)
        ids = pool_store.pool_ids(con)
    # Opened with the recorded dim: a cache whose manifest says otherwise refuses to open.
    try:
        cache = embeddings.EmbeddingCache(cache_dir, fingerprint, mode, dim)
    except embeddings.EmbeddingCacheMismatch as error:
        return _result(checks.CheckOutcome(f"embeddings in {cache_dir}", [str(error)]))
    return _result(checks.check_embeddings(cache, ids))


@dg.asset_check(
    asset="raw_pool",
    name="every_record_accounted_for",
    blocking=True,
    description="Per source read: accepted + rejected + duplicates = records read, matching the pool, "
    "pool_rejects and pool_duplicates rows",
)
def pool_accounting_check(lineage: LineageStore) -> dg.AssetCheckResult:
    with lineage.connect() as con:
        return _result(checks.check_pool_accounting(con))


@dg.asset_check(
    asset="evaluation",
    name="every_checkpoint_scored_on_same_rows",
    partitions_def=model_partitions,
    blocking=True,
    description="The evaluation scored the base model and every current finetuned "
    "checkpoint, each on the same test rows",
)
def evaluation_check(context: dg.AssetCheckExecutionContext, lineage: LineageStore) -> dg.AssetCheckResult:
    run_id = _latest_materialization(context).run_id
    with lineage.connect() as con:
        evaluation_store.ensure_evaluation_tables(con)
        current = [str(key) for key in evaluation_store.current_finetunes(con, context.partition_key)["run_key"]]
        return _result(checks.check_evaluation(con, context.partition_key, run_id, current))


ALL_CHECKS = [
    *map(selection_check, registry.METHODS),
    train_features_check,
    target_features_check,
    embeddings_check,
    pool_accounting_check,
    evaluation_check,
]
