"""Fault scenarios: nothing escapes the root, nothing is silently dropped, nothing hangs.

A hostile user plants symlinks at every depth of every store (DuckDB's write-ahead log
included), gives two files the same default source name, points a source at a FIFO, a
device or a /proc file, or slips a lone surrogate into one record. Each scenario shows the
pipeline refusing with the file named and the fix, or rejecting just that record, and that
nothing was written outside the storage root.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import dagster as dg
import duckdb
import pytest

from assets import ASSET_MODULES
from assets.partitions import DEFAULT_MODEL, model_shard_keys
from assets.pool import raw_pool
from resources import build_resources
from resources.lineage import LineageStore
from selection.common import db, files
from selection.data import pool_store
from selection.data.ingest import RecordsSource, SourceSpec
from tests.fakes import TinyModelStore, error_messages, materialize_error, user_error_text

pytestmark = pytest.mark.faults

OUTSIDE_MARKER = "outside the storage root"
DIM = 32


def _report(record_property, scenario: str, expected: str, observed: str) -> None:
    record_property("scenario", scenario)
    record_property("expected", expected)
    record_property("observed", user_error_text(observed, 160))


def _pool_file(path: Path, prefix: str, n: int = 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"prompt": f"{prefix} question {i}", "completion": f"answer {i}"}) + "\n" for i in range(n))
    )
    return path


def _sources_config(*sources: dict) -> dict:
    return {"ops": {"raw_pool": {"config": {"sources": list(sources)}}}}


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- DuckDB's files -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".wal", ".init.lock", ""])
def test_planted_duckdb_side_file_symlink_is_refused(tmp_path: Path, suffix: str, record_property) -> None:
    home = tmp_path / "home"
    home.mkdir()
    victim = tmp_path / "outside" / "victim.txt"
    victim.parent.mkdir()
    victim.write_text("precious")
    planted = home / f"lineage.duckdb{suffix}"
    planted.symlink_to(victim)
    resources = build_resources(home=str(home), env="ci")
    error = materialize_error(
        [raw_pool], resources, _sources_config({"path": str(_pool_file(tmp_path / "p.jsonl", "a"))})
    )
    _report(
        record_property,
        f"symlink planted at lineage.duckdb{suffix} pointing outside the root, then an ingest",
        "refused naming the file; the outside file untouched",
        error,
    )
    assert str(planted) in error and "symlink" in error and "Remove it" in error
    assert victim.read_text() == "precious"


def test_duckdb_side_folder_that_is_a_file_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / "lineage.duckdb.tmp").write_text("not a folder")
    error = materialize_error(
        [raw_pool],
        build_resources(home=str(home), env="ci"),
        _sources_config({"path": str(_pool_file(tmp_path / "p.jsonl", "a"))}),
    )
    assert "lineage.duckdb.tmp" in error and "not a regular folder" in error


def test_question_mark_in_storage_root_is_refused_with_the_fix(tmp_path: Path, record_property) -> None:
    home = tmp_path / "r.wal?1"
    error = materialize_error(
        [raw_pool],
        build_resources(home=str(home), env="ci"),
        _sources_config({"path": str(_pool_file(tmp_path / "p.jsonl", "a"))}),
    )
    _report(record_property, "storage root path holding '?'", "error naming the root, '?' and the fix", error)
    assert "contains '?'" in error and "INSTRUCT_SELECT_HOME" in error
    assert not home.exists() or not any(home.iterdir())


# --- Symlinks below checked folders ---------------------------------------------------------


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_write_primitives_refuse_a_symlink_at_every_depth(tmp_path: Path, depth: int) -> None:
    root = files.register_root(tmp_path / "root")
    outside = tmp_path / "outside"
    outside.mkdir()
    parts = ["a", "b", "c"]
    chain = root.joinpath(*parts[: depth - 1])
    chain.mkdir(parents=True, exist_ok=True)
    (chain / parts[depth - 1]).symlink_to(outside, target_is_directory=True)
    target = root.joinpath(*parts)
    writes = {
        "make_dirs": lambda: files.make_dirs(target / "d"),
        "write_text": lambda: files.write_text(target / "f.txt", "x"),
        "atomic_directory": lambda: files.atomic_directory(target / "d").__enter__(),
        "confined": lambda: files.confined(target / "f.bin"),
    }
    for name, write in writes.items():
        with pytest.raises(files.OutsideRootError, match=OUTSIDE_MARKER):
            write()
        assert list(outside.rglob("*")) == [], name
    # A symlink that stays inside the root is allowed.
    inner = root / "inner"
    inner.mkdir()
    (root / "link").symlink_to(inner, target_is_directory=True)
    files.write_text(root / "link" / "ok.txt", "fine")
    assert (inner / "ok.txt").read_text() == "fine"


def _owner(relative: Path) -> tuple[str, str | None]:
    """The asset (and partition) that writes the folder ``relative`` of the tiny graph's layout."""
    parts = relative.parts
    by_top = {
        "scores": "influence_scores",
        "embeddings": "embeddings",
        "evaluation": "evaluation",
        "rds": "rds_selection",
        "reports": "comparison_report",
    }
    if parts[0] in by_top:
        return by_top[parts[0]], None if parts[0] == "embeddings" else DEFAULT_MODEL
    if parts[0] == "selections":
        # selections/<model>/<method>; the model folder is shared, LESS writes through it first.
        return (f"{parts[2]}_selection" if len(parts) > 2 else "less_selection"), DEFAULT_MODEL
    if parts[0] == "models":
        # models/<model>/{warmup,finetune,kmq_feedback}/...; the model folder is the warmup's first.
        stage = parts[2] if len(parts) > 2 else "warmup"
        return {
            "warmup": "warmup_checkpoints",
            "finetune": "finetuned_checkpoints",
            "kmq_feedback": "kmq_iterative_selection",
        }[stage], DEFAULT_MODEL
    # gradients/<model store>/<warmup run>-epoch_<n>/{target,train/<recipe>/<shard>}: the folders
    # above `train` are shared, and target_gradients writes through them first.
    if parts[0] == "gradients" and (len(parts) < 4 or parts[3] == "target"):
        return "target_gradients", DEFAULT_MODEL
    if parts[0] == "gradients":
        shards = model_shard_keys(DEFAULT_MODEL)
        return "train_gradients", next((key for key in shards if parts[-1] in key), shards[0])
    raise AssertionError(f"no owner for {relative}")


def _first_of_siblings(home: Path) -> list[Path]:
    """Every store folder the run made, keeping one child per parent (every depth of every store,
    without one case per shard, epoch or finetuned method)."""
    folders = sorted(p for p in home.rglob("*") if p.is_dir() and not p.name.startswith(files.TEMP_PREFIX))
    seen_parents: set[Path] = set()
    kept = []
    for folder in folders:
        if folder.parent in seen_parents:
            continue
        seen_parents.add(folder.parent)
        kept.append(folder.relative_to(home))
    return kept


def test_symlink_planted_at_each_depth_of_each_store_never_receives_a_write(tmp_path: Path, record_property) -> None:
    """The tiny graph once, then each store folder it made (warmup run, epoch, adapter, gradient
    store, shard, score, embedding, RDS, finetune, kMQ feedback, evaluation, report and export
    folders, at every depth) swapped for a symlink to an empty folder outside the root, and its
    asset materialized again: refused, or the planted link removed without being followed; never a
    write outside."""
    from tests.test_pipeline_tiny import _pool_file as tiny_pool
    from tests.test_pipeline_tiny import _targets_file, materialize_refresh

    grad = {"dims": [DIM], "mode": "fast", "seed": 0, "shard_size": 8}
    ops = {
        "raw_pool": {"config": {"sources": [{"path": str(tiny_pool(tmp_path / "pool.jsonl", 30))}]}},
        "target_tasks": {"config": {"files": [{"path": str(_targets_file(tmp_path / "targets.jsonl"))}], "n_val": 2}},
        "warmup_checkpoints": {"config": {"fraction": 0.4, "epochs": 2, "batch_size": 4, "learning_rate": 1e-3}},
        "train_gradients": {"config": grad},
        "target_gradients": {"config": grad},
        "influence_scores": {"config": {"dim": DIM, "mode": "fast", "seed": 0}},
        **{
            f"{m}_selection": {"config": {"budget": 5}} for m in ("less", "bids", "round_robin", "random", "kmq", "rds")
        },
        "clusters": {"config": {"k_candidates": [2, 3]}},
        "finetuned_checkpoints": {"config": {"epochs": 1, "batch_size": 4}},
        "evaluation": {"config": {"max_test_per_task": 2}},
        "kmq_iterative_selection": {"config": {"budget": 6, "n_rounds": 2, "max_new_tokens": 4}},
    }
    home = tmp_path / "home"
    resources = {
        **build_resources(home=str(home), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    assets = list(dg.load_assets_from_modules(ASSET_MODULES))
    with dg.instance_for_test() as instance:
        materialize_refresh(assets, resources, {"ops": ops}, instance)

        def materialize(asset: str, key: str | None) -> str:
            try:
                result = dg.materialize(
                    assets,
                    selection=dg.AssetSelection.assets(asset),
                    resources=resources,
                    run_config={"ops": {asset: ops[asset]} if asset in ops else {}},
                    partition_key=key,
                    instance=instance,
                )
            except Exception as error:  # noqa: BLE001 - the refusal is the expected outcome
                return " | ".join(error_messages(error))
            assert result.success
            return ""

        folders = _first_of_siblings(home)
        tops = {folder.parts[0] for folder in folders}
        assert {"models", "gradients", "scores", "selections", "embeddings", "rds", "evaluation", "reports"} <= tops
        assert len(folders) >= 25, folders
        outside = tmp_path / "outside"
        refused, rebuilt, untouched = [], [], []
        for relative in folders:
            folder = home / relative
            backup = tmp_path / "backup"
            shutil.move(folder, backup)
            outside.mkdir()
            folder.symlink_to(outside, target_is_directory=True)
            asset, key = _owner(relative)
            try:
                error = materialize(asset, key)
                assert list(outside.rglob("*")) == [], f"{asset} wrote outside the root through {relative}"
                if error:
                    assert OUTSIDE_MARKER in error, f"{asset} failed otherwise at {relative}: {error}"
                    refused.append(str(relative))
                elif folder.is_symlink():
                    # Also safe: the run did not need the folder (a cached result above it) and wrote nothing.
                    untouched.append(str(relative))
                else:
                    # Also safe: the writer found the folder damaged or absent and rebuilt it in place,
                    # removing the symlink without following it.
                    rebuilt.append(str(relative))
            finally:
                if folder.is_symlink():
                    folder.unlink()
                else:
                    shutil.rmtree(folder)
                shutil.move(backup, folder)
                shutil.rmtree(outside)
    assert len(refused) >= len(folders) // 2, (rebuilt, untouched)
    _report(
        record_property,
        f"symlink to an outside folder planted at each of {len(folders)} store folders (every depth of every "
        "store), then the owning asset rematerialized",
        "every write refused naming the symlink, or the link removed unfollowed; nothing written outside",
        f"{len(refused)} refused, {len(rebuilt)} rebuilt in place without following the link, {len(untouched)} not "
        "needed by the rerun; nothing outside",
    )


# --- Source names, special files, slow sources ----------------------------------------------


def test_two_files_with_the_same_default_name_are_refused_not_merged(tmp_path: Path, record_property) -> None:
    resources = build_resources(home=str(tmp_path / "home"), env="ci")
    first = _pool_file(tmp_path / "a" / "data.jsonl", "first")
    second = _pool_file(tmp_path / "b" / "data.jsonl", "second")
    dg.materialize([raw_pool], resources=resources, run_config=_sources_config({"path": str(first)}))
    error = materialize_error([raw_pool], resources, _sources_config({"path": str(second)}))
    _report(
        record_property,
        "a/data.jsonl then b/data.jsonl, both without `name`",
        "the second refused naming both paths and the fix; all 20 rows of the first stay current",
        error,
    )
    assert str(first.resolve()) in error and str(second.resolve()) in error
    assert "`name`" in error and "replaces: true" in error
    with resources["lineage"].connect() as con:
        assert con.execute("SELECT count(*) FROM pool WHERE superseded_at_seq IS NULL").fetchone() == (20,)
    # Given its own name, the second file adds its 20 rows; nothing is superseded.
    dg.materialize([raw_pool], resources=resources, run_config=_sources_config({"path": str(second), "name": "b"}))
    with resources["lineage"].connect() as con:
        assert con.execute("SELECT count(*) FROM pool WHERE superseded_at_seq IS NULL").fetchone() == (40,)


def test_replaces_flag_moves_a_source_to_a_new_path(tmp_path: Path) -> None:
    resources = build_resources(home=str(tmp_path / "home"), env="ci")
    old = _pool_file(tmp_path / "old" / "data.jsonl", "q", n=4)
    new = tmp_path / "new" / "data.jsonl"
    new.parent.mkdir()
    new.write_text("".join(old.read_text().splitlines(keepends=True)[:3]))  # one record removed
    dg.materialize([raw_pool], resources=resources, run_config=_sources_config({"path": str(old)}))
    result = dg.materialize(
        [raw_pool], resources=resources, run_config=_sources_config({"path": str(new), "replaces": True})
    )
    metadata = result.asset_materializations_for_node("raw_pool")[0].metadata
    assert metadata["n_superseded"].value == 1
    assert str(old.resolve()) in metadata["sources"].value


SPECIAL_SOURCES = {
    "fifo": None,  # made per test
    "/dev/zero": "/dev/zero",
    "/dev/urandom": "/dev/urandom",
    "/proc/self/mem": "/proc/self/mem",
}


@pytest.mark.parametrize("kind", list(SPECIAL_SOURCES))
def test_special_file_as_source_is_refused_at_once_without_a_lock(tmp_path: Path, kind: str, record_property) -> None:
    # Named like a pool file, as a user's typo or a planted link would be.
    path = str(tmp_path / "pool.jsonl")
    if SPECIAL_SOURCES[kind] is None:
        os.mkfifo(path)
    elif Path(SPECIAL_SOURCES[kind]).exists():
        os.symlink(SPECIAL_SOURCES[kind], path)
    else:
        pytest.skip(f"{SPECIAL_SOURCES[kind]} does not exist here")
    resources = build_resources(home=str(tmp_path / "home"), env="ci")
    outcome: dict[str, str] = {}
    worker = threading.Thread(
        target=lambda: outcome.update(error=materialize_error([raw_pool], resources, _sources_config({"path": path}))),
        daemon=True,
    )
    started = time.monotonic()
    worker.start()
    worker.join(timeout=60)
    if worker.is_alive() and kind == "fifo":
        with open(path, "w"):  # unblock the reader so the test process can end
            pass
    assert not worker.is_alive(), f"ingesting {path} hung"
    elapsed = time.monotonic() - started
    error = outcome["error"]
    _report(record_property, f"{kind} as a pool source", "refused at once naming the file and the fix", error)
    assert path in error and ("regular file" in error or "pseudo-file" in error), error
    assert elapsed < 30
    # The refusal came before any lock: another process opens the database for writing at once.
    db_path = resources["lineage"].db_path
    if Path(db_path).exists():
        with duckdb.connect(db_path) as con:
            con.execute("SELECT 1")


def test_slow_source_does_not_hold_the_database_lock_while_read(tmp_path: Path, record_property) -> None:
    """While the ingest reads its source, another process writes to the same DuckDB file."""
    store = LineageStore(db_path=str(tmp_path / "home" / "lineage.duckdb"))
    with store.connect() as con:
        pool_store.ensure_pool_tables(con)
    probe = (
        "import duckdb, sys; con = duckdb.connect(sys.argv[1]); "
        "con.execute('CREATE TABLE IF NOT EXISTS probe (x INT)'); con.execute('INSERT INTO probe VALUES (1)')"
    )
    seen: list[int] = []

    def records():
        for i in range(6):
            if i == 3:  # mid-read: another process writes to the database
                completed = subprocess.run(
                    [sys.executable, "-c", probe, store.db_path], capture_output=True, text=True, timeout=60
                )
                seen.append(completed.returncode)
                assert completed.returncode == 0, completed.stderr
            yield {"prompt": f"slow {i}", "completion": "ok"}

    report = pool_store.ingest_with(store.connect, [RecordsSource("slow", records(), "sha256:slow")])
    _report(
        record_property,
        "another process writes to the database while an ingest reads a slow source",
        "the other write succeeds at once; the ingest commits afterwards",
        f"other process exit {seen}, ingest accepted {report.n_new}",
    )
    assert seen == [0] and report.n_new == 6


def test_lone_surrogate_is_a_reject_and_the_rest_is_ingested(tmp_path: Path, record_property) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "fine one", "completion": "ok"}\n'
        '{"prompt": "broken \\ud800 text", "completion": "ok"}\n'
        '{"prompt": "fine two", "completion": "ok"}\n'
    )
    clean = _pool_file(tmp_path / "clean.jsonl", "clean", n=5)
    resources = build_resources(home=str(tmp_path / "home"), env="ci")
    result = dg.materialize(
        [raw_pool], resources=resources, run_config=_sources_config({"path": str(bad)}, {"path": str(clean)})
    )
    with resources["lineage"].connect() as con:
        rejects = con.execute("SELECT source, line_no, reason, raw FROM pool_rejects").fetchall()
        n_pool = con.execute("SELECT count(*) FROM pool").fetchone()[0]
    _report(
        record_property,
        'one record with a lone surrogate ("\\ud800") beside a clean source',
        "that record a reject naming the field; 2 + 5 rows ingested",
        f"success={result.success}, pool {n_pool}, rejects {[(r[0], r[1], r[2][:60]) for r in rejects]}",
    )
    assert n_pool == 7
    assert len(rejects) == 1 and rejects[0][:2] == ("bad", 2)
    assert rejects[0][2].startswith("invalid_utf8:") and "surrogate" in rejects[0][2]
    assert "\\ud800" in rejects[0][3]


def test_records_source_with_surrogate_in_parquet_like_values_is_rejected(tmp_path: Path) -> None:
    store = LineageStore(db_path=str(tmp_path / "home" / "lineage.duckdb"))
    records = [{"prompt": "ok", "completion": "fine"}, {"prompt": "x\udcff", "completion": "y"}]
    report = pool_store.ingest_with(store.connect, [RecordsSource("mem", records, "sha256:mem")])
    assert (report.n_new, report.n_rejected) == (1, 1)


# --- Errors that hide their cause -----------------------------------------------------------


def test_failed_rollback_never_hides_the_original_error(tmp_path: Path, record_property) -> None:
    """DuckDB aborts the transaction itself on a fatal write error (a full disk); the rollback then
    fails with "no transaction is active", which used to replace the real cause."""
    con = duckdb.connect(str(tmp_path / "x.duckdb"))
    with pytest.raises(OSError, match="File too large") as caught, db.transaction(con):
        con.execute("CREATE TABLE t (x INT)")
        con.rollback()  # what DuckDB's own abort leaves behind
        raise OSError(27, "File too large")
    notes = " ".join(getattr(caught.value, "__notes__", []))
    _report(
        record_property,
        "a write fails and DuckDB has already aborted the transaction (disk full)",
        "the original error surfaces, the failed rollback attached as a note",
        f"{caught.value} ({notes})",
    )
    assert "rollback" in notes and "no transaction is active" in notes


def test_unreadable_source_error_names_the_file(tmp_path: Path, monkeypatch) -> None:
    source = _pool_file(tmp_path / "p.jsonl", "a")
    real_open = open

    def failing_open(file, mode="r", *args, **kwargs):
        if str(file) == str(source) and "b" in mode:
            raise OSError(5, "Input/output error")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", failing_open)
    store = LineageStore(db_path=str(tmp_path / "home" / "lineage.duckdb"))
    with pytest.raises(ValueError, match=str(source)) as caught:
        pool_store.ingest_with(store.connect, [SourceSpec(source)])
    assert "Input/output error" in str(caught.value)
