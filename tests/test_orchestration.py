"""The code location loads, the graph has the contract's asset keys, and the sensor reacts to new files."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from orchestration.definitions import defs
from orchestration.partitions import (
    DEFAULT_MODEL,
    MODEL_DIMENSION,
    model_partitions,
    model_shard_keys,
    model_shard_partitions,
)
from orchestration.schedules import gradient_shards_after_prepare, incoming_pool_files, select_after_gradient_shards

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


@dg.op
def _noop() -> None:
    pass


@dg.job
def _finished_job() -> None:
    _noop()


def _success_context(instance: dg.DagsterInstance, sensor_name: str, tags: dict[str, str]):
    run_id = _finished_job.execute_in_process(instance=instance, tags=tags).run_id
    (event,) = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)
    return dg.build_run_status_sensor_context(
        sensor_name=sensor_name, dagster_event=event.dagster_event, dagster_instance=instance,
        dagster_run=instance.get_run_by_id(run_id),
    )


def test_refresh_sensors_chain_prepare_shards_and_selection() -> None:
    shard_keys = [str(key) for key in model_shard_keys(DEFAULT_MODEL)]
    with dg.instance_for_test() as instance:
        context = _success_context(instance, "gradient_shards_after_prepare", {"dagster/partition": DEFAULT_MODEL})
        requests = gradient_shards_after_prepare(context)
        assert [r.partition_key for r in requests] == shard_keys and len({r.run_key for r in requests}) == len(shard_keys)

        done = _success_context(instance, "select_after_gradient_shards",
                                {f"dagster/partition/{MODEL_DIMENSION}": DEFAULT_MODEL})
        assert isinstance(select_after_gradient_shards(done), dg.SkipReason)  # no warmup yet
        instance.report_runless_asset_event(dg.AssetMaterialization("warmup_checkpoints", partition=DEFAULT_MODEL))
        for key in shard_keys[:-1]:
            instance.report_runless_asset_event(dg.AssetMaterialization("train_gradients", partition=key))
        assert isinstance(select_after_gradient_shards(done), dg.SkipReason)  # one shard missing
        instance.report_runless_asset_event(dg.AssetMaterialization("train_gradients", partition=shard_keys[-1]))
        request = select_after_gradient_shards(done)
        assert request.partition_key == DEFAULT_MODEL
        assert select_after_gradient_shards(done).run_key == request.run_key  # same shards: deduplicated
        # New warmup checkpoints make every shard stale again.
        instance.report_runless_asset_event(dg.AssetMaterialization("warmup_checkpoints", partition=DEFAULT_MODEL))
        assert isinstance(select_after_gradient_shards(done), dg.SkipReason)
