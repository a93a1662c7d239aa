"""Schedules and sensors. Both start stopped: a user turns them on in the UI."""

from pathlib import Path

import dagster as dg

from orchestration.jobs import demo_job, ingest_job
from orchestration.partitions import DEFAULT_MODEL
from resources.settings import default_home

INCOMING_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".jsonl.gz", ".json.gz")


@dg.schedule(job=demo_job, cron_schedule="0 3 * * 0", default_status=dg.DefaultScheduleStatus.STOPPED)
def weekly_refresh(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    """Weekly rerun of the whole graph for the default model; unchanged inputs are reused."""
    return dg.RunRequest(partition_key=DEFAULT_MODEL, run_key=None)


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
all_sensors = [incoming_pool_files]
