"""Write ingested sources into the DuckDB pool tables (append-only, versioned).

Tables (created by :func:`ensure_pool_tables`):

- ``pool``: one row per distinct conversation; ``messages`` is the canonical JSON that
  ``example_id`` hashes (``sha256(messages)[:32]``); ``first_seen_version``/``first_seen_seq``
  name the pool version that added the row. ``superseded_by`` / ``superseded_at_version`` /
  ``superseded_at_seq`` are set while the row is superseded (see below); the current pool is
  the rows where ``superseded_at_seq IS NULL``.
- ``pool_rejects`` / ``pool_duplicates``: every record that did not become a pool row, with
  the pool version and ``ingest_id`` of the ingest that read it.
- ``pool_versions``: one row per pool state. The version is :func:`pool_version_of_ids` of the
  current (not superseded) ids; ``seq`` increases by one per version; ``n_examples`` counts the
  current rows and ``n_superseded`` the superseded ones. A state equal to an earlier version's
  (an edit reverted) hashes its ids followed by ``seq:<seq>``, since version ids are unique.
- ``pool_sources``: one row per source read by an ingest, with its counts and fingerprint, and
  ``n_superseded``: the rows of that source the ingest superseded.
- ``pool_supersessions``: the history: one row per (row, time it was superseded), with the
  version that revived it, if any; :func:`member_at_seq_sql` reads it.

Refresh semantics: rows are never deleted. A source whose name, record format and content
fingerprint (sha256 of its bytes) match its latest ingest is skipped and reported as
``unchanged``; a changed source is read again in full, its already-pooled conversations
counting as duplicates.

Edited records. A source is identified by its name, a record by its content (the id), not by
its line number, since inserting lines shifts every later one. When a source is read again,
each current pool row its previous read held (first seen from it, or recorded as its
duplicate) whose content appears nowhere in the new read is superseded: its line now holds
other content (an edit; ``superseded_by`` is the id now on the row's first-seen line of that
source, NULL when that line is now rejected or gone). A row whose content merely moved (lines
inserted or removed before it) stays, and so does one that another source's latest read still
holds. A superseded row is revived when its content is read again from any source. An ingest that adds, supersedes or
revives nothing keeps the current version.

Duplicates are resolved in SQL after staging: a record whose id is already in the pool, or
appeared earlier in this ingest (sources in the given order, then record order), is a
duplicate. Everything happens in one transaction, so a failure leaves no partial version.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from selection.common.db import transaction
from selection.data.formats import DEFAULT_MAX_CHARS, reason_code
from selection.data.ingest import (
    Accepted,
    RecordsSource,
    Source,
    SourceReadError,
    SourceSpec,
    detect_file_type,
    hf_dataset_files,
    iter_outcomes,
)

BATCH_ROWS = 5000
_HASH_CHUNK = 1 << 20
_FETCH_ROWS = 50_000

_DDL = (
    """CREATE TABLE IF NOT EXISTS pool (
        example_id VARCHAR PRIMARY KEY,
        source VARCHAR NOT NULL,
        line_no BIGINT NOT NULL,
        messages JSON NOT NULL,
        n_turns INTEGER NOT NULL,
        n_chars BIGINT NOT NULL,
        format VARCHAR NOT NULL,
        first_seen_version VARCHAR NOT NULL,
        first_seen_seq BIGINT NOT NULL,
        superseded_by VARCHAR,
        superseded_at_version VARCHAR,
        superseded_at_seq BIGINT
    )""",
    """CREATE TABLE IF NOT EXISTS pool_rejects (
        source VARCHAR NOT NULL,
        line_no BIGINT NOT NULL,
        reason VARCHAR NOT NULL,
        reason_code VARCHAR NOT NULL,
        raw VARCHAR NOT NULL,
        pool_version VARCHAR NOT NULL,
        ingest_id VARCHAR NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS pool_duplicates (
        source VARCHAR NOT NULL,
        line_no BIGINT NOT NULL,
        example_id VARCHAR NOT NULL,
        pool_version VARCHAR NOT NULL,
        ingest_id VARCHAR NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS pool_versions (
        pool_version VARCHAR PRIMARY KEY,
        seq BIGINT NOT NULL UNIQUE,
        created_at TIMESTAMPTZ NOT NULL,
        n_examples BIGINT NOT NULL,
        n_new BIGINT NOT NULL,
        parent_version VARCHAR,
        ingest_id VARCHAR NOT NULL,
        n_superseded BIGINT DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS pool_sources (
        source VARCHAR NOT NULL,
        path VARCHAR NOT NULL,
        format VARCHAR NOT NULL,
        file_type VARCHAR NOT NULL,
        fingerprint VARCHAR NOT NULL,
        pool_version VARCHAR NOT NULL,
        n_read BIGINT NOT NULL,
        n_accepted BIGINT NOT NULL,
        n_rejected BIGINT NOT NULL,
        n_duplicates BIGINT NOT NULL,
        ingest_id VARCHAR NOT NULL,
        ingested_at TIMESTAMPTZ NOT NULL,
        n_superseded BIGINT DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS pool_supersessions (
        example_id VARCHAR NOT NULL,
        source VARCHAR NOT NULL,
        line_no BIGINT NOT NULL,
        superseded_by VARCHAR,
        superseded_version VARCHAR NOT NULL,
        superseded_seq BIGINT NOT NULL,
        revived_version VARCHAR,
        revived_seq BIGINT,
        ingest_id VARCHAR NOT NULL
    )""",
)
# Tables made before rows could be superseded.
_MIGRATIONS = (
    "ALTER TABLE pool ADD COLUMN IF NOT EXISTS superseded_by VARCHAR",
    "ALTER TABLE pool ADD COLUMN IF NOT EXISTS superseded_at_version VARCHAR",
    "ALTER TABLE pool ADD COLUMN IF NOT EXISTS superseded_at_seq BIGINT",
    "ALTER TABLE pool_versions ADD COLUMN IF NOT EXISTS n_superseded BIGINT DEFAULT 0",
    "ALTER TABLE pool_sources ADD COLUMN IF NOT EXISTS n_superseded BIGINT DEFAULT 0",
)
CURRENT_POOL_SQL = "SELECT * FROM pool WHERE superseded_at_seq IS NULL"

_STAGE_NEW = "_ingest_new_ids"
_STAGE_SUPERSEDED = "_ingest_superseded"
_STAGE_REVIVED = "_ingest_revived"
_STAGE_SKIPPED = "_ingest_skipped"
_STAGE_ACCEPTED = "_ingest_accepted"
_STAGE_REJECTS = "_ingest_rejects"
_STAGE_ACCEPTED_SCHEMA = pa.schema(
    [
        ("ord", pa.int64()),
        ("source", pa.string()),
        ("line_no", pa.int64()),
        ("example_id", pa.string()),
        ("messages", pa.string()),
        ("n_turns", pa.int32()),
        ("n_chars", pa.int64()),
        ("format", pa.string()),
    ]
)
_STAGE_REJECTS_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("line_no", pa.int64()),
        ("reason", pa.string()),
        ("reason_code", pa.string()),
        ("raw", pa.string()),
    ]
)


@dataclass
class SourceReport:
    source: str
    path: str
    format: str
    file_type: str
    fingerprint: str
    status: str  # "ingested" or "unchanged" (skipped: same name, format and fingerprint as before)
    n_read: int = 0
    n_accepted: int = 0
    n_rejected: int = 0
    n_duplicates: int = 0
    n_superseded: int = 0  # rows of this source whose content this read no longer holds
    replaced_path: str = ""  # the other path this source was read from before (``replaces: true``)
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)  # records read as each format (accepted + duplicates)


@dataclass
class IngestReport:
    ingest_id: str
    pool_version: str
    parent_version: str | None
    seq: int
    n_new: int
    n_total: int
    n_read: int
    n_rejected: int
    n_duplicates: int
    elapsed_s: float
    records_per_s: float
    rejects_by_reason: dict[str, int]
    sources: list[SourceReport]
    n_superseded: int = 0  # rows this ingest superseded
    n_revived: int = 0  # superseded rows whose content this ingest read again
    n_superseded_total: int = 0  # superseded rows in the pool after this ingest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ensure_pool_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create the pool tables, or bring tables of an older layout up to the current columns."""
    for statement in (*_DDL, *_MIGRATIONS):
        con.execute(statement)


def member_at_seq_sql(alias: str, seq: str) -> str:
    """SQL condition: pool row ``alias`` belonged to the pool at version number ``seq`` (an SQL
    expression), i.e. was added by then and not superseded at that time."""
    return (
        f"({alias}.first_seen_seq <= {seq} AND NOT EXISTS (SELECT 1 FROM pool_supersessions h "
        f"WHERE h.example_id = {alias}.example_id AND h.superseded_seq <= {seq} "
        f"AND (h.revived_seq IS NULL OR h.revived_seq > {seq})))"
    )


def pool_version_of_ids(ids: Iterable[str]) -> str:
    """The version of a pool holding ``ids``: sha256 of each sorted id followed by a newline."""
    digest = hashlib.sha256()
    for example in sorted(ids):
        digest.update(f"{example}\n".encode())
    return digest.hexdigest()


def _hash_sorted_ids(con: duckdb.DuckDBPyConnection, query: str, salt: str = "") -> str:
    """:func:`pool_version_of_ids` over the ids ``query`` returns, sorted by DuckDB and streamed
    (``salt`` appended last: only for a state that repeats an earlier version)."""
    digest = hashlib.sha256()
    result = con.execute(f"SELECT example_id FROM ({query}) ORDER BY example_id")
    while rows := result.fetchmany(_FETCH_ROWS):
        digest.update(("\n".join(row[0] for row in rows) + "\n").encode())
    digest.update(salt.encode())
    return digest.hexdigest()


def _first_row(con: duckdb.DuckDBPyConnection, query: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
    # fetchall, not fetchone: DuckDB refuses further work on a connection with a half-read result.
    found = con.execute(query, list(params)).fetchall()
    return found[0] if found else None


def latest_pool_version(con: duckdb.DuckDBPyConnection) -> tuple[str, int] | None:
    """(version, seq) of the newest pool version, or None before the first ingest."""
    row = _first_row(con, "SELECT pool_version, seq FROM pool_versions ORDER BY seq DESC LIMIT 1")
    return (row[0], row[1]) if row else None


def pool_version_size(con: duckdb.DuckDBPyConnection, version: str) -> int:
    """How many examples the pool held at ``version`` (superseded rows left out)."""
    ensure_pool_tables(con)
    row = _first_row(con, "SELECT n_examples FROM pool_versions WHERE pool_version = ?", [version])
    if row is None:
        raise ValueError(f"unknown pool version {version!r}")
    return row[0]


def pool_ids(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Every id of the current pool (superseded rows left out), in first-seen then id order."""
    ensure_pool_tables(con)
    return [
        row[0]
        for row in con.execute(
            f"SELECT example_id FROM ({CURRENT_POOL_SQL}) ORDER BY first_seen_seq, example_id"
        ).fetchall()
    ]


def current_pool_rows(con: duckdb.DuckDBPyConnection) -> list[tuple[str, str]]:
    """(example_id, messages JSON) of the current pool, in first-seen then id order."""
    ensure_pool_tables(con)
    return con.execute(
        f"SELECT example_id, messages FROM ({CURRENT_POOL_SQL}) ORDER BY first_seen_seq, example_id"
    ).fetchall()


def read_pool(con: duckdb.DuckDBPyConnection) -> tuple[str, list[str], list[list[dict]]]:
    """(pool_version, ids, conversations) of the current pool (superseded rows left out), in
    first-seen then id order."""
    ensure_pool_tables(con)
    latest = latest_pool_version(con)
    if latest is None:
        raise ValueError("the pool is empty; materialize raw_pool first")
    rows = current_pool_rows(con)
    return latest[0], [r[0] for r in rows], [json.loads(r[1]) for r in rows]


def superseded_among(con: duckdb.DuckDBPyConnection, example_ids: Sequence[str]) -> list[str]:
    """Those of ``example_ids`` that are superseded now, in the given order."""
    ensure_pool_tables(con)
    wanted = pa.table({"example_id": pa.array(list(example_ids), pa.string())})
    con.register("_wanted_ids", wanted)
    try:
        found = {
            row[0]
            for row in con.execute(
                "SELECT p.example_id FROM pool p JOIN _wanted_ids w USING (example_id) "
                "WHERE p.superseded_at_seq IS NOT NULL"
            ).fetchall()
        }
    finally:
        con.unregister("_wanted_ids")
    return [example_id for example_id in example_ids if example_id in found]


def pool_conversations(con: duckdb.DuckDBPyConnection, example_ids: Sequence[str]) -> dict[str, list[dict]]:
    """Messages of the given ids (one query; ids not in the pool are absent from the result)."""
    ensure_pool_tables(con)
    wanted = pa.table({"example_id": pa.array(list(example_ids), pa.string())})
    con.register("_wanted_ids", wanted)
    try:
        rows = con.execute(
            "SELECT p.example_id, p.messages FROM pool p JOIN _wanted_ids w USING (example_id)"
        ).fetchall()
    finally:
        con.unregister("_wanted_ids")
    return {example_id: json.loads(messages) for example_id, messages in rows}


def example_sources(con: duckdb.DuckDBPyConnection, example_ids: Sequence[str]) -> dict[str, str]:
    """Source name of the given ids (ids not in the pool are absent from the result)."""
    ensure_pool_tables(con)
    con.register("_wanted_source_ids", pa.table({"example_id": pa.array(list(example_ids), pa.string())}))
    try:
        rows = con.execute(
            "SELECT p.example_id, p.source FROM pool p JOIN _wanted_source_ids w USING (example_id)"
        ).fetchall()
    finally:
        con.unregister("_wanted_source_ids")
    return dict(rows)


@dataclass(frozen=True)
class SourceAccounting:
    """One source read of one ingest: the counts it recorded, and the rows the tables hold for it."""

    source: str
    ingest_id: str
    n_read: int
    n_accepted: int
    n_rejected: int
    n_duplicates: int
    rows_in_pool: int  # pool rows first seen in this ingest's version
    rows_in_rejects: int
    rows_in_duplicates: int


def source_accounting(con: duckdb.DuckDBPyConnection) -> list[SourceAccounting]:
    """Every source read, oldest first, with its recorded counts and its `pool`, `pool_rejects`
    and `pool_duplicates` rows."""
    ensure_pool_tables(con)
    rows = con.execute(
        """SELECT s.source, s.ingest_id, s.n_read, s.n_accepted, s.n_rejected, s.n_duplicates,
                  (SELECT count(*) FROM pool p JOIN pool_versions v ON v.pool_version = p.first_seen_version
                   WHERE v.ingest_id = s.ingest_id AND p.source = s.source),
                  (SELECT count(*) FROM pool_rejects r WHERE r.ingest_id = s.ingest_id AND r.source = s.source),
                  (SELECT count(*) FROM pool_duplicates d WHERE d.ingest_id = s.ingest_id AND d.source = s.source)
           FROM pool_sources s ORDER BY s.ingested_at, s.source"""
    ).fetchall()
    return [SourceAccounting(*row) for row in rows]


def source_fingerprint(spec: Source) -> tuple[str, str]:
    """(file type, fingerprint) of a source; files are hashed by streaming their bytes."""
    if isinstance(spec, RecordsSource):
        return "records", spec.fingerprint
    path = Path(spec.path)
    file_type = detect_file_type(path)
    files = hf_dataset_files(path) if file_type == "hf_dataset" else [path]
    digest = hashlib.sha256()
    for file in files:
        if file_type == "hf_dataset":
            digest.update(f"{file.relative_to(path)}\n".encode())
        try:
            with open(file, "rb") as handle:
                while chunk := handle.read(_HASH_CHUNK):
                    digest.update(chunk)
        except OSError as error:
            raise SourceReadError(f"source {file}: cannot be read: {error}") from error
    return file_type, f"sha256:{digest.hexdigest()}"


@dataclass(frozen=True)
class _LatestRead:
    path: str
    format: str
    fingerprint: str


def _latest_reads(con: duckdb.DuckDBPyConnection) -> dict[str, _LatestRead]:
    """Each source's latest read: where it came from and what its content was."""
    rows = con.execute(
        """SELECT source, arg_max(path, ingested_at), arg_max(format, ingested_at), arg_max(fingerprint, ingested_at)
        FROM pool_sources GROUP BY source"""
    ).fetchall()
    return {source: _LatestRead(path, fmt, fingerprint) for source, path, fmt, fingerprint in rows}


def _check_source_homes(
    specs: Sequence[Source], reports: Sequence[SourceReport], latest: dict[str, _LatestRead]
) -> None:
    """A source is its name and its path: the same name from another path is refused unless the
    spec says it ``replaces`` that source (two files both named ``data.jsonl`` would otherwise
    read as edits of one source, superseding the first file's rows)."""
    for spec, report in zip(specs, reports):
        before = latest.get(report.source)
        if not isinstance(spec, SourceSpec) or before is None or not before.path or before.path == report.path:
            continue
        if not spec.replaces:
            raise ValueError(
                f"source name {report.source!r} already names {before.path}; {report.path} would replace it "
                f"and supersede its rows. Give this source its own `name`, or set `replaces: true` on it if "
                f"{report.path} is the new version of {before.path}"
            )
        report.replaced_path = before.path


class _StageFile:
    """Rows buffered in Python and appended to a Parquet file every ``batch_rows`` rows.

    Staging goes to disk rather than to DuckDB temporary tables because those live in memory
    (up to DuckDB's memory_limit) and DuckDB keeps registered Arrow batches alive until the
    transaction commits: on disk, memory stays flat however long the sources are.
    """

    def __init__(self, path: Path, schema: pa.Schema, batch_rows: int) -> None:
        self.path = path
        self.schema = schema
        self.batch_rows = batch_rows
        self.columns: dict[str, list[Any]] = {name: [] for name in schema.names}
        # Only the low-cardinality columns are worth dictionary-encoding.
        self.writer = pq.ParquetWriter(
            path, schema, compression="zstd", write_statistics=False, use_dictionary=["source", "format", "reason_code"]
        )

    def add(self, *values: Any) -> None:
        for column, value in zip(self.columns.values(), values):
            column.append(value)
        if len(self.columns[self.schema.names[0]]) >= self.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.columns[self.schema.names[0]]:
            self.writer.write_table(pa.table(self.columns, schema=self.schema))
            for column in self.columns.values():
                column.clear()

    def close(self) -> str:
        """Flush, close, and return the file as a DuckDB ``read_parquet`` expression."""
        self.flush()
        self.writer.close()
        return "read_parquet('" + str(self.path).replace("'", "''") + "')"


class _Stager:
    """Numbers accepted records in ingest order (``ord``) and stages them with the rejects."""

    def __init__(self, folder: Path, batch_rows: int) -> None:
        self.ord = 0
        self.accepted = _StageFile(folder / "accepted.parquet", _STAGE_ACCEPTED_SCHEMA, batch_rows)
        self.rejects = _StageFile(folder / "rejects.parquet", _STAGE_REJECTS_SCHEMA, batch_rows)

    def add_accepted(self, outcome: Accepted) -> None:
        self.ord += 1
        n_chars = sum(len(turn["content"]) for turn in outcome.messages)
        self.accepted.add(
            self.ord,
            outcome.source,
            outcome.line_no,
            outcome.example_id,
            outcome.messages_json,
            len(outcome.messages),
            n_chars,
            outcome.format,
        )

    def add_rejected(self, source: str, line_no: int, reason: str, raw: str) -> None:
        self.rejects.add(source, line_no, reason, reason_code(reason), raw)

    def close(self) -> tuple[str, str]:
        return self.accepted.close(), self.rejects.close()


def _stage_source(stager: _Stager, spec: Source, report: SourceReport, max_chars: int) -> None:
    reasons: Counter[str] = Counter()
    formats: Counter[str] = Counter()
    for outcome in iter_outcomes(spec, max_chars=max_chars):
        report.n_read += 1
        if isinstance(outcome, Accepted):
            formats[outcome.format] += 1
            stager.add_accepted(outcome)
        else:
            reasons[reason_code(outcome.reason)] += 1
            stager.add_rejected(outcome.source, outcome.line_no, outcome.reason, outcome.raw)
    report.rejects_by_reason = dict(sorted(reasons.items()))
    report.formats = dict(sorted(formats.items()))


def _count_by_source(con: duckdb.DuckDBPyConnection, query: str) -> dict[str, int]:
    return dict(con.execute(f"SELECT source, count(*) FROM ({query}) GROUP BY source").fetchall())


def _staging_parent(con: duckdb.DuckDBPyConnection) -> str | None:
    """The folder of the database file (so staging stays under the storage root), None if in memory."""
    row = _first_row(con, "SELECT path FROM duckdb_databases() WHERE database_name = current_database()")
    return str(Path(row[0]).resolve().parent) if row and row[0] else None


Connect = Callable[[], contextlib.AbstractContextManager[duckdb.DuckDBPyConnection]]


def ingest_sources(
    con: duckdb.DuckDBPyConnection,
    specs: Sequence[Source],
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    batch_rows: int = BATCH_ROWS,
    staging_dir: str | Path | None = None,
) -> IngestReport:
    """:func:`ingest_with` on one open connection (the connection must not be in a transaction).

    The connection stays open, so its file stays locked while the sources are read; a pipeline
    step uses :func:`ingest_with` instead, which holds the database only to commit."""

    @contextlib.contextmanager
    def same_connection() -> Iterator[duckdb.DuckDBPyConnection]:
        yield con

    return ingest_with(same_connection, specs, max_chars=max_chars, batch_rows=batch_rows, staging_dir=staging_dir)


def ingest_with(
    connect: Connect,
    specs: Sequence[Source],
    *,
    max_chars: int = DEFAULT_MAX_CHARS,
    batch_rows: int = BATCH_ROWS,
    staging_dir: str | Path | None = None,
) -> IngestReport:
    """Read ``specs`` into the pool: check and stage every source with no database connection
    open, then write them in one short transaction.

    ``connect()`` opens a connection (each use is a context). The first, brief one reads which
    sources are already in the pool, so unchanged sources are skipped without being read and a
    source name already taken by another path is refused before any reading. Records are staged in
    Parquet files in a temporary folder under ``staging_dir`` (default: the database file's
    folder), removed afterwards: Python memory is flat in the number of records, and a slow or
    huge source never holds the database lock, so other runs go on meanwhile. DuckDB's own memory
    is bounded by its ``memory_limit`` setting.
    """
    names = [spec.source_name for spec in specs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"source names must be unique within one ingest; repeated: {repeated}")
    started = time.perf_counter()
    ingest_id = uuid.uuid4().hex
    with connect() as con:
        ensure_pool_tables(con)
        latest = _latest_reads(con)
        parent = staging_dir if staging_dir is not None else _staging_parent(con)
    reports = []
    for spec in specs:
        file_type, fingerprint = source_fingerprint(spec)
        path = str(Path(spec.path).resolve()) if isinstance(spec, SourceSpec) else spec.path
        reports.append(SourceReport(spec.source_name, path, spec.format, file_type, fingerprint, "ingested"))
    _check_source_homes(specs, reports, latest)
    with tempfile.TemporaryDirectory(prefix=".ingest-", dir=parent) as scratch:
        stager = _Stager(Path(scratch), batch_rows)
        for spec, report in zip(specs, reports):
            if _is_unchanged(latest, report):
                report.status = "unchanged"
            else:
                _stage_source(stager, spec, report, max_chars)
        accepted_rows, reject_rows = stager.close()
        with connect() as con, transaction(con):
            # Another ingest may have committed since the first look: decide again on its result.
            latest = _latest_reads(con)
            _check_source_homes(specs, reports, latest)
            skipped = [r.source for r in reports if r.status == "ingested" and _is_unchanged(latest, r)]
            reports = [_unchanged(r) if r.source in skipped else r for r in reports]
            return _commit_staged(con, reports, accepted_rows, reject_rows, skipped, ingest_id, started)


def _is_unchanged(latest: dict[str, _LatestRead], report: SourceReport) -> bool:
    # Against the latest read only: bytes reverted to an older version must be read again
    # so that the rows of the version in between are superseded.
    before = latest.get(report.source)
    return before is not None and (before.format, before.fingerprint) == (report.format, report.fingerprint)


def _unchanged(report: SourceReport) -> SourceReport:
    return SourceReport(report.source, report.path, report.format, report.file_type, report.fingerprint, "unchanged")


def _commit_staged(
    con: duckdb.DuckDBPyConnection,
    reports: list[SourceReport],
    staged_accepted: str,
    staged_rejects: str,
    skipped: Sequence[str],
    ingest_id: str,
    started: float,
) -> IngestReport:
    parent = latest_pool_version(con)
    parent_version, parent_seq = parent or (None, 0)
    # Staged rows of sources found unchanged at commit time are left out through these views.
    con.execute(f"CREATE OR REPLACE TEMP TABLE {_STAGE_SKIPPED} (source VARCHAR)")
    if skipped:
        con.executemany(f"INSERT INTO {_STAGE_SKIPPED} VALUES (?)", [[source] for source in skipped])
    accepted_rows, reject_rows = _STAGE_ACCEPTED, _STAGE_REJECTS
    for view, staged in ((accepted_rows, staged_accepted), (reject_rows, staged_rejects)):
        con.execute(
            f"CREATE OR REPLACE TEMP VIEW {view} AS SELECT * FROM {staged} "
            f"WHERE source NOT IN (SELECT source FROM {_STAGE_SKIPPED})"
        )

    # First occurrence (lowest ord) of every id not already pooled.
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {_STAGE_NEW} AS
        SELECT example_id, min(ord) AS ord FROM {accepted_rows} s
        WHERE NOT EXISTS (SELECT 1 FROM pool p WHERE p.example_id = s.example_id)
        GROUP BY example_id""")
    reread = [report.source for report in reports if report.status == "ingested"]
    # Current rows that a re-read source held before, that no read of this ingest holds, and that
    # no other source's latest read holds either (module docstring: edited records). A source's
    # latest read holds the rows it added (their first_seen_version is that read's version) and
    # the duplicates recorded with that read's ingest_id.
    con.execute(
        f"""CREATE OR REPLACE TEMP TABLE {_STAGE_SUPERSEDED} AS
        WITH latest AS (SELECT source, arg_max(ingest_id, ingested_at) AS ingest_id,
                               arg_max(pool_version, ingested_at) AS pool_version FROM pool_sources GROUP BY source),
        held AS (SELECT d.example_id, d.source FROM pool_duplicates d
                 JOIN latest l ON l.source = d.source AND l.ingest_id = d.ingest_id)
        SELECT p.example_id, p.source, p.line_no, l.example_id AS superseded_by
        FROM pool p LEFT JOIN (SELECT source, line_no, min(example_id) AS example_id FROM {accepted_rows}
                               GROUP BY source, line_no) l ON l.source = p.source AND l.line_no = p.line_no
        WHERE p.superseded_at_seq IS NULL
          AND (list_contains($reread, p.source) OR EXISTS (
               SELECT 1 FROM held h WHERE h.example_id = p.example_id AND list_contains($reread, h.source)))
          AND NOT EXISTS (SELECT 1 FROM {accepted_rows} s WHERE s.example_id = p.example_id)
          AND NOT EXISTS (SELECT 1 FROM held h WHERE h.example_id = p.example_id
                          AND NOT list_contains($reread, h.source))
          AND (list_contains($reread, p.source) OR NOT EXISTS (
               SELECT 1 FROM latest t WHERE t.source = p.source AND t.pool_version = p.first_seen_version))""",
        {"reread": reread},
    )
    con.execute(f"""CREATE OR REPLACE TEMP TABLE {_STAGE_REVIVED} AS
        SELECT p.example_id FROM pool p WHERE p.superseded_at_seq IS NOT NULL
          AND EXISTS (SELECT 1 FROM {accepted_rows} s WHERE s.example_id = p.example_id)""")
    n_new, n_superseded, n_revived, n_current, n_old_superseded = _first_row(
        con,
        f"""SELECT
        (SELECT count(*) FROM {_STAGE_NEW}), (SELECT count(*) FROM {_STAGE_SUPERSEDED}),
        (SELECT count(*) FROM {_STAGE_REVIVED}), (SELECT count(*) FROM pool WHERE superseded_at_seq IS NULL),
        (SELECT count(*) FROM pool WHERE superseded_at_seq IS NOT NULL)""",
    )
    if n_new or n_superseded or n_revived or parent_version is None:
        seq = parent_seq + 1
        ids_after = f"""SELECT example_id FROM pool
            WHERE (superseded_at_seq IS NULL OR example_id IN (SELECT example_id FROM {_STAGE_REVIVED}))
              AND example_id NOT IN (SELECT example_id FROM {_STAGE_SUPERSEDED})
            UNION ALL SELECT example_id FROM {_STAGE_NEW}"""
        version = _hash_sorted_ids(con, ids_after)
        if _first_row(con, "SELECT 1 FROM pool_versions WHERE pool_version = ?", [version]) is not None:
            version = _hash_sorted_ids(con, ids_after, salt=f"seq:{seq}\n")
    else:
        version, seq = parent_version, parent_seq

    con.execute(
        f"""UPDATE pool SET superseded_by = s.superseded_by, superseded_at_version = ?, superseded_at_seq = ?
        FROM {_STAGE_SUPERSEDED} s WHERE pool.example_id = s.example_id""",
        [version, seq],
    )
    con.execute(
        f"""INSERT INTO pool_supersessions (example_id, source, line_no, superseded_by, superseded_version,
        superseded_seq, ingest_id)
        SELECT example_id, source, line_no, superseded_by, ?, ?, ? FROM {_STAGE_SUPERSEDED}""",
        [version, seq, ingest_id],
    )
    con.execute(f"""UPDATE pool SET superseded_by = NULL, superseded_at_version = NULL, superseded_at_seq = NULL
        WHERE example_id IN (SELECT example_id FROM {_STAGE_REVIVED})""")
    con.execute(
        f"""UPDATE pool_supersessions SET revived_version = ?, revived_seq = ?
        WHERE revived_seq IS NULL AND example_id IN (SELECT example_id FROM {_STAGE_REVIVED})""",
        [version, seq],
    )
    con.execute(
        f"""INSERT INTO pool (example_id, source, line_no, messages, n_turns, n_chars, format,
        first_seen_version, first_seen_seq)
        SELECT s.example_id, s.source, s.line_no, s.messages, s.n_turns, s.n_chars, s.format, ?, ?
        FROM {accepted_rows} s SEMI JOIN {_STAGE_NEW} n ON s.ord = n.ord""",
        [version, seq],
    )
    con.execute(
        f"""INSERT INTO pool_duplicates
        SELECT s.source, s.line_no, s.example_id, ?, ? FROM {accepted_rows} s
        ANTI JOIN {_STAGE_NEW} n ON s.ord = n.ord""",
        [version, ingest_id],
    )
    con.execute(
        f"INSERT INTO pool_rejects SELECT source, line_no, reason, reason_code, raw, ?, ? FROM {reject_rows}",
        [version, ingest_id],
    )

    accepted = _count_by_source(
        con, f"SELECT s.source FROM {accepted_rows} s SEMI JOIN {_STAGE_NEW} n ON s.ord = n.ord"
    )
    staged = _count_by_source(con, f"SELECT source FROM {accepted_rows}")
    rejected = _count_by_source(con, f"SELECT source FROM {reject_rows}")
    superseded = _count_by_source(con, f"SELECT source FROM {_STAGE_SUPERSEDED}")
    for view in (_STAGE_ACCEPTED, _STAGE_REJECTS):
        con.execute(f"DROP VIEW {view}")
    for table in (_STAGE_NEW, _STAGE_SUPERSEDED, _STAGE_REVIVED, _STAGE_SKIPPED):
        con.execute(f"DROP TABLE {table}")
    for report in reports:
        if report.status == "unchanged":
            continue
        report.n_accepted = accepted.get(report.source, 0)
        report.n_duplicates = staged.get(report.source, 0) - report.n_accepted
        report.n_rejected = rejected.get(report.source, 0)
        report.n_superseded = superseded.get(report.source, 0)
        if report.n_accepted + report.n_rejected + report.n_duplicates != report.n_read:
            raise RuntimeError(
                f"source {report.source}: accepted {report.n_accepted} + rejected {report.n_rejected} "
                f"+ duplicates {report.n_duplicates} != records read {report.n_read}"
            )
        con.execute(
            """INSERT INTO pool_sources (source, path, format, file_type, fingerprint, pool_version, n_read,
            n_accepted, n_rejected, n_duplicates, ingest_id, ingested_at, n_superseded)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?)""",
            [
                report.source,
                report.path,
                report.format,
                report.file_type,
                report.fingerprint,
                version,
                report.n_read,
                report.n_accepted,
                report.n_rejected,
                report.n_duplicates,
                ingest_id,
                report.n_superseded,
            ],
        )

    n_total = n_current - n_superseded + n_revived + n_new
    n_superseded_total = n_old_superseded + n_superseded - n_revived
    if seq != parent_seq:
        con.execute(
            """INSERT INTO pool_versions (pool_version, seq, created_at, n_examples, n_new, parent_version,
            ingest_id, n_superseded) VALUES (?, ?, now(), ?, ?, ?, ?, ?)""",
            [version, seq, n_total, n_new, parent_version, ingest_id, n_superseded_total],
        )

    elapsed = time.perf_counter() - started
    n_read = sum(report.n_read for report in reports)
    reasons: Counter[str] = Counter()
    for report in reports:
        reasons.update(report.rejects_by_reason)
    return IngestReport(
        ingest_id=ingest_id,
        pool_version=version,
        parent_version=parent_version,
        seq=seq,
        n_new=n_new,
        n_total=n_total,
        n_read=n_read,
        n_rejected=sum(r.n_rejected for r in reports),
        n_duplicates=sum(r.n_duplicates for r in reports),
        elapsed_s=round(elapsed, 4),
        records_per_s=round(n_read / elapsed, 1) if elapsed > 0 else 0.0,
        rejects_by_reason=dict(sorted(reasons.items())),
        sources=reports,
        n_superseded=n_superseded,
        n_revived=n_revived,
        n_superseded_total=n_superseded_total,
    )
