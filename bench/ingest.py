"""Raw pool ingest throughput and memory: a generated mixed JSONL file, parsed and ingested.

Generates N lines (default 200,000) mixing all four record formats, with ~2% malformed lines,
~1% records rejected for content (empty response) and ~5% duplicates (half of them the same
conversation in another format). Then, each in a fresh child process so peak RSS is its own:

- parse only: ``iter_outcomes`` over the file (read + canonicalize + hash), records/s;
- end to end: ``ingest_sources`` into an empty DuckDB file, records/s;
- memory flatness: the same two runs on the first ``--small`` lines (default 50,000); the
  ratio of peak RSS (and of growth over the post-import baseline) big/small should stay
  near 1 when memory does not grow with the file.

Usage: .venv/bin/python bench/ingest.py [--lines 200000] [--small 50000] [--memory-limit 256MB] [--keep DIR]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
WORDS = [
    "data",
    "model",
    "train",
    "select",
    "token",
    "gradient",
    "influence",
    "budget",
    "cluster",
    "target",
    "task",
    "answer",
    "question",
    "python",
    "math",
    "history",
    "physics",
    "poem",
    "story",
    "explain",
    "list",
    "summary",
    "compare",
    "reason",
    "step",
    "code",
    "bug",
    "fix",
]


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def _conversation(rng: random.Random) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": _text(rng, 3, 10)}] if rng.random() < 0.2 else []
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        turns += [{"role": "user", "content": _text(rng, 8, 60)}, {"role": "assistant", "content": _text(rng, 20, 200)}]
    return turns


def _render(turns: list[dict[str, str]], rng: random.Random) -> dict[str, Any]:
    """The conversation in a random format that can hold it."""
    dialogue = [t for t in turns if t["role"] != "system"]
    single = len(dialogue) == 2 and len(turns) == 2
    choice = rng.choice(("messages", "sharegpt", "alpaca", "prompt_completion") if single else ("messages", "sharegpt"))
    if choice == "messages":
        return {"messages": turns, "id": rng.getrandbits(32)}
    if choice == "sharegpt":
        speaker = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": speaker[t["role"]], "value": t["content"]} for t in turns]}
    if choice == "alpaca":
        return {"instruction": dialogue[0]["content"], "input": "", "output": dialogue[1]["content"]}
    return {"prompt": dialogue[0]["content"], "completion": dialogue[1]["content"]}


def generate(
    path: Path, n_lines: int, seed: int = 0, malformed: float = 0.02, duplicates: float = 0.05
) -> dict[str, int]:
    rng = random.Random(seed)
    recent: list[list[dict[str, str]]] = []
    counts = {"malformed": 0, "duplicate": 0, "bad_content": 0}
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n_lines):
            draw = rng.random()
            if draw < malformed:
                line = json.dumps(_render(_conversation(rng), rng))
                line = line[: rng.randint(1, len(line) - 1)]  # cut short: malformed JSON
                counts["malformed"] += 1
            elif draw < malformed + duplicates and recent:
                line = json.dumps(_render(rng.choice(recent), rng))
                counts["duplicate"] += 1
            elif draw < malformed + duplicates + 0.01:
                line = json.dumps({"instruction": _text(rng, 5, 20), "output": "  "})
                counts["bad_content"] += 1
            else:
                turns = _conversation(rng)
                recent = (recent + [turns])[-1000:]
                line = json.dumps(_render(turns, rng))
            handle.write(line + "\n")
    return counts


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(mode: str, path: str, db: str, batch_rows: int, memory_limit: str) -> None:
    sys.path.insert(0, str(ROOT))
    import duckdb

    from selection.common.names import check_memory_limit
    from selection.data.ingest import Accepted, SourceSpec, iter_outcomes
    from selection.data.pool_store import ingest_sources

    baseline = _peak_rss_mb()
    started = time.perf_counter()
    if mode == "parse":
        n_read = n_accepted = 0  # streamed: the bench measures parsing memory, so no list of outcomes
        for outcome in iter_outcomes(SourceSpec(path)):
            n_read += 1  # noqa: SIM113
            n_accepted += isinstance(outcome, Accepted)
        extra: dict[str, Any] = {"n_accepted_before_dedup": n_accepted}
    else:
        con = duckdb.connect(db)
        if memory_limit != "none":
            con.execute("SET memory_limit = ?", [check_memory_limit(memory_limit, "--memory-limit")])
        report = ingest_sources(con, [SourceSpec(path)], batch_rows=batch_rows)
        con.close()
        n_read = report.n_read
        extra = {key: getattr(report, key) for key in ("n_new", "n_rejected", "n_duplicates", "rejects_by_reason")}
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {
                "mode": mode,
                "n_read": n_read,
                "seconds": seconds,
                "records_per_s": n_read / seconds,
                "baseline_rss_mb": baseline,
                "peak_rss_mb": _peak_rss_mb(),
                **extra,
            }
        )
    )


def run_child(mode: str, path: Path, db: Path, batch_rows: int, memory_limit: str) -> dict[str, Any]:
    command = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--path",
        str(path),
        "--db",
        str(db),
        "--batch-rows",
        str(batch_rows),
        "--memory-limit",
        memory_limit,
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--small", type=int, default=50_000, help="size of the comparison run for memory flatness")
    parser.add_argument("--batch-rows", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--memory-limit",
        default="256MB",
        help="DuckDB memory_limit for the ingest ('none': DuckDB's default, 80%% of RAM, used as cache)",
    )
    parser.add_argument("--keep", type=Path, help="write the files here and keep them (reused by later runs)")
    parser.add_argument("--child", choices=("parse", "ingest"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path, args.db, args.batch_rows, args.memory_limit)
        return
    if not 0 < args.small < args.lines:
        parser.error("--small must be between 0 and --lines")

    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        results: dict[str, dict[str, Any]] = {}
        for label, n_lines in (("small", args.small), ("big", args.lines)):
            path = folder / f"mixed_{n_lines}_seed{args.seed}.jsonl"
            if path.exists() and args.keep:
                print(f"reusing {path}", flush=True)
            else:
                started = time.perf_counter()
                mix = generate(path, n_lines, seed=args.seed)
                print(
                    f"generated {n_lines:,} lines ({path.stat().st_size / 2**20:.1f} MiB, {mix}) "
                    f"in {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
            for mode in ("parse", "ingest"):
                db = folder / f"pool_{n_lines}.duckdb"
                db.unlink(missing_ok=True)
                results[f"{mode}_{label}"] = outcome = run_child(mode, path, db, args.batch_rows, args.memory_limit)
                print(
                    f"  {mode:6s} {n_lines:>9,} lines: {outcome['records_per_s']:>9,.0f} records/s, "
                    f"{outcome['seconds']:.1f} s, peak RSS {outcome['peak_rss_mb']:.0f} MB "
                    f"(after imports {outcome['baseline_rss_mb']:.0f} MB)",
                    flush=True,
                )

    parse, ingest, ingest_small = results["parse_big"], results["ingest_big"], results["ingest_small"]
    growth = {key: max(r["peak_rss_mb"] - r["baseline_rss_mb"], 1.0) for key, r in results.items()}
    ratio_peak = ingest["peak_rss_mb"] / ingest_small["peak_rss_mb"]
    ratio_growth = growth["ingest_big"] / growth["ingest_small"]
    parse_ratio_growth = growth["parse_big"] / growth["parse_small"]
    size_ratio = args.lines / args.small
    print(f"parse only:  {parse['records_per_s']:,.0f} records/s over {args.lines:,} lines")
    print(
        f"end to end:  {ingest['records_per_s']:,.0f} records/s (new {ingest['n_new']:,}, rejected "
        f"{ingest['n_rejected']:,}, duplicates {ingest['n_duplicates']:,}); peak RSS {ingest['peak_rss_mb']:.0f} MB"
    )
    print(
        f"memory flatness ({size_ratio:.0f}x the lines): ingest peak RSS {ingest_small['peak_rss_mb']:.0f} MB vs "
        f"{ingest['peak_rss_mb']:.0f} MB = {ratio_peak:.2f}x; growth over imports {ratio_growth:.2f}x; "
        f"parse-only growth {parse_ratio_growth:.2f}x"
    )
    print(
        json.dumps(
            {
                "lines": args.lines,
                "small_lines": args.small,
                "duckdb_memory_limit": args.memory_limit,
                "parse_records_per_s": round(parse["records_per_s"], 1),
                "ingest_records_per_s": round(ingest["records_per_s"], 1),
                "ingest_seconds": round(ingest["seconds"], 2),
                "n_new": ingest["n_new"],
                "n_rejected": ingest["n_rejected"],
                "n_duplicates": ingest["n_duplicates"],
                "rejects_by_reason": ingest["rejects_by_reason"],
                "peak_rss_mb": round(ingest["peak_rss_mb"], 1),
                "peak_rss_mb_small": round(ingest_small["peak_rss_mb"], 1),
                "peak_rss_ratio_big_vs_small": round(ratio_peak, 3),
                "rss_growth_ratio_big_vs_small": round(ratio_growth, 3),
                "parse_rss_growth_ratio_big_vs_small": round(parse_ratio_growth, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
