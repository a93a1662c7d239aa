"""Bench: kMQ clustering + selection on 270K x 384 embeddings (MiniLM-sized).

Synthetic unit-norm embeddings from planted blobs. Times the silhouette search
over candidate k (MiniBatchKMeans, silhouette on a sample), the per-cluster
allocation and the quality sampling, and compares the clustering with full
(Lloyd) k-means at the chosen k on the same data (time and adjusted Rand index).
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score
from threadpoolctl import threadpool_limits

from selection.kmq import allocate_budget, kmq_select, sample_within_clusters


def synthetic_embeddings(n: int, dim: int, centers: int, spread: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((centers, dim), dtype=np.float32)
    x = means[rng.integers(centers, size=n)] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=270_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--centers", type=int, default=32, help="planted clusters")
    ap.add_argument("--spread", type=float, default=0.6)
    ap.add_argument("--candidates", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--silhouette-sample", type=int, default=5_000)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="cap BLAS/OpenMP threads (OpenMP spin-waits badly when the cores are shared)",
    )
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-full-kmeans", action="store_true", help="skip the Lloyd k-means comparison")
    args = ap.parse_args()
    run(args)


def run(args: argparse.Namespace) -> None:

    X = synthetic_embeddings(args.n, args.dim, args.centers, args.spread, seed=0)
    quality = np.random.default_rng(1).standard_normal(args.n)
    budget = int(args.n * args.fraction)

    times, result = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = kmq_select(
            quality,
            budget,
            embeddings=X,
            k_candidates=args.candidates,
            seed=0,
            silhouette_sample=args.silhouette_sample,
            n_threads=args.threads,
        )
        times.append(time.perf_counter() - t0)
    total_s = statistics.median(times)
    t0 = time.perf_counter()
    per_cluster = allocate_budget(np.bincount(result.labels, minlength=result.k), budget)
    sample_within_clusters(result.labels, quality, per_cluster, 1.0, seed=0)
    select_s = time.perf_counter() - t0
    assert result.indices.size == budget and np.unique(result.indices).size == budget

    report = {
        "threads": args.threads,
        "n": args.n,
        "dim": args.dim,
        "planted_k": args.centers,
        "candidates": args.candidates,
        "chosen_k": result.k,
        "budget": budget,
        "seconds_total": round(total_s, 2),
        "seconds_allocate_and_sample": round(select_s, 3),
        "time_vs_60s_target": round(total_s / 60, 3),
        "silhouette": {str(k): round(v, 4) for k, v in result.silhouette.items()},
    }
    print(f"embeddings {args.n} x {args.dim}, planted k={args.centers}, candidates {args.candidates}")
    print(
        f"ours (median of {args.repeats}): {total_s:.2f} s for silhouette search + clustering + selection "
        f"(allocation + sampling alone {select_s:.3f} s); chosen k={result.k}"
    )
    print("silhouette:", report["silhouette"])
    if not args.no_full_kmeans:
        t0 = time.perf_counter()
        with threadpool_limits(limits=args.threads):
            lloyd = KMeans(n_clusters=result.k, random_state=0, n_init=1).fit_predict(X)
        lloyd_s = time.perf_counter() - t0
        ari = adjusted_rand_score(lloyd, result.labels)
        per_k = total_s / len(args.candidates)
        print(
            f"full k-means (n_init=1) at k={result.k}: {lloyd_s:.2f} s vs ours {per_k:.2f} s per candidate "
            f"(ratio {lloyd_s / per_k:.1f}x); ARI(ours, full) = {ari:.3f}"
        )
        report.update(
            {
                "full_kmeans_seconds": round(lloyd_s, 2),
                "ours_seconds_per_candidate": round(per_k, 2),
                "full_kmeans_vs_ours_per_candidate": round(lloyd_s / per_k, 2),
                "ari_vs_full_kmeans": round(ari, 4),
            }
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
