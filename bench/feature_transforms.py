"""Which train-feature transform lets LESS find planted target examples?

LESS scores a pool example by the cosine between its *train feature* (a transform of its
per-example LoRA gradient at a warmup checkpoint) and the plain gradients of the target's
val examples. This script computes every per-example gradient once, on the real default
model after the real warmup, and then compares candidate transforms on the same gradients:

- ``adam``: LESS's literal feature, one hypothetical Adam step from the warmup's moments,
  ``m'/sqrt(v'+eps)`` with ``m' = b1 m + (1-b1) g`` and ``v' = b2 v + (1-b2) g^2``;
- ``adam_bias_corrected``: the same with Adam's bias correction at the warmup's step count;
- ``adam_no_momentum``: ``g/sqrt(v'+eps)``: Adam's preconditioner without the momentum
  ``b1 m``, a term shared by every example;
- ``sgd``: the raw gradient (the LESS paper's own ablation);
- ``adam_centered`` / ``sgd_centered``: the projected feature minus the pool's mean projected
  feature (removes the shared direction, but needs the whole pool: not shard-local).

Planted pool: `bench/recall.py`'s ``build_pool`` (MMLU questions, a share from each planted
group's subjects, AlpacaEval answers); each group's val examples come from the held-out side
of the same subjects. Per transform and group it reports planted precision over the base
rate at a 10% budget for LESS's aggregation (mean over a subject's val examples, max over
subjects) and for BIDS, the MMLU share of LESS's pick, and how collapsed the stored features
are: the norm of the mean L2-normalized train feature and the mean pairwise cosine (both 0
for isotropic features, 1 when every feature points the same way), and the Spearman
correlation of the LESS score with the raw gradient norm (a norm-confounded score is
strongly negative: small gradients of long answers win). ``--loss-tokens sequence`` takes
every gradient (pool and val) of the whole conversation's loss instead of the answer's (the
warmup trains on answers either way). The last line is one JSON object.

    .venv/bin/python bench/feature_transforms.py                  # 480 rows, 1 warmup epoch, ~15 min on 2 cores
    .venv/bin/python bench/feature_transforms.py --pool-size 240 --groups medicine   # quicker
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import numpy as np
import torch

from bench.recall import PLANTED_GROUPS, build_pool
from selection import bids, less
from selection.data import tokenization
from selection.influence import gradients, projection
from selection.influence.warmup import stable_fraction_sample
from selection.train import models, training
from selection.train.checkpoints import load_adapter_weights

CANDIDATES = ("adam", "adam_bias_corrected", "adam_no_momentum", "sgd", "adam_centered", "sgd_centered")
BLOCK_ROWS = 32  # rows transformed and projected at a time (a full-size transform is 3.7 MB per row)


def per_example_gradients(engine, examples, pad_id: int, batch_size: int, max_tokens: int) -> torch.Tensor:
    out = torch.empty(len(examples), engine.dim)
    for rows in tokenization.length_sorted_batches(examples, batch_size, max_tokens):
        out[rows] = engine(tokenization.collate([examples[r] for r in rows], pad_id))
    return out


def transform_block(name: str, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int) -> torch.Tensor:
    b1, b2, eps = gradients.LESS_BETA1, gradients.LESS_BETA2, gradients.LESS_EPS
    base = name.removesuffix("_centered")
    if base == "adam":
        return gradients.adam_feature(g, m, v)
    if base == "adam_bias_corrected":
        m2 = (b1 * m + (1 - b1) * g) / (1 - b1 ** (step + 1))
        v2 = (b2 * v + (1 - b2) * g.square()) / (1 - b2 ** (step + 1))
        return m2 / torch.sqrt(v2 + eps)
    if base == "adam_no_momentum":
        return g / torch.sqrt(b2 * v + (1 - b2) * g.square() + eps)
    if base == "sgd":
        return g
    raise ValueError(name)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def collapse(features: np.ndarray) -> tuple[float, float]:
    """(norm of the mean unit feature, mean pairwise cosine over distinct pairs)."""
    n = features.shape[0]
    total = features.sum(axis=0)
    mean_norm = float(np.linalg.norm(total) / n)
    return mean_norm, float((total @ total - n) / (n * (n - 1)))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=["medicine", "computing"], choices=sorted(PLANTED_GROUPS))
    parser.add_argument("--pool-size", type=int, default=480)
    parser.add_argument("--planted-share", type=float, default=0.075)
    parser.add_argument("--alpaca-share", type=float, default=0.25)
    parser.add_argument("--n-val", type=int, default=5, help="val examples per subject")
    parser.add_argument("--budget", type=float, default=0.10)
    parser.add_argument("--epochs", type=int, default=1, help="warmup epochs (gradients at every checkpoint)")
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    parser.add_argument("--dim", type=int, default=projection.DEFAULT_DIM)
    parser.add_argument("--mode", default="fast", choices=projection.MODES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4, help="per-example gradient batch (memory bound)")
    parser.add_argument(
        "--loss-tokens",
        default="response",
        choices=tokenization.LOSS_TOKENS,
        help="tokens whose loss makes the per-example gradients (pool and val): the answer only (LESS), "
        "or every token of the rendered conversation",
    )
    parser.add_argument("--save", help="also write the projected features of every transform to this .npz")
    parser.add_argument("--model-cache", help="folder for the converted model (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    records, val_by_group, planted = build_pool(
        args.pool_size, args.planted_share, args.alpaca_share, args.groups, args.n_val, args.seed
    )
    # build_pool draws n_val + 2 per subject (val plus held-out test rows); the first n_val of each subject are val.
    val_rows = []
    for group in args.groups:
        per_subject: dict[str, int] = {}
        for row in val_by_group[group]:
            if per_subject.get(row["subtask"], 0) < args.n_val:
                per_subject[row["subtask"]] = per_subject.get(row["subtask"], 0) + 1
                val_rows.append(row)

    spec = dataclasses.replace(models.default_model_spec(), **models.DEMO_SPEC_OVERRIDES)
    with tempfile.TemporaryDirectory(prefix="feature-transforms-") as scratch:
        cache = Path(args.model_cache) if args.model_cache else Path(scratch) / "model_cache"
        model, tokenizer = models.load_model_and_tokenizer(spec, cache, device="cpu")
        pool_tok, stats = tokenization.tokenize_many(tokenizer, [r["messages"] for r in records], spec.max_length)
        usable = stats.usable_indices()
        records = [records[i] for i in usable]
        pool_tok = [pool_tok[i] for i in usable]
        ids = [r["id"] for r in records]
        val_tok, val_stats = tokenization.tokenize_many(tokenizer, [r["messages"] for r in val_rows], spec.max_length)
        val_keep = val_stats.usable_indices()
        val_rows, val_tok = [val_rows[i] for i in val_keep], [val_tok[i] for i in val_keep]
        # The warmup trains on answers either way; only the measured gradients change.
        gradient_pool_tok = [tokenization.with_loss_on(e, args.loss_tokens) for e in pool_tok]
        val_tok = [tokenization.with_loss_on(e, args.loss_tokens) for e in val_tok]

        # `make demo`'s warmup settings (DEMO_TRAINING_CONFIG), except the epochs.
        demo = training.DEMO_TRAINING_CONFIG
        config = training.TrainingConfig(
            epochs=args.epochs,
            learning_rate=demo.learning_rate,
            batch_size=demo.batch_size,
            micro_batch_size=demo.micro_batch_size,
            max_tokens_per_micro_batch=4096,
            warmup_ratio=demo.warmup_ratio,
            seed=0,
        )
        warm_ids = set(stable_fraction_sample(ids, args.warmup_fraction, 0))
        warm_examples = [e for i, e in zip(ids, pool_tok) if i in warm_ids]
        peft_model = models.add_lora(model, spec, seed=0)
        t = time.perf_counter()
        result = training.train_lora(
            peft_model, warm_examples, config, Path(scratch) / "warmup", tokenizer.pad_token_id
        )
        seconds["warmup"] = time.perf_counter() - t
        engine = gradients.PerExampleGradients(peft_model)
        projector = projection.make_projector(args.mode, engine.dim, args.dim, 0, engine.names_hash, "cpu")
        print(
            f"pool {len(ids)} rows ({len(warm_examples)} warmup examples, {result.total_steps} steps), "
            f"{len(val_rows)} val rows, gradient dim {engine.dim}",
            flush=True,
        )

        # Per checkpoint: projected unnormalized features of every candidate, and the val SGD features.
        train_feats: dict[str, list[np.ndarray]] = {name: [] for name in CANDIDATES}
        val_feats: list[np.ndarray] = []
        grad_norms = None
        avg_lrs = []
        for checkpoint in result.checkpoints:
            load_adapter_weights(peft_model, checkpoint.path)
            _, exp_avg, exp_avg_sq, avg_lr = training.load_checkpoint(checkpoint.path, expected_names=engine.names)
            moments = gradients.AdamMoments.from_named(exp_avg, exp_avg_sq, engine.slots)
            avg_lrs.append(avg_lr)
            t = time.perf_counter()
            pool_grads = per_example_gradients(engine, gradient_pool_tok, tokenizer.pad_token_id, args.batch_size, 2048)
            val_grads = per_example_gradients(engine, val_tok, tokenizer.pad_token_id, args.batch_size, 2048)
            seconds[f"gradients_epoch_{checkpoint.epoch}"] = time.perf_counter() - t
            print(
                f"epoch {checkpoint.epoch}: gradients in {seconds[f'gradients_epoch_{checkpoint.epoch}']:.0f} s "
                f"(step {checkpoint.global_step}, avg lr {avg_lr:.2e})",
                flush=True,
            )
            grad_norms = pool_grads.norm(dim=1).numpy()
            val_feats.append(projector.project(val_grads).numpy())
            for name in CANDIDATES:
                if name.endswith("_centered") and name.removesuffix("_centered") in CANDIDATES:
                    continue  # derived below from the uncentered projection (projection is linear)
                rows = [
                    projector.project(
                        transform_block(
                            name,
                            pool_grads[s : s + BLOCK_ROWS],
                            moments.exp_avg,
                            moments.exp_avg_sq,
                            checkpoint.global_step,
                        )
                    )
                    for s in range(0, len(ids), BLOCK_ROWS)
                ]
                train_feats[name].append(torch.cat(rows).numpy())
            for name in CANDIDATES:
                if name.endswith("_centered"):
                    raw = train_feats[name.removesuffix("_centered")][-1]
                    train_feats[name].append(raw - raw.mean(axis=0, keepdims=True))
            del pool_grads, val_grads

    if args.save:
        np.savez(
            args.save,
            avg_lrs=np.asarray(avg_lrs),
            val=np.stack(val_feats),
            grad_norms=grad_norms,
            **{name: np.stack(feats) for name, feats in train_feats.items()},
        )
    weights = less.checkpoint_weights(avg_lrs)
    k = less.resolve_budget(args.budget, len(ids))
    mmlu = np.array([r["dataset"] == "mmlu" for r in records])
    n_tokens = np.array([e.n_target_tokens for e in pool_tok])
    results: dict[str, dict] = {}
    for name in CANDIDATES:
        unit_train = [unit(f).astype(np.float16) for f in train_feats[name]]
        unit_val = [unit(f).astype(np.float16) for f in val_feats]
        mean_norm, mean_cos = collapse(unit_train[-1].astype(np.float32))
        scores = less.influence_scores(unit_train, unit_val, weights, np.empty((len(ids), len(val_rows)), np.float32))
        entry: dict = {"mean_feature_norm": round(mean_norm, 3), "mean_pairwise_cos": round(mean_cos, 3), "groups": {}}
        for group in args.groups:
            cols = [j for j, r in enumerate(val_rows) if r["task"] == group]
            # build_pool's planted ids are ingested ids; here a planted row is one from the group's subjects
            # (background MMLU never comes from any group's subjects).
            is_planted = np.array([r["subject"] in PLANTED_GROUPS[group] for r in records])
            assert is_planted.sum() == len(planted[group]), (group, is_planted.sum(), len(planted[group]))
            base = is_planted.mean()
            target = less.aggregate_target_scores(scores[:, cols], [val_rows[j]["subtask"] for j in cols])
            less_pick = less.top_k(target, k)
            bids_pick = bids.bids_select(scores[:, cols], k)
            entry["groups"][group] = {
                "base_rate": round(float(base), 4),
                "less": round(float(is_planted[less_pick].mean() / base), 2),
                "bids": round(float(is_planted[bids_pick].mean() / base), 2),
                "less_mmlu_share": round(float(mmlu[less_pick].mean()), 2),
                "spearman_score_vs_grad_norm": round(spearman(target, grad_norms), 2),
                "spearman_score_vs_target_tokens": round(spearman(target, n_tokens), 2),
            }
        entry["less"] = round(float(np.mean([g["less"] for g in entry["groups"].values()])), 2)
        entry["bids"] = round(float(np.mean([g["bids"] for g in entry["groups"].values()])), 2)
        results[name] = entry

    best = 1 / np.mean([results["adam"]["groups"][g]["base_rate"] for g in args.groups])
    print(
        f"\nplanted precision over base rate at a {args.budget:.0%} budget ({k} of {len(ids)}); "
        f"1.00 = chance, {best:.1f} = all planted"
    )
    header = (
        f"{'transform':<21}"
        + "".join(f"{'LESS ' + g[:4]:>11}{'BIDS ' + g[:4]:>11}" for g in args.groups)
        + f"{'LESS':>7}{'BIDS':>7}{'mmlu%':>7}{'|mean|':>8}{'cos':>7}{'rho(norm)':>11}"
    )
    print(header)
    for name, entry in results.items():
        groups = entry["groups"]
        print(
            f"{name:<21}"
            + "".join(f"{groups[g]['less']:>10.2f}x{groups[g]['bids']:>10.2f}x" for g in args.groups)
            + f"{entry['less']:>6.2f}x{entry['bids']:>6.2f}x"
            + f"{np.mean([groups[g]['less_mmlu_share'] for g in args.groups]):>7.0%}"
            + f"{entry['mean_feature_norm']:>8.3f}{entry['mean_pairwise_cos']:>7.3f}"
            + f"{np.mean([groups[g]['spearman_score_vs_grad_norm'] for g in args.groups]):>11.2f}"
        )
    seconds["total"] = time.perf_counter() - started
    print(
        json.dumps(
            {
                "results": results,
                "profile": vars(args),
                "n_pool": len(ids),
                "n_val": len(val_rows),
                "avg_lrs": avg_lrs,
                "seconds": {k_: round(v) for k_, v in seconds.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
