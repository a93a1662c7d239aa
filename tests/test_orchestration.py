"""The code location loads, the graph has the contract's asset keys, and the sensor reacts to new files."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from orchestration.definitions import defs
from orchestration.partitions import model_partitions, model_shard_partitions
from orchestration.schedules import incoming_pool_files

CONTRACT_ASSETS = {
    "raw_pool", "target_tasks", "embeddings", "warmup_checkpoints", "train_gradients", "target_gradients",
    "influence_scores", "finetuned_checkpoints", "evaluation", "comparison_report",
}


def test_definitions_load_with_contract_assets() -> None:
    dg.Definitions.validate_loadable(defs)
    keys = {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert CONTRACT_ASSETS <= keys
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
