"""Fidelity of the `device` projection against `exact`, next to exact's own seed-to-seed noise.

Real SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o (921,600 dims; the default spec's r=128 gives
14.7M dims, where exact's CPU generation takes hours per pass here), LESS train features (Adam
transform with moments from a few AdamW warmup steps) of real default-pool examples and SGD
features of MMLU target examples, 8192 dims. Per-example gradients are computed once and
kept; each projector then projects all of them in one pass. LESS target score = mean
cosine to the targets. Pairs compared (Spearman of the scores, top-5% overlap):

- cross-mode: every (exact seed s, device seed t) pair, s, t in {0, 1};
- the bar: exact seed 0 vs exact seed 1 (the noise of any 8192-dim JL projection);
- for reference: device seed 0 vs 1, and fast (sparse) seed 0 vs exact seed 0.

`device` passes when the mean of its cross-mode pairs is at least the bar on both metrics.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradients import (
    less_scores,
    log,
    peak_rss_mb,
    pool_examples,
    spearman,
    target_examples,
    top_overlap,
    warmup_moments,
)

from resources.settings import default_home
from selection.data.tokenization import collate, length_sorted_batches
from selection.influence.gradients import AdamMoments, PerExampleGradients
from selection.influence.projection import make_projector
from selection.train.models import add_lora, default_model_spec, load_model_and_tokenizer


def gradients_of(engine, examples, pad: int, batch_size: int, moments: AdamMoments | None) -> torch.Tensor:
    tokenized = [e for _, e in examples]
    out = torch.empty(len(examples), engine.dim)
    for rows in length_sorted_batches(tokenized, batch_size):
        grads = engine(collate([tokenized[r] for r in rows], pad))
        out[rows] = moments.transform(grads) if moments is not None else grads
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-examples", type=int, default=400)
    parser.add_argument("--n-targets", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--warmup-lr", type=float, default=1e-4)
    args = parser.parse_args()
    args.device = torch.device("cpu")
    started = time.perf_counter()
    spec = default_model_spec().with_lora(8, 32)
    model, tokenizer = load_model_and_tokenizer(spec, cache_dir=Path(default_home()) / "models")
    model = add_lora(model, spec, seed=0)
    pad = tokenizer.pad_token_id
    warm = pool_examples(tokenizer, 4 * args.warmup_steps, 16, args.max_tokens)
    train = pool_examples(tokenizer, args.n_examples, 16, args.max_tokens, skip=4 * args.warmup_steps)
    targets = target_examples(tokenizer, args.n_targets, args.max_tokens)
    exp_avg, exp_avg_sq = warmup_moments(model, warm, pad, args.warmup_steps, args.warmup_lr, args.device)
    engine = PerExampleGradients(model)
    moments = AdamMoments.from_named(exp_avg, exp_avg_sq, engine.slots)
    features = torch.cat(
        [
            gradients_of(engine, train, pad, args.batch_size, moments),
            gradients_of(engine, targets, pad, args.batch_size, None),
        ]
    )
    gradient_seconds = time.perf_counter() - started
    log(
        f"gradients of {len(train)} train + {len(targets)} target examples ({engine.dim} dims): {gradient_seconds:.0f}s"
    )
    scores, seconds = {}, {}
    for mode, seed in (("exact", 0), ("exact", 1), ("device", 0), ("device", 1), ("fast", 0)):
        projector = make_projector(
            mode, engine.dim, args.dim, seed, engine.names_hash, **({"cache_bytes": 0} if mode == "exact" else {})
        )
        tick = time.perf_counter()
        projected = torch.nn.functional.normalize(projector.project(features), dim=1).numpy()
        seconds[f"{mode}{seed}"] = round(time.perf_counter() - tick, 1)
        scores[f"{mode}{seed}"] = less_scores(projected[: len(train)], projected[len(train) :])
        log(f"{mode} seed {seed}: {seconds[f'{mode}{seed}']}s")

    def agree(a: str, b: str) -> tuple[float, float]:
        return spearman(scores[a], scores[b]), top_overlap(scores[a], scores[b])

    cross = [agree(f"exact{s}", f"device{t}") for s, t in itertools.product((0, 1), (0, 1))]
    bar = agree("exact0", "exact1")
    device_pair, fast = agree("device0", "device1"), agree("fast0", "exact0")
    result = {
        "bench": "projection_fidelity",
        "n_train": len(train),
        "n_targets": len(targets),
        "input_dim": engine.dim,
        "dim": args.dim,
        "top5pct_k": int(np.ceil(0.05 * len(train))),
        "device_vs_exact_spearman_mean": float(np.mean([c[0] for c in cross])),
        "device_vs_exact_overlap_mean": float(np.mean([c[1] for c in cross])),
        "device_vs_exact_pairs": [[round(a, 4), round(b, 4)] for a, b in cross],
        "exact_vs_exact_spearman": bar[0],
        "exact_vs_exact_overlap": bar[1],
        "device_vs_device_spearman": device_pair[0],
        "device_vs_device_overlap": device_pair[1],
        "fast_vs_exact_spearman": fast[0],
        "fast_vs_exact_overlap": fast[1],
        "projection_seconds": seconds,
        "gradient_seconds": round(gradient_seconds, 1),
        "peak_rss_mb": round(peak_rss_mb()),
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    result["device_passes"] = (
        result["device_vs_exact_spearman_mean"] >= bar[0] and result["device_vs_exact_overlap_mean"] >= bar[1]
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
