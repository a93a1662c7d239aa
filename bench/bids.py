"""Bench: BIDS selection, incremental vs the naive loop of the definition.

Default: 270K x 300 synthetic influence scores (low-rank + noise, so columns are
correlated like real influence), 15% budget (40,500 steps). The naive loop
costs O(n * m) per step, so it is timed on its first steps of the same matrix
and extrapolated to the whole budget; those steps must pick the same rows as
ours. Exactness over a whole budget is checked on a smaller matrix.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from selection.bids import bids_select, bids_select_naive


def synthetic_scores(n: int, m: int, rank: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    low = rng.standard_normal((n, rank), dtype=np.float32) @ rng.standard_normal((rank, m), dtype=np.float32)
    return 0.01 * (low + 0.5 * rng.standard_normal((n, m), dtype=np.float32))


def timed(fn, *args) -> tuple[float, np.ndarray]:
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=270_000)
    ap.add_argument("--m", type=int, default=300)
    ap.add_argument("--fraction", type=float, default=0.15)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--naive-steps", type=int, default=20, help="naive steps timed on the full matrix")
    ap.add_argument("--check-n", type=int, default=4000, help="rows of the full-budget exactness check")
    args = ap.parse_args()

    scores = synthetic_scores(args.n, args.m, args.rank, seed=0)
    budget = int(args.n * args.fraction)
    runs = [timed(bids_select, scores, budget) for _ in range(args.repeats)]
    ours_s = statistics.median(t for t, _ in runs)
    picks = runs[0][1]
    assert np.unique(picks).size == budget

    # per-step naive cost from two prefix lengths (cancels the shared normalization time)
    short, long = max(1, args.naive_steps // 4), args.naive_steps
    t_short, _ = timed(bids_select_naive, scores, short)
    t_long, naive_prefix = timed(bids_select_naive, scores, long)
    per_step = (t_long - t_short) / (long - short)
    naive_s = t_short + per_step * (budget - short)
    prefix_match = bool(np.array_equal(naive_prefix, picks[:long]))

    small = synthetic_scores(args.check_n, args.m, args.rank, seed=1)
    small_budget = int(args.check_n * args.fraction)
    full_match = bool(np.array_equal(bids_select(small, small_budget), bids_select_naive(small, small_budget)))

    print(f"scores {args.n} x {args.m}, budget {budget} ({args.fraction:.0%})")
    print(f"ours (median of {args.repeats}): {ours_s:.2f} s")
    print(
        f"naive: {per_step * 1e3:.0f} ms/step over {long} steps -> {naive_s:,.0f} s extrapolated; "
        f"speedup {naive_s / ours_s:,.0f}x"
    )
    print(
        f"first {long} picks equal naive: {prefix_match}; full budget on {args.check_n} x {args.m} equal: {full_match}"
    )
    print(
        json.dumps(
            {
                "n": args.n,
                "m": args.m,
                "budget": budget,
                "ours_seconds": round(ours_s, 3),
                "naive_seconds_per_step": round(per_step, 4),
                "naive_seconds_extrapolated": round(naive_s, 1),
                "speedup_vs_naive": round(naive_s / ours_s, 1),
                "prefix_equal_naive": prefix_match,
                "small_full_budget_equal_naive": full_match,
            }
        )
    )


if __name__ == "__main__":
    main()
