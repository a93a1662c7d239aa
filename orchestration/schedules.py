"""Schedules and sensors. All start stopped: a user turns them on in the UI.

A weekly refresh is `weekly_refresh` (prepare_job) -> `gradient_shards_after_prepare` (one
train_gradients_job run per shard after any run that materialized the model's warmup
checkpoints) -> `select_after_gradient_shards` (select_and_evaluate_job once every shard is
newer than the model's warmup checkpoints); turn the three on together.
"""

import hashlib
from pathlib import Path

import dagster as dg

from orchestration.jobs import ingest_job, prepare_job, select_and_evaluate_job, train_gradients_job
from orchestration.partitions import DEFAULT_MODEL, MODEL_DIMENSION, model_shard_keys, model_shard_partitions
from resources.settings import default_home

INCOMING_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".jsonl.gz", ".json.gz")


@dg.schedule(job=prepare_job, cron_schedule="0 3 * * 0", default_status=dg.DefaultScheduleStatus.STOPPED)
def weekly_refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Weekly refresh of the default model, step 1 (the sensors below run steps 2 and 3);
    unchanged inputs are reused."""
    return dg.RunRequest(partition_key=DEFAULT_MODEL, run_key=None)


def materialized_partitions(context: dg.RunStatusSensorContext, asset: str) -> list[str]:
    """Partitions of `asset` that the finished run materialized (whichever job or UI action launched it)."""
    records = context.instance.get_records_for_run(
        context.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION).records
    events = [record.event_log_entry.dagster_event for record in records]
    return sorted({event.partition for event in events if event.asset_key == dg.AssetKey(asset) and event.partition})


# No `monitored_jobs`: every run of this code location is seen, including asset materializations
# launched from the UI or `dagster asset materialize`; the body looks at what the run materialized.
@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS, request_job=train_gradients_job,
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def gradient_shards_after_prepare(context: dg.RunStatusSensorContext):
    """After a run that materialized a model's warmup checkpoints, one train_gradients_job run per shard."""
    models = materialized_partitions(context, "warmup_checkpoints")
    if not models:
        return dg.SkipReason(f"run {context.dagster_run.run_id} materialized no warmup checkpoints")
    return [dg.RunRequest(run_key=f"{context.dagster_run.run_id}:{key}", partition_key=key)
            for model in models for key in model_shard_keys(model)]


def latest_materialization_ids(instance: dg.DagsterInstance, asset: str, partitions: list[str]) -> list[int | None]:
    """Storage id of each partition's latest materialization (None where there is none)."""
    ids = []
    for partition in partitions:
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]), limit=1).records
        ids.append(records[0].storage_id if records else None)
    return ids


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS, request_job=select_and_evaluate_job,
    default_status=dg.DefaultSensorStatus.STOPPED,
)
def select_after_gradient_shards(context: dg.RunStatusSensorContext):
    """Once every shard of a model has train features newer than its warmup checkpoints, run
    select_and_evaluate_job for it (once per such set of shard materializations)."""
    shards = materialized_partitions(context, "train_gradients")
    models = sorted({model_shard_partitions.get_partition_key_from_str(key).keys_by_dimension[MODEL_DIMENSION]
                     for key in shards})
    if not models:
        return dg.SkipReason(f"run {context.dagster_run.run_id} materialized no train_gradients shard")
    requests, waiting = [], []
    for model in models:
        (warmup,) = latest_materialization_ids(context.instance, "warmup_checkpoints", [model])
        latest = latest_materialization_ids(context.instance, "train_gradients",
                                            [str(key) for key in model_shard_keys(model)])
        if warmup is None or any(shard is None or shard < warmup for shard in latest):
            waiting.append(model)
            continue
        run_key = hashlib.sha256(f"{model}:{latest}".encode()).hexdigest()[:16]
        requests.append(dg.RunRequest(run_key=run_key, partition_key=model))
    return requests or dg.SkipReason(f"not every shard of {waiting} has features newer than its warmup checkpoints")


def incoming_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(INCOMING_SUFFIXES))


@dg.sensor(job=ingest_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def incoming_pool_files(context: dg.SensorEvaluationContext):
    """Ingest any new or changed file dropped into `$INSTRUCT_SELECT_HOME/incoming/` into the pool."""
    folder = Path(default_home()) / "incoming"
    if not folder.is_dir():
        yield dg.SkipReason(f"{folder} does not exist; create it and drop pool files there")
        return
    for path in incoming_files(folder):
        stat = path.stat()
        yield dg.RunRequest(
            run_key=f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}",
            run_config={"ops": {"raw_pool": {"config": {"sources": [{"path": str(path)}]}}}},
        )


all_schedules = [weekly_refresh]
all_sensors = [incoming_pool_files, gradient_shards_after_prepare, select_after_gradient_shards]
