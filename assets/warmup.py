"""LESS step 1: warmup LoRA checkpoints with Adam moments saved after every epoch."""

import time

import dagster as dg
from pydantic import Field

from assets.common import LineageTracker, code_version, markdown_table, read_pool, stable_fraction_sample
from assets.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection.common import progress
from selection.data import pool_store, tokenization
from selection.train import checkpoints, models, preflight, training


class WarmupConfig(dg.Config):
    """Defaults are LESS's warmup (fraction 0.05, 4 epochs, lr 2e-5, linear schedule, warmup ratio 0.03,
    32 examples per optimizer step); `make demo`'s profiles set smaller values (orchestration/profiles.py)."""

    fraction: float = Field(default=0.05, description="Share of the pool used for warmup (seeded)")
    epochs: int = training.LESS_TRAINING_CONFIG.epochs
    learning_rate: float = training.LESS_TRAINING_CONFIG.learning_rate
    batch_size: int = Field(default=training.LESS_TRAINING_CONFIG.batch_size,
                            description="Examples per optimizer step, accumulated over micro-batches of the "
                            "`device` resource's batch_size")
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
    code_version=code_version("selection.train.training", "selection.data.tokenization", "selection.train.models", "selection.train.checkpoints"),
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
        epochs=config.epochs, learning_rate=config.learning_rate, batch_size=config.batch_size,
        micro_batch_size=min(config.batch_size, device.batch_size), max_tokens_per_micro_batch=device.max_tokens_per_batch,
        warmup_ratio=config.warmup_ratio, seed=config.seed,
    )
    config_key = checkpoints.training_run_key(spec.fingerprint(), train_config.to_dict(), [config.fraction, config.seed])
    with lineage.connect() as con:
        pool_version, ids, conversations = read_pool(con)
        previous = None if config.resample else checkpoints.examples_of_latest_run(con, spec.name, "warmup", config_key)
    by_id = dict(zip(ids, conversations))
    if previous is not None:
        # Rows superseded by an edited source record since are never trained on again.
        warmup_ids = [example_id for example_id in previous if example_id in by_id]
        if len(warmup_ids) < len(previous):
            context.log.warning(f"{len(previous) - len(warmup_ids)} examples of the earlier warmup sample were "
                                "superseded by edited source records and are dropped from it (retraining)")
        context.log.info(f"reusing the earlier warmup sample ({len(warmup_ids)} examples); set resample=true to redraw")
    else:
        warmup_ids = stable_fraction_sample(ids, config.fraction, config.seed)
    # Refused before loading the model (all sampled examples usable), then on the usable count.
    preflight.check_warmup_schedule(len(warmup_ids), train_config.batch_size, train_config.epochs,
                                    train_config.warmup_ratio, pool_size=len(ids))
    model, tokenizer = model_store.load(spec, device.resolve())
    examples, stats = tokenization.tokenize_many(tokenizer, [by_id[i] for i in warmup_ids], spec.max_length)
    with lineage.connect() as con:
        sources = pool_store.example_sources(con, warmup_ids)
    truncation = tokenization.TruncationTally()
    truncation.add(warmup_ids, [sources.get(i, "unknown") for i in warmup_ids], examples)
    usable = stats.usable_indices()
    if len(usable) < len(examples):
        context.log.warning(f"{len(examples) - len(usable)} warmup examples have no target tokens and are skipped")
    preflight.check_warmup_schedule(len(usable), train_config.batch_size, train_config.epochs,
                                    train_config.warmup_ratio, pool_size=len(ids))
    trained_ids = [warmup_ids[i] for i in usable]
    run_key = checkpoints.training_run_key(spec.fingerprint(), train_config.to_dict(), trained_ids)
    out_dir = settings.subdir("models", spec.name, "warmup", run_key)
    peft_model = models.add_lora(model, spec, seed=config.seed)
    started = time.perf_counter()
    reporter = progress.ProgressReporter(
        "warmup training", training.lr_schedule(len(usable), train_config.batch_size, train_config.epochs,
                                                train_config.warmup_ratio).total_steps,
        context.log.info, unit="optimizer steps")

    def log_progress(step: training.TrainingProgress) -> None:
        reporter.update(1, f"epoch {step.epoch}, loss {step.loss:.4f}, lr {step.learning_rate:.2e}")

    result = training.train_lora(
        peft_model, [examples[i] for i in usable], train_config, out_dir, tokenizer.pad_token_id, log_progress
    )
    for problem in result.metrics["discarded_damaged_epochs"]:
        context.log.warning(f"damaged warmup epoch deleted and retrained with the epochs after it: {problem}")
    rows = [
        checkpoints.CheckpointRow(
            model=spec.name, stage="warmup", run_key=run_key, epoch=c.epoch, path=str(c.path), avg_lr=c.avg_lr,
            mean_loss=c.mean_loss, n_examples=len(trained_ids), pool_version=pool_version,
            config={"training": train_config.to_dict(), "model": spec.to_dict(), "config_key": config_key,
                    "fraction": config.fraction, "seed": config.seed},
        )
        for c in result.checkpoints
    ]
    with lineage.connect() as con:
        checkpoints.record_training_run(con, rows, trained_ids)
    for row in rows:
        tracker.add_file(f"epoch_{row.epoch}", out_dir / f"epoch_{row.epoch}")
    per_epoch = [{"epoch": r.epoch, "avg_lr": f"{r.avg_lr:.3e}", "mean_loss": f"{r.mean_loss:.4f}"} for r in rows]
    metrics = {
        "run_key": run_key, "pool_version": pool_version, "model": spec.to_dict(), "training": train_config.to_dict(),
        "n_examples": len(trained_ids), "resumed_from_epoch": result.resumed_from_epoch,
        "discarded_damaged_epochs": result.metrics["discarded_damaged_epochs"],
        "seconds": time.perf_counter() - started, "tokenization": stats.as_metrics(), "epochs": per_epoch,
        "truncation_by_source": truncation.rows(),
    }
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "run_key": run_key,
            "model_fingerprint": spec.fingerprint(),
            "pool_version": pool_version,
            "n_examples": dg.MetadataValue.int(len(trained_ids)),
            "resumed_from_epoch": dg.MetadataValue.int(result.resumed_from_epoch),
            "tokenization": dg.MetadataValue.json(stats.as_metrics()),
            "truncation": dg.MetadataValue.md(markdown_table(truncation.rows())),
            "epochs": dg.MetadataValue.md(markdown_table(per_epoch)),
            "checkpoint_dir": dg.MetadataValue.path(str(out_dir)),
        },
    )
