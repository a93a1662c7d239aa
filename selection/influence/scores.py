"""LESS influence over the gradient datastore: row-aligned views over the stores' chunks, scores on disk,
and the influence run that picks its stores and val columns (`score_influence`)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from selection import less
from selection.common import arrays, files, integrity
from selection.data.tokenization import LESS_LOSS_TOKENS
from selection.influence import datastore, diagnostics, directions, recipes
from selection.influence.datastore import FeatureStore, check_compatible
from selection.influence.influence_store import FeatureKey, InfluenceRecord
from selection.train import preflight

SCORES_FILE = "influence.npy"
IDS_FILE = "train_ids.json"
# sha256 and size of the two files above, written last: the commit record checked by load_scores.
RECORD_FILE = "integrity.json"
ASSET = "influence_scores"


class ChunkedRows:
    """A read-only `[n_rows, dim]` view over the memory-mapped chunks of one store, or of the
    stores of several shards (parts) read one after another, in storage order.

    Supports what the chunked influence loop needs (`shape`, `ndim`, row slices) without
    concatenating the chunks in memory.
    """

    def __init__(self, stores: FeatureStore | Sequence[FeatureStore]) -> None:
        stores = [stores] if isinstance(stores, FeatureStore) else list(stores)
        if not stores or len({store.dim for store in stores}) != 1:
            raise ValueError("need at least one store, all of one dim")
        self.stores = stores
        self._chunks = [store.chunk(i) for store in stores for i in range(store.n_chunks)]
        self._starts = np.cumsum([0] + [len(c) for c in self._chunks])
        self.shape = (int(self._starts[-1]), stores[0].dim)
        self.ndim = 2
        self.dtype = np.float16

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("ChunkedRows supports contiguous row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        for chunk in range(max(first, 0), len(self._chunks)):
            lo, hi = self._starts[chunk], self._starts[chunk + 1]
            if lo >= stop:
                break
            parts.append(self._chunks[chunk][max(start - lo, 0) : min(stop, hi) - lo])
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), np.float16)


@dataclass(frozen=True)
class InfluenceResult:
    scores_path: Path
    train_ids: list[str]
    n_val: int
    # Per checkpoint, the features as scored: target always, train when directions were removed
    # (otherwise the stored train features, diagnosed when written, are what was scored).
    target_diagnostics: list[diagnostics.FeatureDiagnostics]
    train_diagnostics: list[diagnostics.FeatureDiagnostics]


def _parts(stores: FeatureStore | Sequence[FeatureStore]) -> list[FeatureStore]:
    return [stores] if isinstance(stores, FeatureStore) else list(stores)


def compute_influence(
    train_stores: Sequence[FeatureStore | Sequence[FeatureStore]],
    target_stores: Sequence[FeatureStore],
    avg_lrs: Sequence[float],
    val_ids: Sequence[str],
    out_dir: str | Path,
    chunk_rows: int = 8192,
    dropped_directions: int = 0,
) -> InfluenceResult:
    """Scores `[n_train, n_val]` = sum_c w_c cos(train_c, val_c), w_c = avg lr normalized (LESS).

    With ``dropped_directions`` > 0, each checkpoint's features lose the train pool's mean and its top
    principal directions before the cosine (``selection.influence.directions``).

    One train store (or the list of its parts, read in that order) and one target store per
    checkpoint. Train rows are read chunk by chunk from disk; the score matrix is a float32 .npy memmap
    in `out_dir` with the row ids beside it (`train_ids.json`) and their sha256 (`integrity.json`).
    Every feature chunk is verified before anything is written; on failure no staging folder is left.
    """
    if not train_stores or len(train_stores) != len(target_stores) or len(avg_lrs) != len(train_stores):
        raise ValueError(
            f"need one train store, target store and avg lr per checkpoint; got {len(train_stores)}, "
            f"{len(target_stores)}, {len(avg_lrs)}"
        )
    parts = [_parts(stores) for stores in train_stores]
    for train, target in zip(parts, target_stores):
        for part in train:
            check_compatible(part, target)
    train_ids = [example_id for part in parts[0] for example_id in part.ids()]
    for c, checkpoint_parts in enumerate(parts[1:], start=1):
        if [example_id for part in checkpoint_parts for example_id in part.ids()] != train_ids:
            raise ValueError(
                f"train features of checkpoint {c} ({[str(p.directory) for p in checkpoint_parts]}) hold other ids or "
                f"another order than checkpoint 0; rematerialize train_gradients"
            )
    if not train_ids:
        raise ValueError("the train gradient stores are empty")
    weights = less.checkpoint_weights(avg_lrs)
    # Opening verifies every chunk against its commit record, before anything is written.
    train_rows = [ChunkedRows(p) for p in parts]
    val_features = [s.features(list(val_ids)) for s in target_stores]
    directions.check_count(dropped_directions, len(train_ids), train_rows[0].shape[1])
    if dropped_directions:
        common = [directions.fit(rows, dropped_directions) for rows in train_rows]
        train_rows = [directions.WithoutDirections(rows, c) for rows, c in zip(train_rows, common)]
        val_features = [c.remove(val) for val, c in zip(val_features, common)]
    # Collapse of what the cosine sees, judged apart: the directions are fitted on train rows only,
    # so they centre the train features but can leave the target features collapsed.
    target_diagnostics = [diagnostics.feature_diagnostics(val) for val in val_features]
    # One more pass over the train rows, only when they differ from the stored (already diagnosed) ones.
    train_diagnostics = [diagnostics.feature_diagnostics(rows) for rows in train_rows] if dropped_directions else []
    out_dir = Path(out_dir)
    # Scores and their row ids are written side by side in a temporary folder and swapped in
    # together, so a reader never pairs new scores with old ids.
    staging = files.confined(out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}"))
    if staging.exists():
        files.remove_tree(staging)
    files.make_dirs(staging.parent)
    staging.mkdir()
    try:
        scores = less.influence_scores(train_rows, val_features, weights, staging / SCORES_FILE, chunk_rows=chunk_rows)
        if isinstance(scores, np.memmap):
            scores.flush()
        del scores
        (staging / IDS_FILE).write_text(json.dumps(train_ids))
        record = integrity.directory_record(staging, [SCORES_FILE, IDS_FILE])
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=1))
        if out_dir.exists():
            files.remove_tree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, entry in record.items():
        integrity.remember_digest(out_dir / name, entry["sha256"])
    return InfluenceResult(
        scores_path=out_dir / SCORES_FILE,
        train_ids=train_ids,
        n_val=len(val_ids),
        target_diagnostics=target_diagnostics,
        train_diagnostics=train_diagnostics,
    )


def load_scores(out_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """The memory-mapped score matrix and its row ids, verified against their commit record
    (``ArtifactIntegrityError`` naming the file otherwise) and checked to agree."""
    out_dir = Path(out_dir)
    record_path = out_dir / RECORD_FILE
    if not record_path.is_file():
        raise integrity.ArtifactIntegrityError(
            record_path, "is missing (scores written without a commit record cannot be checked)", ASSET
        )
    record = integrity.read_json(record_path, asset=ASSET)
    integrity.verify_record(out_dir, {IDS_FILE: record.get(IDS_FILE)}, asset=ASSET)
    sha256, size = integrity.recorded(out_dir / SCORES_FILE, record.get(SCORES_FILE), ASSET)
    scores = integrity.open_npy(out_dir / SCORES_FILE, asset=ASSET, sha256=sha256, size=size)
    ids = integrity.read_json(out_dir / IDS_FILE, asset=ASSET, expect=list)
    if scores.ndim != 2 or scores.shape[0] != len(ids):
        raise ValueError(f"{out_dir}: score matrix {scores.shape} does not match {len(ids)} row ids")
    return scores, ids


def open_store(directory: str | Path, asset: str = "the gradient asset that wrote it") -> FeatureStore:
    """Reopen an existing store from its manifest (its identity is re-checked on open); ``asset``
    (what rewrites the store) is named if the manifest is unreadable."""
    manifest = arrays.read_manifest(directory, asset)
    if manifest is None:
        raise ValueError(f"{directory} is not a feature store: {arrays.MANIFEST_FILE} is missing")
    lacking = [key for key in ("model", "checkpoint", "kind", "projection") if key not in manifest]
    if lacking:
        raise integrity.ArtifactIntegrityError(
            Path(directory) / arrays.MANIFEST_FILE,
            f"lacks {lacking}",
            asset,
            arrays.rebuild_fix(directory, asset),
        )
    return FeatureStore(
        directory,
        manifest["model"],
        manifest["checkpoint"],
        manifest["kind"],
        manifest["projection"],
        part=manifest.get("part"),
        transform=manifest.get("transform"),
        loss_tokens=manifest.get("loss_tokens", LESS_LOSS_TOKENS),
    )


def train_shard_directories(
    frame: pd.DataFrame, model: str, epochs: Sequence[int], shards: Sequence[str]
) -> list[list[str]]:
    """Per epoch, the directories of every shard of the current shard layout (``shards``), in shard
    order; ``frame`` holds the recorded train stores (``influence_store.latest_stores``)."""
    have = {(int(e), s): d for e, s, d in frame[["epoch", "shard", "directory"]].itertuples(index=False)}
    missing = sorted({shard for epoch in epochs for shard in shards if (epoch, shard) not in have})
    if missing:
        raise ValueError(
            f"train_gradients of model {model!r} lack shards {missing} for the latest warmup run; materialize them, "
            f"e.g. dagster asset materialize -m orchestration.definitions --select train_gradients "
            f"--partition '{model}|{missing[0]}'"
        )
    return [[have[(epoch, shard)] for shard in shards] for epoch in epochs]


def _check_pool_covered(stores: Sequence[FeatureStore], pool_ids: Sequence[str]) -> None:
    """Every current pool example has features or a recorded reason for having none."""
    covered: set[str] = set()
    for store in stores:
        covered |= store.covered()
    uncovered = [example_id for example_id in pool_ids if example_id not in covered]
    if uncovered:
        _, count = datastore.parse_shard_key(stores[0].part)
        shards = sorted({datastore.shard_key(datastore.shard_of(i, count), count) for i in uncovered})
        raise ValueError(
            f"{len(uncovered)} pool examples have no gradient features yet (the pool grew after their shards ran), "
            f"e.g. {uncovered[:3]}; rematerialize train_gradients for shards {shards}"
        )


def feature_recipe(
    mode: str,
    train_transform: str,
    loss_tokens: str,
    dropped_directions: int,
    recipe: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """How an influence run's features were made: the recipe named (None: recorded before recipes),
    the settings that ran, which overrode the recipe, and each setting's reason, built from these settings."""
    whys = recipes.whys(loss_tokens, train_transform, mode, dropped_directions)
    return {
        "recipe": recipe or "not recorded",
        "recipe_overrides": overrides or {},
        "recipe_why": whys["recipe_why"],
        "projection_mode": mode,
        "projection_mode_why": whys["mode_why"] or "as in LESS",
        "train_transform": train_transform,
        "train_transform_why": whys["transform_why"] or "as in LESS",
        "loss_tokens": loss_tokens,
        "loss_tokens_why": whys["loss_tokens_why"] or "as in LESS",
        "dropped_directions": str(dropped_directions),
        "dropped_directions_why": whys["dropped_directions_why"] or "as in LESS",
    }


@dataclass(frozen=True)
class InfluenceRequest:
    """One influence run of a model: what it was given (read by the caller) and where scores go."""

    model: str
    key: FeatureKey
    warmup: pd.DataFrame  # the latest warmup run's checkpoints (run_key, epoch)
    train: pd.DataFrame  # its recorded train stores (influence_store.latest_stores)
    target: pd.DataFrame  # ... and target stores
    val_rows: Sequence[tuple[str, str, str, Any]]  # (task, subtask, val example id, messages)
    pool_ids: Sequence[str]  # the current pool
    pool_version: str
    shards: Sequence[str]  # the current shard layout
    scores_root: Path  # the model's scores folder
    warn: Callable[[str], None]
    dropped_directions: int = 0  # the pool's top directions removed before the cosine
    recipe: str | None = None  # the feature recipe named by the config (recorded as given)
    recipe_overrides: dict[str, Any] | None = None  # fields given that differ from the recipe


@dataclass(frozen=True)
class InfluenceRun:
    record: InfluenceRecord  # the `influence_runs` row to write
    scores_path: Path
    dropped_val_ids: list[str]  # val examples without features, left out of the columns
    per_task: pd.DataFrame  # task, val_examples, mean_influence


def score_influence(request: InfluenceRequest) -> InfluenceRun:
    """Score every pool example against every val example with features, from the stores of the
    warmup run's checkpoints; refuses checkpoints that differ, missing shards, pool examples without
    features and tasks without a val example with features, before scoring."""
    warmup, train, target, key = request.warmup, request.train, request.target, request.key
    run_key = str(warmup["run_key"].iloc[0])
    epochs = [int(e) for e in warmup["epoch"]]
    train_epochs = sorted({int(e) for e in train["epoch"]})
    if train_epochs != epochs or [int(e) for e in target["epoch"]] != epochs:
        raise ValueError(
            f"checkpoints differ: warmup {epochs}, train {train_epochs}, target {list(target['epoch'])}; "
            "rematerialize the gradient assets"
        )
    train_stores = [
        [open_store(d, "train_gradients") for d in directories]
        for directories in train_shard_directories(train, request.model, epochs, request.shards)
    ]
    _check_pool_covered(train_stores[0], request.pool_ids)
    avg_lrs = [float(train[train["epoch"] == epoch]["avg_lr"].iloc[0]) for epoch in epochs]
    columns = [{"task": t, "subtask": s, "val_example_id": i} for t, s, i, _ in request.val_rows]
    target_stores = [open_store(d, "target_gradients") for d in target["directory"]]
    with_features = set(target_stores[0].ids())
    # Refused before any scoring: a task whose val examples all lack features would drop out.
    preflight.check_val_usable(
        [(c["task"], c["val_example_id"]) for c in columns],
        with_features,
        "none has gradient features in target_gradients",
    )
    dropped = [c["val_example_id"] for c in columns if c["val_example_id"] not in with_features]
    if dropped:
        request.warn(
            f"{len(dropped)} val examples have no gradient features (no target tokens after "
            f"truncation) and are left out: {dropped[:10]}"
        )
        columns = [c for c in columns if c["val_example_id"] in with_features]
    # Nothing is created here: compute_influence builds the folder aside and moves it into place.
    # LESS's own settings keep the folder name they always had; others are named in it.
    transform_tag = datastore.settings_prefix(key.train_transform, key.loss_tokens)
    n_rows = sum(len(store) for store in train_stores[0])
    removed_directions = directions.usable_count(request.dropped_directions, n_rows, key.dim)
    if removed_directions < request.dropped_directions:
        request.warn(
            f"dropped_directions {request.dropped_directions} lowered to {removed_directions}: at most a quarter "
            f"of the {n_rows} train rows and of the dim {key.dim}"
        )
    dropped_tag = f"-x{removed_directions}" if removed_directions else ""
    out_dir = request.scores_root / f"{run_key}-{transform_tag}{key.mode}-d{key.dim}-s{key.seed}{dropped_tag}"
    result = compute_influence(
        train_stores,
        target_stores,
        avg_lrs,
        [c["val_example_id"] for c in columns],
        out_dir,
        dropped_directions=removed_directions,
    )
    scores, _ = load_scores(out_dir)
    weights = less.checkpoint_weights(avg_lrs).tolist()
    per_task = (
        pd.DataFrame(columns)
        .assign(mean=np.asarray(scores).mean(axis=0))
        .groupby("task")["mean"]
        .agg(["count", "mean"])
        .reset_index()
        .rename(columns={"count": "val_examples", "mean": "mean_influence"})
    )
    record = InfluenceRecord(
        model=request.model,
        scores_dir=str(out_dir),
        warmup_run_key=run_key,
        mode=key.mode,
        dim=key.dim,
        seed=key.seed,
        n_train=len(result.train_ids),
        n_val=result.n_val,
        columns=columns,
        weights=weights,
        # Every current example is covered, so the scores cover the latest version (rows superseded
        # since the shards ran may have scores too; selections leave them out).
        pool_version=request.pool_version,
        train_transform=key.train_transform,
        loss_tokens=key.loss_tokens,
        dropped_directions=removed_directions,
        recipe=request.recipe,
        recipe_overrides=request.recipe_overrides or {},
        scored_diagnostics={
            "target": [diagnostics.scored_entry(e, d) for e, d in zip(epochs, result.target_diagnostics)],
            "train": [diagnostics.scored_entry(e, d) for e, d in zip(epochs, result.train_diagnostics)],
        },
    )
    return InfluenceRun(record=record, scores_path=result.scores_path, dropped_val_ids=dropped, per_task=per_task)
