"""LESS step 1: train warmup LoRA checkpoints (adapter + Adam moments + avg lr per epoch) on a
seeded slice of the pool, whose gradients the datastore is then filled with."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from selection.common import progress
from selection.common.runtime import Connect, Device, Log, ModelLoader
from selection.data import pool_store, tokenization
from selection.train import checkpoints, models, preflight, training
from selection.train.models import ModelSpec
from selection.train.training import TrainingConfig


def stable_fraction_sample(ids: list[str], fraction: float, seed: int) -> list[str]:
    """A seeded subset whose membership depends on each id alone (pool refreshes barely move it)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    count = max(1, round(fraction * len(ids)))
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return sorted(ranked[:count])


@dataclass(frozen=True)
class WarmupRequest:
    spec: ModelSpec
    training: TrainingConfig  # its seed also seeds the sample and the LoRA init
    fraction: float  # share of the pool trained on
    resample: bool  # draw a new sample instead of keeping the earlier one of the same settings
    pool_version: str
    pool: dict[str, list[dict]]  # the current pool: id -> conversation, in pool order
    out_root: Path  # the model's warmup folder; each run trains in <out_root>/<run_key>
    models: ModelLoader
    device: Device
    connect: Connect
    log: Log


@dataclass(frozen=True)
class WarmupRun:
    run_key: str
    out_dir: Path
    trained_ids: list[str]
    rows: list[checkpoints.CheckpointRow]  # one per epoch, to record
    result: training.TrainingResult
    tokenization: dict[str, int]  # stats of the sampled examples
    truncation_by_source: list[dict]
    seconds: float  # training time


def train_warmup(request: WarmupRequest) -> WarmupRun:
    """Train on the warmup sample, refusing (before loading the model, then on the usable count) a
    sample whose schedule gives some epoch no learning rate. By default a pool refresh keeps the
    earlier sample of the same settings, so checkpoints and every stored gradient stay valid."""
    spec, train_config, pool, log = request.spec, request.training, request.pool, request.log
    config_key = checkpoints.training_run_key(
        spec.fingerprint(), train_config.to_dict(), [request.fraction, train_config.seed]
    )
    previous = None
    if not request.resample:
        with request.connect() as con:
            previous = checkpoints.examples_of_latest_run(con, spec.name, "warmup", config_key)
    if previous is not None:
        # Rows superseded by an edited source record since are never trained on again.
        warmup_ids = [example_id for example_id in previous if example_id in pool]
        if len(warmup_ids) < len(previous):
            log.warning(
                f"{len(previous) - len(warmup_ids)} examples of the earlier warmup sample were "
                "superseded by edited source records and are dropped from it (retraining)"
            )
        log.info(f"reusing the earlier warmup sample ({len(warmup_ids)} examples); set resample=true to redraw")
    else:
        warmup_ids = stable_fraction_sample(list(pool), request.fraction, train_config.seed)
    # Refused before loading the model (all sampled examples usable), then on the usable count.
    preflight.check_warmup_schedule(
        len(warmup_ids), train_config.batch_size, train_config.epochs, train_config.warmup_ratio, pool_size=len(pool)
    )
    model, tokenizer = request.models.load(spec, request.device.resolve())
    examples, stats = tokenization.tokenize_many(tokenizer, [pool[i] for i in warmup_ids], spec.max_length)
    with request.connect() as con:
        sources = pool_store.example_sources(con, warmup_ids)
    truncation = tokenization.TruncationTally()
    truncation.add(warmup_ids, [sources.get(i, "unknown") for i in warmup_ids], examples)
    usable = stats.usable_indices()
    if len(usable) < len(examples):
        log.warning(f"{len(examples) - len(usable)} warmup examples have no target tokens and are skipped")
    preflight.check_warmup_schedule(
        len(usable), train_config.batch_size, train_config.epochs, train_config.warmup_ratio, pool_size=len(pool)
    )
    trained_ids = [warmup_ids[i] for i in usable]
    run_key = checkpoints.training_run_key(spec.fingerprint(), train_config.to_dict(), trained_ids)
    out_dir = request.out_root / run_key
    peft_model = models.add_lora(model, spec, seed=train_config.seed)
    started = time.perf_counter()
    reporter = progress.ProgressReporter(
        "warmup training",
        training.lr_schedule(
            len(usable), train_config.batch_size, train_config.epochs, train_config.warmup_ratio
        ).total_steps,
        log.info,
        unit="optimizer steps",
    )

    def log_progress(step: training.TrainingProgress) -> None:
        reporter.update(1, f"epoch {step.epoch}, loss {step.loss:.4f}, lr {step.learning_rate:.2e}")

    result = training.train_lora(
        peft_model, [examples[i] for i in usable], train_config, out_dir, tokenizer.pad_token_id, log_progress
    )
    for problem in result.metrics["discarded_damaged_epochs"]:
        log.warning(f"damaged warmup epoch deleted and retrained with the epochs after it: {problem}")
    rows = [
        checkpoints.CheckpointRow.of_epoch(
            c,
            spec.name,
            "warmup",
            run_key,
            len(trained_ids),
            request.pool_version,
            config={
                "training": train_config.to_dict(),
                "model": spec.to_dict(),
                "config_key": config_key,
                "fraction": request.fraction,
                "seed": train_config.seed,
            },
        )
        for c in result.checkpoints
    ]
    return WarmupRun(
        run_key=run_key,
        out_dir=out_dir,
        trained_ids=trained_ids,
        rows=rows,
        result=result,
        tokenization=stats.as_metrics(),
        truncation_by_source=truncation.rows(),
        seconds=time.perf_counter() - started,
    )
