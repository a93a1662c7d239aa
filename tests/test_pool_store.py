"""DuckDB pool: accounting invariant, duplicates, versions, refresh, atomicity."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from selection.data.formats import canonicalize, example_id
from selection.data.ingest import RecordsSource, SourceSpec
from selection.data.pool_store import (
    IngestReport,
    ensure_pool_tables,
    ingest_sources,
    latest_pool_version,
    member_at_seq_sql,
    pool_ids,
    pool_version_of_ids,
    pool_version_size,
)

# Columns that other code and users' queries read: a migration may add columns but must keep these.
STABLE_COLUMNS = {
    "pool": {
        "example_id",
        "source",
        "messages",
        "line_no",
        "n_turns",
        "n_chars",
        "first_seen_version",
        "first_seen_seq",
    },
    "pool_rejects": {"source", "line_no", "reason", "raw", "pool_version"},
    "pool_duplicates": {"source", "line_no", "example_id", "pool_version"},
    "pool_versions": {"pool_version", "seq", "created_at", "n_examples", "n_new", "parent_version"},
    "pool_sources": {
        "source",
        "path",
        "format",
        "fingerprint",
        "pool_version",
        "n_read",
        "n_accepted",
        "n_rejected",
        "n_duplicates",
    },
}


def qa(i: int) -> dict[str, Any]:
    return {"instruction": f"Question {i}?", "output": f"Answer {i}."}


def as_messages(i: int) -> dict[str, Any]:
    return {"messages": canonicalize(qa(i))}


def write_jsonl(path: Path, records: list[Any]) -> SourceSpec:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return SourceSpec(path)


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(str(tmp_path / "x.duckdb"))
    yield connection
    connection.close()


def rows(con: duckdb.DuckDBPyConnection, query: str) -> list[tuple]:
    return con.execute(query).fetchall()


def ids_at(con: duckdb.DuckDBPyConnection, version: str) -> list[str]:
    """Sorted ids of the pool at ``version``, by the membership condition the selection check uses."""
    return [
        row[0]
        for row in con.execute(
            "SELECT p.example_id FROM pool p JOIN pool_versions v ON v.pool_version = ? "
            f"WHERE {member_at_seq_sql('p', 'v.seq')} ORDER BY p.example_id",
            [version],
        ).fetchall()
    ]


def source_counts(report: IngestReport) -> dict[str, tuple[int, int, int, int]]:
    return {s.source: (s.n_read, s.n_accepted, s.n_rejected, s.n_duplicates) for s in report.sources}


def test_tables_have_stable_columns(con: duckdb.DuckDBPyConnection) -> None:
    ensure_pool_tables(con)
    ensure_pool_tables(con)  # idempotent
    for table, needed in STABLE_COLUMNS.items():
        columns = {row[0] for row in rows(con, f"DESCRIBE {table}")}
        assert needed <= columns, (table, needed - columns)


def test_first_ingest_accounts_for_every_record(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    first = write_jsonl(
        tmp_path / "first.jsonl", [qa(1), qa(2), "", "{oops", as_messages(1), qa(3), {"text": "?"}, qa(2)]
    )
    second = write_jsonl(tmp_path / "second.jsonl", [as_messages(3), qa(4), [1], qa(4)])
    report = ingest_sources(con, [first, second], batch_rows=2)

    assert source_counts(report) == {"first": (7, 3, 2, 2), "second": (4, 1, 1, 2)}
    assert (report.n_new, report.n_total, report.n_read, report.n_rejected, report.n_duplicates) == (4, 4, 11, 3, 4)
    assert report.rejects_by_reason == {"malformed_json": 1, "not_object": 1, "unknown_schema": 1}
    assert report.sources[0].formats == {"alpaca": 4, "messages": 1}
    json.dumps(report.to_dict())  # usable as Dagster metadata

    ids = {i: example_id(canonicalize(qa(i))) for i in range(1, 5)}
    assert rows(con, "SELECT example_id, source, line_no FROM pool ORDER BY line_no, source") == [
        (ids[1], "first", 1),
        (ids[2], "first", 2),
        (ids[4], "second", 2),
        (ids[3], "first", 5),
    ]
    # Within a source (messages form of qa(1), repeated qa(2)) and across sources (qa(3)).
    assert rows(con, "SELECT source, line_no, example_id FROM pool_duplicates ORDER BY source, line_no") == [
        ("first", 4, ids[1]),
        ("first", 7, ids[2]),
        ("second", 1, ids[3]),
        ("second", 4, ids[4]),
    ]
    assert rows(con, "SELECT source, line_no, reason_code, raw FROM pool_rejects ORDER BY source, line_no") == [
        ("first", 3, "malformed_json", "{oops"),
        ("first", 6, "unknown_schema", '{"text": "?"}'),
        ("second", 3, "not_object", "[1]"),
    ]
    assert rows(con, "SELECT count(*) FROM pool_rejects WHERE reason = '' OR reason IS NULL") == [(0,)]
    stored = rows(
        con, "SELECT source, n_read, n_accepted + n_rejected + n_duplicates FROM pool_sources ORDER BY source"
    )
    assert stored == [("first", 7, 7), ("second", 4, 4)]


def test_messages_column_is_the_hashed_canonical_json(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    ingest_sources(con, [write_jsonl(tmp_path / "a.jsonl", [qa(1)])])
    ((eid, messages, n_turns, n_chars, fmt),) = rows(
        con, "SELECT example_id, messages, n_turns, n_chars, format FROM pool"
    )
    assert eid == hashlib.sha256(messages.encode()).hexdigest()[:32]
    assert json.loads(messages) == canonicalize(qa(1))
    assert (n_turns, n_chars, fmt) == (2, len("Question 1?") + len("Answer 1."), "alpaca")


def test_refresh_adds_rows_and_skips_unchanged(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    first = write_jsonl(tmp_path / "first.jsonl", [qa(1), qa(2)])
    v1 = ingest_sources(con, [first])
    assert (v1.seq, v1.parent_version, v1.n_new) == (1, None, 2)

    second = write_jsonl(tmp_path / "second.jsonl", [qa(2), qa(3), "bad"])
    v2 = ingest_sources(con, [first, second])
    assert [s.status for s in v2.sources] == ["unchanged", "ingested"]
    assert source_counts(v2)["second"] == (3, 1, 1, 1)  # qa(2) duplicates the pool
    assert (v2.seq, v2.parent_version, v2.n_new, v2.n_total) == (2, v1.pool_version, 1, 3)
    assert rows(con, "SELECT source, line_no, pool_version FROM pool_duplicates") == [("second", 1, v2.pool_version)]

    ids = {i: example_id(canonicalize(qa(i))) for i in range(1, 5)}
    assert rows(
        con, "SELECT example_id, first_seen_version, first_seen_seq FROM pool ORDER BY first_seen_seq, line_no"
    ) == [(ids[1], v1.pool_version, 1), (ids[2], v1.pool_version, 1), (ids[3], v2.pool_version, 2)]
    assert ids_at(con, v1.pool_version) == sorted([ids[1], ids[2]])
    assert ids_at(con, v2.pool_version) == sorted(ids[i] for i in (1, 2, 3))
    assert sorted(set(ids_at(con, v2.pool_version)) - set(ids_at(con, v1.pool_version))) == [ids[3]]
    assert sorted(pool_ids(con)) == ids_at(con, v2.pool_version)  # nothing added since v2
    assert [pool_version_size(con, v.pool_version) for v in (v1, v2)] == [2, 3]
    with pytest.raises(ValueError, match="unknown pool version"):
        pool_version_size(con, "nope")

    # A changed source is read again in full; what it already contributed is now duplicates.
    write_jsonl(tmp_path / "first.jsonl", [qa(1), qa(2), qa(4)])
    v3 = ingest_sources(con, [first, second])
    assert [s.status for s in v3.sources] == ["ingested", "unchanged"]
    assert source_counts(v3)["first"] == (3, 1, 0, 2)
    assert (v3.seq, v3.n_new, v3.n_total) == (3, 1, 4)
    assert rows(con, "SELECT pool_version, seq, n_examples, n_new, parent_version FROM pool_versions ORDER BY seq") == [
        (v1.pool_version, 1, 2, 2, None),
        (v2.pool_version, 2, 3, 1, v1.pool_version),
        (v3.pool_version, 3, 4, 1, v2.pool_version),
    ]
    assert latest_pool_version(con) == (v3.pool_version, 3)


def test_ingest_without_new_ids_keeps_the_version(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    v1 = ingest_sources(con, [write_jsonl(tmp_path / "a.jsonl", [qa(1)])])
    again = ingest_sources(con, [write_jsonl(tmp_path / "b.jsonl", [as_messages(1), "nope"])])
    assert (again.pool_version, again.seq, again.n_new, again.n_total) == (v1.pool_version, 1, 0, 1)
    assert rows(con, "SELECT count(*) FROM pool_versions") == [(1,)]
    assert rows(con, "SELECT pool_version FROM pool_rejects") == [(v1.pool_version,)]


def test_pool_version_is_the_hash_of_sorted_ids_whatever_the_order(tmp_path: Path) -> None:
    records = [qa(i) for i in range(10)]
    one = duckdb.connect(str(tmp_path / "one.duckdb"))
    report_one = ingest_sources(one, [write_jsonl(tmp_path / "all.jsonl", records)])
    two = duckdb.connect(str(tmp_path / "two.duckdb"))
    ingest_sources(two, [write_jsonl(tmp_path / "tail.jsonl", records[5:][::-1])])
    report_two = ingest_sources(two, [write_jsonl(tmp_path / "head.jsonl", [as_messages(i) for i in range(5)])])
    expected = pool_version_of_ids(example_id(canonicalize(r)) for r in records)
    assert report_one.pool_version == report_two.pool_version == expected
    assert (
        expected
        == hashlib.sha256(
            "".join(f"{i}\n" for i in sorted(example_id(canonicalize(r)) for r in records)).encode()
        ).hexdigest()
    )
    one.close()
    two.close()


def test_failed_ingest_leaves_nothing_behind(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    v1 = ingest_sources(con, [write_jsonl(tmp_path / "a.jsonl", [qa(1)])])
    good = write_jsonl(tmp_path / "b.jsonl", [qa(2), "bad"])
    with pytest.raises(FileNotFoundError):
        ingest_sources(con, [good, SourceSpec(tmp_path / "missing.jsonl")])
    for table, count in [
        ("pool", 1),
        ("pool_rejects", 0),
        ("pool_duplicates", 0),
        ("pool_versions", 1),
        ("pool_sources", 1),
    ]:
        assert rows(con, f"SELECT count(*) FROM {table}") == [(count,)], table
    assert latest_pool_version(con) == (v1.pool_version, 1)
    # The connection is usable again and the good source was not marked as ingested.
    assert ingest_sources(con, [good]).n_new == 1


def test_generator_failure_mid_source_rolls_back(con: duckdb.DuckDBPyConnection) -> None:
    def records() -> Any:
        yield qa(1)
        raise RuntimeError("generator broke")

    with pytest.raises(RuntimeError, match="generator broke"):
        ingest_sources(con, [RecordsSource("gen", records(), fingerprint="v1")], batch_rows=1)
    assert rows(con, "SELECT count(*) FROM pool") == [(0,)]


def test_records_source_skipped_when_fingerprint_unchanged(con: duckdb.DuckDBPyConnection) -> None:
    first = ingest_sources(con, [RecordsSource("gen", [qa(1), qa(2)], fingerprint="size=2")])
    again = ingest_sources(con, [RecordsSource("gen", [qa(1), qa(2)], fingerprint="size=2")])
    grown = ingest_sources(con, [RecordsSource("gen", [qa(1), qa(2), qa(3)], fingerprint="size=3")])
    assert (first.n_new, again.sources[0].status, grown.n_new) == (2, "unchanged", 1)
    assert rows(con, "SELECT file_type, path FROM pool_sources LIMIT 1") == [("records", "")]


def test_empty_first_ingest_records_the_empty_version(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    report = ingest_sources(con, [write_jsonl(tmp_path / "junk.jsonl", ["{", "[]"])])
    assert (report.pool_version, report.seq, report.n_total) == (hashlib.sha256(b"").hexdigest(), 1, 0)
    assert source_counts(report) == {"junk": (2, 0, 2, 0)}


def test_source_names_must_be_unique(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    spec = write_jsonl(tmp_path / "a.jsonl", [qa(1)])
    with pytest.raises(ValueError, match="unique"):
        ingest_sources(con, [spec, SourceSpec(tmp_path / "b" / "a.jsonl")])
    # The same file under another name is allowed: everything in it is a duplicate.
    report = ingest_sources(con, [spec, SourceSpec(spec.path, name="copy")])
    assert source_counts(report)["copy"] == (1, 0, 0, 1)


def test_parquet_and_hf_sources_ingest(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    # tests/ is not a package: load the layout writer from its file.
    spec = importlib.util.spec_from_file_location("_ingest_tests", Path(__file__).with_name("test_ingest.py"))
    ingest_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ingest_tests)
    write_hf_dataset = ingest_tests.write_hf_dataset

    pq.write_table(pa.Table.from_pylist([qa(1), qa(2)]), tmp_path / "p.parquet")
    write_hf_dataset(tmp_path / "hf", [{"messages": canonicalize(qa(2))}, {"messages": canonicalize(qa(3))}], shards=2)
    report = ingest_sources(con, [SourceSpec(tmp_path / "p.parquet"), SourceSpec(tmp_path / "hf")])
    assert source_counts(report) == {"p": (2, 2, 0, 0), "hf": (2, 1, 0, 1)}
    assert [s.file_type for s in report.sources] == ["parquet", "hf_dataset"]
    assert ingest_sources(con, [SourceSpec(tmp_path / "hf")]).sources[0].status == "unchanged"


# ---------------------------------------------------------------- edited records (superseded rows)


def current(con: duckdb.DuckDBPyConnection) -> set[str]:
    return {row[0] for row in rows(con, "SELECT example_id FROM pool WHERE superseded_at_seq IS NULL")}


def test_edited_record_supersedes_its_old_version(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    ids = {i: example_id(canonicalize(qa(i))) for i in range(1, 10)}
    source = write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(2), qa(3)])
    v1 = ingest_sources(con, [source])
    write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(9), qa(3)])  # line 2 edited
    v2 = ingest_sources(con, [source])

    assert (v2.n_new, v2.n_superseded, v2.n_total, v2.n_superseded_total) == (1, 1, 3, 1)
    assert source_counts(v2)["s"] == (3, 1, 0, 2) and v2.sources[0].n_superseded == 1  # accounting unchanged
    assert con.execute(
        "SELECT superseded_by, superseded_at_version, superseded_at_seq FROM pool WHERE example_id = ?", [ids[2]]
    ).fetchall() == [(ids[9], v2.pool_version, 2)]
    assert current(con) == {ids[1], ids[3], ids[9]}
    assert sorted(pool_ids(con)) == sorted(current(con))  # the readers leave superseded rows out
    # The version hashes the current ids only, and records how many rows are superseded.
    assert v2.pool_version == pool_version_of_ids([ids[1], ids[3], ids[9]])
    assert rows(con, "SELECT n_examples, n_superseded FROM pool_versions ORDER BY seq") == [(3, 0), (3, 1)]
    assert ids_at(con, v1.pool_version) == sorted([ids[1], ids[2], ids[3]])
    assert ids_at(con, v2.pool_version) == sorted([ids[1], ids[3], ids[9]])
    assert rows(con, "SELECT n_superseded FROM pool_sources ORDER BY ingested_at") == [(0,), (1,)]


def test_inserted_lines_shift_rows_without_superseding(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(2), qa(3)])
    v1 = ingest_sources(con, [source])
    write_jsonl(tmp_path / "s.jsonl", [qa(7), qa(1), "bad", qa(2), qa(3)])  # every old line moved
    v2 = ingest_sources(con, [source])
    assert (v2.n_new, v2.n_superseded, v2.n_total) == (1, 0, 4)
    assert source_counts(v2)["s"] == (5, 1, 1, 3)
    assert v2.parent_version == v1.pool_version and len(current(con)) == 4


def test_removed_or_broken_lines_supersede_and_reverts_revive(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    ids = {i: example_id(canonicalize(qa(i))) for i in range(1, 10)}
    source = write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(2), qa(3)])
    v1 = ingest_sources(con, [source])
    write_jsonl(tmp_path / "s.jsonl", [qa(1), "{broken"])  # line 2 now rejected, line 3 gone
    v2 = ingest_sources(con, [source])
    assert (v2.n_superseded, v2.n_total) == (2, 1) and current(con) == {ids[1]}
    assert rows(con, f"SELECT superseded_by FROM pool WHERE example_id IN ('{ids[2]}', '{ids[3]}')") == [
        (None,),
        (None,),
    ]

    # The original bytes again: not skipped as unchanged (v1's fingerprint is not the latest).
    write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(2), qa(3)])
    v3 = ingest_sources(con, [source])
    assert v3.sources[0].status == "ingested"
    assert (v3.n_new, v3.n_revived, v3.n_superseded_total, v3.n_total) == (0, 2, 0, 3)
    assert current(con) == {ids[1], ids[2], ids[3]}
    # Same ids as v1, yet a new version: version ids are unique, the seq salts the hash.
    assert v3.pool_version not in (v1.pool_version, v2.pool_version) and v3.seq == 3
    assert ids_at(con, v2.pool_version) == [ids[1]]
    assert ids_at(con, v3.pool_version) == sorted(ids[i] for i in (1, 2, 3))
    assert rows(con, "SELECT superseded_seq, revived_seq FROM pool_supersessions ORDER BY example_id") == [(2, 3)] * 2


def test_row_another_source_still_holds_is_not_superseded(con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    ids = {i: example_id(canonicalize(qa(i))) for i in range(1, 10)}
    first = write_jsonl(tmp_path / "first.jsonl", [qa(1), qa(2)])
    second = write_jsonl(tmp_path / "second.jsonl", [qa(2), qa(5)])  # qa(2): a duplicate of first
    ingest_sources(con, [first, second])
    write_jsonl(tmp_path / "first.jsonl", [qa(1), qa(8)])
    report = ingest_sources(con, [first, second])
    assert [s.status for s in report.sources] == ["ingested", "unchanged"]
    assert report.n_superseded == 0 and ids[2] in current(con)
    # Once the other source drops it too, it goes.
    write_jsonl(tmp_path / "second.jsonl", [qa(5)])
    assert ingest_sources(con, [first, second]).n_superseded == 1 and ids[2] not in current(con)


def test_old_pool_tables_are_migrated(tmp_path: Path) -> None:
    old = duckdb.connect(str(tmp_path / "old.duckdb"))
    old.execute("""CREATE TABLE pool (example_id VARCHAR PRIMARY KEY, source VARCHAR NOT NULL, line_no BIGINT NOT NULL,
        messages JSON NOT NULL, n_turns INTEGER NOT NULL, n_chars BIGINT NOT NULL, format VARCHAR NOT NULL,
        first_seen_version VARCHAR NOT NULL, first_seen_seq BIGINT NOT NULL)""")
    old.execute("""CREATE TABLE pool_versions (pool_version VARCHAR PRIMARY KEY, seq BIGINT NOT NULL UNIQUE,
        created_at TIMESTAMPTZ NOT NULL, n_examples BIGINT NOT NULL, n_new BIGINT NOT NULL, parent_version VARCHAR,
        ingest_id VARCHAR NOT NULL)""")
    old.execute("""CREATE TABLE pool_sources (source VARCHAR NOT NULL, path VARCHAR NOT NULL, format VARCHAR NOT NULL,
        file_type VARCHAR NOT NULL, fingerprint VARCHAR NOT NULL, pool_version VARCHAR NOT NULL, n_read BIGINT NOT NULL,
        n_accepted BIGINT NOT NULL, n_rejected BIGINT NOT NULL, n_duplicates BIGINT NOT NULL,
        ingest_id VARCHAR NOT NULL, ingested_at TIMESTAMPTZ NOT NULL)""")
    source = write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(2)])
    ingest_sources(old, [source])
    write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(3)])
    report = ingest_sources(old, [source])
    assert (report.n_superseded, report.n_total) == (1, 2)
    assert {"superseded_by", "superseded_at_version", "superseded_at_seq"} <= {r[0] for r in rows(old, "DESCRIBE pool")}
    assert rows(old, "SELECT n_superseded FROM pool_versions ORDER BY seq") == [(0,), (1,)]
    old.close()


def test_demo_summary_counts_superseded_rows_apart(tmp_path: Path, capsys) -> None:
    from orchestration.summary import print_summary

    with duckdb.connect(str(tmp_path / "lineage.duckdb")) as connection:
        source = write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(2), qa(3)])
        ingest_sources(connection, [source])
        write_jsonl(tmp_path / "s.jsonl", [qa(1), qa(9), qa(3)])  # line 2 edited
        ingest_sources(connection, [source])
    print_summary(str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    header = lines.index("== pool by source ==")
    assert lines[header + 1].split() == ["source", "examples", "superseded"]
    assert lines[header + 2].split() == ["s", "3", "1"]
