"""Bench: LESS influence scoring from memory-mapped fp16 features.

Default: 270K x 8192 fp16 train features (one checkpoint, ~4.4 GB written in
chunks to a temp dir and deleted afterwards) against 300 val rows. Reports
seconds per checkpoint (median over repeats) next to the BLAS floor: the bare
fp32 matmul of the same shape on data already in RAM, measured on a slice and
extrapolated. The file is freshly written, so reads are from a warm page cache.
Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from selection.less import checkpoint_weights, influence_scores


def write_features(path: Path, n_rows: int, dim: int, seed: int, block_rows: int = 8192) -> np.ndarray:
    """Unit-norm fp16 rows. One random block is written repeatedly, with its sign
    flipped on odd blocks, to keep generation cheap (content does not affect timing)."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((block_rows, dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    base16 = base.astype(np.float16)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n_rows, dim))
    for start in range(0, n_rows, block_rows):
        stop = min(start + block_rows, n_rows)
        block = base16[: stop - start]
        mm[start:stop] = -block if (start // block_rows) % 2 else block
    mm.flush()
    del mm
    return np.load(path, mmap_mode="r")


def blas_floor_seconds(n_rows: int, dim: int, n_val: int, sample_rows: int, repeats: int) -> float:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((sample_rows, dim), dtype=np.float32)
    v = rng.standard_normal((dim, n_val), dtype=np.float32)
    out = np.empty((sample_rows, n_val), dtype=np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.matmul(x, v, out=out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * n_rows / sample_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n-train", type=int, default=270_000)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--n-val", type=int, default=300)
    ap.add_argument("--checkpoints", type=int, default=1)
    ap.add_argument("--chunk-rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tmp-dir", default=None, help="where to write the synthetic features")
    ap.add_argument("--threads", type=int, default=None, help="cap BLAS threads (default: all cores)")
    args = ap.parse_args()
    with threadpool_limits(limits=args.threads):
        run(args)


def run(args: argparse.Namespace) -> None:

    tmp = Path(tempfile.mkdtemp(prefix="bench_influence_", dir=args.tmp_dir))
    try:
        t0 = time.perf_counter()
        trains = [
            write_features(tmp / f"train{c}.npy", args.n_train, args.dim, seed=c) for c in range(args.checkpoints)
        ]
        gen_s = time.perf_counter() - t0
        rng = np.random.default_rng(99)
        vals = []
        for _ in range(args.checkpoints):
            v = rng.standard_normal((args.n_val, args.dim), dtype=np.float32)
            vals.append((v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16))
        weights = checkpoint_weights([1.0] * args.checkpoints)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = influence_scores(trains, vals, weights, tmp / "scores.npy", chunk_rows=args.chunk_rows)
            times.append(time.perf_counter() - t0)
        ours_s = statistics.median(times)

        check_rows = np.random.default_rng(5).choice(args.n_train, size=64, replace=False)
        expected = sum(
            w
            * (
                tr[check_rows].astype(np.float64)
                / np.linalg.norm(tr[check_rows].astype(np.float64), axis=1, keepdims=True)
            )
            @ (va.astype(np.float64) / np.linalg.norm(va.astype(np.float64), axis=1, keepdims=True)).T
            for w, tr, va in zip(weights, trains, vals)
        )
        max_abs_err = float(np.abs(np.asarray(out[check_rows]) - expected).max())
        del out
    finally:
        shutil.rmtree(tmp)

    floor_s = args.checkpoints * blas_floor_seconds(args.n_train, args.dim, args.n_val, args.chunk_rows, 3)
    per_ckpt = ours_s / args.checkpoints
    print(
        f"features: {args.checkpoints} x [{args.n_train} x {args.dim}] fp16 memmap, {args.n_val} val rows "
        f"(generated in {gen_s:.1f} s, warm page cache)"
    )
    print(
        f"ours (median of {args.repeats}): {ours_s:.2f} s total, {per_ckpt:.2f} s per checkpoint, "
        f"{args.n_train * args.checkpoints / ours_s:,.0f} rows/s"
    )
    print(f"fp32 BLAS matmul floor (in RAM, extrapolated): {floor_s:.2f} s -> ours / floor = {ours_s / floor_s:.2f}")
    print(f"max |error| vs float64 on 64 rows: {max_abs_err:.2e}")
    print(
        json.dumps(
            {
                "threads": args.threads,
                "n_train": args.n_train,
                "dim": args.dim,
                "n_val": args.n_val,
                "checkpoints": args.checkpoints,
                "chunk_rows": args.chunk_rows,
                "seconds_per_checkpoint": round(per_ckpt, 3),
                "seconds_total": round(ours_s, 3),
                "blas_floor_seconds": round(floor_s, 3),
                "time_vs_floor": round(ours_s / floor_s, 3),
                "max_abs_err_vs_float64": max_abs_err,
            }
        )
    )


if __name__ == "__main__":
    main()
