"""Sharded, memory-mapped store of projected gradient features, and the loop filling it.

One store = one directory holding the features of one (model, checkpoint, kind,
projector) combination; ``store_directory`` derives a canonical location under a root.

Layout::

    manifest.json          identity: model fingerprint, checkpoint, kind, projector
                           fingerprint (mode, dim, seed, input dim, parameter names) and, for
                           train stores, the train-feature transform (``adam``, ``sgd``, ...)
    shard-00000.npy        float16 [rows, dim], L2-normalized rows (np.load mmap_mode="r")
    shard-00000.json       {"ids": [...], "sha256": <of the .npy>, "size": <bytes>, "excluded": {id: reason}}:
                           the commit record; ``excluded`` lists the examples of that chunk
                           that have no features (no target tokens), so that no id is lost
                           silently and a rerun need not look at them again

A store may hold one *part* of a pool (``part="03-of-08"``: the ids with
``shard_of(id, 8) == 3``), so that parts are computed by separate processes or machines
(Dagster partitions) and read together.

A shard is written to a temporary file and renamed, then its commit record likewise;
a shard without its record (a killed run) does not exist and is rewritten. Shard
contents depend only on the ordered ids that go in them (shards are cut every
``shard_size`` not-yet-computed ids in input order, and batches are formed inside a
shard), so a resumed run writes the same bytes as an uninterrupted one on the same
device type. Opening a store whose manifest differs in anything (another model,
checkpoint, dim, seed, projection mode, transform ...) is a ValueError.

Every read of a shard checks it against its commit record (size, .npy header, sha256;
``selection.common.integrity``) and raises ``ArtifactIntegrityError`` naming the file. A writer
rerun repairs instead (``repair_stores``): the first damaged shard and every later one are
dropped and recomputed, since shards are numbered in commit order.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selection.common import integrity
from selection.influence.gradients import LITERAL_LESS_TRANSFORM, AdamMoments, PerExampleGradients, check_train_transform
from selection.common.memory import gradient_memory, run_halving_on_oom
from selection.common.names import check_identifier
from selection.influence.projection import Projector
from selection.data.tokenization import TokenizedExample, collate, length_sorted_batches

KINDS = ("train", "target")
MANIFEST_FILE = "manifest.json"
STORE_FORMAT = 1
INDEX_TABLE = "feature_index"
LOCK_FILE = ".writer.lock"


def fingerprint_of(value: Any) -> str:
    """Short stable hash of a JSON-able value (e.g. a model spec dict)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _store_transform(kind: str, transform: str | None) -> str | None:
    """The transform a store of ``kind`` records: train stores always name one (LESS's own when
    not given), target stores none (their features are always plain gradients)."""
    if kind == "target":
        if transform not in (None, "sgd"):
            raise ValueError(f"target features are plain gradients; transform {transform!r} does not apply")
        return None
    return check_train_transform(transform or LITERAL_LESS_TRANSFORM)


def store_directory(
    root: str | Path, model_fingerprint: str, checkpoint: str, kind: str, projector: Projector, part: str | None = None,
    transform: str | None = None,
) -> Path:
    """Canonical place of a store: ``root/<model>/<checkpoint>/<kind>/[<transform>-]<mode>-d<dim>-s<seed>-<hash>[/<part>]``.

    Train stores of a transform other than LESS's own ``adam`` carry it in the folder name, so
    switching transforms opens a new store (``adam`` keeps the folder it always had)."""
    transform = _store_transform(kind, transform)
    name = f"{projector.mode}-d{projector.dim}-s{projector.seed}-{projector.fingerprint_hash()}"
    if transform is not None and transform != LITERAL_LESS_TRANSFORM:
        name = f"{transform}-{name}"
    directory = Path(root) / model_fingerprint / checkpoint / kind / name
    return directory / part if part is not None else directory


def shard_of(example_id: str, n_shards: int) -> int:
    """The pool part an example belongs to: a hash of its id alone, so parts stay put as the pool grows."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    return int.from_bytes(hashlib.sha256(example_id.encode()).digest()[:8], "little") % n_shards


def shard_key(index: int, n_shards: int) -> str:
    """Partition key of one part, e.g. ``03-of-08`` (the count is in the key: recutting makes new keys)."""
    if not 0 <= index < n_shards:
        raise ValueError(f"shard index {index} is not in [0, {n_shards})")
    return f"{index:02d}-of-{n_shards:02d}"


def parse_shard_key(key: str) -> tuple[int, int]:
    """``"03-of-08"`` -> ``(3, 8)``; anything else is a ValueError."""
    index, sep, count = key.partition("-of-")
    if not sep or not index.isdigit() or not count.isdigit() or not 0 <= int(index) < int(count):
        raise ValueError(f"not a shard key: {key!r} (expected e.g. '03-of-08')")
    return int(index), int(count)


@dataclass(frozen=True)
class IndexRow:
    example_id: str
    shard: int
    row: int


class StoreBusyError(RuntimeError):
    """Another process holds the store's writer lock."""


class FeatureStore:
    """Features of one (model, checkpoint, kind, projector); see the module docstring."""

    def __init__(
        self,
        directory: str | Path,
        model_fingerprint: str,
        checkpoint: str,
        kind: str,
        projector: Projector | Mapping[str, Any],
        shard_size: int = 512,
        part: str | None = None,
        transform: str | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        transform = _store_transform(kind, transform)
        if not model_fingerprint or not checkpoint:
            raise ValueError("model_fingerprint and checkpoint must be non-empty strings")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        projection = projector.fingerprint() if isinstance(projector, Projector) else dict(projector)
        self.directory = Path(directory)
        self.shard_size = shard_size
        self.manifest = {
            "format": STORE_FORMAT,
            "model": model_fingerprint,
            "checkpoint": checkpoint,
            "kind": kind,
            "projection": projection,
            "dtype": "float16",
            "normalized": "l2",
        }
        if part is not None:
            parse_shard_key(part)
            self.manifest["part"] = part
        if transform is not None:
            self.manifest["transform"] = transform
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / MANIFEST_FILE
        if manifest_path.is_file():
            existing = json.loads(manifest_path.read_text())
            if existing.get("kind") == "train":
                # Train stores written before the transform was recorded all hold LESS's own.
                existing.setdefault("transform", LITERAL_LESS_TRANSFORM)
            if existing != self.manifest:
                raise ValueError(
                    f"feature store {self.directory} holds other features: {describe_mismatch(existing, self.manifest)}; "
                    "refusing to mix them (use another directory, e.g. store_directory(...))"
                )
        else:
            _atomic_write_bytes(manifest_path, json.dumps(self.manifest, indent=1, sort_keys=True).encode())
        self._excluded: dict[str, str] = {}
        self._records: list[dict[str, Any]] = []  # per shard: sha256 and (newer records) size
        self._shards: list[list[str]] = self._read_committed_shards()

    @property
    def dim(self) -> int:
        return int(self.manifest["projection"]["dim"])

    @property
    def kind(self) -> str:
        return str(self.manifest["kind"])

    @property
    def part(self) -> str | None:
        return self.manifest.get("part")

    @property
    def transform(self) -> str | None:
        """The train-feature transform (``selection.influence.gradients.train_feature``); None for target stores."""
        return self.manifest.get("transform")

    @property
    def store_id(self) -> str:
        return fingerprint_of(self.manifest)

    @property
    def asset(self) -> str:
        """What to rematerialize to rewrite this store (named in integrity errors)."""
        return f"{self.kind}_gradients" + (f" (shard {self.part})" if self.part else "")

    def _shard_paths(self, shard: int) -> tuple[Path, Path]:
        return self.directory / f"shard-{shard:05d}.npy", self.directory / f"shard-{shard:05d}.json"

    def _read_committed_shards(self) -> list[list[str]]:
        shards: list[list[str]] = []
        self._records = []
        while True:
            array_path, record_path = self._shard_paths(len(shards))
            if not record_path.is_file():
                return shards
            if not array_path.is_file():
                raise ValueError(f"{record_path} is committed but {array_path.name} is missing; store is damaged")
            try:
                record = json.loads(record_path.read_text())
                ids = list(record["ids"])
            except (ValueError, KeyError, TypeError) as error:
                raise integrity.ArtifactIntegrityError(
                    record_path, f"commit record is unreadable ({error}); delete it and the shards after it",
                    self.asset) from error
            shards.append(ids)
            self._records.append({"sha256": record.get("sha256"), "size": record.get("size")})
            self._excluded.update(record.get("excluded", {}))

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def ids(self) -> list[str]:
        return [example_id for shard in self._shards for example_id in shard]

    def __len__(self) -> int:
        return sum(len(shard) for shard in self._shards)

    def excluded(self) -> dict[str, str]:
        """Ids this store was given but holds no features for, with the reason."""
        return dict(self._excluded)

    def covered(self) -> set[str]:
        """Every id already dealt with: stored or excluded."""
        return set(self.ids()) | set(self._excluded)

    def __contains__(self, example_id: str) -> bool:
        return any(example_id in shard for shard in self._shards)

    def write_shard(self, ids: Sequence[str], features: np.ndarray, excluded: Mapping[str, str] | None = None) -> int:
        """Append one shard (float16 ``[len(ids), dim]``, possibly empty) and the ids of its
        chunk that have no features (``excluded``: id -> reason); returns its number."""
        excluded = dict(excluded or {})
        if features.dtype != np.float16 or features.shape != (len(ids), self.dim):
            raise ValueError(f"expected float16 [{len(ids)}, {self.dim}], got {features.dtype} {features.shape}")
        if not ids and not excluded:
            raise ValueError("a shard needs at least one stored or excluded id")
        present = self.covered()
        incoming = list(ids) + list(excluded)
        duplicates = [example_id for example_id in incoming if example_id in present]
        if duplicates or len(set(incoming)) != len(incoming):
            raise ValueError(f"ids already stored or repeated: {duplicates[:3] or 'repeated within the shard'}")
        shard = len(self._shards)
        array_path, record_path = self._shard_paths(shard)
        temporary = array_path.with_name(f".{array_path.name}.tmp-{os.getpid()}.npy")
        np.save(temporary, np.ascontiguousarray(features))
        content = temporary.read_bytes()
        digest = hashlib.sha256(content).hexdigest()
        os.replace(temporary, array_path)
        integrity.remember_digest(array_path, digest)
        record: dict[str, Any] = {"ids": list(ids), "sha256": digest, "size": len(content)}
        if excluded:
            record["excluded"] = excluded
        _atomic_write_bytes(record_path, json.dumps(record).encode())
        self._shards.append(list(ids))
        self._records.append({"sha256": digest, "size": len(content)})
        self._excluded.update(excluded)
        return shard

    def truncate(self, n_shards: int) -> None:
        """Forget the shards from ``n_shards`` on (records first, so a kill midway leaves a valid store)."""
        for shard in range(len(self._shards) - 1, n_shards - 1, -1):
            array_path, record_path = self._shard_paths(shard)
            record_path.unlink()
            array_path.unlink(missing_ok=True)
        self._excluded = {}
        self._shards = self._read_committed_shards()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the store's writer lock; a second writer (another run of the same partition) is refused."""
        with open(self.directory / LOCK_FILE, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                raise StoreBusyError(
                    f"another process is filling {self.directory}; wait for it (two runs of the same partition "
                    "must not overlap)"
                ) from error
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def shard(self, shard: int) -> np.ndarray:
        """Memory-mapped float16 ``[rows, dim]`` of one committed shard, checked against its commit
        record (``ArtifactIntegrityError`` naming the file if it was truncated or changed)."""
        if not 0 <= shard < len(self._shards):
            raise ValueError(f"shard {shard} does not exist (store has {len(self._shards)})")
        path = self._shard_paths(shard)[0]
        record = self._records[shard]
        array = integrity.open_npy(path, asset=self.asset, sha256=record["sha256"], size=record["size"])
        expected = (len(self._shards[shard]), self.dim)
        if array.shape != expected or array.dtype != np.float16:
            raise integrity.ArtifactIntegrityError(
                path, f"holds {array.dtype} {array.shape}, its commit record says float16 {expected}", self.asset)
        return array

    def first_damaged_shard(self) -> tuple[int, str] | None:
        """``(shard, problem)`` of the first shard that fails its check, or None (reads every shard once)."""
        for shard in range(self.n_shards):
            problem = integrity.first_problem(lambda shard=shard: self.shard(shard))
            if problem is not None:
                return shard, problem
        return None

    def iter_shards(self) -> Iterator[tuple[list[str], np.ndarray]]:
        for shard, ids in enumerate(self._shards):
            yield ids, self.shard(shard)

    def index_rows(self) -> list[IndexRow]:
        return [IndexRow(example_id, shard, row) for shard, ids in enumerate(self._shards) for row, example_id in enumerate(ids)]

    def features(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """Float16 ``[len(ids), dim]`` in the order of ``ids`` (default: storage order)."""
        if ids is None:
            parts = [np.asarray(array) for _, array in self.iter_shards()]
            return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float16)
        where = {row.example_id: row for row in self.index_rows()}
        missing = [example_id for example_id in ids if example_id not in where]
        if missing:
            raise ValueError(f"{len(missing)} ids have no features in {self.directory}, e.g. {missing[:3]}")
        out = np.empty((len(ids), self.dim), np.float16)
        shards = [self.shard(shard) for shard in range(self.n_shards)]
        for position, example_id in enumerate(ids):
            out[position] = shards[where[example_id].shard][where[example_id].row]
        return out


def align_stores(stores: Sequence[FeatureStore]) -> int:
    """Make stores that are filled together (one per projection dim) hold the same shards.

    They commit each chunk one store after the other, so a run killed between two commits
    leaves some stores one shard ahead; those extra shards are dropped (the resumed run
    recomputes them to the same bytes). Stores that differ in any shared shard (e.g. a dim
    added to an existing datastore) are refused. Returns the number of shards dropped.
    """
    common = min(store.n_shards for store in stores)
    reference = stores[0]._shards[:common]
    for store in stores:
        # A kill between commits leaves a store at most one shard ahead; more means it was filled alone.
        if store.n_shards > common + 1 or store._shards[:common] != reference:
            raise ValueError(
                f"{store.directory} and {stores[0].directory} hold different examples; stores of several dims are "
                "filled together from the start: compute a new dim with a fresh seed or a fresh warmup run"
            )
    dropped = 0
    for store in stores:
        dropped += store.n_shards - common
        store.truncate(common)
    return dropped


def repair_stores(stores: Sequence[FeatureStore]) -> list[str]:
    """Drop, in stores filled together, the first shard any of them fails to verify and every later
    shard (shard numbers follow commit order), so the writer recomputes them. Returns the problems found."""
    damaged = [found for found in (store.first_damaged_shard() for store in stores) if found is not None]
    if damaged:
        first = min(shard for shard, _ in damaged)
        for store in stores:
            store.truncate(min(first, store.n_shards))
    return [problem for _, problem in damaged]


def describe_mismatch(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = "") -> str:
    differences = []
    for key in sorted(set(a) | set(b)):
        left, right = a.get(key), b.get(key)
        if isinstance(left, Mapping) and isinstance(right, Mapping):
            inner = describe_mismatch(left, right, f"{prefix}{key}.")
            if inner:
                differences.append(inner)
        elif left != right:
            differences.append(f"{prefix}{key} {left!r} != {right!r}")
    return "; ".join(differences)


def check_compatible(train: FeatureStore, target: FeatureStore) -> None:
    """Train and target features may be compared only if all but ``kind`` agree."""
    if train.kind != "train" or target.kind != "target":
        raise ValueError(f"expected a train and a target store, got {train.kind!r} and {target.kind!r}")
    # Train features may be cut into parts and transformed; targets are neither.
    left = {key: value for key, value in train.manifest.items() if key not in ("kind", "part", "transform")}
    right = {key: value for key, value in target.manifest.items() if key not in ("kind", "part", "transform")}
    if left != right:
        raise ValueError(f"train and target features are not comparable: {describe_mismatch(left, right)}")


def write_index(con: Any, store: FeatureStore, table: str = INDEX_TABLE) -> int:
    """Bring ``store``'s rows in the DuckDB table ``table`` (created if missing) up to date.

    Shards are append-only, so only shards not yet indexed are inserted (a rerun over a
    large store writes nothing). Returns the number of rows indexed for the store.
    """
    import pandas as pd

    table = check_identifier(table, "feature index table")  # interpolated into the SQL below
    con.execute(
        f"CREATE TABLE IF NOT EXISTS {table} (store_id VARCHAR, model VARCHAR, checkpoint VARCHAR, kind VARCHAR, "
        "mode VARCHAR, dim INTEGER, seed BIGINT, directory VARCHAR, example_id VARCHAR, shard INTEGER, "
        "row_in_shard INTEGER, part VARCHAR)"
    )
    con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS part VARCHAR")  # tables made before parts existed
    con.execute(f"DELETE FROM {table} WHERE store_id = ? AND shard >= ?", [store.store_id, store.n_shards])
    indexed = {shard for (shard,) in con.execute(
        f"SELECT DISTINCT shard FROM {table} WHERE store_id = ?", [store.store_id]).fetchall()}
    projection = store.manifest["projection"]
    rows = pd.DataFrame(
        [
            (store.store_id, store.manifest["model"], store.manifest["checkpoint"], store.kind, projection["mode"],
             projection["dim"], projection["seed"], str(store.directory), row.example_id, row.shard, row.row,
             store.part)
            for row in store.index_rows() if row.shard not in indexed
        ],
        columns=["store_id", "model", "checkpoint", "kind", "mode", "dim", "seed", "directory", "example_id",
                 "shard", "row_in_shard", "part"],
    )
    if len(rows):
        con.register("_feature_index_rows", rows)
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _feature_index_rows")
        con.unregister("_feature_index_rows")
    (count,) = con.execute(f"SELECT count(*) FROM {table} WHERE store_id = ?", [store.store_id]).fetchone()
    return int(count)


def read_index(con: Any, store: FeatureStore, table: str = INDEX_TABLE) -> dict[str, tuple[int, int]]:
    table = check_identifier(table, "feature index table")
    result = con.execute(
        f"SELECT example_id, shard, row_in_shard FROM {table} WHERE store_id = ? ORDER BY shard, row_in_shard",
        [store.store_id],
    ).fetchall()
    return {example_id: (shard, row) for example_id, shard, row in result}


@dataclass(frozen=True)
class Progress:
    done: int  # examples computed in this call
    total: int  # examples this call has to compute (already stored ones excluded)
    skipped: int  # already stored, not recomputed
    examples_per_s: float
    eta_s: float


def _l2_normalize_fp16(features: torch.Tensor) -> np.ndarray:
    norms = features.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()) or not bool(torch.isfinite(features).all()):
        raise ValueError("a projected gradient is zero or not finite; cannot L2-normalize it")
    return (features / norms).to(torch.float16).cpu().numpy()


def compute_features(
    model: torch.nn.Module,
    examples: Sequence[tuple[str, TokenizedExample]],
    projector: Projector | Sequence[Projector],
    store: FeatureStore | Sequence[FeatureStore],
    *,
    exp_avg: Mapping[str, torch.Tensor] | None = None,
    exp_avg_sq: Mapping[str, torch.Tensor] | None = None,
    adam_step: int | None = None,
    pad_token_id: int,
    max_batch_size: int = 8,
    max_tokens: int | None = None,
    exact_group_size: int = 256,
    progress_cb: Callable[[Progress], None] | None = None,
    memory_budget_bytes: int | None = None,
    oom_log: Callable[[str], None] | None = None,
) -> int:
    """Fill ``store`` with features of the ``(example_id, tokenized)`` pairs it has not covered.

    Examples without target tokens get no features; they are recorded in the store as
    excluded, with the reason, in the commit record of the shard their chunk went to.

    ``model`` is the peft model already holding the checkpoint's adapter. Train stores
    need that checkpoint's Adam moments (``exp_avg``/``exp_avg_sq`` keyed by parameter
    name, and ``adam_step``, its optimizer step count, for ``adam_bias_corrected``) and
    get the features of the transform their manifest records (``train_feature``); target
    stores take plain gradients and refuse moments. Several ``(projector, store)`` pairs (e.g. several dims) share
    one gradient pass. ``exact`` projections are applied to groups of up to
    ``exact_group_size`` examples so that each dense block is generated once per group.
    With ``memory_budget_bytes`` (``selection.common.memory.free_bytes``), batches and groups are also
    bounded by the memory estimate of ``selection.common.memory.GradientMemory``. A batch that runs out of
    memory is halved and retried (``oom_log`` is told), whatever the budget.
    Returns the number of examples whose features were computed (excluded ones not counted).
    """
    projectors = [projector] if isinstance(projector, Projector) else list(projector)
    stores = [store] if isinstance(store, FeatureStore) else list(store)
    if len(projectors) != len(stores) or not stores:
        raise ValueError(f"need one store per projector, got {len(projectors)} projectors and {len(stores)} stores")
    engine = PerExampleGradients(model)
    for proj, st in zip(projectors, stores):
        if st.manifest["projection"] != proj.fingerprint():
            raise ValueError(f"projector does not match store {st.directory}: "
                             f"{describe_mismatch(st.manifest['projection'], proj.fingerprint())}")
        if proj.input_dim != engine.dim or proj.names_hash != engine.names_hash:
            raise ValueError(f"projector was built for {proj.input_dim} inputs / names {proj.names_hash}, "
                             f"the model has {engine.dim} / {engine.names_hash}")
    kinds = {st.kind for st in stores}
    if len(kinds) != 1:
        raise ValueError(f"all stores must be of one kind, got {sorted(kinds)}")
    kind = kinds.pop()
    if kind == "train":
        if exp_avg is None or exp_avg_sq is None:
            raise ValueError("train features need the checkpoint's Adam moments (exp_avg and exp_avg_sq)")
        transforms = {st.transform for st in stores}
        if len(transforms) != 1:
            raise ValueError(f"stores filled together must share one transform, got {sorted(transforms)}")
        transform = transforms.pop()
        if transform == "adam_bias_corrected" and adam_step is None:
            raise ValueError("adam_bias_corrected features need the checkpoint's optimizer step count (adam_step)")
        moments: AdamMoments | None = AdamMoments.from_named(exp_avg, exp_avg_sq, engine.slots, adam_step)
    else:
        if exp_avg is not None or exp_avg_sq is not None:
            raise ValueError("target features are plain gradients; do not pass Adam moments")
        moments = None
    done_sets = [st.covered() for st in stores]
    if any(done != done_sets[0] for done in done_sets[1:]):
        raise ValueError("the stores hold different example sets; fill them one at a time")
    seen: set[str] = set()
    todo: list[tuple[str, TokenizedExample]] = []
    for example_id, example in examples:
        if example_id in seen:
            raise ValueError(f"example id {example_id!r} appears twice")
        seen.add(example_id)
        if example_id in done_sets[0]:
            continue
        todo.append((example_id, example))
    skipped = len(seen) - len(todo)
    shard_size = stores[0].shard_size
    # Dense blocks are costly to generate: apply dense projectors to groups, not batches.
    group_size = exact_group_size if any(proj.mode in ("exact", "device") for proj in projectors) else 1
    max_rows = None
    if memory_budget_bytes is not None:
        estimate = gradient_memory(model, engine.dim)
        # Half the budget for a batch's gradients and activations, half for the group of pending features.
        max_rows = estimate.max_rows(memory_budget_bytes // 2)
        group_size = max(1, min(group_size, memory_budget_bytes // 2 // (engine.dim * 4)))
    started = time.perf_counter()
    done = n_excluded = 0
    for shard_start in range(0, len(todo), shard_size):
        excluded = {
            example_id: f"no_target_tokens: no assistant token {'left after truncation' if e.truncated else 'to learn'}"
            for example_id, e in todo[shard_start : shard_start + shard_size] if e.n_target_tokens == 0
        }
        chunk = [(i, e) for i, e in todo[shard_start : shard_start + shard_size] if i not in excluded]
        chunk_examples = [example for _, example in chunk]
        outputs = [torch.empty(len(chunk), proj.dim) for proj in projectors]
        pending_rows: list[int] = []
        pending_grads: list[torch.Tensor] = []

        def flush() -> None:
            grads = torch.cat(pending_grads)
            for proj, out in zip(projectors, outputs):
                out[pending_rows] = proj.project(grads).cpu()
            pending_rows.clear()
            pending_grads.clear()

        def features_of(rows: list[int]) -> torch.Tensor:
            grads = engine(collate([chunk_examples[row] for row in rows], pad_token_id))
            return moments.transform(grads, transform) if moments is not None else grads

        batches = length_sorted_batches(chunk_examples, max_batch_size, max_tokens, max_rows)
        for batch_rows, batch_features in run_halving_on_oom(batches, features_of, oom_log):
            pending_grads.append(batch_features)
            del batch_features
            pending_rows.extend(batch_rows)
            if len(pending_rows) >= group_size:
                flush()
            done += len(batch_rows)
            if progress_cb is not None:
                elapsed = time.perf_counter() - started
                rate = done / elapsed if elapsed > 0 else 0.0
                progress_cb(Progress(done, len(todo), skipped, rate, (len(todo) - done) / rate if rate else float("inf")))
        if pending_rows:
            flush()
        ids = [example_id for example_id, _ in chunk]
        for st, out in zip(stores, outputs):
            features = _l2_normalize_fp16(out) if ids else np.zeros((0, st.dim), np.float16)
            st.write_shard(ids, features, excluded)
        done += len(excluded)
        n_excluded += len(excluded)
    return len(todo) - n_excluded


def target_scores(train: FeatureStore, target: FeatureStore, train_ids: Sequence[str] | None = None) -> np.ndarray:
    """Cosine similarities ``[n_train, n_target]`` (features are unit-norm), in float32."""
    check_compatible(train, target)
    return train.features(train_ids).astype(np.float32) @ target.features().astype(np.float32).T
