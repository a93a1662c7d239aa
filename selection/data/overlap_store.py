"""DuckDB storage of decontamination results: tables `target_overlap_runs` and `target_overlaps`.

One result per (pool version, targets version, rule): its `target_overlap_runs` row says it was
computed (a result without any overlap has that row and no `target_overlaps` row), and
`target_overlaps` holds one row per (pool row, target row) overlap of
:mod:`selection.data.decontamination`. Both versions are content versions (the pool's of its
current ids, the targets' of their rows), so :func:`current_overlaps` finds the result of the
pool and targets as they are now, computing it when either changed since (the pool re-ingested,
the targets rewritten) and reading it back otherwise. Takes an open connection (the caller owns
locking and retries).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import duckdb
import pandas as pd

from selection.common.db import transaction
from selection.data import decontamination, pool_store, target_store
from selection.data.decontamination import Overlap

OVERLAP_DDL = (
    """CREATE TABLE IF NOT EXISTS target_overlap_runs (
        pool_version VARCHAR NOT NULL,
        targets_version VARCHAR NOT NULL,
        rule VARCHAR NOT NULL,
        n_pool BIGINT NOT NULL,
        n_targets BIGINT NOT NULL,
        n_overlaps BIGINT NOT NULL,
        seconds DOUBLE NOT NULL,
        computed_at TIMESTAMPTZ NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS target_overlaps (
        pool_version VARCHAR NOT NULL,
        targets_version VARCHAR NOT NULL,
        rule VARCHAR NOT NULL,
        example_id VARCHAR NOT NULL,
        task VARCHAR NOT NULL,
        split VARCHAR NOT NULL,
        kind VARCHAR NOT NULL,
        target_example_id VARCHAR NOT NULL,
        evidence VARCHAR NOT NULL
    )""",
)
# Tables of an older layout are brought up to date here.
_MIGRATIONS: tuple[str, ...] = ()
OVERLAP_COLUMNS = ("example_id", "task", "split", "kind", "target_example_id", "evidence")
KEEP_FIELD = "keep_target_overlaps"


def ensure_overlap_tables(con: duckdb.DuckDBPyConnection) -> None:
    for statement in (*OVERLAP_DDL, *_MIGRATIONS):
        con.execute(statement)


@dataclass(frozen=True)
class OverlapSet:
    """The overlaps of one pool version with one targets version (versions None: no pool or no targets yet)."""

    pool_version: str | None
    targets_version: str | None
    rule: str
    overlaps: tuple[Overlap, ...]
    computed: bool = False  # True when this call computed it, False when it was read back
    seconds: float = 0.0

    @cached_property
    def example_ids(self) -> frozenset[str]:
        """The pool rows that overlap a target row."""
        return frozenset(o.example_id for o in self.overlaps)

    def counts(self) -> list[dict[str, Any]]:
        return decontamination.overlap_counts(self.overlaps)

    def among(self, example_ids: Iterable[str]) -> list[str]:
        """Those of ``example_ids`` that overlap a target row, in the given order."""
        overlapping = self.example_ids
        return [example_id for example_id in example_ids if example_id in overlapping]

    def describe(self, example_ids: Collection[str] | None = None) -> str:
        """'<n> <task>/<split> (<kind>), ...' over the overlaps (of ``example_ids`` only, if given)."""
        wanted = self.overlaps if example_ids is None else [o for o in self.overlaps if o.example_id in example_ids]
        return ", ".join(
            f"{c['pool_rows']} {c['task']}/{c['split']} ({c['kind']})" for c in decontamination.overlap_counts(wanted)
        )

    def trained(self, example_ids: Iterable[str]) -> dict[str, Any]:
        """How many of ``example_ids`` are target rows, how many of those are test rows, and their tasks."""
        wanted = set(self.among(example_ids))
        hits = [o for o in self.overlaps if o.example_id in wanted]
        return {
            "rows": len(wanted),
            "test_rows": len({o.example_id for o in hits if o.split == "test"}),
            "tasks": sorted({o.task for o in hits}),
        }

    def summary(self) -> dict[str, Any]:
        """For lineage metrics."""
        return {
            "pool_version": self.pool_version,
            "targets_version": self.targets_version,
            "rule": self.rule,
            "n_pool_rows": len(self.example_ids),
            "by_task_split_kind": self.counts(),
            "computed_now": self.computed,
            "seconds": self.seconds,
        }


def read_overlaps(con: duckdb.DuckDBPyConnection, pool_version: str, targets_version: str) -> OverlapSet | None:
    """The stored result for these versions under the current rule, None if it was never computed."""
    ensure_overlap_tables(con)
    key = [pool_version, targets_version, decontamination.RULE]
    runs = con.execute(
        "SELECT seconds FROM target_overlap_runs WHERE pool_version = ? AND targets_version = ? AND rule = ?", key
    ).fetchall()
    if not runs:
        return None
    rows = con.execute(
        f"SELECT {', '.join(OVERLAP_COLUMNS)} FROM target_overlaps "
        "WHERE pool_version = ? AND targets_version = ? AND rule = ? ORDER BY example_id, task, split, kind",
        key,
    ).fetchall()
    return OverlapSet(pool_version, targets_version, decontamination.RULE, tuple(Overlap(*row) for row in rows))


def write_overlaps(con: duckdb.DuckDBPyConnection, overlaps: OverlapSet, n_pool: int, n_targets: int) -> None:
    """Replace the stored result of ``overlaps``' versions and rule with it, in one transaction."""
    if overlaps.pool_version is None or overlaps.targets_version is None:
        raise ValueError("overlaps without a pool version and a targets version are not stored")
    ensure_overlap_tables(con)
    key = [overlaps.pool_version, overlaps.targets_version, overlaps.rule]
    frame = pd.DataFrame.from_records(  # noqa: F841  (DuckDB reads it by name in the SQL)
        [(o.example_id, o.task, o.split, o.kind, o.target_example_id, o.evidence) for o in overlaps.overlaps],
        columns=list(OVERLAP_COLUMNS),
    ).astype(str)
    where = "WHERE pool_version = ? AND targets_version = ? AND rule = ?"
    with transaction(con):
        con.execute(f"DELETE FROM target_overlap_runs {where}", key)
        con.execute(f"DELETE FROM target_overlaps {where}", key)
        con.execute(
            "INSERT INTO target_overlap_runs (pool_version, targets_version, rule, n_pool, n_targets, n_overlaps, "
            "seconds, computed_at) VALUES (?, ?, ?, ?, ?, ?, ?, now())",
            [*key, n_pool, n_targets, len(overlaps.overlaps), overlaps.seconds],
        )
        con.execute(
            f"INSERT INTO target_overlaps (pool_version, targets_version, rule, {', '.join(OVERLAP_COLUMNS)}) "
            f"SELECT ?, ?, ?, {', '.join(OVERLAP_COLUMNS)} FROM frame",
            key,
        )


def _current_pool(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(example_id, messages JSON) of the current pool; parsed one row at a time by the caller."""
    return con.execute(
        f"SELECT example_id, messages FROM ({pool_store.CURRENT_POOL_SQL}) ORDER BY example_id"
    ).fetchall()


def current_overlaps(con: duckdb.DuckDBPyConnection) -> OverlapSet:
    """The overlaps of the current pool with the current targets: read back, or computed and stored.

    No pool or no targets yet: an empty result (nothing can overlap), not stored.
    """
    pool_store.ensure_pool_tables(con)
    latest = pool_store.latest_pool_version(con)
    targets_version = target_store.stored_targets_version(con)
    if latest is None or targets_version is None:
        return OverlapSet(latest[0] if latest else None, targets_version, decontamination.RULE, ())
    stored = read_overlaps(con, latest[0], targets_version)
    if stored is not None:
        return stored
    started = time.perf_counter()
    target_rows = [
        decontamination.TargetPrompt(task, split, example_id, messages)
        for task, _, split, example_id, messages in target_store.read_target_rows(con)
    ]
    pool_rows = _current_pool(con)
    found = decontamination.find_overlaps(((i, json.loads(m)) for i, m in pool_rows), target_rows)
    overlaps = OverlapSet(
        latest[0], targets_version, decontamination.RULE, tuple(found), True, round(time.perf_counter() - started, 3)
    )
    write_overlaps(con, overlaps, len(pool_rows), len(target_rows))
    return overlaps


class TargetOverlapPicked(ValueError):
    """A selection would hold pool rows that are target rows while they are to be excluded."""


def refuse_overlapping_picks(overlaps: OverlapSet, picked: Sequence[str], keep: bool, selection: str) -> int:
    """The number of ``picked`` ids that overlap target rows; raises when there is one and ``keep`` is False."""
    overlapping = overlaps.among(picked)
    if overlapping and not keep:
        raise TargetOverlapPicked(
            f"{selection} picked {len(overlapping)} pool rows that are target rows "
            f"({overlaps.describe(set(overlapping))}; table target_overlaps), e.g. {overlapping[:3]}: its skin must "
            f"drop them from the candidates before choosing. Nothing was written; `{KEEP_FIELD}: true` keeps "
            "them on purpose"
        )
    return len(overlapping)
