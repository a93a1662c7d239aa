"""The code location loads, the graph has the contract's asset keys, and the sensor reacts to new files
(the automation conditions: tests/test_automation.py)."""

from __future__ import annotations

import gzip
from pathlib import Path

import dagster as dg
import duckdb
import pyarrow as pa

from assets.partitions import model_partitions, model_shard_partitions
from orchestration.automation import incoming_pool_files
from orchestration.definitions import defs
from selection.data import pool_store
from selection.data.ingest import SourceSpec

# Asset keys that runs, schedules and the README refer to: renaming one breaks them.
STABLE_ASSETS = {
    "raw_pool",
    "target_tasks",
    "embeddings",
    "warmup_checkpoints",
    "train_gradients",
    "target_gradients",
    "influence_scores",
    "finetuned_checkpoints",
    "evaluation",
    "comparison_report",
}


def test_definitions_load_with_stable_assets() -> None:
    dg.Definitions.validate_loadable(defs)
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert keys >= STABLE_ASSETS
    assert {"less_selection", "bids_selection", "kmq_selection", "kmq_iterative_selection"} <= keys
    for job in ("prepare_job", "select_and_evaluate_job"):
        assert defs.resolve_job_def(job).partitions_def == model_partitions
    assert defs.resolve_job_def("train_gradients_job").partitions_def == model_shard_partitions


def test_incoming_sensor_requests_one_run_per_new_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("INSTRUCT_SELECT_HOME", str(tmp_path))
    context = dg.build_sensor_context()
    skipped = list(incoming_pool_files(context))
    assert isinstance(skipped[0], dg.SkipReason)
    (tmp_path / "incoming").mkdir()
    (tmp_path / "incoming" / "new.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "incoming" / "notes.txt").write_text("ignored")
    requests = list(incoming_pool_files(context))
    assert len(requests) == 1
    assert requests[0].run_config["ops"]["raw_pool"]["config"]["sources"][0]["path"].endswith("new.jsonl")


def test_incoming_sensor_sees_every_format_ingestion_accepts(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("INSTRUCT_SELECT_HOME", str(tmp_path))
    incoming = tmp_path / "incoming"
    incoming.mkdir()

    def arrow_file(path: Path, prompt: str) -> None:
        table = pa.Table.from_pylist([{"prompt": prompt, "completion": "an answer"}])
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)

    arrow_file(incoming / "rows.arrow", "q1")
    (incoming / "lines.ndjson.gz").write_bytes(gzip.compress(b'{"prompt": "q2", "completion": "a2"}\n'))
    dataset = incoming / "hf_dataset"  # what datasets' save_to_disk writes
    dataset.mkdir()
    arrow_file(dataset / "data-00000-of-00001.arrow", "q3")
    (dataset / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    (incoming / "notes.txt").write_text("ignored")
    (incoming / "plain_folder").mkdir()  # not written by save_to_disk: ignored too

    def requests() -> dict[str, str]:
        return {
            Path(r.run_config["ops"]["raw_pool"]["config"]["sources"][0]["path"]).name: r.run_key
            for r in incoming_pool_files(dg.build_sensor_context())
        }

    seen = requests()
    assert sorted(seen) == ["hf_dataset", "lines.ndjson.gz", "rows.arrow"]
    # ... and ingestion reads each of them: one example apiece.
    with duckdb.connect() as con:
        report = pool_store.ingest_sources(
            con, [SourceSpec(path=incoming / name) for name in sorted(seen)], staging_dir=tmp_path
        )
    assert [s.n_accepted for s in report.sources] == [1, 1, 1]
    # A rewritten file inside the dataset folder is requested again (a new run key); the others are not.
    arrow_file(dataset / "data-00000-of-00001.arrow", "q3, edited")
    again = requests()
    assert [name for name in again if again[name] != seen[name]] == ["hf_dataset"]
