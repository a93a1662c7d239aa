"""LESS step 2: fill the gradient datastore with the features of one set of examples.

One call covers every checkpoint of the model's latest warmup run: per checkpoint, one store per
projection dim (filled together, from one gradient pass), streamed in chunks of ``chunk_size``
examples (read, tokenize, compute, write) so memory does not grow with the pool. Ids a store
already covers (stored or excluded) are skipped, so a rerun after a kill resumes. After each
checkpoint its stores and their diagnostics are recorded (``influence_store.record_stores``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selection.common import integrity, memory, progress
from selection.common.runtime import Connect, Device, Log, ModelLoader
from selection.data import pool_store, tokenization
from selection.influence import datastore, diagnostics, influence_store, projection
from selection.influence.gradients import PerExampleGradients, check_train_transform
from selection.train import checkpoints, models, preflight, training
from selection.train.models import ModelSpec

# Conversations of the given ids, keyed by id (ids not found are missing from the dict).
ConversationLoader = Callable[[Sequence[str]], dict[str, list[dict]]]
# The group (pool source, target task) of each given id, for per-group truncation counts.
GroupLoader = Callable[[Sequence[str]], dict[str, str]]


@dataclass(frozen=True)
class FeatureExamples:
    """The examples one gradient partition computes features of."""

    example_ids: list[str]
    load_conversations: ConversationLoader
    shard: str | None  # the pool shard ("03-of-08"); None for target examples
    metrics: dict[str, Any]  # recorded with the run's own
    # Called with (tokenizer, max_length) before any gradient is computed; raises to refuse.
    precheck: Callable[[Any, int], None] | None = None
    groups_of: GroupLoader | None = None  # per-group truncation counts
    group_label: str = "source"


def pool_shard_examples(connect: Connect, shard: str) -> FeatureExamples:
    """The current pool's examples that fall in ``shard`` ("03-of-08"), in first-seen order; their
    conversations and sources are read chunk by chunk."""
    index, count = datastore.parse_shard_key(shard)
    with connect() as con:
        latest = pool_store.latest_pool_version(con)
        if latest is None:
            raise ValueError("the pool is empty; materialize raw_pool first")
        ids = pool_store.pool_ids(con)
    mine = [example_id for example_id in ids if datastore.shard_of(example_id, count) == index]

    def load_conversations(example_ids: Sequence[str]) -> dict[str, list[dict]]:
        with connect() as con:
            return pool_store.pool_conversations(con, example_ids)

    def load_sources(example_ids: Sequence[str]) -> dict[str, str]:
        with connect() as con:
            return pool_store.example_sources(con, example_ids)

    return FeatureExamples(
        mine, load_conversations, shard, {"pool_version": latest[0], "pool_size": len(ids)}, groups_of=load_sources
    )


def target_val_examples(rows: Sequence[tuple[str, str, str, list[dict]]]) -> FeatureExamples:
    """The val examples of the target tasks, given as (task, subtask, example id, messages) rows;
    refuses (before any gradient) a task none of whose val examples has target tokens."""
    # The same example may define several tasks; its gradient is computed once.
    conversations = {example_id: messages for _, _, example_id, messages in rows}
    tasks: dict[str, set[str]] = {}
    for task, _, example_id, _ in rows:
        tasks.setdefault(example_id, set()).add(task)
    tasks_of = {example_id: ",".join(sorted(names)) for example_id, names in tasks.items()}

    def check_usable(tokenizer: Any, max_length: int) -> None:
        ids = list(conversations)
        _, stats = tokenization.tokenize_many(tokenizer, [conversations[i] for i in ids], max_length)
        preflight.check_val_usable(
            [(task, example_id) for task, _, example_id, _ in rows],
            {ids[i] for i in stats.usable_indices()},
            f"none has target tokens within max_length {max_length}",
        )

    return FeatureExamples(
        list(conversations),
        lambda ids: {i: conversations[i] for i in ids if i in conversations},
        None,
        {"n_val_rows": len(rows)},
        check_usable,
        lambda ids: {i: tasks_of[i] for i in ids if i in tasks_of},
        "task",
    )


@dataclass(frozen=True)
class FeatureSettings:
    dims: list[int]  # one store per dim, filled from one gradient pass
    mode: str  # projection mode
    seed: int  # projection seed
    chunk_size: int  # examples per chunk read and per file on disk
    train_transform: str  # train features only; target features are plain gradients
    loss_tokens: str = tokenization.LESS_LOSS_TOKENS  # whose loss the gradients are of (tokenization.LOSS_TOKENS)

    def __post_init__(self) -> None:
        # Before the model loads: an empty or repeated dim would fail only after it.
        projection.check_dims(self.dims, self.mode)


@dataclass(frozen=True)
class FeatureRequest:
    kind: str  # "train" or "target"
    spec: ModelSpec
    examples: FeatureExamples
    settings: FeatureSettings
    root: Path  # the datastore root; stores are created under it (datastore.store_directory)
    models: ModelLoader
    device: Device
    connect: Connect
    log: Log


@dataclass(frozen=True)
class FeatureRun:
    """What a ``compute_gradient_features`` call did; ``as_metrics`` is its lineage record."""

    warmup_run_key: str
    kind: str
    shard: str | None
    mode: str
    dims: list[int]
    transform: str  # "sgd" for target features
    loss_tokens: str
    seed: int
    n_examples: int
    n_stored: int
    excluded: dict[str, str]  # ids without features (no target tokens), with the reason
    n_computed: int
    seconds: float
    token_counts: dict[str, int]  # summed over the checkpoints that had work
    checkpoints: list[dict[str, Any]]  # per checkpoint: epoch, computed, stored, excluded
    truncation_by_group: list[dict[str, Any]]
    feature_diagnostics: list[dict[str, Any]]  # per (checkpoint, dim)
    files: dict[str, Path]  # output label -> store directory

    @property
    def examples_per_s(self) -> float | None:
        return self.n_computed / self.seconds if self.seconds > 0 and self.n_computed else None

    @property
    def features_collapsed(self) -> bool:
        return any(c["collapsed"] for c in self.feature_diagnostics)

    def as_metrics(self) -> dict[str, Any]:
        # The shard keeps its recorded metrics key, "part".
        return {
            "warmup_run_key": self.warmup_run_key,
            "kind": self.kind,
            "part": self.shard,
            "mode": self.mode,
            "dims": list(self.dims),
            "transform": self.transform,
            "loss_tokens": self.loss_tokens,
            "seed": self.seed,
            "n_examples": self.n_examples,
            "n_stored": self.n_stored,
            "n_skipped_no_target": len(self.excluded),
            "skipped_ids": sorted(self.excluded)[:50],
            "n_computed": self.n_computed,
            "seconds": self.seconds,
            "examples_per_s": self.examples_per_s,
            # Each checkpoint with work tokenizes its chunks again.
            "tokenization_this_run_all_checkpoints": self.token_counts,
            "checkpoints": self.checkpoints,
            "truncation_by_group": self.truncation_by_group,
            "feature_diagnostics": self.feature_diagnostics,
            "features_collapsed": self.features_collapsed,
        }


def _warmup_steps(checkpoint_dir: str) -> int | None:
    """Optimizer steps the warmup had taken at this checkpoint (None when its record is gone)."""
    path = Path(checkpoint_dir) / training.CHECKPOINT_FILE
    return integrity.read_json(path, asset=training.WARMUP_ASSET).get("global_step") if path.is_file() else None


def compute_gradient_features(request: FeatureRequest) -> FeatureRun:
    """Fill one store per (checkpoint, dim) with ``kind`` features of the examples; see the module docstring."""
    kind, spec, examples, config, log = request.kind, request.spec, request.examples, request.settings, request.log
    shard, device = examples.shard, request.device
    transform = check_train_transform(config.train_transform) if kind == "train" else None
    loss_tokens = tokenization.check_loss_tokens(config.loss_tokens)
    with request.connect() as con:
        warmup = checkpoints.latest_run_checkpoints(con, spec.name, "warmup")
    run_key = str(warmup["run_key"].iloc[0])
    resolved = device.resolve()
    model, tokenizer = request.models.load(spec, resolved)
    if examples.precheck is not None:
        examples.precheck(tokenizer, spec.max_length)
    # Exact projectors share the cache for the dense matrix (no effect on the numbers, only on speed).
    projection_options = (
        {"cache_bytes": device.projection_cache_bytes(resolved) // len(config.dims)} if config.mode == "exact" else {}
    )
    peft_model = models.add_lora(model, spec)
    engine = PerExampleGradients(peft_model)
    model_fingerprint = f"{spec.name}-{spec.fingerprint()}"
    token_counts: dict[str, int] = {}
    truncation = tokenization.TruncationTally()
    per_checkpoint, checked, files = [], [], {}
    started = time.perf_counter()
    # Built once: a cached dense `exact` matrix then serves every checkpoint.
    projectors = [
        projection.make_projector(
            config.mode, engine.dim, dim, config.seed, engine.names_hash, resolved, **projection_options
        )
        for dim in config.dims
    ]
    for row in warmup.itertuples():
        checkpoint = f"{run_key}-epoch_{row.epoch}"
        stores = [
            datastore.FeatureStore(
                datastore.store_directory(
                    request.root, model_fingerprint, checkpoint, kind, p, shard, transform, loss_tokens
                ),
                model_fingerprint,
                checkpoint,
                kind,
                p,
                chunk_size=config.chunk_size,
                part=shard,
                transform=transform,
                loss_tokens=loss_tokens,
            )
            for p in projectors
        ]
        with contextlib.ExitStack() as locks:
            for store in stores:
                locks.enter_context(store.exclusive())
            dropped = datastore.align_stores(stores)
            if dropped:
                log.warning(f"dropped {dropped} chunk(s) a killed run committed to only some dims; recomputing them")
            for problem in datastore.repair_stores(stores):
                log.warning(f"damaged feature chunk dropped with the chunks after it, recomputing: {problem}")
            covered = stores[0].covered()
            todo = [example_id for example_id in examples.example_ids if example_id not in covered]
            computed = 0
            if todo:
                checkpoints.load_adapter_weights(peft_model, row.path)
                exp_avg = exp_avg_sq = None
                if kind == "train":
                    _, exp_avg, exp_avg_sq, _ = training.load_checkpoint(row.path, expected_names=engine.names)
                reporter = progress.ProgressReporter(
                    f"{kind} gradients{f' {shard}' if shard else ''} epoch {row.epoch}", len(todo), log.info
                )
            for start in range(0, len(todo), config.chunk_size):
                chunk = todo[start : start + config.chunk_size]
                chunk_start = reporter.done
                conversations = examples.load_conversations(chunk)
                missing = [example_id for example_id in chunk if example_id not in conversations]
                if missing:
                    raise ValueError(
                        f"{len(missing)} {kind} examples vanished while computing features, e.g. "
                        f"{missing[:3]}; rematerialize {kind}_gradients"
                    )
                tokenized, stats = tokenization.tokenize_many(
                    tokenizer, [conversations[i] for i in chunk], spec.max_length
                )
                for key, value in stats.as_metrics().items():
                    token_counts[key] = token_counts.get(key, 0) + value
                groups = examples.groups_of(chunk) if examples.groups_of is not None else {}
                truncation.add(chunk, [groups.get(i, "all") for i in chunk], tokenized)
                tokenized = [tokenization.with_loss_on(example, loss_tokens) for example in tokenized]
                computed += datastore.compute_features(
                    peft_model,
                    list(zip(chunk, tokenized)),
                    projectors,
                    stores,
                    exp_avg=exp_avg,
                    exp_avg_sq=exp_avg_sq,
                    adam_step=_warmup_steps(row.path) if kind == "train" else None,
                    pad_token_id=tokenizer.pad_token_id,
                    max_batch_size=device.batch_size,
                    max_tokens=device.max_tokens_per_batch,
                    oom_log=log.warning,
                    # On a GPU, batches and dense-projection groups also fit its free memory (selection.common.memory).
                    memory_budget_bytes=memory.free_bytes(resolved) if resolved.startswith("cuda") else None,
                    # Progress.done counts from this chunk's start.
                    progress_cb=lambda p, base=chunk_start: reporter.update(base + p.done - reporter.done),
                )
        steps = _warmup_steps(row.path)
        found = [
            (store, diagnostics.feature_diagnostics([array for _, array in store.iter_chunks()])) for store in stores
        ]
        with request.connect() as con:
            influence_store.record_stores(
                con,
                model=spec.name,
                kind=kind,
                warmup_run_key=run_key,
                epoch=int(row.epoch),
                avg_lr=float(row.avg_lr),
                stores=stores,
                diagnostics=[
                    {
                        "store_id": store.store_id,
                        "model": spec.name,
                        "kind": kind,
                        "warmup_run_key": run_key,
                        "epoch": int(row.epoch),
                        "part": shard,
                        "mode": config.mode,
                        "dim": store.dim,
                        "seed": config.seed,
                        "warmup_steps": steps,
                        **result.as_dict(),
                    }
                    for store, result in found
                ],
            )
        for store, result in found:
            checked.append({"epoch": int(row.epoch), "dim": store.dim, "warmup_steps": steps, **result.as_dict()})
            if result.collapsed:
                log.warning(
                    f"{kind} features of epoch {row.epoch} (d{store.dim}) collapsed onto one direction: "
                    f"{result.describe()}, after {steps} warmup optimizer steps. Influence scores from them rank "
                    "mostly by that direction; train the warmup longer and recompute the features"
                )
        for store in stores:
            files[f"{kind}/epoch_{row.epoch}/d{store.dim}"] = store.directory
        per_checkpoint.append(
            {
                "epoch": int(row.epoch),
                "computed": computed,
                "stored": len(stores[0]),
                "excluded": len(stores[0].excluded()),
            }
        )
    seconds = time.perf_counter() - started
    excluded = stores[0].excluded()
    if excluded:
        log.warning(
            f"{len(excluded)} {kind} examples have no target tokens after truncation and get no "
            f"features (recorded in the store), e.g. {sorted(excluded)[:5]}"
        )
    return FeatureRun(
        warmup_run_key=run_key,
        kind=kind,
        shard=shard,
        mode=config.mode,
        dims=list(config.dims),
        # Target features are plain per-example gradients whatever train_transform says.
        transform=transform or "sgd",
        loss_tokens=loss_tokens,
        seed=config.seed,
        n_examples=len(examples.example_ids),
        n_stored=len(stores[0]),
        excluded=excluded,
        n_computed=sum(c["computed"] for c in per_checkpoint),
        seconds=seconds,
        token_counts=token_counts,
        checkpoints=per_checkpoint,
        truncation_by_group=truncation.rows(examples.group_label),
        feature_diagnostics=checked,
        files=files,
    )
