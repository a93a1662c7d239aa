"""What do gradient features match on a planted MMLU pool: the subject, or the answer letter?

Reads the projected features that ``bench/feature_transforms.py --save FILE`` wrote (same pool
arguments), rebuilds the same planted pool, and reports per train transform:

- ``letter``: the share of each val question's 20 nearest pool rows (cosine of the stored
  features) whose answer starts with the same letter (A-D) as the val question's answer,
  against the base rate of that letter among the pool rows;
- ``subject_group``: the share of those 20 rows from the val question's own planted group,
  against its base rate;
- LESS and BIDS planted precision over the base rate at a 10% budget, on the features as
  stored and after removing the pool's mean and its top principal components ("all but the
  top", Mu and Viswanath 2018), a post-processing step that needs the whole pool.

An MMLU answer here is "<letter>. <choice text>": the letter is the one token the model cannot
copy from the prompt, so it carries most of the loss and of the gradient. The last line is one
JSON object.

    .venv/bin/python bench/feature_transforms.py --pool-size 800 --save /tmp/features800.npz
    .venv/bin/python bench/gradient_signal.py /tmp/features800.npz --pool-size 800
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

import numpy as np  # noqa: E402

from bench.feature_transforms import CANDIDATES, unit  # noqa: E402
from bench.recall import PLANTED_GROUPS, build_pool  # noqa: E402
from selection import bids, less  # noqa: E402
from selection.influence import directions  # noqa: E402

NEIGHBOURS = 20
DROPPED_COMPONENTS = (0, 4, 8, 16, 32)


def answer_letter(messages: list[dict]) -> str:
    return [m["content"] for m in messages if m["role"] == "assistant"][-1][:1]


def neighbour_shares(scores: np.ndarray, pool_labels: np.ndarray, val_labels: np.ndarray) -> tuple[float, float]:
    """(mean share of each val column's top rows sharing its label, mean base rate of that label)."""
    top = np.argsort(-scores, axis=0)[:NEIGHBOURS]
    same = [(pool_labels[top[:, j]] == label).mean() for j, label in enumerate(val_labels)]
    base = [(pool_labels == label).mean() for label in val_labels]
    return float(np.mean(same)), float(np.mean(base))


def drop_top_components(train: np.ndarray, val: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Centre on the pool's mean unit feature and remove its top ``count`` principal directions,
    with the pipeline's own code (``influence_scores``' ``dropped_directions``)."""
    common = directions.fit(train, count)
    return common.remove(train), common.remove(val)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("features", help=".npz written by bench/feature_transforms.py --save")
    parser.add_argument("--groups", nargs="+", default=["medicine", "computing"], choices=sorted(PLANTED_GROUPS))
    parser.add_argument("--pool-size", type=int, default=480)
    parser.add_argument("--planted-share", type=float, default=0.075)
    parser.add_argument("--alpaca-share", type=float, default=0.25)
    parser.add_argument("--n-val", type=int, default=5)
    parser.add_argument("--budget", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    stored = np.load(args.features)
    records, val_by_group, _ = build_pool(
        args.pool_size, args.planted_share, args.alpaca_share, args.groups, args.n_val, args.seed
    )
    val_rows = []
    for group in args.groups:  # the first n_val rows of each subject, as feature_transforms.py takes them
        taken: dict[str, int] = {}
        for row in val_by_group[group]:
            if taken.get(row["subtask"], 0) < args.n_val:
                taken[row["subtask"]] = taken.get(row["subtask"], 0) + 1
                val_rows.append(row)
    if stored["val"].shape[1] != len(val_rows) or stored["sgd"].shape[1] != len(records):
        raise SystemExit(
            f"{args.features} holds {stored['sgd'].shape[1]} pool and {stored['val'].shape[1]} val rows; "
            f"these arguments build {len(records)} and {len(val_rows)}: pass the same pool arguments"
        )
    pool_letters = np.array([answer_letter(r["messages"]) if r["dataset"] == "mmlu" else "" for r in records])
    val_letters = np.array([answer_letter(r["messages"]) for r in val_rows])
    group_of = {s: g for g, subjects in PLANTED_GROUPS.items() for s in subjects}
    pool_groups = np.array([group_of.get(r["subject"], "") for r in records])
    val_groups = np.array([r["task"] for r in val_rows])
    k = less.resolve_budget(args.budget, len(records))
    val = unit(stored["val"][-1])  # the last checkpoint: the one the warmup ends with

    results: dict[str, dict] = {}
    for name in (c for c in CANDIDATES if not c.endswith("_centered")):
        train = unit(stored[name][-1])
        scores = train @ val.T
        letter, letter_base = neighbour_shares(scores, pool_letters, val_letters)
        subject, subject_base = neighbour_shares(scores, pool_groups, val_groups)
        entry = {
            "letter": round(letter, 3),
            "letter_base": round(letter_base, 3),
            "subject_group": round(subject, 3),
            "subject_group_base": round(subject_base, 3),
            "recall": {},
        }
        for count in DROPPED_COMPONENTS:
            t, v = drop_top_components(train, val, count) if count else (train, val)
            s = unit(t) @ unit(v).T
            per_method = {"less": [], "bids": []}
            for group in args.groups:
                cols = [j for j, r in enumerate(val_rows) if r["task"] == group]
                planted = pool_groups == group
                target = less.aggregate_target_scores(s[:, cols], [val_rows[j]["subtask"] for j in cols])
                per_method["less"].append(planted[less.top_k(target, k)].mean() / planted.mean())
                per_method["bids"].append(planted[bids.bids_select(s[:, cols], k)].mean() / planted.mean())
            entry["recall"][count] = {m: round(float(np.mean(v_)), 2) for m, v_ in per_method.items()}
        results[name] = entry

    print(f"{len(records)} pool rows, {len(val_rows)} val rows; {NEIGHBOURS} nearest pool rows per val question")
    print(
        f"{'transform':<20}{'same letter':>13}{'(base)':>8}{'same group':>12}{'(base)':>8}  "
        + "  ".join(f"LESS/BIDS -{c} PCs" if c else "LESS/BIDS as is" for c in DROPPED_COMPONENTS)
    )
    for name, e in results.items():
        print(
            f"{name:<20}{e['letter']:>13.0%}{e['letter_base']:>8.0%}{e['subject_group']:>12.0%}"
            f"{e['subject_group_base']:>8.0%}  "
            + "  ".join(f"{e['recall'][c]['less']:>7.2f}x/{e['recall'][c]['bids']:.2f}x" for c in DROPPED_COMPONENTS)
        )
    print(json.dumps({"neighbours": NEIGHBOURS, "results": results, "profile": vars(args)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
