"""kMQ and iterative kMQ (Yu et al. 2024, "Diversify and Conquer: Diversity-Centric
Data Selection with Iterative Refinement"), implemented from the paper:

- k-means over embeddings, k chosen by the silhouette score over a candidate grid;
- per-cluster budgets proportional to cluster size (largest remainder, capped);
- within a cluster, sampling without replacement with probabilities
  softmax(quality / temperature);
- iterative kMQ: N rounds of b/N new examples; after each round the caller
  trains on the selection so far and returns per-example scores
  S = score(prompt + gold) - score(prompt + generated); cluster weights are
  updated w_j <- w_j * s_j / sum_c s_c (multiplying the previous weights, unlike
  the public code, their issue #10), and later rounds allocate in proportion to
  w_j * (examples still available in cluster j).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Integral

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from selection.common.allocation import largest_remainder

MINIBATCH_ABOVE = 20_000  # rows; full KMeans below, MiniBatchKMeans above
DEFAULT_SILHOUETTE_SAMPLE = 5_000  # silhouette is quadratic in the rows it sees
DEFAULT_WEIGHT_FLOOR = 1e-6

SeedLike = int | np.random.Generator


def _as_count(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return int(value)


def _as_int_vector(values: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(values)
    integral = np.issubdtype(arr.dtype, np.integer) or (
        np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))
    )
    if arr.ndim != 1 or (arr.size and not integral):
        raise ValueError(f"{what} must be a 1-D array of integers, got dtype {arr.dtype}, shape {arr.shape}")
    if np.any(arr < 0):
        raise ValueError(f"{what} must be non-negative")
    return arr.astype(np.int64)


def allocate_weighted_budget(
    mass: Sequence[float] | np.ndarray, capacity: Sequence[int] | np.ndarray, budget: int
) -> np.ndarray:
    """Integer budgets proportional to `mass`, each at most `capacity`, summing to `budget`.

    Exact rational arithmetic. Clusters whose proportional quota reaches their
    capacity get exactly their capacity and the rest of the budget is re-shared
    among the others in proportion to their mass (repeated until no quota
    exceeds its capacity). The remaining quotas are floored and the leftover
    units go to the largest fractional remainders; equal remainders go to the
    lower cluster index. Clusters with zero mass or zero capacity get nothing.
    """
    cap = _as_int_vector(capacity, "capacity")
    weights = np.asarray(mass, dtype=np.float64)
    if weights.shape != cap.shape:
        raise ValueError(f"mass has shape {weights.shape}, capacity has shape {cap.shape}")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0):
        raise ValueError("mass must be finite and non-negative")
    budget = _as_count(budget, "budget")
    if budget < 0:
        raise ValueError(f"budget must be non-negative, got {budget}")
    active = [j for j in range(cap.size) if cap[j] > 0 and weights[j] > 0]
    reachable = int(cap[active].sum()) if active else 0
    if budget > reachable:
        raise ValueError(f"budget {budget} exceeds the {reachable} examples available in clusters with positive weight")
    alloc = np.zeros(cap.size, dtype=np.int64)
    mass_exact = {j: Fraction(float(weights[j])) for j in active}
    remaining = budget
    while active:
        total = sum(mass_exact[j] for j in active)
        quota = {j: remaining * mass_exact[j] / total for j in active}
        capped = {j for j in active if quota[j] >= int(cap[j])}
        if not capped:
            break
        for j in capped:
            alloc[j] = cap[j]
            remaining -= int(cap[j])
        active = [j for j in active if j not in capped]
    if not active:
        return alloc
    for j, count in largest_remainder(remaining, {j: mass_exact[j] for j in active}).items():
        alloc[j] = count
    return alloc


def allocate_budget(cluster_sizes: Sequence[int] | np.ndarray, budget: int) -> np.ndarray:
    """Per-cluster budgets proportional to cluster size (largest remainder, never
    above a cluster's size, summing exactly to `budget`; ties to the lower index)."""
    sizes = _as_int_vector(cluster_sizes, "cluster_sizes")
    budget = _as_count(budget, "budget")
    if budget > int(sizes.sum()):
        raise ValueError(f"budget {budget} exceeds the total of cluster sizes {int(sizes.sum())}")
    return allocate_weighted_budget(sizes, sizes, budget)


def _check_embeddings(X: np.ndarray) -> np.ndarray:
    arr = np.asarray(X)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("embeddings contain NaN or infinite values")
    return arr


def cluster(
    X: np.ndarray, k: int, seed: int, minibatch_above: int = MINIBATCH_ABOVE, n_threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """k-means labels `[n]` and centers `[k, d]`, k-means++ init with one run
    (scikit-learn's default); MiniBatchKMeans for more than `minibatch_above`
    rows (full Lloyd k-means is too slow there on a small CPU). `n_threads` caps
    the OpenMP/BLAS threads: on cores shared with other work, 1 thread can be
    several times faster than spin-waiting OpenMP threads."""
    arr = _check_embeddings(X)
    k = _as_count(k, "k")
    if not 1 <= k <= arr.shape[0]:
        raise ValueError(f"k must be in [1, {arr.shape[0]}], got {k}")
    if arr.shape[0] > minibatch_above:
        model = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=1)
    else:
        model = KMeans(n_clusters=k, random_state=seed, n_init=1)
    with threadpool_limits(limits=n_threads):
        labels = model.fit_predict(arr)
    return labels.astype(np.int64), model.cluster_centers_


def _silhouette_search(
    X: np.ndarray,
    candidates: Sequence[int],
    seed: int,
    sample_size: int,
    minibatch_above: int,
    n_threads: int | None,
) -> tuple[int, dict[int, float], dict[int, np.ndarray]]:
    arr = _check_embeddings(X)
    ks = sorted({_as_count(k, "candidate k") for k in candidates})
    if not ks:
        raise ValueError("need at least one candidate k")
    if ks[0] < 2 or ks[-1] >= arr.shape[0]:
        raise ValueError(f"silhouette needs 2 <= k < n_rows={arr.shape[0]}, got candidates {ks}")
    curve: dict[int, float] = {}
    labels_of: dict[int, np.ndarray] = {}
    for k in ks:
        labels, _ = cluster(arr, k, seed, minibatch_above, n_threads)
        if np.unique(labels).size < 2:
            raise ValueError(f"k-means with k={k} produced a single non-empty cluster")
        sample = sample_size if arr.shape[0] > sample_size else None
        with threadpool_limits(limits=n_threads):
            curve[k] = float(silhouette_score(arr, labels, sample_size=sample, random_state=seed))
        labels_of[k] = labels
    best = max(ks, key=lambda k: (curve[k], -k))
    return best, curve, labels_of


def choose_k_by_silhouette(
    X: np.ndarray,
    candidates: Sequence[int],
    seed: int,
    sample_size: int = DEFAULT_SILHOUETTE_SAMPLE,
    minibatch_above: int = MINIBATCH_ABOVE,
    n_threads: int | None = None,
) -> tuple[int, dict[int, float]]:
    """Cluster with each candidate k and keep the best silhouette score (ties to the
    smaller k). The silhouette is computed on `sample_size` random rows (seeded)
    when the pool is larger, since it is quadratic in the number of rows."""
    best, curve, _ = _silhouette_search(X, candidates, seed, sample_size, minibatch_above, n_threads)
    return best, curve


@dataclass(frozen=True)
class PoolClustering:
    k: int
    labels: np.ndarray  # [n] cluster per row
    silhouette: dict[int, float]  # score per candidate k searched; empty when k was fixed

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.k)


def cluster_pool(X: np.ndarray, k: int | None, k_candidates: Sequence[int], seed: int) -> PoolClustering:
    """k-means of the pool embeddings with `k`, or else with the best-silhouette k among the
    candidates that fit the pool (2 <= k < rows)."""
    curve: dict[int, float] = {}
    if k is None:
        candidates = [c for c in k_candidates if 2 <= c < len(X)]
        if not candidates:
            raise ValueError(f"no k candidate in {k_candidates} fits a pool of {len(X)}")
        k, curve = choose_k_by_silhouette(X, candidates, seed)
    labels, _ = cluster(X, k, seed)
    return PoolClustering(k, labels, curve)


def _rng(seed: SeedLike) -> np.random.Generator:
    return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def sample_within_clusters(
    labels: Sequence[int] | np.ndarray,
    quality: Sequence[float] | np.ndarray,
    per_cluster_budget: Sequence[int] | np.ndarray,
    temperature: float,
    seed: SeedLike,
    exclude: Sequence[int] | np.ndarray | None = None,
) -> np.ndarray:
    """Sample `per_cluster_budget[j]` rows of each cluster j without replacement,
    with probabilities softmax(quality / temperature) within the cluster; rows in
    `exclude` are never drawn.

    Uses the Gumbel-top-k trick (Kool et al. 2019): the top-b rows of
    quality / temperature + Gumbel noise are distributed exactly like b
    successive draws without replacement from that softmax. One noise value
    per row is drawn in row order, so a seed gives the same sample for the same
    inputs. Returned in sampling order: cluster by cluster, within a cluster by
    decreasing key.
    """
    lab = _as_int_vector(labels, "labels")
    q = np.asarray(quality, dtype=np.float64)
    if q.shape != lab.shape:
        raise ValueError(f"quality has shape {q.shape}, labels has shape {lab.shape}")
    if not np.all(np.isfinite(q)):
        bad = np.flatnonzero(~np.isfinite(q))
        raise ValueError(f"quality has {bad.size} NaN/infinite value(s), first at rows {bad[:5].tolist()}")
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    want = _as_int_vector(per_cluster_budget, "per_cluster_budget")
    n_clusters = int(lab.max()) + 1 if lab.size else 0
    if want.size < n_clusters:
        raise ValueError(f"per_cluster_budget has {want.size} entries but labels go up to {n_clusters - 1}")
    available = np.ones(lab.size, dtype=bool)
    if exclude is not None:
        ex = np.asarray(exclude, dtype=np.int64)
        if ex.size and (ex.min() < 0 or ex.max() >= lab.size):
            raise ValueError(f"exclude holds indices outside [0, {lab.size})")
        available[ex] = False
    have = np.bincount(lab[available], minlength=want.size)
    short = np.flatnonzero(want > have)
    if short.size:
        j = int(short[0])
        raise ValueError(f"cluster {j} has {int(have[j])} available rows but a budget of {int(want[j])}")
    scaled = q / temperature
    if not np.all(np.isfinite(scaled)):
        raise ValueError(f"quality / temperature overflows; temperature {temperature} is too small")
    keys = scaled + _rng(seed).gumbel(size=lab.size)
    rows = np.flatnonzero(available)
    order = rows[np.lexsort((-keys[rows], lab[rows]))]  # by cluster, then key descending
    starts = np.searchsorted(lab[order], np.arange(want.size))
    return np.concatenate(
        [order[starts[j] : starts[j] + want[j]] for j in range(want.size)] or [np.empty(0, np.int64)]
    ).astype(np.int64)


@dataclass
class KMQResult:
    indices: np.ndarray
    labels: np.ndarray
    per_cluster_budget: np.ndarray
    k: int
    silhouette: dict[int, float] = field(default_factory=dict)


def kmq_select(
    quality: Sequence[float] | np.ndarray,
    budget: int,
    *,
    labels: Sequence[int] | np.ndarray | None = None,
    embeddings: np.ndarray | None = None,
    k: int | None = None,
    k_candidates: Sequence[int] = (8, 16, 32, 64),
    seed: int = 0,
    temperature: float = 1.0,
    silhouette_sample: int = DEFAULT_SILHOUETTE_SAMPLE,
    n_threads: int | None = None,
) -> KMQResult:
    """One-shot kMQ. Give either cluster `labels`, or `embeddings` to cluster
    (with `k`, or k chosen by silhouette over `k_candidates`)."""
    if (labels is None) == (embeddings is None):
        raise ValueError("give exactly one of labels or embeddings")
    curve: dict[int, float] = {}
    if labels is None:
        if k is None:
            valid = [c for c in k_candidates if 2 <= c < len(embeddings)]
            # reuse the winning candidate's clustering instead of fitting it again
            k, curve, labels_of = _silhouette_search(
                embeddings, valid, seed, silhouette_sample, MINIBATCH_ABOVE, n_threads
            )
            lab = labels_of[k]
        else:
            lab, _ = cluster(embeddings, k, seed, n_threads=n_threads)
    else:
        lab = _as_int_vector(labels, "labels")
    n_clusters = int(lab.max()) + 1 if k is None else int(k)
    per_cluster = allocate_budget(np.bincount(lab, minlength=n_clusters), budget)
    indices = sample_within_clusters(lab, quality, per_cluster, temperature, seed)
    return KMQResult(indices, lab, per_cluster, n_clusters, curve)


def iterative_round_budget(total_budget: int, n_rounds: int, round_idx: int) -> int:
    """Examples to add in round `round_idx`: total // n_rounds, plus one for the
    first total % n_rounds rounds, so the rounds sum exactly to the total."""
    total_budget = _as_count(total_budget, "total_budget")
    n_rounds = _as_count(n_rounds, "n_rounds")
    if n_rounds <= 0 or total_budget < 0:
        raise ValueError(f"need n_rounds > 0 and total_budget >= 0, got {n_rounds}, {total_budget}")
    if not 0 <= round_idx < n_rounds:
        raise ValueError(f"round_idx must be in [0, {n_rounds}), got {round_idx}")
    base, extra = divmod(total_budget, n_rounds)
    return base + (1 if round_idx < extra else 0)


def update_cluster_weights(
    weights: Sequence[float] | np.ndarray,
    cluster_scores: Sequence[float] | np.ndarray,
    floor: float = DEFAULT_WEIGHT_FLOOR,
) -> np.ndarray:
    """w_j <- w_j * s_j / sum_c s_c, then renormalized to sum 1 (the scale does not
    change any allocation; a normalized vector is easier to plot).

    Negative and zero scores are clipped to `floor` (> 0): a cluster whose
    generations already score at least as well as the gold answers has nothing
    left to teach, so its weight shrinks towards zero but stays positive (it is
    not removed, and if every cluster is clipped the weights stay as they were).
    Clusters with no scored example (NaN) get the mean of the clipped observed
    scores: no evidence, so their weight only changes through renormalization.
    """
    w = np.asarray(weights, dtype=np.float64)
    s = np.asarray(cluster_scores, dtype=np.float64)
    if w.ndim != 1 or s.shape != w.shape:
        raise ValueError(f"weights {w.shape} and cluster_scores {s.shape} must be equal-length 1-D")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("weights must be finite and > 0")
    if not (np.isfinite(floor) and floor > 0):
        raise ValueError(f"floor must be finite and > 0, got {floor}")
    if np.any(np.isinf(s)):
        raise ValueError("cluster scores must not be infinite")
    observed = ~np.isnan(s)
    if not observed.any():
        raise ValueError("no cluster has a score")
    clipped = np.maximum(s, floor)
    clipped[~observed] = clipped[observed].mean()
    new = w * clipped / clipped.sum()
    return new / new.sum()


def cluster_mean_scores(labels: np.ndarray, indices: np.ndarray, scores: np.ndarray, n_clusters: int) -> np.ndarray:
    """Mean score per cluster over `indices` (NaN for clusters with none).

    A NaN score marks an example whose generation could not be scored
    (`selection.train.generation` lists them as unscored): it is left out of its
    cluster's mean. Infinite scores are an error.
    """
    s = np.asarray(scores, dtype=np.float64)
    idx = np.asarray(indices, dtype=np.int64)
    if s.shape != idx.shape:
        raise ValueError(f"got {s.size} scores for {idx.size} selected examples")
    if np.any(np.isinf(s)):
        raise ValueError("feedback scores contain infinite values")
    scored = ~np.isnan(s)
    lab = np.asarray(labels)[idx[scored]]
    counts = np.bincount(lab, minlength=n_clusters)
    sums = np.bincount(lab, weights=s[scored], minlength=n_clusters)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def iterative_kmq_round(
    labels: Sequence[int] | np.ndarray,
    quality: Sequence[float] | np.ndarray,
    weights: Sequence[float] | np.ndarray,
    round_budget: int,
    already_selected: Sequence[int] | np.ndarray,
    seed: SeedLike,
    temperature: float = 1.0,
) -> np.ndarray:
    """New indices for one round: allocation proportional to w_j * (rows of
    cluster j not yet selected), capped at those rows, then quality sampling;
    never returns an already selected index."""
    lab = _as_int_vector(labels, "labels")
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or (lab.size and w.size <= lab.max()):
        raise ValueError(f"need one weight per cluster; got {w.size} weights for labels up to {lab.max()}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("weights must be finite and > 0")
    taken = np.zeros(lab.size, dtype=bool)
    prior = np.asarray(already_selected, dtype=np.int64)
    taken[prior] = True
    if int(taken.sum()) != prior.size:
        raise ValueError("already_selected contains duplicate indices")
    available = np.bincount(lab[~taken], minlength=w.size)
    per_cluster = allocate_weighted_budget(w * available, available, round_budget)
    return sample_within_clusters(lab, quality, per_cluster, temperature, seed, exclude=prior)


@dataclass
class RoundRecord:
    round: int
    weights: np.ndarray  # weights used to allocate this round
    new_indices: np.ndarray
    cluster_scores: np.ndarray | None  # mean feedback per cluster (NaN: none), None if not computed
    updated_weights: np.ndarray | None


def run_iterative_kmq(
    labels: Sequence[int] | np.ndarray,
    quality: Sequence[float] | np.ndarray,
    budget: int,
    n_rounds: int,
    feedback_fn: Callable[[np.ndarray], np.ndarray],
    seed: int = 0,
    temperature: float = 1.0,
    n_clusters: int | None = None,
    feedback_on_last_round: bool = False,
    floor: float = DEFAULT_WEIGHT_FLOOR,
) -> tuple[np.ndarray, list[RoundRecord]]:
    """Iterative kMQ driver. Starts from w = 1/k; each round adds
    `iterative_round_budget` new examples, then calls
    `feedback_fn(selected_so_far)` -> one S score per selected example (train on
    them, generate, score gold minus generated; NaN = could not be scored, left
    out), averages it per cluster and
    updates the weights. The feedback after the last round would only move
    weights nobody uses, so it is skipped unless `feedback_on_last_round`.
    Round r uses seed (seed, r). Returns (all indices in selection order, records).
    """
    lab = _as_int_vector(labels, "labels")
    k = int(lab.max()) + 1 if n_clusters is None else int(n_clusters)
    if lab.size and k <= lab.max():
        raise ValueError(f"n_clusters={k} but labels go up to {lab.max()}")
    if _as_count(budget, "budget") > lab.size:
        raise ValueError(f"budget {budget} exceeds the pool size {lab.size}")
    weights = np.full(k, 1.0 / k)
    selected = np.empty(0, dtype=np.int64)
    records: list[RoundRecord] = []
    for r in range(_as_count(n_rounds, "n_rounds")):
        new = iterative_kmq_round(
            lab,
            quality,
            weights,
            iterative_round_budget(budget, n_rounds, r),
            selected,
            np.random.default_rng([seed, r]),
            temperature,
        )
        selected = np.concatenate([selected, new])
        record = RoundRecord(r, weights, new, None, None)
        if r + 1 < n_rounds or feedback_on_last_round:
            scores = np.asarray(feedback_fn(selected.copy()), dtype=np.float64)
            record.cluster_scores = cluster_mean_scores(lab, selected, scores, k)
            record.updated_weights = update_cluster_weights(weights, record.cluster_scores, floor)
            weights = record.updated_weights
        records.append(record)
    return selected, records
