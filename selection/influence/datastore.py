"""Memory-mapped store of projected gradient features, and the loop filling it.

One store = one directory holding the features of one (model, checkpoint, kind,
projector) combination; ``store_directory`` derives a canonical location under a root.
Features are kept in a ``selection.common.arrays.ArrayStore`` (its module docstring gives the
layout, commit, lock and check rules): float16 ``[rows, dim]`` L2-normalized rows in chunks
of ``chunk_size`` examples. The manifest records the identity: model fingerprint, checkpoint,
kind, projector fingerprint (mode, dim, seed, input dim, parameter names) and, for train
stores, the train-feature transform (``adam``, ``sgd``, ...), and whose loss the gradients are of
when it is not LESS's response tokens (``loss_tokens``). A chunk's commit record also
lists as ``excluded`` the examples of that chunk that have no features (no target tokens),
so that no id is lost silently and a rerun need not look at them again.

A store may hold one *part* of a pool (``part="03-of-08"``: the ids with
``shard_of(id, 8) == 3``), so that parts are computed by separate processes or machines
(Dagster partitions, called shards) and read together.

Chunk contents depend only on the ordered ids that go in them (chunks are cut every
``chunk_size`` not-yet-computed ids in input order, and batches are formed inside a
chunk), so a resumed run writes the same bytes as an uninterrupted one on the same
device type. Opening a store whose manifest differs in anything (another model,
checkpoint, dim, seed, projection mode, transform ...) is a ValueError.

Every read of a chunk is checked against its commit record and raises
``ArtifactIntegrityError`` naming the file. A writer rerun repairs instead (``repair_stores``):
the first damaged chunk and every later one are dropped and recomputed, since chunks are
numbered in commit order and stores filled together must hold the same chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from selection.common.arrays import ArrayStore
from selection.common.memory import gradient_memory, run_halving_on_oom
from selection.data.tokenization import (
    LESS_LOSS_TOKENS,
    TokenizedExample,
    check_loss_tokens,
    collate,
    length_sorted_batches,
)
from selection.influence.gradients import (
    LITERAL_LESS_TRANSFORM,
    AdamMoments,
    PerExampleGradients,
    check_train_transform,
)
from selection.influence.projection import Projector

KINDS = ("train", "target")
STORE_FORMAT = 1


def fingerprint_of(value: Any) -> str:
    """Short stable hash of a JSON-able value (e.g. a model spec dict)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _store_transform(kind: str, transform: str | None) -> str | None:
    """The transform a store of ``kind`` records: train stores always name one (LESS's own when
    not given), target stores none (their features are always plain gradients)."""
    if kind == "target":
        if transform not in (None, "sgd"):
            raise ValueError(f"target features are plain gradients; transform {transform!r} does not apply")
        return None
    return check_train_transform(transform or LITERAL_LESS_TRANSFORM)


def store_directory(
    root: str | Path,
    model_fingerprint: str,
    checkpoint: str,
    kind: str,
    projector: Projector,
    part: str | None = None,
    transform: str | None = None,
    loss_tokens: str = LESS_LOSS_TOKENS,
) -> Path:
    """Canonical place of a store.

    ``root/<model>/<checkpoint>/<kind>/[<loss tokens>-][<transform>-]<mode>-d<dim>-s<seed>-<hash>[/<shard>]``.

    Train stores of a transform other than LESS's own ``adam``, and stores of gradients of other
    than the response tokens, carry it in the folder name, so switching opens a new store (LESS's
    own settings keep the folder they always had)."""
    prefix = settings_prefix(_store_transform(kind, transform), loss_tokens)
    name = f"{prefix}{projector.mode}-d{projector.dim}-s{projector.seed}-{projector.fingerprint_hash()}"
    directory = Path(root) / model_fingerprint / checkpoint / kind / name
    return directory / part if part is not None else directory


def settings_prefix(transform: str | None, loss_tokens: str) -> str:
    """``[<loss tokens>-][<transform>-]`` of store and score folder names: empty for LESS's own settings
    (and for no transform), so their folders keep the names they always had."""
    prefix = "" if transform in (None, LITERAL_LESS_TRANSFORM) else f"{transform}-"
    return prefix if check_loss_tokens(loss_tokens) == LESS_LOSS_TOKENS else f"{loss_tokens}-{prefix}"


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


class FeatureStore:
    """Features of one (model, checkpoint, kind, projector); see the module docstring."""

    def __init__(
        self,
        directory: str | Path,
        model_fingerprint: str,
        checkpoint: str,
        kind: str,
        projector: Projector | Mapping[str, Any],
        chunk_size: int = 512,
        part: str | None = None,
        transform: str | None = None,
        loss_tokens: str = LESS_LOSS_TOKENS,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        transform = _store_transform(kind, transform)
        if not model_fingerprint or not checkpoint:
            raise ValueError("model_fingerprint and checkpoint must be non-empty strings")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        projection = projector.fingerprint() if isinstance(projector, Projector) else dict(projector)
        self.directory = Path(directory)
        self.chunk_size = chunk_size
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
        # Recorded only when not LESS's response tokens, so stores written before it keep their identity.
        if check_loss_tokens(loss_tokens) != LESS_LOSS_TOKENS:
            self.manifest["loss_tokens"] = loss_tokens
        self.arrays = ArrayStore(
            self.directory, self.manifest, self._check_manifest, dtype=np.float16, width=self.dim, asset=self.asset
        )

    def _check_manifest(self, existing: dict[str, Any]) -> None:
        if existing.get("kind") == "train":
            # Train stores written before the transform was recorded all hold LESS's own.
            existing.setdefault("transform", LITERAL_LESS_TRANSFORM)
        if existing != self.manifest:
            raise ValueError(
                f"feature store {self.directory} holds other features: {describe_mismatch(existing, self.manifest)}; "
                "refusing to mix them (use another directory, e.g. store_directory(...))"
            )

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
    def loss_tokens(self) -> str:
        """Whose loss the gradients are of (``selection.data.tokenization.LOSS_TOKENS``)."""
        return str(self.manifest.get("loss_tokens", LESS_LOSS_TOKENS))

    @property
    def store_id(self) -> str:
        return fingerprint_of(self.manifest)

    @property
    def asset(self) -> str:
        """What to rematerialize to rewrite this store (named in integrity errors)."""
        return f"{self.kind}_gradients" + (f" (shard {self.part})" if self.part else "")

    @property
    def n_chunks(self) -> int:
        """Committed chunks, damaged ones included, numbered 0 to n_chunks - 1; a chunk after a
        missing number is not counted (rows are addressed by position across chunks)."""
        committed = set(self.arrays.numbers())
        count = 0
        while count in committed:
            count += 1
        return count

    def ids(self) -> list[str]:
        return self.arrays.ids()

    def __len__(self) -> int:
        return len(self.arrays)

    def excluded(self) -> dict[str, str]:
        """Ids this store was given but holds no features for, with the reason."""
        return self.arrays.excluded()

    def covered(self) -> set[str]:
        """Every id already dealt with: stored or excluded."""
        return self.arrays.covered()

    def __contains__(self, example_id: str) -> bool:
        return example_id in self.arrays

    def write_chunk(self, ids: Sequence[str], features: np.ndarray, excluded: Mapping[str, str] | None = None) -> int:
        """Append one chunk (float16 ``[len(ids), dim]``, possibly empty) and the ids given with it
        that have no features (``excluded``: id -> reason); returns its number."""
        return self.arrays.commit(ids, features, excluded)

    def truncate(self, n_chunks: int) -> None:
        """Forget the chunks from ``n_chunks`` on."""
        self.arrays.drop(number for number in self.arrays.numbers() if number >= n_chunks)

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Hold the store's writer lock; a second writer (another run of the same partition) is
        refused with ``selection.common.arrays.StoreBusyError``."""
        return self.arrays.lock(wait=False, busy=" (two runs of the same partition must not overlap)")

    def chunk(self, number: int) -> np.ndarray:
        """Memory-mapped float16 ``[rows, dim]`` of one committed chunk, checked against its commit
        record (``ArtifactIntegrityError`` naming the file if it was truncated or changed)."""
        return self.arrays.array(number)

    def first_damaged_chunk(self) -> tuple[int, str] | None:
        """``(chunk, problem)`` of the first chunk that fails its check, or None (reads chunks until then)."""
        return next(self.arrays.problems(), None)

    def iter_chunks(self) -> Iterator[tuple[list[str], np.ndarray]]:
        for number in self.arrays.numbers():
            yield list(self.arrays.chunk(number).ids), self.chunk(number)

    def features(self, ids: Sequence[str] | None = None) -> np.ndarray:
        """Float16 ``[len(ids), dim]`` in the order of ``ids`` (default: storage order)."""
        if ids is None:
            parts = [np.asarray(array) for _, array in self.iter_chunks()]
            return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float16)
        missing = self.arrays.absent(ids)
        if missing:
            raise ValueError(f"{len(missing)} ids have no features in {self.directory}, e.g. {missing[:3]}")
        return self.arrays.rows(ids)


def align_stores(stores: Sequence[FeatureStore]) -> int:
    """Make stores that are filled together (one per projection dim) hold the same chunks.

    They commit each chunk one store after the other, so a run killed between two commits
    leaves some stores one chunk ahead; those extra chunks are dropped (the resumed run
    recomputes them to the same bytes). Stores that differ in any shared chunk (e.g. a dim
    added to an existing datastore) are refused. Returns the number of chunks dropped.
    """
    common = min(store.n_chunks for store in stores)

    def chunk_ids(store: FeatureStore) -> list[tuple[str, ...] | None]:
        # A damaged record hides its ids: it matches anything here and repair_stores drops it.
        return [None if n in store.arrays.damaged else store.arrays.chunk(n).ids for n in range(common)]

    reference = chunk_ids(stores[0])
    for store in stores:
        # A kill between commits leaves a store at most one chunk ahead; more means it was filled alone.
        differs = any(a is not None and b is not None and a != b for a, b in zip(chunk_ids(store), reference))
        if store.n_chunks > common + 1 or differs:
            raise ValueError(
                f"{store.directory} and {stores[0].directory} hold different examples; stores of several dims are "
                "filled together from the start: compute a new dim with a fresh seed or a fresh warmup run"
            )
    dropped = 0
    for store in stores:
        dropped += store.n_chunks - common
        store.truncate(common)
    return dropped


def repair_stores(stores: Sequence[FeatureStore]) -> list[str]:
    """Drop, in stores filled together, the first chunk any of them fails to verify and every later
    chunk (chunk numbers follow commit order), so the writer recomputes them. Returns the problems found."""
    damaged = [found for found in (store.first_damaged_chunk() for store in stores) if found is not None]
    if damaged:
        first = min(chunk for chunk, _ in damaged)
        for store in stores:
            store.truncate(first)
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
    excluded, with the reason, in the commit record of their chunk.

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
            raise ValueError(
                f"projector does not match store {st.directory}: "
                f"{describe_mismatch(st.manifest['projection'], proj.fingerprint())}"
            )
        if proj.input_dim != engine.dim or proj.names_hash != engine.names_hash:
            raise ValueError(
                f"projector was built for {proj.input_dim} inputs / names {proj.names_hash}, "
                f"the model has {engine.dim} / {engine.names_hash}"
            )
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
    chunk_size = stores[0].chunk_size
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
    for chunk_start in range(0, len(todo), chunk_size):
        excluded = {
            example_id: f"no_target_tokens: no assistant token {'left after truncation' if e.truncated else 'to learn'}"
            for example_id, e in todo[chunk_start : chunk_start + chunk_size]
            if e.n_target_tokens == 0
        }
        chunk = [(i, e) for i, e in todo[chunk_start : chunk_start + chunk_size] if i not in excluded]
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
                progress_cb(
                    Progress(done, len(todo), skipped, rate, (len(todo) - done) / rate if rate else float("inf"))
                )
        if pending_rows:
            flush()
        ids = [example_id for example_id, _ in chunk]
        for st, out in zip(stores, outputs):
            features = _l2_normalize_fp16(out) if ids else np.zeros((0, st.dim), np.float16)
            st.write_chunk(ids, features, excluded)
        done += len(excluded)
        n_excluded += len(excluded)
    return len(todo) - n_excluded


def target_scores(train: FeatureStore, target: FeatureStore, train_ids: Sequence[str] | None = None) -> np.ndarray:
    """Cosine similarities ``[n_train, n_target]`` (features are unit-norm), in float32."""
    check_compatible(train, target)
    return train.features(train_ids).astype(np.float32) @ target.features().astype(np.float32).T
