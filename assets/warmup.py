"""LESS step 1: warmup LoRA checkpoints with Adam moments saved after every epoch."""

import dagster as dg
from pydantic import Field

from assets.common import LineageTracker, code_version
from assets.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection.common.markdown import markdown_table
from selection.data import pool_store
from selection.influence import warmup
from selection.train import checkpoints, training


class WarmupConfig(dg.Config):
    """Defaults are LESS's warmup (fraction 0.05, 4 epochs, lr 2e-5, linear schedule, warmup ratio 0.03,
    32 examples per optimizer step); `make demo`'s profiles set smaller values (orchestration/profiles.py)."""

    fraction: float = Field(default=0.05, description="Share of the pool used for warmup (seeded)")
    epochs: int = training.LESS_TRAINING_CONFIG.epochs
    learning_rate: float = training.LESS_TRAINING_CONFIG.learning_rate
    batch_size: int = Field(
        default=training.LESS_TRAINING_CONFIG.batch_size,
        description="Examples per optimizer step, accumulated over micro-batches of the `device` resource's batch_size",
    )
    warmup_ratio: float = training.LESS_TRAINING_CONFIG.warmup_ratio
    seed: int = 0
    resample: bool = Field(
        default=False,
        description="Draw a new warmup sample from the current pool. By default a pool refresh keeps the earlier "
        "sample (same settings), so checkpoints and every stored gradient stay valid and only new ids are computed.",
    )


@dg.asset(
    partitions_def=model_partitions,
    deps=["raw_pool"],
    group_name="less",
    pool="accelerator",
    code_version=code_version(
        "selection.train.training",
        "selection.data.tokenization",
        "selection.train.models",
        "selection.train.checkpoints",
        "selection.influence.warmup",
    ),
    description="Warmup LoRA checkpoints (adapter + Adam moments + avg lr per epoch) on a seeded slice of the pool.",
)
def warmup_checkpoints(
    context: dg.AssetExecutionContext,
    config: WarmupConfig,
    settings: StorageSettings,
    lineage: LineageStore,
    model_store: ModelStore,
    device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec = model_store.spec(context.partition_key)
    train_config = training.TrainingConfig(
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        micro_batch_size=min(config.batch_size, device.batch_size),
        max_tokens_per_micro_batch=device.max_tokens_per_batch,
        warmup_ratio=config.warmup_ratio,
        seed=config.seed,
    )
    with lineage.connect() as con:
        pool_version, ids, conversations = pool_store.read_pool(con)
    run = warmup.train_warmup(
        warmup.WarmupRequest(
            spec=spec,
            training=train_config,
            fraction=config.fraction,
            resample=config.resample,
            pool_version=pool_version,
            pool=dict(zip(ids, conversations)),
            out_root=settings.path("models", spec.name, "warmup"),
            models=model_store,
            device=device,
            connect=lineage.connect,
            log=context.log,
        )
    )
    with lineage.connect() as con:
        checkpoints.record_training_run(con, run.rows, run.trained_ids)
    for row in run.rows:
        tracker.add_file(f"epoch_{row.epoch}", run.out_dir / f"epoch_{row.epoch}")
    per_epoch = [{"epoch": r.epoch, "avg_lr": f"{r.avg_lr:.3e}", "mean_loss": f"{r.mean_loss:.4f}"} for r in run.rows]
    metrics = {
        "run_key": run.run_key,
        "pool_version": pool_version,
        "model": spec.to_dict(),
        "training": train_config.to_dict(),
        "n_examples": len(run.trained_ids),
        "resumed_from_epoch": run.result.resumed_from_epoch,
        "discarded_damaged_epochs": run.result.metrics["discarded_damaged_epochs"],
        "seconds": run.seconds,
        "tokenization": run.tokenization,
        "epochs": per_epoch,
        "truncation_by_source": run.truncation_by_source,
    }
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "run_key": run.run_key,
            "model_fingerprint": spec.fingerprint(),
            "pool_version": pool_version,
            "n_examples": dg.MetadataValue.int(len(run.trained_ids)),
            "resumed_from_epoch": dg.MetadataValue.int(run.result.resumed_from_epoch),
            "tokenization": dg.MetadataValue.json(run.tokenization),
            "truncation": dg.MetadataValue.md(markdown_table(run.truncation_by_source)),
            "epochs": dg.MetadataValue.md(markdown_table(per_epoch)),
            "checkpoint_dir": dg.MetadataValue.path(str(run.out_dir)),
        },
    )
