"""A short textual report of what the pipeline stored, printed after `make demo`."""

from __future__ import annotations

from pathlib import Path

from resources.lineage import connect_with_retry

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
    "selections": (
        "SELECT model, method, target, count(*) AS examples FROM selections GROUP BY ALL ORDER BY ALL"
    ),
    "lineage": (
        "SELECT asset_key, partition_key, code_version, finished_at FROM lineage "
        "QUALIFY row_number() OVER (PARTITION BY asset_key, partition_key ORDER BY finished_at DESC) = 1 "
        "ORDER BY finished_at"
    ),
}


def print_summary(home: str) -> None:
    db_path = Path(home) / "lineage.duckdb"
    with connect_with_retry(db_path) as con:
        tables = {row[0] for row in con.execute("SHOW TABLES").fetchall()}
        for title, sql in SUMMARY_QUERIES.items():
            table = sql.split(" FROM ")[1].split()[0]
            if table not in tables:
                continue
            print(f"\n== {title} ==")
            print(con.execute(sql).df().to_string(index=False))
