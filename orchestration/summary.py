"""A short textual report of what the pipeline stored, printed after `make demo`."""

from __future__ import annotations

import os
from pathlib import Path

from resources.lineage import connect_with_retry
from resources.settings import LINEAGE_DB_FILE

SUMMARY_QUERIES = {
    # Superseded rows (old versions of edited records) are never selected; counted apart.
    "pool by source": (
        "SELECT source, count(*) FILTER (WHERE superseded_at_seq IS NULL) AS examples, "
        "count(*) FILTER (WHERE superseded_at_seq IS NOT NULL) AS superseded FROM pool GROUP BY source ORDER BY source"
    ),
    "pool rejects by reason": (
        "SELECT source, split_part(reason, ':', 1) AS reason, count(*) AS n FROM pool_rejects GROUP BY ALL ORDER BY ALL"
    ),
    "targets": "SELECT task, split, count(*) AS examples FROM targets GROUP BY ALL ORDER BY ALL",
    "selections": ("SELECT model, method, target, count(*) AS examples FROM selections GROUP BY ALL ORDER BY ALL"),
    "lineage": (
        "SELECT asset_key, partition_key, code_version, finished_at FROM lineage "
        "QUALIFY row_number() OVER (PARTITION BY asset_key, partition_key ORDER BY finished_at DESC) = 1 "
        "ORDER BY finished_at"
    ),
}


def print_summary(home: str) -> None:
    db_path = Path(home) / LINEAGE_DB_FILE
    with connect_with_retry(db_path) as con:
        tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
        for title, sql in SUMMARY_QUERIES.items():
            table = sql.split(" FROM ")[1].split()[0]
            if table not in tables:
                continue
            print(f"\n== {title} ==")
            print(con.execute(sql).df().to_string(index=False))


# Pasteable: which pool sources each finetuned checkpoint was trained on (lineage down to examples).
LINEAGE_QUERY = (
    "SELECT c.method, c.target, c.seed, p.source, count(*) AS examples "
    "FROM checkpoints c JOIN checkpoint_examples e USING (model, stage, run_key) "
    "JOIN pool p ON p.example_id = e.example_id WHERE c.stage = 'finetune' GROUP BY ALL ORDER BY ALL"
)


def headline(con, model: str) -> list[str]:
    """Per method: its target loss (NLL) delta vs the report's baseline on each task, with the 95% interval."""
    rows = con.execute(
        "SELECT method, task, delta_nll, delta_nll_ci_low, delta_nll_ci_high, delta_nll_significant "
        "FROM comparison WHERE model = ? ORDER BY method, task",
        [model],
    ).fetchall()
    by_method: dict[str, list[str]] = {}
    for method, task, delta, low, high, significant in rows:
        interval = "" if low is None else f" [{low:+.4f}, {high:+.4f}]{' *' if significant else ''}"
        cell = f"{task} n/a" if delta is None else f"{task} {delta:+.4f}{interval}"
        by_method.setdefault(method, []).append(cell)
    return [f"  {method:<20} {'; '.join(cells)}" for method, cells in by_method.items()]


def print_next_steps(home: Path, model: str) -> None:
    """What to look at after the demo: the report and its headline, the exports, a lineage query, the UI."""
    db_path = home / LINEAGE_DB_FILE
    with connect_with_retry(db_path) as con:
        # The report's own lineage row says where it was written and which baseline its deltas are against.
        report, baseline = con.execute(
            "SELECT json_extract_string(outputs, '$.report.path'), json_extract_string(metrics, '$.baseline') "
            "FROM lineage WHERE asset_key = 'comparison_report' AND partition_key = ? AND status = 'success' "
            "ORDER BY finished_at DESC LIMIT 1",
            [model],
        ).fetchone()
        print(f"\n== what to look at ==\nReport: {report}")
        print(
            f"Target loss (NLL) delta vs the baseline ({baseline}) per task, 95% interval (* = p < 0.05 after "
            "Holm's correction over every method x task; lower = better; the report says what the row count can show):"
        )
        print("\n".join(headline(con, model)))
    print(f"Selections (JSONL, the pool's own format): {home / 'selections' / model}/<method>/<target>-<budget>.jsonl")
    for path in sorted((home / "selections" / model).glob("*/*.jsonl")):
        print(f"  {path}")
    connect = f"duckdb.connect('{db_path}', read_only=True)"
    print(
        "Lineage, e.g. which pool sources trained each finetuned checkpoint:\n"
        f'  .venv/bin/python -c "import duckdb; {connect}.sql(\\"{LINEAGE_QUERY}\\").show()"'
    )
    print(
        f"The Dagster UI on this storage (runs launched there use LESS's recipe unless given the profile's config):\n"
        f"  INSTRUCT_SELECT_HOME={home} DAGSTER_HOME={os.environ.get('DAGSTER_HOME', '')} make dev"
        "   (then http://127.0.0.1:3000)"
    )
