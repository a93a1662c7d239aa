"""LESS influence scoring and top-k selection (Xia et al. 2024, "LESS: Selecting
Influential Data for Targeted Instruction Tuning").

Pure numpy. Gradient features come from the datastore as memory-mapped fp16
arrays (one per warm-up checkpoint) and are only ever read in row chunks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from fractions import Fraction
from numbers import Integral, Real

import numpy as np

from selection.common import files

DEFAULT_CHUNK_ROWS = 4096


def checkpoint_weights(avg_lrs: Sequence[float]) -> np.ndarray:
    """Per-checkpoint weights w_c = avg_lr_c / sum(avg_lr) (LESS eq. 2)."""
    lrs = np.asarray(avg_lrs, dtype=np.float64)
    if lrs.ndim != 1 or lrs.size == 0:
        raise ValueError(f"avg_lrs must be a non-empty 1-D sequence, got shape {lrs.shape}")
    if not np.all(np.isfinite(lrs)) or np.any(lrs <= 0):
        raise ValueError(f"every average learning rate must be finite and > 0, got {lrs.tolist()}")
    return lrs / lrs.sum()


def _checked_row_norms(x32: np.ndarray, what: str, row_offset: int = 0) -> np.ndarray:
    """L2 norms of the rows of a float32 array. A zero or non-finite row has no
    direction, so cosine similarity is undefined for it: raise instead of guessing."""
    norms = np.sqrt(np.einsum("ij,ij->i", x32, x32))
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if bad.size:
        raise ValueError(
            f"{what}: {bad.size} row(s) have zero or non-finite norm (first rows "
            f"{(bad[:5] + row_offset).tolist()}); cosine influence is undefined for them"
        )
    return norms


def _open_output(out: np.ndarray | str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    if isinstance(out, np.ndarray):
        if out.shape != shape:
            raise ValueError(f"output array has shape {out.shape}, expected {shape}")
        if out.dtype != np.float32:
            raise ValueError(f"output array must be float32, got {out.dtype}")
        return out
    return np.lib.format.open_memmap(os.fspath(files.confined(out)), mode="w+", dtype=np.float32, shape=shape)


def influence_scores(
    train_feature_mmaps: Sequence[np.ndarray],
    val_features: Sequence[np.ndarray],
    weights: Sequence[float] | np.ndarray,
    out: np.ndarray | str | os.PathLike,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> np.ndarray:
    """score[i, j] = sum_c w_c * cos(train_c[i], val_c[j]) written into `out`.

    `train_feature_mmaps[c]` is `[n_train, d_c]` (typically an fp16 memmap),
    `val_features[c]` is `[n_val, d_c]`. Training rows are read `chunk_rows` at a
    time and upcast to fp32, so peak memory is O(chunk_rows * d) regardless of
    n_train. Rows are re-normalized here even though the datastore stores unit
    vectors (cheap, and protects against un-normalized inputs); a zero or
    non-finite row raises ValueError.

    `out` is a float32 array of shape [n_train, n_val] or a path, in which case a
    `.npy` memmap is created there. Returns the (memmapped) output.
    """
    n_ckpt = len(train_feature_mmaps)
    w = np.asarray(weights, dtype=np.float64)
    if n_ckpt == 0:
        raise ValueError("need at least one checkpoint")
    if len(val_features) != n_ckpt or w.shape != (n_ckpt,):
        raise ValueError(
            f"got {n_ckpt} train feature arrays, {len(val_features)} val feature arrays "
            f"and weights of shape {w.shape}; they must match one per checkpoint"
        )
    if not np.all(np.isfinite(w)):
        raise ValueError("checkpoint weights must be finite")
    if chunk_rows <= 0:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    n_train, n_val = train_feature_mmaps[0].shape[0], val_features[0].shape[0]
    for c, (tr, va) in enumerate(zip(train_feature_mmaps, val_features)):
        if tr.ndim != 2 or va.ndim != 2:
            raise ValueError(f"checkpoint {c}: features must be 2-D, got {tr.shape} and {va.shape}")
        if tr.shape[0] != n_train or va.shape[0] != n_val:
            raise ValueError(
                f"checkpoint {c}: {tr.shape[0]} train / {va.shape[0]} val rows, "
                f"expected {n_train} / {n_val} like checkpoint 0"
            )
        if tr.shape[1] != va.shape[1]:
            raise ValueError(f"checkpoint {c}: train dim {tr.shape[1]} != val dim {va.shape[1]}")
    if n_val == 0:
        raise ValueError("need at least one validation example")

    # Fold the checkpoint weight into the (small) val matrix once: w * (x @ v.T) == x @ (w * v).T
    val_t = []
    for c, va in enumerate(val_features):
        va32 = np.asarray(va, dtype=np.float32)
        scale = np.float32(w[c]) / _checked_row_norms(va32, f"val features, checkpoint {c}")
        val_t.append(np.ascontiguousarray((va32 * scale[:, None]).T))
    result = _open_output(out, (n_train, n_val))
    # Reused buffers: fresh 100+ MB allocations per chunk cost more in page faults than the cast.
    max_dim = max(tr.shape[1] for tr in train_feature_mmaps)
    buffer_rows = min(chunk_rows, n_train)
    upcast = np.empty(buffer_rows * max_dim, dtype=np.float32)
    prod = np.empty((buffer_rows, n_val), dtype=np.float32)
    acc = np.empty_like(prod)
    for start in range(0, n_train, chunk_rows):
        stop = min(start + chunk_rows, n_train)
        rows = stop - start
        for c, tr in enumerate(train_feature_mmaps):
            chunk = upcast[: rows * tr.shape[1]].reshape(rows, tr.shape[1])  # contiguous for BLAS
            np.copyto(chunk, tr[start:stop], casting="unsafe")
            norms = _checked_row_norms(chunk, f"train features, checkpoint {c}", start)
            target = acc[:rows] if c == 0 else prod[:rows]
            np.matmul(chunk, val_t[c], out=target)
            target /= norms[:, None]
            if c:
                acc[:rows] += target
        result[start:stop] = acc[:rows]
    if isinstance(result, np.memmap):
        result.flush()
    return result


def _check_scores(scores: np.ndarray, ndim: int) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.ndim != ndim:
        raise ValueError(f"scores must be {ndim}-D, got shape {arr.shape}")
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError("scores contain NaN or infinite values")
    return arr


def aggregate_target_scores(
    scores: np.ndarray, subtask_of_column: Sequence[Hashable], chunk_rows: int = 65536
) -> np.ndarray:
    """LESS target score per training row: mean over the val columns of each
    subtask, then max over subtasks. Works for any number of subtasks (one or
    many), taken from the labels themselves (LESS issue #14). Returns float64 `[n_train]`.
    """
    arr = _check_scores(scores, 2)
    labels = list(subtask_of_column)
    if len(labels) != arr.shape[1]:
        raise ValueError(f"subtask_of_column has {len(labels)} labels but scores has {arr.shape[1]} columns")
    if not labels:
        raise ValueError("scores must have at least one validation column")
    groups: dict[Hashable, list[int]] = {}
    for col, label in enumerate(labels):
        groups.setdefault(label, []).append(col)
    out = np.empty(arr.shape[0], dtype=np.float64)
    # Row chunks keep memory bounded when `scores` is a memmap of the full pool.
    for start in range(0, arr.shape[0], chunk_rows):
        block = np.asarray(arr[start : start + chunk_rows], dtype=np.float64)
        per_subtask = np.stack([block[:, cols].mean(axis=1) for cols in groups.values()], axis=1)
        out[start : start + block.shape[0]] = per_subtask.max(axis=1)
    return out


def resolve_budget(budget: int | float, n_pool: int) -> int:
    """A count (int, 1..n_pool) or a fraction of the pool (float in (0, 1]) -> count.

    Fractions are read as the decimal the user wrote (0.29 -> 29/100 exactly)
    and rounded down, like LESS's `int(len * percentage)`.
    """
    if isinstance(n_pool, bool) or not isinstance(n_pool, Integral) or n_pool < 0:
        raise ValueError(f"n_pool must be a non-negative integer, got {n_pool!r}")
    if isinstance(budget, bool):
        raise ValueError(f"budget must be a count or a fraction, got {budget!r}")
    if isinstance(budget, Integral):
        count = int(budget)
        if count <= 0:
            raise ValueError(f"budget must be positive, got {count}")
    elif isinstance(budget, Real):
        frac = float(budget)
        if not (math.isfinite(frac) and 0 < frac <= 1):
            raise ValueError(
                f"a float budget is a fraction of the pool and must be in (0, 1], got {frac}; "
                "pass an int for an absolute count"
            )
        count = math.floor(Fraction(repr(frac)) * n_pool)
        if count == 0:
            raise ValueError(f"budget fraction {frac} of a pool of {n_pool} selects no examples")
    else:
        raise ValueError(f"budget must be an int count or a float fraction, got {budget!r}")
    if count > n_pool:
        raise ValueError(f"budget {count} exceeds the pool size {n_pool}")
    return count


def top_k(scores: np.ndarray, budget: int | float) -> np.ndarray:
    """Indices of the `budget` highest scores, descending; ties go to the lower index."""
    arr = _check_scores(scores, 1)
    k = resolve_budget(budget, arr.shape[0])
    # Stable sort of the negated scores keeps equal scores in index order.
    return np.argsort(-arr.astype(np.float64), kind="stable")[:k]


def multi_target_scores(per_task_scores: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Max over target tasks of each task's aggregated LESS score, and the task
    name giving that max (first task in sorted name order on ties).

    Taking the max mirrors LESS's max over subtasks: an example is valuable if
    it helps any target. Task scores are the same unit (weighted cosine), so no
    re-scaling is applied.
    """
    if not per_task_scores:
        raise ValueError("per_task_scores is empty")
    names = sorted(per_task_scores)
    lengths = {t: np.shape(per_task_scores[t]) for t in names}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-task score arrays differ in shape: {lengths}")
    mat = np.stack([_check_scores(per_task_scores[t], 1) for t in names], axis=1).astype(np.float64)
    best = mat.argmax(axis=1)
    return mat[np.arange(mat.shape[0]), best], np.asarray(names, dtype=object)[best]
