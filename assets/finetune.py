"""Finetuned LoRA checkpoints: one per stored selection, with the exact examples recorded per checkpoint."""

import dataclasses
import time
from collections.abc import Sequence

import dagster as dg
from pydantic import Field, field_validator

from assets.common import LineageTracker, code_version
from assets.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection import registry, selection_store, selectors
from selection.common import names, progress
from selection.common.markdown import markdown_table
from selection.data import overlap_store, pool_store, tokenization
from selection.train import checkpoints, models, training

GPU_DEFAULT_SEEDS = 3


class FinetuneConfig(dg.Config):
    """Training defaults are LESS's (4 epochs, lr 2e-5, linear schedule, warmup ratio 0.03, 32 examples per step)."""

    targets: list[str] = Field(
        default=["all"], description="Which selection targets to finetune on ('all' = multi-target)"
    )
    methods: list[str] | None = Field(default=None, description="Methods to finetune; default every stored method")
    epochs: int = training.LESS_TRAINING_CONFIG.epochs
    learning_rate: float = training.LESS_TRAINING_CONFIG.learning_rate
    batch_size: int = Field(
        default=training.LESS_TRAINING_CONFIG.batch_size,
        description="Examples per optimizer step, accumulated over micro-batches of the `device` resource's batch_size",
    )
    seed: int = 0
    seeds: int | None = Field(
        default=None,
        ge=1,
        description="Finetuning runs per selection, with seeds seed, seed+1, ...; the report averages each test "
        f"row over them. None = 1 on the CPU, {GPU_DEFAULT_SEEDS} on a GPU",
    )

    # Targets and methods name checkpoint folders: checked before anything is read or written.
    @field_validator("targets")
    @classmethod
    def _target_names(cls, values: list[str]) -> list[str]:
        return [
            v if v == selectors.ALL_TARGETS else names.check_name(v, "task", f"targets[{i}]")
            for i, v in enumerate(values)
        ]

    @field_validator("methods")
    @classmethod
    def _method_names(cls, values: list[str] | None) -> list[str] | None:
        return (
            None if values is None else [names.check_name(v, "method", f"methods[{i}]") for i, v in enumerate(values)]
        )


def _finetune(
    context: dg.AssetExecutionContext,
    config: FinetuneConfig,
    settings: StorageSettings,
    lineage: LineageStore,
    model_store: ModelStore,
    device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        _, ids, conversations = pool_store.read_pool(con)
        wanted = selection_store.latest_selections(con, spec.name, config.targets, config.methods)
        chosen = {selection: selection_store.selected_ids(con, spec.name, selection) for selection in wanted}
    if not wanted:
        raise ValueError(f"no selections stored for model {spec.name!r} and targets {config.targets}")
    # A selection made before a source record was edited may hold its old version: never train on it.
    current = set(ids)
    stale = {key: gone for key, picked in chosen.items() if (gone := [i for i in picked if i not in current])}
    if stale:
        first, gone = next(iter(stale.items()))
        raise ValueError(
            f"{len(stale)} stored selections hold examples superseded or gone from the pool since they "
            f"were made, e.g. {first.method}/{first.target}/{first.budget}: {gone[:3]}; rematerialize "
            f"{', '.join(sorted({f'{s.method}_selection' for s in stale}))} for {spec.name!r} first"
        )
    for s in wanted:  # stored names: refuse a folder outside the root before training any
        settings.path("models", spec.name, "finetune", f"{s.method}-{s.target}-{s.budget}")
    # Not refused: a selection keeps target rows on purpose (`keep_target_overlaps`) or predates
    # decontamination; either way the reader of the evaluation must know.
    with lineage.connect() as con:
        overlaps = overlap_store.current_overlaps(con)
    overlapping = {key: found for key in wanted if (found := overlaps.among(chosen[key]))}
    for key, found in overlapping.items():
        context.log.warning(
            f"{key.method}/{key.target}/{key.budget} holds {len(found)} pool rows that are target rows "
            f"({overlaps.describe(set(found))}): it was made with `{overlap_store.KEEP_FIELD}: true` or before they "
            "were excluded, so its checkpoint trains on target rows and its evaluation on those tasks measures "
            f"memorisation; rematerialize {key.method}_selection to leave them out"
        )
    by_id = dict(zip(ids, conversations))
    device_name = device.resolve()
    model, tokenizer = model_store.load(spec, device_name)
    n_seeds = config.seeds or (GPU_DEFAULT_SEEDS if device_name.startswith("cuda") else 1)
    seeds = list(range(config.seed, config.seed + n_seeds))
    base_config = training.TrainingConfig(
        epochs=config.epochs,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        micro_batch_size=min(config.batch_size, device.batch_size),
        seed=config.seed,
    )
    summary = []
    runs = [(selection, seed) for selection in wanted for seed in seeds]
    # Counted before examples without target tokens are dropped: the ETA errs long, never short.
    reporter = progress.ProgressReporter(
        f"finetuning {len(runs)} LoRAs",
        sum(
            training.lr_schedule(len(chosen[selection]), base_config.batch_size, base_config.epochs, 0.0).total_steps
            for selection, _ in runs
        ),
        context.log.info,
        unit="optimizer steps",
    )
    for selection, seed in runs:
        method, target, budget = selection.method, selection.target, selection.budget
        example_ids = chosen[selection]
        examples, stats = tokenization.tokenize_many(tokenizer, [by_id[i] for i in example_ids], spec.max_length)
        usable = stats.usable_indices()
        trained_ids = [example_ids[i] for i in usable]
        # The seed is in the training config, hence in the run key and the folder: one checkpoint per seed.
        train_config = dataclasses.replace(base_config, seed=seed)
        # The selection's identity is part of the key: two methods may pick the same examples.
        run_key = checkpoints.training_run_key(
            spec.fingerprint(), {**train_config.to_dict(), "selection": [method, target, budget]}, trained_ids
        )
        out_dir = settings.subdir("models", spec.name, "finetune", f"{method}-{target}-{budget}-{run_key}")
        started = time.perf_counter()
        peft_model = models.add_lora(model, spec, seed=seed)
        result = training.train_lora(
            peft_model,
            [examples[i] for i in usable],
            train_config,
            out_dir,
            tokenizer.pad_token_id,
            save_moments=False,
            progress_cb=lambda step, name=f"{method}/{target} seed {seed}": reporter.update(
                1, f"{name}, epoch {step.epoch}, loss {step.loss:.4f}"
            ),
        )
        peft_model.unload()
        final = result.checkpoints[-1]
        row = checkpoints.CheckpointRow.of_epoch(
            final,
            spec.name,
            "finetune",
            run_key,
            len(trained_ids),
            selection.pool_version,
            method=method,
            target=target,
            budget=budget,
            seed=seed,
            # `seeds` tells evaluation which seeds make up this materialization.
            config={"training": train_config.to_dict(), "seeds": seeds},
        )
        with lineage.connect() as con:
            checkpoints.record_training_run(con, [row], trained_ids)
        tracker.add_file(f"{method}/{target}/{budget}/seed-{seed}", final.path)
        summary.append(
            {
                "method": method,
                "target": target,
                "budget": budget,
                "seed": seed,
                "trained": len(trained_ids),
                "skipped_no_target": len(example_ids) - len(trained_ids),
                "target_rows": len(overlaps.among(trained_ids)),
                "final_loss": round(final.mean_loss, 4),
                "seconds": round(time.perf_counter() - started, 1),
                "run_key": run_key,
            }
        )
        context.log.info(
            f"finetuned on {method}/{target} seed {seed} ({len(trained_ids)} examples): loss {final.mean_loss:.4f}"
        )
    n_target_rows = len({i for found in overlapping.values() for i in found})
    data_version = tracker.finish(
        {
            "finetuned": summary,
            "training": base_config.to_dict(),
            "seeds": seeds,
            "target_rows_in_selections": {f"{k.method}/{k.target}/{k.budget}": len(v) for k, v in overlapping.items()},
            "target_overlaps": overlaps.summary(),
        }
    )
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "n_checkpoints": dg.MetadataValue.int(len(summary)),
            "n_target_rows_in_selections": dg.MetadataValue.int(n_target_rows),
            "checkpoints": dg.MetadataValue.md(markdown_table(summary, max_rows=100)),
        },
    )


def finetuned_checkpoints_of(methods: Sequence[registry.SelectionMethod]) -> dg.AssetsDefinition:
    """The finetuning asset, downstream of the selection asset of each of `methods`."""
    return dg.asset(
        name="finetuned_checkpoints",
        partitions_def=model_partitions,
        deps=[method.asset for method in methods],
        group_name="evaluation",
        pool="accelerator",
        code_version=code_version(
            "selection.train.training", "selection.train.checkpoints", "selection.data.tokenization"
        ),
        description="A LoRA finetuned on each selection; `checkpoints`/`checkpoint_examples` say which data trained "
        "it.",
    )(_finetune)


finetuned_checkpoints = finetuned_checkpoints_of(registry.METHODS)
