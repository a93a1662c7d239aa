"""Data checks the asset checks run: each returns a CheckOutcome naming what failed.

Pure functions over the stores' readers, feature stores and arrays (no SQL here); the Dagster wrappers
(assets/checks.py) only find what a materialization wrote and report the outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import duckdb
import numpy as np

from selection import selection_store
from selection.common import integrity
from selection.data import pool_store

# A unit vector stored as float16 has each coordinate rounded to a relative 2^-11, so its norm
# is 1 within 2^-11; twice that allows for the float32 norm computed over thousands of terms.
UNIT_NORM_TOLERANCE = 2.0**-10
MAX_LISTED = 10  # problems named in a description; the rest are counted


@dataclass(frozen=True)
class CheckOutcome:
    """What a check looked at (`checked`) and what it found wrong (`problems`; empty = passed)."""

    checked: str
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def description(self) -> str:
        if self.passed:
            return f"passed: {self.checked}"
        listed = "; ".join(self.problems[:MAX_LISTED])
        more = f" (and {len(self.problems) - MAX_LISTED} more)" if len(self.problems) > MAX_LISTED else ""
        return f"FAILED ({self.checked}): {listed}{more}"


def check_selection(con: duckdb.DuckDBPyConnection, model: str, method: str, budget: int, run_id: str) -> CheckOutcome:
    """The selections `run_id` wrote for (model, method): each target holds exactly the requested
    `budget` rows, no id twice, and every id is in the pool version it was selected from."""
    checked = f"{method} selections of {model} by run {run_id}: {budget} rows per target, distinct ids, ids in the pool"
    counts = selection_store.run_target_counts(con, model, method, run_id)
    if not counts:
        return CheckOutcome(checked, [f"run {run_id} stored no {method} selection for {model}"])
    problems = []
    for c in counts:
        if c.n_rows != budget or c.budget != budget:
            problems.append(f"{c.target}: {c.n_rows} rows (stored budget {c.budget}), requested budget {budget}")
        if c.n_distinct != c.n_rows:
            problems.append(f"{c.target}: {c.n_rows - c.n_distinct} duplicate example ids")
        if c.n_not_in_pool:
            problems.append(f"{c.target}: {c.n_not_in_pool} ids not in the pool version they were selected from")
    return CheckOutcome(checked, problems)


def _unit_row_problems(label: str, rows: np.ndarray, dim: int) -> list[str]:
    if rows.ndim != 2 or rows.shape[1] != dim:
        return [f"{label}: shape {rows.shape}, recorded dim {dim}"]
    values = np.asarray(rows, dtype=np.float32)
    finite = np.isfinite(values).all(axis=1)
    problems = [f"{label}: {int((~finite).sum())} rows hold NaN or inf"] if not finite.all() else []
    deviation = np.abs(np.linalg.norm(values[finite], axis=1) - 1.0)
    off = deviation > UNIT_NORM_TOLERANCE
    if off.any():
        problems.append(
            f"{label}: {int(off.sum())} rows with L2 norm off 1 by up to {deviation.max():.3g} "
            f"(tolerance {UNIT_NORM_TOLERANCE:.3g})"
        )
    return problems


def check_unit_rows(blocks: Iterable[tuple[str, int, Callable[[], np.ndarray]]], checked: str) -> CheckOutcome:
    """Every block (label, recorded dim, loader) holds finite rows of that dim with L2 norm 1 within
    float16 rounding; a block that cannot be read (integrity error) is a problem, not a crash."""
    problems = []
    for label, dim, load in blocks:
        rows: list[np.ndarray] = []
        unreadable = integrity.first_problem(lambda load=load: rows.append(load()))
        problems += [f"{label}: {unreadable}"] if unreadable else _unit_row_problems(label, rows[0], dim)
    return CheckOutcome(checked, problems)


def check_feature_stores(stores: Sequence[tuple[str, int]], checked: str) -> CheckOutcome:
    """Gradient feature stores (directory, dim recorded in `gradient_stores`): each manifest and every
    committed chunk have the recorded dim, and rows are finite unit vectors."""
    from selection.influence.scores import open_store

    if not stores:
        return CheckOutcome(checked, ["no feature store recorded"])
    problems, blocks = [], []
    for directory, dim in stores:
        try:
            store = open_store(directory)
        except integrity.ArtifactIntegrityError as error:  # a damaged manifest fails the check, not the run
            problems.append(str(error))
            continue
        if store.dim != dim:
            problems.append(f"{directory}: manifest dim {store.dim}, recorded dim {dim}")
            continue
        blocks += [
            (f"{directory} chunk {chunk}", dim, lambda store=store, chunk=chunk: store.chunk(chunk))
            for chunk in range(store.n_chunks)
        ]
    return CheckOutcome(checked, problems + check_unit_rows(blocks, checked).problems)


def check_embeddings(cache, ids: Sequence[str], chunk_rows: int = 65536) -> CheckOutcome:
    """The embedding cache (opened with the dim its run recorded) holds a finite unit row of that
    dim for every id, read `chunk_rows` at a time."""
    checked = f"embeddings of {len(ids)} pool examples in {cache.path}: dim {cache.dim}, finite, L2 norm 1"
    missing = cache.missing(ids)
    if missing:
        return CheckOutcome(checked, [f"{len(missing)} pool examples have no embedding, e.g. {missing[:3]}"])
    blocks = [
        (f"rows {start}-{start + len(chunk) - 1}", cache.dim, lambda chunk=chunk: cache.load(chunk))
        for start in range(0, len(ids), chunk_rows)
        for chunk in [list(ids[start : start + chunk_rows])]
    ]
    return check_unit_rows(blocks, checked)


def check_pool_accounting(con: duckdb.DuckDBPyConnection) -> CheckOutcome:
    """Per source and ingest: accepted + rejected + duplicates = records read, and the `pool`,
    `pool_rejects` and `pool_duplicates` rows of that ingest match the counts it recorded."""
    reads = pool_store.source_accounting(con)
    checked = f"{len(reads)} source reads: accepted + rejected + duplicates = read, and the tables hold those rows"
    if not reads:
        return CheckOutcome(checked, ["no source was ever ingested"])
    problems = []
    for r in reads:
        where = f"{r.source} (ingest {r.ingest_id[:8]})"
        if r.n_accepted + r.n_rejected + r.n_duplicates != r.n_read:
            problems.append(
                f"{where}: accepted {r.n_accepted} + rejected {r.n_rejected} + duplicates "
                f"{r.n_duplicates} != read {r.n_read}"
            )
        for name, recorded, found in (
            ("pool", r.n_accepted, r.rows_in_pool),
            ("pool_rejects", r.n_rejected, r.rows_in_rejects),
            ("pool_duplicates", r.n_duplicates, r.rows_in_duplicates),
        ):
            if recorded != found:
                problems.append(f"{where}: {found} rows in {name}, {recorded} recorded")
    return CheckOutcome(checked, problems)


def check_evaluation(
    con: duckdb.DuckDBPyConnection, model: str, run_id: str, current_run_keys: Sequence[str]
) -> CheckOutcome:
    """The evaluation `run_id` scored the base model and every current finetuned checkpoint
    (`current_run_keys`), each on exactly the same test rows."""
    from selection.evaluate.evaluation_store import scored_test_rows  # imports torch (via checkpoints)

    checked = (
        f"evaluation run {run_id} of {model}: base and {len(current_run_keys)} current checkpoints, same test rows"
    )
    scored = scored_test_rows(con, model, run_id)
    problems = [f"checkpoint {key} was not evaluated" for key in ["base", *current_run_keys] if key not in scored]
    base_rows = scored["base"].rows if "base" in scored else None
    for key, checkpoint in scored.items():
        rows = checkpoint.rows
        if checkpoint.n_scored != len(rows):
            problems.append(f"{key}: {checkpoint.n_scored - len(rows)} test rows scored twice")
        if base_rows is not None and rows != base_rows:
            problems.append(f"{key}: {len(set(rows) ^ set(base_rows))} test rows differ from the base model's")
    return CheckOutcome(checked, problems)
