"""LESS step 2: the gradient datastore (projected, L2-normalized fp16 features in memory-mapped shards).

`train_gradients` is partitioned by (model, shard): each partition computes the pool examples
whose id hashes to its shard (`selection.influence.datastore.shard_of`), so a run launcher or executor
can spread shards over machines. It streams the pool in chunks of `shard_size` examples
(read, tokenize, compute, write), so its memory does not grow with the pool.
`target_gradients` (a few val examples) is partitioned by model only.
"""

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, code_version, markdown_table, read_targets, transaction
from assets.partitions import MODEL_DIMENSION, SHARD_DIMENSION, model_partitions, model_shard_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection.common import memory, progress
from selection.data import pool_store, tokenization
from selection.influence import datastore, diagnostics, projection
from selection.train import checkpoints, models, preflight, training
from selection.influence.gradients import DEFAULT_TRAIN_TRANSFORM, PerExampleGradients, check_train_transform, transform_why

STORE_TABLE_DDL = """CREATE TABLE IF NOT EXISTS gradient_stores (
    model VARCHAR, kind VARCHAR, warmup_run_key VARCHAR, epoch INTEGER, avg_lr DOUBLE, store_id VARCHAR,
    directory VARCHAR, mode VARCHAR, dim INTEGER, seed BIGINT, n_rows INTEGER, created_at TIMESTAMPTZ,
    part VARCHAR, n_excluded INTEGER, transform VARCHAR
)"""
# Tables made before stores had parts.
STORE_TABLE_MIGRATIONS = (
    "ALTER TABLE gradient_stores ADD COLUMN IF NOT EXISTS part VARCHAR",
    "ALTER TABLE gradient_stores ADD COLUMN IF NOT EXISTS n_excluded INTEGER",
    # NULL on rows made before the transform was recorded: those train stores hold LESS's `adam`.
    "ALTER TABLE gradient_stores ADD COLUMN IF NOT EXISTS transform VARCHAR",
)

GRADIENT_CODE = code_version(
    "selection.influence.gradients", "selection.influence.projection", "selection.influence.datastore", "selection.data.tokenization",
    "selection.train.checkpoints", "selection.influence.diagnostics",
)

# Conversations of the given ids, keyed by id (ids not found are missing from the dict).
ConversationLoader = Callable[[Sequence[str]], dict[str, list[dict]]]
# The group (pool source, target task) of each given id, for per-group truncation counts.
GroupLoader = Callable[[Sequence[str]], dict[str, str]]


class GradientConfig(dg.Config):
    dims: list[int] = Field(default=[projection.DEFAULT_DIM], description="Projection dims (one pass fills all)")
    mode: str = Field(default=projection.DEFAULT_MODE,
                      description="'exact' (dense Rademacher from the CPU), 'device' (dense Rademacher generated "
                      "on the device, for 7B-scale LoRA dims) or 'fast' (sparse sign)")
    seed: int = Field(default=0, description="Projection seed; stores of different seeds never mix")
    shard_size: int = Field(default=512, description="Examples per chunk read from the pool and per file on disk")
    train_transform: str = Field(
        default=DEFAULT_TRAIN_TRANSFORM,
        description="train_gradients only (target features are always plain gradients): 'adam' (default, "
        "LESS's literal Adam step), 'adam_no_momentum' (Adam's preconditioner without the shared momentum), "
        "'adam_bias_corrected' or 'sgd'. Stores of different "
        "transforms never mix; influence_scores reads the one its own train_transform names.",
    )


def ensure_store_table(con) -> None:
    """`gradient_stores`, created or brought up to the current columns."""
    con.execute(STORE_TABLE_DDL)
    for migration in STORE_TABLE_MIGRATIONS:
        con.execute(migration)


def _store_rows(con, spec_name: str, kind: str, run_key: str, epoch: int, avg_lr: float, stores) -> None:
    ensure_store_table(con)
    frame = pd.DataFrame(
        [
            (spec_name, kind, run_key, epoch, avg_lr, s.store_id, str(s.directory), s.manifest["projection"]["mode"],
             s.dim, s.manifest["projection"]["seed"], len(s), pd.Timestamp.now(tz="UTC"), s.part, len(s.excluded()),
             s.transform)
            for s in stores
        ],
        columns=["model", "kind", "warmup_run_key", "epoch", "avg_lr", "store_id", "directory", "mode", "dim", "seed",
                 "n_rows", "created_at", "part", "n_excluded", "transform"],
    )
    con.execute("DELETE FROM gradient_stores WHERE store_id IN (SELECT store_id FROM frame)")
    con.execute("INSERT INTO gradient_stores BY NAME SELECT * FROM frame")
    for store in stores:
        datastore.write_index(con, store)


def _gradient_features(
    context: dg.AssetExecutionContext,
    kind: str,
    model_name: str,
    example_ids: Sequence[str],
    load_conversations: ConversationLoader,
    part: str | None,
    config: GradientConfig,
    settings: StorageSettings,
    lineage: LineageStore,
    model_store: ModelStore,
    device: DeviceSettings,
    tracker: LineageTracker,
    precheck: Callable[[Any, int], None] | None = None,
    groups_of: GroupLoader | None = None,
    group_label: str = "source",
) -> dict:
    """Fill one store per (checkpoint, dim) with `kind` features of `example_ids`, streaming them
    in chunks of `shard_size`; ids a store already covers (stored or excluded) are skipped."""
    spec = model_store.spec(model_name)
    transform = check_train_transform(config.train_transform) if kind == "train" else None
    with lineage.connect() as con:
        warmup = checkpoints.latest_run_checkpoints(con, spec.name, "warmup")
    run_key = str(warmup["run_key"].iloc[0])
    resolved = device.resolve()
    model, tokenizer = model_store.load(spec, resolved)
    if precheck is not None:
        precheck(tokenizer, spec.max_length)
    # Exact projectors share the cache for the dense matrix (no effect on the numbers, only on speed).
    projection_options = ({"cache_bytes": device.projection_cache_bytes(resolved) // len(config.dims)}
                          if config.mode == "exact" else {})
    peft_model = models.add_lora(model, spec)
    engine = PerExampleGradients(peft_model)
    model_fingerprint = f"{spec.name}-{spec.fingerprint()}"
    token_counts: dict[str, int] = {}
    truncation = tokenization.TruncationTally()
    per_checkpoint, checked = [], []
    started = time.perf_counter()
    # Built once: a cached dense `exact` matrix then serves every checkpoint.
    projectors = [
        projection.make_projector(config.mode, engine.dim, dim, config.seed, engine.names_hash, resolved,
                                  **projection_options)
        for dim in config.dims
    ]
    for row in warmup.itertuples():
        checkpoint = f"{run_key}-epoch_{row.epoch}"
        stores = [
            datastore.FeatureStore(
                datastore.store_directory(settings.subdir("gradients"), model_fingerprint, checkpoint, kind, p, part,
                                          transform=transform),
                model_fingerprint, checkpoint, kind, p, shard_size=config.shard_size, part=part, transform=transform,
            )
            for p in projectors
        ]
        with contextlib.ExitStack() as locks:
            for store in stores:
                locks.enter_context(store.exclusive())
            dropped = datastore.align_stores(stores)
            if dropped:
                context.log.warning(f"dropped {dropped} shard(s) a killed run committed to only some dims; "
                                    "recomputing them")
            for problem in datastore.repair_stores(stores):
                context.log.warning(f"damaged feature shard dropped with the shards after it, recomputing: {problem}")
            covered = stores[0].covered()
            todo = [example_id for example_id in example_ids if example_id not in covered]
            computed = 0
            if todo:
                checkpoints.load_adapter_weights(peft_model, row.path)
                exp_avg = exp_avg_sq = None
                if kind == "train":
                    _, exp_avg, exp_avg_sq, _ = training.load_checkpoint(row.path, expected_names=engine.names)
                reporter = progress.ProgressReporter(f"{kind} gradients{f' {part}' if part else ''} epoch {row.epoch}",
                                                     len(todo), context.log.info)
            for start in range(0, len(todo), config.shard_size):
                chunk = todo[start : start + config.shard_size]
                chunk_start = reporter.done
                conversations = load_conversations(chunk)
                missing = [example_id for example_id in chunk if example_id not in conversations]
                if missing:
                    raise ValueError(f"{len(missing)} {kind} examples vanished while computing features, e.g. "
                                     f"{missing[:3]}; rematerialize {kind}_gradients")
                tokenized, stats = tokenization.tokenize_many(tokenizer, [conversations[i] for i in chunk],
                                                              spec.max_length)
                for key, value in stats.as_metrics().items():
                    token_counts[key] = token_counts.get(key, 0) + value
                groups = groups_of(chunk) if groups_of is not None else {}
                truncation.add(chunk, [groups.get(i, "all") for i in chunk], tokenized)
                computed += datastore.compute_features(
                    peft_model, list(zip(chunk, tokenized)), projectors, stores, exp_avg=exp_avg,
                    exp_avg_sq=exp_avg_sq, adam_step=_warmup_steps(row.path) if kind == "train" else None,
                    pad_token_id=tokenizer.pad_token_id, max_batch_size=device.batch_size,
                    max_tokens=device.max_tokens_per_batch, oom_log=context.log.warning,
                    # On a GPU, batches and dense-projection groups also fit its free memory (selection.common.memory).
                    memory_budget_bytes=memory.free_bytes(resolved) if resolved.startswith("cuda") else None,
                    # Progress.done counts from this chunk's start.
                    progress_cb=lambda p, base=chunk_start: reporter.update(base + p.done - reporter.done),
                )
        steps = _warmup_steps(row.path)
        found = [(store, diagnostics.feature_diagnostics([array for _, array in store.iter_shards()]))
                 for store in stores]
        with lineage.connect() as con, transaction(con):
            _store_rows(con, spec.name, kind, run_key, int(row.epoch), float(row.avg_lr), stores)
            diagnostics.record_diagnostics(con, [
                {"store_id": store.store_id, "model": spec.name, "kind": kind, "warmup_run_key": run_key,
                 "epoch": int(row.epoch), "part": part, "mode": config.mode, "dim": store.dim, "seed": config.seed,
                 "warmup_steps": steps, **result.as_dict()}
                for store, result in found
            ])
        for store, result in found:
            checked.append({"epoch": int(row.epoch), "dim": store.dim, "warmup_steps": steps, **result.as_dict()})
            if result.collapsed:
                context.log.warning(
                    f"{kind} features of epoch {row.epoch} (d{store.dim}) collapsed onto one direction: "
                    f"{result.describe()}, after {steps} warmup optimizer steps. Influence scores from them rank "
                    "mostly by that direction; train the warmup longer and recompute the features")
        for store in stores:
            tracker.add_file(f"{kind}/epoch_{row.epoch}/d{store.dim}", store.directory)
        per_checkpoint.append({"epoch": int(row.epoch), "computed": computed, "stored": len(stores[0]),
                               "excluded": len(stores[0].excluded())})
    seconds = time.perf_counter() - started
    n_computed = sum(c["computed"] for c in per_checkpoint)
    excluded = stores[0].excluded()
    if excluded:
        context.log.warning(f"{len(excluded)} {kind} examples have no target tokens after truncation and get no "
                            f"features (recorded in the store), e.g. {sorted(excluded)[:5]}")
    return {
        "warmup_run_key": run_key, "kind": kind, "part": part, "mode": config.mode, "dims": list(config.dims),
        # Target features are plain per-example gradients whatever train_transform says.
        "transform": transform or "sgd", "transform_why": transform_why(transform) if transform else "",
        "seed": config.seed, "n_examples": len(example_ids), "n_stored": len(stores[0]),
        "n_skipped_no_target": len(excluded), "skipped_ids": sorted(excluded)[:50], "n_computed": n_computed,
        "seconds": seconds, "examples_per_s": n_computed / seconds if seconds > 0 and n_computed else None,
        # Summed over the checkpoints that had work (each tokenizes its chunks again).
        "tokenization_this_run_all_checkpoints": token_counts, "checkpoints": per_checkpoint,
        "truncation_by_group": truncation.rows(group_label), "feature_diagnostics": checked,
        "features_collapsed": any(c["collapsed"] for c in checked),
    }


def _result(tracker: LineageTracker, metrics: dict) -> dg.MaterializeResult:
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "warmup_run_key": metrics["warmup_run_key"],
            "part": metrics["part"] or "all",
            "mode": metrics["mode"],
            "transform": metrics["transform"],
            "transform_why": metrics["transform_why"] or "as in LESS",
            "dims": dg.MetadataValue.json(metrics["dims"]),
            "n_examples": dg.MetadataValue.int(metrics["n_examples"]),
            "n_stored": dg.MetadataValue.int(metrics["n_stored"]),
            "n_computed": dg.MetadataValue.int(metrics["n_computed"]),
            "n_skipped_no_target": dg.MetadataValue.int(metrics["n_skipped_no_target"]),
            "examples_per_s": dg.MetadataValue.float(float(metrics["examples_per_s"] or 0.0)),
            "checkpoints": dg.MetadataValue.md(markdown_table(metrics["checkpoints"])),
            "features_collapsed": dg.MetadataValue.bool(metrics["features_collapsed"]),
            "feature_diagnostics": dg.MetadataValue.md(markdown_table([
                {"epoch": c["epoch"], "dim": c["dim"], "warmup_steps": c["warmup_steps"], "rows": c["n_rows"],
                 "mean_feature_norm": _rounded(c["mean_feature_norm"]),
                 "mean_pairwise_cosine": _rounded(c["mean_pairwise_cosine"]),
                 "saturated_share": _rounded(c["saturated_share"]), "collapsed": c["collapsed"]}
                for c in metrics["feature_diagnostics"]
            ])),
            # Examples tokenized by this run (none when every feature was already stored).
            "truncation": dg.MetadataValue.md(markdown_table(metrics["truncation_by_group"])),
        },
    )


def _rounded(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def _warmup_steps(checkpoint_dir: str) -> int | None:
    """Optimizer steps the warmup had taken at this checkpoint (None when its record is gone)."""
    path = Path(checkpoint_dir) / training.CHECKPOINT_FILE
    return json.loads(path.read_text()).get("global_step") if path.is_file() else None


def _load_pool_conversations(lineage: LineageStore) -> ConversationLoader:
    def load(example_ids: Sequence[str]) -> dict[str, list[dict]]:
        with lineage.connect() as con:
            return pool_store.pool_conversations(con, example_ids)

    return load


def _load_pool_sources(lineage: LineageStore) -> GroupLoader:
    def load(example_ids: Sequence[str]) -> dict[str, str]:
        with lineage.connect() as con:
            return pool_store.example_sources(con, example_ids)

    return load


def pool_shard_ids(lineage: LineageStore, shard: str) -> tuple[list[str], dict]:
    """Ids of the current pool that fall in `shard` ("03-of-08"), in first-seen order."""
    index, count = datastore.parse_shard_key(shard)
    with lineage.connect() as con:
        latest = pool_store.latest_pool_version(con)
        if latest is None:
            raise ValueError("the pool is empty; materialize raw_pool first")
        ids = pool_store.pool_ids(con)
    mine = [example_id for example_id in ids if datastore.shard_of(example_id, count) == index]
    return mine, {"pool_version": latest[0], "pool_size": len(ids)}


@dataclass(frozen=True)
class GradientExamples:
    """What one partition of a gradient asset computes."""

    model: str
    example_ids: list[str]
    load_conversations: ConversationLoader
    part: str | None
    metrics: dict
    # Called with (tokenizer, max_length) before any gradient is computed; raises to refuse.
    precheck: Callable[[Any, int], None] | None = None
    groups_of: GroupLoader | None = None  # per-group truncation counts in the metadata
    group_label: str = "source"


def _pool_shard(context: dg.AssetExecutionContext, lineage: LineageStore) -> GradientExamples:
    keys = context.partition_key.keys_by_dimension
    ids, metrics = pool_shard_ids(lineage, keys[SHARD_DIMENSION])
    return GradientExamples(keys[MODEL_DIMENSION], ids, _load_pool_conversations(lineage), keys[SHARD_DIMENSION],
                            metrics, groups_of=_load_pool_sources(lineage))


def _target_val(context: dg.AssetExecutionContext, lineage: LineageStore) -> GradientExamples:
    with lineage.connect() as con:
        rows = read_targets(con, "val")
    # The same example may define several tasks; its gradient is computed once.
    conversations = dict((example_id, messages) for _, _, example_id, messages in rows)
    tasks: dict[str, set[str]] = {}
    for task, _, example_id, _ in rows:
        tasks.setdefault(example_id, set()).add(task)
    tasks_of = {example_id: ",".join(sorted(names)) for example_id, names in tasks.items()}

    def check_usable(tokenizer: Any, max_length: int) -> None:
        ids = list(conversations)
        _, stats = tokenization.tokenize_many(tokenizer, [conversations[i] for i in ids], max_length)
        preflight.check_val_usable([(task, example_id) for task, _, example_id, _ in rows],
                                   {ids[i] for i in stats.usable_indices()},
                                   f"none has target tokens within max_length {max_length}")

    return GradientExamples(context.partition_key, list(conversations),
                            lambda ids: {i: conversations[i] for i in ids if i in conversations}, None,
                            {"n_val_rows": len(rows)}, check_usable,
                            lambda ids: {i: tasks_of[i] for i in ids if i in tasks_of}, "task")


def build_gradient_asset(
    kind: str, partitions_def: dg.PartitionsDefinition, upstream: str,
    examples_of: Callable[[dg.AssetExecutionContext, LineageStore], GradientExamples], description: str,
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
        context: dg.AssetExecutionContext, config: GradientConfig, settings: StorageSettings, lineage: LineageStore,
        model_store: ModelStore, device: DeviceSettings,
    ) -> dg.MaterializeResult:
        tracker = LineageTracker(context, lineage)
        examples = examples_of(context, lineage)
        metrics = _gradient_features(context, kind, examples.model, examples.example_ids, examples.load_conversations,
                                     examples.part, config, settings, lineage, model_store, device, tracker,
                                     examples.precheck, examples.groups_of, examples.group_label)
        return _result(tracker, {**metrics, **examples.metrics})

    return _gradients


train_gradients = build_gradient_asset(
    "train", model_shard_partitions, "raw_pool", _pool_shard,
    "Per-example LoRA gradients of one shard of the pool at every warmup checkpoint, transformed by "
    "`train_transform` (default 'adam': LESS's Adam step), projected. One partition per (model, shard).",
)
target_gradients = build_gradient_asset(
    "target", model_partitions, "target_tasks", _target_val,
    "Plain (SGD) per-example LoRA gradients of the target val examples at every warmup checkpoint, projected.",
)
