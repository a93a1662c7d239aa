"""LESS influence over the gradient datastore: row-aligned views of sharded stores, scores on disk."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from selection import less
from selection.common import integrity
from selection.influence.datastore import FeatureStore, check_compatible


SCORES_FILE = "influence.npy"
IDS_FILE = "train_ids.json"
# sha256 and size of the two files above, written last: the commit record checked by load_scores.
RECORD_FILE = "integrity.json"
ASSET = "influence_scores"


class ShardedRows:
    """A read-only `[n_rows, dim]` view over the memory-mapped shards of one store, or of
    several parts of one store read one after another, in storage order.

    Supports what the chunked influence loop needs (`shape`, `ndim`, row slices) without
    concatenating the shards in memory.
    """

    def __init__(self, stores: FeatureStore | Sequence[FeatureStore]) -> None:
        stores = [stores] if isinstance(stores, FeatureStore) else list(stores)
        if not stores or len({store.dim for store in stores}) != 1:
            raise ValueError("need at least one store, all of one dim")
        self.stores = stores
        self._shards = [store.shard(i) for store in stores for i in range(store.n_shards)]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.shape = (int(self._starts[-1]), stores[0].dim)
        self.ndim = 2
        self.dtype = np.float16

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: slice) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("ShardedRows supports contiguous row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        parts = []
        first = int(np.searchsorted(self._starts, start, side="right") - 1)
        for shard in range(max(first, 0), len(self._shards)):
            lo, hi = self._starts[shard], self._starts[shard + 1]
            if lo >= stop:
                break
            parts.append(self._shards[shard][max(start - lo, 0) : min(stop, hi) - lo])
        return np.concatenate(parts) if parts else np.zeros((0, self.shape[1]), np.float16)


@dataclass(frozen=True)
class InfluenceResult:
    scores_path: Path
    train_ids: list[str]
    n_val: int


def _parts(stores: FeatureStore | Sequence[FeatureStore]) -> list[FeatureStore]:
    return [stores] if isinstance(stores, FeatureStore) else list(stores)


def compute_influence(
    train_stores: Sequence[FeatureStore | Sequence[FeatureStore]],
    target_stores: Sequence[FeatureStore],
    avg_lrs: Sequence[float],
    val_ids: Sequence[str],
    out_dir: str | Path,
    chunk_rows: int = 8192,
) -> InfluenceResult:
    """Scores `[n_train, n_val]` = sum_c w_c cos(train_c, val_c), w_c = avg lr normalized (LESS).

    One train store (or the list of its parts, read in that order) and one target store per
    checkpoint. Train rows are read shard by shard from disk; the score matrix is a float32 .npy memmap
    in `out_dir` with the row ids beside it (`train_ids.json`) and their sha256 (`integrity.json`).
    Every feature shard is verified before anything is written; on failure no staging folder is left.
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
    # Opening verifies every shard against its commit record, before anything is written.
    train_rows = [ShardedRows(p) for p in parts]
    val_features = [s.features(list(val_ids)) for s in target_stores]
    out_dir = Path(out_dir)
    # Scores and their row ids are written side by side in a temporary folder and swapped in
    # together, so a reader never pairs new scores with old ids.
    staging = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        scores = less.influence_scores(train_rows, val_features, weights, staging / SCORES_FILE, chunk_rows=chunk_rows)
        if isinstance(scores, np.memmap):
            scores.flush()
        del scores
        (staging / IDS_FILE).write_text(json.dumps(train_ids))
        record = integrity.directory_record(staging, [SCORES_FILE, IDS_FILE])
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name, entry in record.items():
        integrity.remember_digest(out_dir / name, entry["sha256"])
    return InfluenceResult(scores_path=out_dir / SCORES_FILE, train_ids=train_ids, n_val=len(val_ids))


def load_scores(out_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """The memory-mapped score matrix and its row ids, verified against their commit record
    (``ArtifactIntegrityError`` naming the file otherwise) and checked to agree."""
    out_dir = Path(out_dir)
    record_path = out_dir / RECORD_FILE
    if not record_path.is_file():
        raise integrity.ArtifactIntegrityError(
            record_path, "is missing (scores written without a commit record cannot be checked)", ASSET)
    record = json.loads(record_path.read_text())
    integrity.verify_record(out_dir, {IDS_FILE: record[IDS_FILE]}, asset=ASSET)
    entry = record[SCORES_FILE]
    scores = integrity.open_npy(out_dir / SCORES_FILE, asset=ASSET, sha256=entry["sha256"], size=entry["size"])
    ids = json.loads((out_dir / IDS_FILE).read_text())
    if scores.ndim != 2 or scores.shape[0] != len(ids):
        raise ValueError(f"{out_dir}: score matrix {scores.shape} does not match {len(ids)} row ids")
    return scores, ids


def open_store(directory: str | Path) -> FeatureStore:
    """Reopen an existing store from its manifest (its identity is re-checked on open)."""
    from selection.influence.datastore import MANIFEST_FILE

    manifest_path = Path(directory) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"{directory} is not a feature store: {MANIFEST_FILE} is missing")
    manifest = json.loads(manifest_path.read_text())
    return FeatureStore(directory, manifest["model"], manifest["checkpoint"], manifest["kind"], manifest["projection"],
                        part=manifest.get("part"), transform=manifest.get("transform"))
