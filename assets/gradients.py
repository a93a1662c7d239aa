"""LESS step 2: the gradient datastore (projected, L2-normalized fp16 features in memory-mapped shards)."""

import time

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, code_version, markdown_table, read_pool, read_targets, transaction
from orchestration.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection import checkpoints, datastore, models, projection, tokenization, training
from selection.gradients import PerExampleGradients

STORE_TABLE_DDL = """CREATE TABLE IF NOT EXISTS gradient_stores (
    model VARCHAR, kind VARCHAR, warmup_run_key VARCHAR, epoch INTEGER, avg_lr DOUBLE, store_id VARCHAR,
    directory VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT, n_rows INTEGER, created_at TIMESTAMPTZ
)"""

GRADIENT_CODE = code_version(
    "selection.gradients", "selection.projection", "selection.datastore", "selection.tokenization", "selection.checkpoints"
)


class GradientConfig(dg.Config):
    dims: list[int] = Field(default=[projection.DEFAULT_DIM], description="Projection dims (one pass fills all)")
    mode: str = Field(default=projection.DEFAULT_MODE, description="'fast' (sparse sign) or 'exact' (dense Rademacher)")
    seed: int = Field(default=0, description="Projection seed; stores of different seeds never mix")
    shard_size: int = Field(default=512, description="Rows per memory-mapped shard")


def _store_rows(con, spec_name: str, kind: str, run_key: str, epoch: int, avg_lr: float, stores) -> None:
    con.execute(STORE_TABLE_DDL)
    frame = pd.DataFrame(
        [
            (spec_name, kind, run_key, epoch, avg_lr, s.store_id, str(s.directory), s.manifest["projection"]["mode"],
             s.dim, s.manifest["projection"]["seed"], len(s.ids()), pd.Timestamp.now(tz="UTC"))
            for s in stores
        ],
        columns=["model", "kind", "warmup_run_key", "epoch", "avg_lr", "store_id", "directory", "mode", "dim", "seed",
                 "n_rows", "created_at"],
    )
    con.execute(
        "DELETE FROM gradient_stores WHERE store_id IN (SELECT store_id FROM frame)"
    )
    con.execute("INSERT INTO gradient_stores SELECT * FROM frame")
    for store in stores:
        datastore.write_index(con, store)


def _gradient_features(
    context: dg.AssetExecutionContext,
    kind: str,
    example_ids: list[str],
    conversations: list[list[dict]],
    config: GradientConfig,
    settings: StorageSettings,
    lineage: LineageStore,
    model_store: ModelStore,
    device: DeviceSettings,
    tracker: LineageTracker,
) -> dict:
    """Fill one store per (checkpoint, dim) with `kind` features of the given examples (skipping stored ids)."""
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        warmup = checkpoints.latest_run_checkpoints(con, spec.name, "warmup")
    run_key = str(warmup["run_key"].iloc[0])
    model, tokenizer = model_store.load(spec, device.resolve())
    peft_model = models.add_lora(model, spec)
    engine = PerExampleGradients(peft_model)
    tokenized, stats = tokenization.tokenize_many(tokenizer, conversations, spec.max_length)
    usable = stats.usable_indices()
    skipped_ids = sorted(set(example_ids) - {example_ids[i] for i in usable})
    if skipped_ids:
        context.log.warning(f"{len(skipped_ids)} examples have no target tokens after truncation; no features")
    pairs = [(example_ids[i], tokenized[i]) for i in usable]
    per_checkpoint = []
    started = time.perf_counter()
    for row in warmup.itertuples():
        checkpoints.load_adapter_weights(peft_model, row.path)
        exp_avg = exp_avg_sq = None
        if kind == "train":
            _, exp_avg, exp_avg_sq, _ = training.load_checkpoint(row.path, expected_names=engine.names)
        projectors = [
            projection.make_projector(config.mode, engine.dim, dim, config.seed, engine.names_hash, device.resolve())
            for dim in config.dims
        ]
        stores = [
            datastore.FeatureStore(
                datastore.store_directory(settings.subdir("gradients"), f"{spec.name}-{spec.fingerprint()}",
                                          f"{run_key}-epoch_{row.epoch}", kind, p),
                f"{spec.name}-{spec.fingerprint()}", f"{run_key}-epoch_{row.epoch}", kind, p, shard_size=config.shard_size,
            )
            for p in projectors
        ]

        def log_progress(progress: datastore.Progress, epoch: int = row.epoch) -> None:
            context.log.info(
                f"{kind} epoch {epoch}: {progress.done}/{progress.total} examples ({progress.skipped} already stored), "
                f"{progress.examples_per_s:.2f} examples/s, ETA {progress.eta_s:.0f} s"
            )

        computed = datastore.compute_features(
            peft_model, pairs, projectors, stores, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
            pad_token_id=tokenizer.pad_token_id, max_batch_size=device.batch_size,
            max_tokens=device.max_tokens_per_batch, progress_cb=log_progress,
        )
        with lineage.connect() as con, transaction(con):
            _store_rows(con, spec.name, kind, run_key, int(row.epoch), float(row.avg_lr), stores)
        for store in stores:
            tracker.add_file(f"{kind}/epoch_{row.epoch}/d{store.dim}", store.directory)
        per_checkpoint.append({"epoch": int(row.epoch), "computed": computed, "stored": len(stores[0].ids())})
    seconds = time.perf_counter() - started
    n_computed = sum(c["computed"] for c in per_checkpoint)
    return {
        "warmup_run_key": run_key, "kind": kind, "mode": config.mode, "dims": list(config.dims), "seed": config.seed,
        "n_examples": len(pairs), "n_skipped_no_target": len(skipped_ids), "skipped_ids": skipped_ids[:50],
        "n_computed": n_computed, "seconds": seconds,
        "examples_per_s": n_computed / seconds if seconds > 0 and n_computed else None,
        "tokenization": stats.as_metrics(), "checkpoints": per_checkpoint,
    }


def _result(tracker: LineageTracker, metrics: dict) -> dg.MaterializeResult:
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "warmup_run_key": metrics["warmup_run_key"],
            "mode": metrics["mode"],
            "dims": dg.MetadataValue.json(metrics["dims"]),
            "n_examples": dg.MetadataValue.int(metrics["n_examples"]),
            "n_computed": dg.MetadataValue.int(metrics["n_computed"]),
            "n_skipped_no_target": dg.MetadataValue.int(metrics["n_skipped_no_target"]),
            "examples_per_s": dg.MetadataValue.float(float(metrics["examples_per_s"] or 0.0)),
            "checkpoints": dg.MetadataValue.md(markdown_table(metrics["checkpoints"])),
        },
    )


def _pool_examples(lineage: LineageStore) -> tuple[list[str], list[list[dict]], dict]:
    with lineage.connect() as con:
        pool_version, ids, conversations = read_pool(con)
    return ids, conversations, {"pool_version": pool_version}


def _target_val_examples(lineage: LineageStore) -> tuple[list[str], list[list[dict]], dict]:
    with lineage.connect() as con:
        rows = read_targets(con, "val")
    # The same example may define several tasks; its gradient is computed once.
    unique = dict((example_id, messages) for _, _, example_id, messages in rows)
    return list(unique), list(unique.values()), {"n_val_rows": len(rows)}


def build_gradient_asset(kind: str, upstream: str, examples_of, description: str) -> dg.AssetsDefinition:
    """`train_gradients` (Adam features of the pool) and `target_gradients` (SGD features of val targets)."""

    @dg.asset(
        name=f"{kind}_gradients",
        partitions_def=model_partitions,
        deps=["warmup_checkpoints", upstream],
        group_name="less",
        pool="accelerator",
        code_version=GRADIENT_CODE,
        description=description,
    )
    def _gradients(
        context: dg.AssetExecutionContext, config: GradientConfig, settings: StorageSettings, lineage: LineageStore,
        model_store: ModelStore, device: DeviceSettings,
    ) -> dg.MaterializeResult:
        tracker = LineageTracker(context, lineage)
        ids, conversations, extra = examples_of(lineage)
        metrics = _gradient_features(context, kind, ids, conversations, config, settings, lineage, model_store,
                                     device, tracker)
        return _result(tracker, {**metrics, **extra})

    return _gradients


train_gradients = build_gradient_asset(
    "train", "raw_pool", _pool_examples,
    "Adam-preconditioned per-example LoRA gradients of the pool at every warmup checkpoint, projected.",
)
target_gradients = build_gradient_asset(
    "target", "target_tasks", _target_val_examples,
    "Plain (SGD) per-example LoRA gradients of the target val examples at every warmup checkpoint, projected.",
)
