"""Target recall: does a targeted selector find examples planted to match the target?

A pool is built from packaged data only: MMLU questions from many subjects (rendered as the
default pool renders them) plus AlpacaEval examples. For each planted group, a set of
related MMLU subjects, about 7-10% of the pool comes from that group's subjects; the group's
val (target) examples come from the same subjects but from the held-out side of MMLU, so
they are never in the pool. The real assets run in a temporary storage root on the real
default model (raw_pool, target_tasks, warmup_checkpoints, train_gradients,
target_gradients, influence_scores, then LESS, BIDS, RDS, kMQ and random at a 10% budget).
The pool, the warmup and the pool's gradient features are shared by every group; each group
then rematerializes its targets, their gradients, the influence scores and the selections.

Reported per method and group: the planted share of the selection divided by the planted
base rate (1.0 = no better than chance), and the MMLU share. kMQ and random ignore the
target by design; they are there as references. The last line is one JSON object with
`planted_groups`, `base_rate` and `precision_over_base` (averaged over groups) plus the
per-group figures and the profile that ran.

    .venv/bin/python bench/recall.py                      # the CPU profile, two groups
    .venv/bin/python bench/recall.py --pool-size 400 --groups medicine   # quicker, one group
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))
# One shard: this bench measures selection quality, not scale-out.
os.environ["INSTRUCT_SELECT_GRADIENT_SHARDS"] = "1"

# Related MMLU subjects per planted group. Background MMLU questions never come from any group.
PLANTED_GROUPS: dict[str, tuple[str, ...]] = {
    "medicine": (
        "anatomy",
        "clinical_knowledge",
        "college_medicine",
        "medical_genetics",
        "professional_medicine",
        "nutrition",
        "virology",
    ),
    "computing": (
        "college_computer_science",
        "high_school_computer_science",
        "computer_security",
        "machine_learning",
        "electrical_engineering",
    ),
    "history": ("high_school_european_history", "high_school_us_history", "high_school_world_history", "prehistory"),
}
METHODS = ("less", "bids", "rds", "kmq", "random")
# Methods whose selection is per target task; the others select once for every target ("all").
PER_TASK_METHODS = {"less", "rds"}


def build_pool(
    pool_size: int, planted_share: float, alpaca_share: float, groups: list[str], n_val: int, seed: int
) -> tuple[list[dict], dict[str, list[dict]], dict[str, set[str]]]:
    """(pool records, val records per group, planted example ids per group)."""
    from selection.data import default_data

    planted_per_group = round(planted_share * pool_size)
    n_alpaca = round(alpaca_share * pool_size)
    n_background = pool_size - n_alpaca - planted_per_group * len(groups)
    if n_background < 0:
        raise SystemExit("pool too small for that many planted groups")
    every_planted_subject = {s for g in PLANTED_GROUPS.values() for s in g}

    def record(item) -> dict:
        return {
            "dataset": item.source,
            "id": f"{item.source}/{item.ref}",
            "messages": item.messages,
            "subject": item.meta.get("subject", ""),
        }

    mmlu_pool = default_data.pool_side("mmlu")
    records = [
        record(i)
        for i in default_data.sample_items(
            default_data.pool_side("alpaca_eval"), n_alpaca, salt=f"recall/{seed}/alpaca"
        )
    ]
    background = [i for i in mmlu_pool if i.meta["subject"] not in every_planted_subject]
    records += [record(i) for i in default_data.sample_items(background, n_background, salt=f"recall/{seed}/bg")]
    planted: dict[str, set[str]] = {}
    val: dict[str, list[dict]] = {}
    for group in groups:
        subjects = PLANTED_GROUPS[group]
        chosen = default_data.sample_items(
            [i for i in mmlu_pool if i.meta["subject"] in subjects], planted_per_group, salt=f"recall/{seed}/{group}"
        )
        if len(chosen) < planted_per_group:
            raise SystemExit(f"group {group}: only {len(chosen)} pool-side questions for {planted_per_group}")
        records += [record(i) for i in chosen]
        planted[group] = {i.example_id for i in chosen}
        held_out = [i for i in default_data.target_side("mmlu") if i.meta["subject"] in subjects]
        val[group] = []
        for subject in subjects:
            # n_val val rows define the target; two more per subject are its held-out test rows.
            for item in default_data.sample_items(
                [i for i in held_out if i.meta["subject"] == subject], n_val + 2, salt=f"recall/{seed}/val"
            ):
                val[group].append({"task": group, "subtask": subject, "messages": item.messages})
    return records, val, planted


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def run_config(args, pool_file: Path, targets_file: Path) -> dict:
    grad = {"dims": [args.dim], "mode": args.mode, "seed": 0}
    budget = {"budget": args.budget}
    return {
        "ops": {
            "raw_pool": {
                "config": {"sources": [{"path": str(pool_file), "name": "recall_pool", "format": "messages"}]}
            },
            "target_tasks": {"config": {"files": [{"path": str(targets_file)}], "n_val": args.n_val}},
            "warmup_checkpoints": {
                "config": {
                    "epochs": args.epochs,
                    "fraction": args.warmup_fraction,
                    "learning_rate": args.learning_rate,
                    "batch_size": args.warmup_batch_size,
                }
            },
            "train_gradients": {"config": grad},
            "target_gradients": {"config": grad},
            "influence_scores": {"config": {"dim": args.dim, "mode": args.mode, "seed": 0}},
            **{f"{method}_selection": {"config": budget} for method in METHODS},
        }
    }


def materialize(assets, resources, instance, names: list[str], config: dict, partition_key: str | None) -> float:
    import dagster as dg

    started = time.perf_counter()
    ops = {name: value for name, value in config["ops"].items() if name in names}
    result = dg.materialize(
        assets,
        selection=dg.AssetSelection.assets(*names),
        resources=resources,
        run_config={"ops": ops},
        partition_key=partition_key,
        instance=instance,
        raise_on_error=False,
    )
    if not result.success:
        failure = next((e for e in result.all_events if e.event_type_value == "STEP_FAILURE"), None)
        detail = failure.step_failure_data.error.to_string() if failure else "no step failure recorded"
        raise SystemExit(f"materializing {names} failed:\n{detail}")
    elapsed = time.perf_counter() - started
    print(f"  {', '.join(names)}: {elapsed:.0f} s", flush=True)
    return elapsed


def selected(con, model: str, method: str, task: str) -> list[str]:
    target = task if method in PER_TASK_METHODS else "all"
    rows = con.execute(
        "SELECT example_id FROM selections WHERE model = ? AND method = ? AND target = ? ORDER BY rank",
        [model, method, target],
    ).fetchall()
    if not rows:
        raise SystemExit(f"no selection stored for {method}/{target}")
    return [r[0] for r in rows]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=["medicine", "computing"], choices=sorted(PLANTED_GROUPS))
    parser.add_argument("--pool-size", type=int, default=800)
    parser.add_argument("--planted-share", type=float, default=0.075, help="share of the pool per planted group")
    parser.add_argument("--alpaca-share", type=float, default=0.25)
    parser.add_argument("--n-val", type=int, default=2, help="val examples per subject of a planted group")
    parser.add_argument("--budget", type=float, default=0.10)
    parser.add_argument("--epochs", type=int, default=1, help="warmup epochs (1: 40 examples = 5 Adam steps)")
    parser.add_argument("--warmup-fraction", type=float, default=0.05)
    # The CPU profile's warmup and model setup, set explicitly since the assets default to LESS's recipe
    # (lr 2e-5, 32-example steps, LoRA r=128, 2048 tokens), which 40 warmup examples cannot fill.
    parser.add_argument("--learning-rate", type=float, default=1e-4, help="warmup learning rate")
    parser.add_argument("--warmup-batch-size", type=int, default=8, help="warmup examples per optimizer step")
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--mode", default="fast", choices=["fast", "exact"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", help="storage root to use (default: a temporary folder, removed afterwards)")
    args = parser.parse_args()

    import dagster as dg
    import duckdb

    from assets import ALL_CHECKS, ASSET_MODULES
    from assets.partitions import DEFAULT_MODEL, model_shard_keys
    from resources import build_resources
    from resources.model_store import ModelStore

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recall-") as scratch:
        home = Path(args.home or scratch)
        home.mkdir(parents=True, exist_ok=True)
        records, val, planted = build_pool(
            args.pool_size, args.planted_share, args.alpaca_share, args.groups, args.n_val, args.seed
        )
        pool_file = write_jsonl(
            home / "recall_pool.jsonl", [{k: r[k] for k in ("dataset", "id", "messages")} for r in records]
        )
        resources = build_resources(home=str(home / "store"))
        resources["model_store"] = ModelStore(
            cache_dir=resources["model_store"].cache_dir,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            max_length=args.max_length,
        )
        assets = [*dg.load_assets_from_modules(ASSET_MODULES), *ALL_CHECKS]
        per_group: dict[str, dict] = {}
        timings: dict[str, float] = {}
        with dg.instance_for_test() as instance:
            for index, group in enumerate(args.groups):
                print(f"group {group}: {len(planted[group])} planted of {len(records)}", flush=True)
                config = run_config(args, pool_file, write_jsonl(home / f"targets_{group}.jsonl", val[group]))
                if index == 0:
                    timings["pool"] = materialize(assets, resources, instance, ["raw_pool"], config, None)
                    timings["warmup"] = materialize(
                        assets, resources, instance, ["warmup_checkpoints"], config, DEFAULT_MODEL
                    )
                    timings["train_gradients"] = sum(
                        materialize(assets, resources, instance, ["train_gradients"], config, str(key))
                        for key in model_shard_keys(DEFAULT_MODEL)
                    )
                    timings["clusters"] = materialize(
                        assets, resources, instance, ["embeddings", "clusters"], config, None
                    )
                    timings["kmq"] = materialize(assets, resources, instance, ["kmq_selection"], config, DEFAULT_MODEL)
                timings[f"targets_{group}"] = materialize(assets, resources, instance, ["target_tasks"], config, None)
                timings[f"scores_{group}"] = materialize(
                    assets,
                    resources,
                    instance,
                    [
                        "target_gradients",
                        "influence_scores",
                        "less_selection",
                        "bids_selection",
                        "rds_selection",
                        "random_selection",
                    ],
                    config,
                    DEFAULT_MODEL,
                )
                with duckdb.connect(resources["lineage"].db_path, read_only=True) as con:
                    pool_ids = {r[0] for r in con.execute("SELECT example_id FROM pool").fetchall()}
                    mmlu_ids = {
                        r[0]
                        for r in con.execute(
                            "SELECT example_id FROM pool WHERE messages::VARCHAR LIKE '%multiple choice question%'"
                        ).fetchall()
                    }
                    base_rate = len(planted[group] & pool_ids) / len(pool_ids)
                    figures = {}
                    for method in METHODS:
                        ids = selected(con, DEFAULT_MODEL, method, group)
                        share = len(set(ids) & planted[group]) / len(ids)
                        figures[method] = {
                            "n": len(ids),
                            "planted": len(set(ids) & planted[group]),
                            "precision_over_base": round(share / base_rate, 3),
                            "mmlu_share": round(len(set(ids) & mmlu_ids) / len(ids), 3),
                            "sources": dict(Counter("mmlu" if i in mmlu_ids else "alpaca_eval" for i in ids)),
                        }
                    recipe = con.execute(
                        "SELECT train_transform, loss_tokens, dropped_directions FROM influence_runs "
                        "ORDER BY created_at DESC LIMIT 1"
                    ).fetchone()
                per_group[group] = {"base_rate": round(base_rate, 4), "methods": figures}
                print(
                    f"  {group}: base rate {base_rate:.3f}; "
                    + ", ".join(
                        f"{m} {f['precision_over_base']:.2f}x ({f['planted']}/{f['n']}, mmlu {f['mmlu_share']:.0%})"
                        for m, f in figures.items()
                    ),
                    flush=True,
                )

    print("\nmethod      " + "  ".join(f"{g:>12}" for g in args.groups) + "         mean")
    precision = {}
    for method in METHODS:
        values = [per_group[g]["methods"][method]["precision_over_base"] for g in args.groups]
        precision[method] = round(sum(values) / len(values), 3)
        print(f"{method:<12}" + "  ".join(f"{v:>11.2f}x" for v in values) + f"  {precision[method]:>10.2f}x")
    summary = {
        "planted_groups": args.groups,
        "base_rate": round(sum(per_group[g]["base_rate"] for g in args.groups) / len(args.groups), 4),
        "precision_over_base": precision,
        "per_group": per_group,
        "profile": {k: v for k, v in vars(args).items() if k != "home"},
        # The influence settings that ran (the pipeline's defaults): see the README's gradient features.
        "feature_recipe": dict(zip(("train_transform", "loss_tokens", "dropped_directions"), recipe)),
        "seconds": {**{k: round(v) for k, v in timings.items()}, "total": round(time.perf_counter() - started)},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
