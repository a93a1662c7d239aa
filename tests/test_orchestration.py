"""The code location loads, the graph has the contract's asset keys, and the sensor reacts to new files."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from orchestration.definitions import defs
from orchestration.partitions import (
    DEFAULT_MODEL,
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


@dg.asset(name="warmup_checkpoints", partitions_def=model_partitions)
def _warmup_stand_in() -> None:
    pass


@dg.asset(name="train_gradients", partitions_def=model_shard_partitions)
def _shard_stand_in() -> None:
    pass


def _success_context(instance: dg.DagsterInstance, sensor_name: str, asset, partition: str):
    """A finished run that materialized `asset` for `partition`, as the sensor sees it."""
    run_id = dg.materialize([asset], partition_key=partition, instance=instance).run_id
    (event,) = instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)
    return dg.build_run_status_sensor_context(
        sensor_name=sensor_name, dagster_event=event.dagster_event, dagster_instance=instance,
        dagster_run=instance.get_run_by_id(run_id),
    )


def test_refresh_sensors_chain_prepare_shards_and_selection() -> None:
    shard_keys = [str(key) for key in model_shard_keys(DEFAULT_MODEL)]
    with dg.instance_for_test() as instance:
        shard_done = _success_context(instance, "select_after_gradient_shards", _shard_stand_in, shard_keys[0])
        assert isinstance(select_after_gradient_shards(shard_done), dg.SkipReason)  # no warmup yet
        assert isinstance(gradient_shards_after_prepare(shard_done), dg.SkipReason)  # materialized no warmup

        prepared = _success_context(instance, "gradient_shards_after_prepare", _warmup_stand_in, DEFAULT_MODEL)
        requests = gradient_shards_after_prepare(prepared)
        assert [r.partition_key for r in requests] == shard_keys and len({r.run_key for r in requests}) == len(shard_keys)
        assert isinstance(select_after_gradient_shards(prepared), dg.SkipReason)  # materialized no shard

        for key in shard_keys[:-1]:
            done = _success_context(instance, "select_after_gradient_shards", _shard_stand_in, key)
            skip = select_after_gradient_shards(done)
            assert isinstance(skip, dg.SkipReason) and DEFAULT_MODEL in skip.skip_message  # a shard is missing
        done = _success_context(instance, "select_after_gradient_shards", _shard_stand_in, shard_keys[-1])
        (request,) = select_after_gradient_shards(done)
        assert request.partition_key == DEFAULT_MODEL
        assert select_after_gradient_shards(done)[0].run_key == request.run_key  # same shards: deduplicated
        # New warmup checkpoints make every shard stale again.
        _success_context(instance, "gradient_shards_after_prepare", _warmup_stand_in, DEFAULT_MODEL)
        assert isinstance(select_after_gradient_shards(done), dg.SkipReason)


def test_demo_run_config_fits_the_jobs_and_passes_the_warmup_preflight() -> None:
    """`make demo`'s config must stay valid as asset configs change, and its warmup must not be
    refused for a zero-lr epoch at the demo's pool size (both would only show 10+ minutes in)."""
    from assets.warmup import WarmupConfig
    from orchestration.jobs import DEMO_RUN_CONFIG
    from selection import preflight

    for job_name, run_config in DEMO_RUN_CONFIG.items():
        result = dg.validate_run_config(defs.resolve_job_def(job_name), run_config)
        assert result is not None, job_name
    ops = DEMO_RUN_CONFIG["prepare_job"]["ops"]
    warmup = WarmupConfig(**ops.get("warmup_checkpoints", {}).get("config", {}))
    pool_size = ops["raw_pool"]["config"]["default_pool_size"]
    preflight.check_warmup_schedule(round(warmup.fraction * pool_size), warmup.batch_size, warmup.epochs,
                                    warmup.warmup_ratio, pool_size=pool_size)
    broken = {"ops": {"warmup_checkpoints": {"config": {"no_such_field": 1}}}}
    try:
        dg.validate_run_config(defs.resolve_job_def("prepare_job"), broken)
    except dg.DagsterInvalidConfigError:
        pass
    else:
        raise AssertionError("an unknown config field must be refused")
