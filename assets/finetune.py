"""Finetuned LoRA checkpoints: one per stored selection, with the exact examples recorded per checkpoint."""

import dataclasses
import time

import dagster as dg
from pydantic import Field, field_validator

from assets.common import LineageTracker, code_version, markdown_table, read_pool
from assets.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection import selection_store, selectors
from selection.common import names, progress
from selection.data import tokenization
from selection.train import checkpoints, models, training

GPU_DEFAULT_SEEDS = 3

SELECTION_ASSETS = [
    "less_selection", "bids_selection", "round_robin_selection", "random_selection", "kmq_selection",
    "kmq_iterative_selection", "rds_selection", "full_selection",
]


class FinetuneConfig(dg.Config):
    """Training defaults are LESS's (4 epochs, lr 2e-5, linear schedule, warmup ratio 0.03, 32 examples per step)."""

    targets: list[str] = Field(default=["all"], description="Which selection targets to finetune on ('all' = multi-target)")
    methods: list[str] | None = Field(default=None, description="Methods to finetune; default every stored method")
    epochs: int = training.LESS_TRAINING_CONFIG.epochs
    learning_rate: float = training.LESS_TRAINING_CONFIG.learning_rate
    batch_size: int = Field(default=training.LESS_TRAINING_CONFIG.batch_size,
                            description="Examples per optimizer step, accumulated over micro-batches of the "
                            "`device` resource's batch_size")
    seed: int = 0
    seeds: int | None = Field(
        default=None, ge=1,
        description="Finetuning runs per selection, with seeds seed, seed+1, ...; the report averages each test "
                    f"row over them. None = 1 on the CPU, {GPU_DEFAULT_SEEDS} on a GPU",
    )

    # Targets and methods name checkpoint folders: checked before anything is read or written.
    @field_validator("targets")
    @classmethod
    def _target_names(cls, values: list[str]) -> list[str]:
        return [v if v == selectors.ALL_TARGETS else names.check_name(v, "task", f"targets[{i}]")
                for i, v in enumerate(values)]

    @field_validator("methods")
    @classmethod
    def _method_names(cls, values: list[str] | None) -> list[str] | None:
        return None if values is None else [names.check_name(v, "method", f"methods[{i}]") for i, v in enumerate(values)]


def latest_selections(con, model: str, targets: list[str], methods: list[str] | None) -> list[tuple[str, str, int, str]]:
    """(method, target, budget, pool_version) of the most recent selection per (method, target)."""
    selection_store.ensure_selection_tables(con)
    rows = con.execute(
        """SELECT method, target, budget, any_value(pool_version) FROM selections WHERE model = ?
           GROUP BY method, target, budget
           QUALIFY row_number() OVER (PARTITION BY method, target ORDER BY max(created_at) DESC) = 1
           ORDER BY method, target""",
        [model],
    ).fetchall()
    return [r for r in rows if r[1] in targets and (methods is None or r[0] in methods)]


@dg.asset(
    partitions_def=model_partitions,
    deps=SELECTION_ASSETS,
    group_name="evaluation",
    pool="accelerator",
    code_version=code_version("selection.train.training", "selection.train.checkpoints", "selection.data.tokenization"),
    description="A LoRA finetuned on each selection; `checkpoints`/`checkpoint_examples` say which data trained it.",
)
def finetuned_checkpoints(
    context: dg.AssetExecutionContext, config: FinetuneConfig, settings: StorageSettings, lineage: LineageStore,
    model_store: ModelStore, device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        _, ids, conversations = read_pool(con)
        wanted = latest_selections(con, spec.name, config.targets, config.methods)
        chosen = {
            (m, t, b): [r[0] for r in con.execute(
                "SELECT example_id FROM selections WHERE model = ? AND method = ? AND target = ? AND budget = ? "
                "ORDER BY rank", [spec.name, m, t, b]).fetchall()]
            for m, t, b, _ in wanted
        }
    if not wanted:
        raise ValueError(f"no selections stored for model {spec.name!r} and targets {config.targets}")
    # A selection made before a source record was edited may hold its old version: never train on it.
    current = set(ids)
    stale = {key: gone for key, picked in chosen.items() if (gone := [i for i in picked if i not in current])}
    if stale:
        (method, target, budget), gone = next(iter(stale.items()))
        raise ValueError(f"{len(stale)} stored selections hold examples superseded or gone from the pool since they "
                         f"were made, e.g. {method}/{target}/{budget}: {gone[:3]}; rematerialize "
                         f"{', '.join(sorted({f'{m}_selection' for m, _, _ in stale}))} for {spec.name!r} first")
    for method, target, budget, _ in wanted:  # stored names: refuse a folder outside the root before training any
        settings.path("models", spec.name, "finetune", f"{method}-{target}-{budget}")
    by_id = dict(zip(ids, conversations))
    device_name = device.resolve()
    model, tokenizer = model_store.load(spec, device_name)
    n_seeds = config.seeds or (GPU_DEFAULT_SEEDS if device_name.startswith("cuda") else 1)
    seeds = list(range(config.seed, config.seed + n_seeds))
    base_config = training.TrainingConfig(
        epochs=config.epochs, learning_rate=config.learning_rate, batch_size=config.batch_size,
        micro_batch_size=min(config.batch_size, device.batch_size), seed=config.seed,
    )
    summary = []
    runs = [(selection, seed) for selection in wanted for seed in seeds]
    # Counted before examples without target tokens are dropped: the ETA errs long, never short.
    reporter = progress.ProgressReporter(
        f"finetuning {len(runs)} LoRAs", sum(training.lr_schedule(len(chosen[key[:3]]), base_config.batch_size,
                                                                   base_config.epochs, 0.0).total_steps
                                             for key, _ in runs),
        context.log.info, unit="optimizer steps")
    for (method, target, budget, pool_version), seed in runs:
        example_ids = chosen[(method, target, budget)]
        examples, stats = tokenization.tokenize_many(tokenizer, [by_id[i] for i in example_ids], spec.max_length)
        usable = stats.usable_indices()
        trained_ids = [example_ids[i] for i in usable]
        # The seed is in the training config, hence in the run key and the folder: one checkpoint per seed.
        train_config = dataclasses.replace(base_config, seed=seed)
        # The selection's identity is part of the key: two methods may pick the same examples.
        run_key = checkpoints.training_run_key(
            spec.fingerprint(), {**train_config.to_dict(), "selection": [method, target, budget]}, trained_ids)
        out_dir = settings.subdir("models", spec.name, "finetune", f"{method}-{target}-{budget}-{run_key}")
        started = time.perf_counter()
        peft_model = models.add_lora(model, spec, seed=seed)
        result = training.train_lora(peft_model, [examples[i] for i in usable], train_config, out_dir,
                                     tokenizer.pad_token_id, save_moments=False,
                                     progress_cb=lambda step, name=f"{method}/{target} seed {seed}": reporter.update(
                                         1, f"{name}, epoch {step.epoch}, loss {step.loss:.4f}"))
        peft_model.unload()
        final = result.checkpoints[-1]
        row = checkpoints.CheckpointRow(
            model=spec.name, stage="finetune", run_key=run_key, epoch=final.epoch, path=str(final.path),
            avg_lr=final.avg_lr, mean_loss=final.mean_loss, n_examples=len(trained_ids), pool_version=pool_version,
            method=method, target=target, budget=budget, seed=seed,
            # `seeds` tells evaluation which seeds make up this materialization.
            config={"training": train_config.to_dict(), "seeds": seeds},
        )
        with lineage.connect() as con:
            checkpoints.record_training_run(con, [row], trained_ids)
        tracker.add_file(f"{method}/{target}/{budget}/seed-{seed}", final.path)
        summary.append({"method": method, "target": target, "budget": budget, "seed": seed, "trained": len(trained_ids),
                        "skipped_no_target": len(example_ids) - len(trained_ids), "final_loss": round(final.mean_loss, 4),
                        "seconds": round(time.perf_counter() - started, 1), "run_key": run_key})
        context.log.info(f"finetuned on {method}/{target} seed {seed} ({len(trained_ids)} examples): "
                         f"loss {final.mean_loss:.4f}")
    data_version = tracker.finish({"finetuned": summary, "training": base_config.to_dict(), "seeds": seeds})
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={"n_checkpoints": dg.MetadataValue.int(len(summary)),
                  "checkpoints": dg.MetadataValue.md(markdown_table(summary, max_rows=100))},
    )
