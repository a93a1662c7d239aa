"""Fidelity of the `device` projection against `exact`, next to exact's own seed-to-seed noise.

Real SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o (921,600 dims; the default spec's r=128 gives
14.7M dims, where exact's CPU generation takes hours per pass here), a few AdamW warmup steps so
the LoRA B matrices are no longer zero, then per-example gradients of real default-pool examples
(train) and of MMLU target examples, with the pipeline's default features (`--train-transform`,
`--loss-tokens`), projected to 8192 dims. Gradients are computed once and kept; each projector
then projects all of them in one pass. Two target scores per projection, both as the pipeline
computes them (`selection.less.influence_scores`, one checkpoint):

- ``cosine``: mean cosine to the targets (LESS's score);
- ``dropped``: the same after removing the pool's mean and top ``--dropped-directions`` principal
  directions (`selection.influence.directions`; the pipeline's default).

Pairs compared (Spearman of the scores, top-5% overlap), with seeds 0..``--seeds``-1 per mode:

- the bar: every pair of distinct exact seeds (the noise of any 8192-dim JL projection);
- cross-mode: every (exact seed, device seed) pair;
- for reference: device vs device, and fast (sparse) seed 0 vs every exact seed.

Both modes draw the same +-1 distribution, so the cross-mode mean and the bar's mean have the
same expectation and the strict comparison (``strict_passes``) is decided by seed noise about
half the time. The verdict (``device_passes``) therefore allows that noise, fixed before the
run: on both metrics and both scores, the cross-mode mean must be at least the bar's mean minus
one standard error of the bar's pairs. A generator defect (correlated rows, a wrong sign
table) costs far more than that. ``fast`` (one seed, against every exact seed) is judged by the
same rule (``fast_passes``). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradients import log, peak_rss_mb, pool_examples, spearman, target_examples, top_overlap, warmup_moments

from resources.settings import default_home
from selection import less
from selection.data.tokenization import LOSS_TOKENS, collate, length_sorted_batches, with_loss_on
from selection.influence import directions
from selection.influence.gradients import AdamMoments, PerExampleGradients
from selection.influence.projection import make_projector
from selection.train.models import add_lora, default_model_spec, load_model_and_tokenizer

SCORES = ("cosine", "dropped")
METRICS = ("spearman", "overlap")


def gradients_of(engine, examples, pad: int, batch_size: int, moments: AdamMoments | None, every: int) -> torch.Tensor:
    tokenized = [e for _, e in examples]
    out = torch.empty(len(examples), engine.dim)
    done, started = 0, time.perf_counter()
    for rows in length_sorted_batches(tokenized, batch_size):
        grads = engine(collate([tokenized[r] for r in rows], pad))
        out[rows] = moments.transform(grads) if moments is not None else grads
        before, done = done, done + len(rows)
        if done // every > before // every:
            log(f"  {done}/{len(examples)} examples, {time.perf_counter() - started:.0f}s")
    return out


def target_scores(train: np.ndarray, target: np.ndarray, dropped: int) -> np.ndarray:
    """Mean over the targets of the pipeline's influence score (one checkpoint, weight 1)."""
    rows: object = train
    if dropped:
        common = directions.fit(train, dropped)
        rows, target = directions.WithoutDirections(train, common), common.remove(target)
    scores = less.influence_scores([rows], [target], [1.0], np.empty((len(train), len(target)), np.float32))
    return np.asarray(scores).mean(axis=1)


def agreement(scores: dict, pairs: list[tuple[str, str]], score: str) -> dict[str, list[float]]:
    a = {"spearman": [], "overlap": []}
    for x, y in pairs:
        a["spearman"].append(spearman(scores[x][score], scores[y][score]))
        a["overlap"].append(top_overlap(scores[x][score], scores[y][score]))
    return a


def summary(values: list[float]) -> dict[str, float]:
    mean = float(np.mean(values))
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else 0.0
    return {"mean": round(mean, 4), "se": round(se, 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def verdicts(result: dict) -> dict[str, bool]:
    """``<mode>_passes`` (the bar less one standard error of it) and ``<mode>_strict_passes`` (the
    bar itself) for device and fast, on both metrics and both scores."""
    out = {}
    for mode in ("device", "fast"):
        strict = allowing_noise = True
        for score in SCORES:
            for metric in METRICS:
                bar, cross = result[score]["bar_exact_vs_exact"][metric], result[score][f"{mode}_vs_exact"][metric]
                strict &= cross["mean"] >= bar["mean"]
                allowing_noise &= cross["mean"] >= bar["mean"] - bar["se"]
                log(
                    f"{score} {metric}: {mode} vs exact {cross['mean']:.4f}, exact vs exact {bar['mean']:.4f} "
                    f"(se {bar['se']:.4f}, range {bar['min']:.4f}-{bar['max']:.4f})"
                )
        out[f"{mode}_passes"], out[f"{mode}_strict_passes"] = bool(allowing_noise), bool(strict)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--n-targets", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per mode (at least 2)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--warmup-lr", type=float, default=1e-4)
    parser.add_argument("--train-transform", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--loss-tokens", choices=LOSS_TOKENS, default="sequence")
    parser.add_argument("--dropped-directions", type=int, default=8)
    parser.add_argument("--judge", type=Path, help="only re-judge a finished run: its log (last line, the JSON)")
    args = parser.parse_args()
    if args.judge:
        result = json.loads(args.judge.read_text().strip().splitlines()[-1])
        print(json.dumps({"bench": "projection_fidelity_verdicts", "log": str(args.judge), **verdicts(result)}))
        return
    if args.seeds < 2:
        parser.error("--seeds must be at least 2: the bar is exact's seed-to-seed agreement")
    device = torch.device("cpu")
    started = time.perf_counter()
    spec = default_model_spec().with_lora(8, 32)
    model, tokenizer = load_model_and_tokenizer(spec, cache_dir=Path(default_home()) / "models")
    model = add_lora(model, spec, seed=0)
    pad = tokenizer.pad_token_id
    warm = pool_examples(tokenizer, 4 * args.warmup_steps, 16, args.max_tokens)
    train = pool_examples(tokenizer, args.n_examples, 16, args.max_tokens, skip=4 * args.warmup_steps)
    targets = target_examples(tokenizer, args.n_targets, args.max_tokens)
    # The warmup trains on answers, as the pipeline's does; the features then take the chosen loss.
    exp_avg, exp_avg_sq = warmup_moments(model, warm, pad, args.warmup_steps, args.warmup_lr, device)
    engine = PerExampleGradients(model)
    moments = AdamMoments.from_named(exp_avg, exp_avg_sq, engine.slots) if args.train_transform == "adam" else None
    train = [(i, with_loss_on(e, args.loss_tokens)) for i, e in train]
    targets = [(i, with_loss_on(e, args.loss_tokens)) for i, e in targets]
    log(
        f"{len(train)} train + {len(targets)} target examples, {engine.dim} dims, "
        f"{args.train_transform} train features, {args.loss_tokens} loss"
    )
    features = torch.cat(
        [
            gradients_of(engine, train, pad, args.batch_size, moments, every=100),
            gradients_of(engine, targets, pad, args.batch_size, None, every=100),
        ]
    )
    del engine, model
    gradient_seconds = time.perf_counter() - started
    log(f"gradients: {gradient_seconds:.0f}s")
    seeds = range(args.seeds)
    runs = [("exact", s) for s in seeds] + [("device", s) for s in seeds] + [("fast", 0)]
    scores, seconds = {}, {}
    for mode, seed in runs:
        options = {"cache_bytes": 0} if mode == "exact" else {}
        projector = make_projector(mode, features.shape[1], args.dim, seed, "fidelity", **options)
        tick = time.perf_counter()
        projected = torch.nn.functional.normalize(projector.project(features), dim=1).numpy()
        name = f"{mode}{seed}"
        seconds[name] = round(time.perf_counter() - tick, 1)
        train_rows, target_rows = projected[: len(train)], projected[len(train) :]
        scores[name] = {
            "cosine": target_scores(train_rows, target_rows, 0),
            "dropped": target_scores(train_rows, target_rows, args.dropped_directions),
        }
        log(f"{mode} seed {seed}: projected in {seconds[name]}s")

    exact, device_ = [f"exact{s}" for s in seeds], [f"device{s}" for s in seeds]
    pair_sets = {
        "bar_exact_vs_exact": list(itertools.combinations(exact, 2)),
        "device_vs_exact": list(itertools.product(device_, exact)),
        "device_vs_device": list(itertools.combinations(device_, 2)),
        "fast_vs_exact": [("fast0", e) for e in exact],
    }
    result: dict = {
        "bench": "projection_fidelity",
        "n_train": len(train),
        "n_targets": len(targets),
        "input_dim": int(features.shape[1]),
        "dim": args.dim,
        "seeds_per_mode": args.seeds,
        "train_transform": args.train_transform,
        "loss_tokens": args.loss_tokens,
        "dropped_directions": args.dropped_directions,
        "top5pct_k": math.ceil(0.05 * len(train)),
    }
    for score in SCORES:
        table = {name: agreement(scores, pairs, score) for name, pairs in pair_sets.items()}
        result[score] = {name: {m: summary(v[m]) for m in METRICS} for name, v in table.items()}
    result.update(
        verdicts(result),
        projection_seconds=seconds,
        gradient_seconds=round(gradient_seconds, 1),
        peak_rss_mb=round(peak_rss_mb()),
        total_seconds=round(time.perf_counter() - started, 1),
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
