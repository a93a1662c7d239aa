"""A killed run never blocks the next one, and never goes missing from lineage.

A run whose worker process dies (`kill -9`, OOM, a closed terminal) stays STARTED in
Dagster's run storage and keeps the concurrency slot its step claimed, so every later run
of a pool-limited asset (`accelerator`, limit 1) waits forever. One mechanism handles it:

- Every run records where its worker runs: the tag `instruct_select/run_worker` =
  `host:pid:start-time` (the start time tells a reused pid apart), set by `guarded_executor`
  when the run starts, and by `tag_worker_run` for in-process runs (`make demo`).
- `release_dead_runs` finds STARTED/STARTING runs whose worker is on this host and gone,
  writes a `failed` lineage row for each asset they had planned and not materialized, marks
  them failed and frees their pool slots. `guarded_executor` (the default executor of
  `orchestration.definitions`; `orchestration.distributed` wraps Celery's the same way)
  calls it at every run start, before any step claims a slot, so a rerun from the CLI starts
  at once; `make demo` calls it before its runs.
- In a deployment, the daemon's run monitoring (`run_monitoring` in `dagster_home/dagster.yaml`)
  asks `WorkerCheckingRunLauncher` whether each STARTED run's worker is alive, fails the run
  if not, and frees the slots of ended runs (`free_slots_after_run_end_seconds`); the
  `lineage_for_failed_runs` sensor then writes the failed lineage rows.
- A step that raises: `guarded_executor` writes `failed` rows for the assets the run did not
  materialize once the run's steps are done.

Runs whose worker is on another host, or that carry no worker tag, are never released by a
liveness guess: run monitoring with a launcher that can see them (Kubernetes, ECS) does.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus
from dagster._core.storage.dagster_run import DagsterRun

from resources.lineage import LineageRecord, LineageStore, lineage_row_count

WORKER_TAG = "instruct_select/run_worker"
IN_PROGRESS = [dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING]


def _start_ticks(pid: int) -> str | None:
    """The process start time in clock ticks since boot (Linux), which a reused pid does not share."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 22; the command name (field 2) may hold spaces and parentheses, so split after it.
    return stat.rsplit(")", 1)[1].split()[19]


def worker_identity(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}"


def worker_alive(identity: str | None) -> bool | None:
    """False: the worker was on this host and is gone; True: it runs; None: cannot tell."""
    if not identity or identity.count(":") < 2:
        return None
    host, pid_text, ticks = identity.rsplit(":", 2)
    if host != socket.gethostname() or not pid_text.isdigit():
        return None
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if ticks and os.path.exists("/proc"):
        return _start_ticks(pid) == ticks
    return True


def tag_worker_run(instance: dg.DagsterInstance, run_id: str) -> None:
    """Record this process as the run's worker."""
    instance.add_run_tags(run_id, {WORKER_TAG: worker_identity()})


def find_dead_runs(instance: dg.DagsterInstance, exclude_run_ids: set[str] = frozenset()) -> list[DagsterRun]:
    runs = instance.get_runs(filters=dg.RunsFilter(statuses=IN_PROGRESS))
    return [
        run for run in runs if run.run_id not in exclude_run_ids and worker_alive(run.tags.get(WORKER_TAG)) is False
    ]


def record_unfinished_assets(
    instance: dg.DagsterInstance,
    run: DagsterRun,
    lineage: LineageStore,
    reason: str,
    code_versions: Mapping[str, str | None] | None = None,
    errors_by_step: Mapping[str, str] | None = None,
) -> list[str]:
    """Write a `failed` lineage row for each asset the run planned and did not materialize.

    Idempotent: an (run, asset, partition) that already has a lineage row gets none (an asset
    that wrote its row and died before Dagster stored the materialization keeps its row)."""
    planned = instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED)
    done = {
        (e.dagster_event.asset_key, e.dagster_event.partition)
        for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION)
    }
    record = instance.get_run_record_by_id(run.run_id)
    started = (record.start_time or record.create_timestamp.timestamp()) if record else None
    started_at = datetime.fromtimestamp(started, UTC) if started else datetime.now(UTC)
    written = []
    for event in planned:
        data = event.dagster_event.event_specific_data
        if (data.asset_key, data.partition) in done:
            continue
        asset = data.asset_key.to_user_string()
        step_key = event.dagster_event.step_key
        with lineage.connect() as con:
            if lineage_row_count(con, run.run_id, asset, data.partition):
                continue
        lineage.record(
            LineageRecord(
                run_id=run.run_id,
                asset_key=asset,
                partition_key=data.partition,
                code_version=(code_versions or {}).get(asset),
                started_at=started_at,
                finished_at=datetime.now(UTC),
                status="failed",
                metrics={"error": (errors_by_step or {}).get(step_key) or reason, "step_key": step_key},
            )
        )
        written.append(asset)
    return written


def release_dead_runs(
    instance: dg.DagsterInstance,
    lineage: LineageStore | None,
    exclude_run_ids: set[str] = frozenset(),
) -> list[str]:
    """Fail the runs whose worker process on this host is gone and free their pool slots."""
    released = []
    for run in find_dead_runs(instance, exclude_run_ids):
        message = (
            f"run worker {run.tags[WORKER_TAG]} is gone (killed?); marked failed and its pool slots "
            f"freed by {worker_identity()}"
        )
        if lineage is not None:
            record_unfinished_assets(instance, run, lineage, message)
        instance.report_run_failed(run, message)
        # What the daemon's free_slots_after_run_end_seconds calls; there is no public instance method.
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
    return released


def lineage_store_for_run(job_def: dg.JobDefinition, run_config: Mapping) -> LineageStore | None:
    """The run's `lineage` resource as configured for this run (None if the job has none)."""
    from dagster._core.system_config.objects import ResolvedRunConfig

    resource_def = job_def.resource_defs.get("lineage")
    if resource_def is None or not issubclass(getattr(resource_def, "configurable_resource_cls", object), LineageStore):
        return None
    config = ResolvedRunConfig.build(job_def, run_config).resources["lineage"].config
    return resource_def.configurable_resource_cls(**config)


def _error_text(error) -> str:
    """The error and its causes, one line each (Dagster wraps the asset's own exception)."""
    parts = []
    while error is not None:
        parts.append(error.message.strip())
        error = error.cause
    return " <- ".join(parts)[:2000] or "step failed"


class _GuardedExecutor(dg.Executor):
    """Releases dead runs before the wrapped executor claims any slot; records failed assets after."""

    def __init__(self, inner: dg.Executor):
        self._inner = inner

    def __getattr__(self, name: str):
        # Executors read their own settings back from `plan_context.executor` (Celery's `app_args`).
        return getattr(self._inner, name)

    @property
    def retries(self):
        return self._inner.retries

    @property
    def step_dependency_config(self):
        return self._inner.step_dependency_config

    def execute(self, plan_context, execution_plan) -> Iterator[dg.DagsterEvent]:
        instance, run = plan_context.instance, plan_context.dagster_run
        job_def = plan_context.job.get_definition()
        lineage = lineage_store_for_run(job_def, run.run_config)
        tag_worker_run(instance, run.run_id)
        for run_id in release_dead_runs(instance, lineage, exclude_run_ids={run.run_id}):
            instance.report_engine_event(f"Released run {run_id}: its worker process is gone", run)
        errors_by_step: dict[str, str] = {}
        for event in self._inner.execute(plan_context, execution_plan):
            if event.event_type == dg.DagsterEventType.STEP_FAILURE:
                errors_by_step[event.step_key] = _error_text(event.step_failure_data.error)
            yield event
        if errors_by_step and lineage is not None:
            graph = job_def.asset_layer.asset_graph
            versions = {key.to_user_string(): graph.get(key).code_version for key in graph.get_all_asset_keys()}
            record_unfinished_assets(instance, run, lineage, "an upstream step failed", versions, errors_by_step)


def guarded(executor_def: dg.ExecutorDefinition, name: str) -> dg.ExecutorDefinition:
    """`executor_def` with the same config, plus the dead-run release and failed lineage rows
    described in this module."""

    @dg.executor(
        name=name, config_schema=executor_def.config_schema.as_field(), requirements=executor_def.get_requirements
    )
    def _guarded(init_context: dg.InitExecutorContext) -> dg.Executor:
        return _GuardedExecutor(executor_def.executor_creation_fn(init_context))

    return _guarded


# Dagster's default executor: multiprocess unless configured `in_process`.
guarded_executor = guarded(dg.multi_or_in_process_executor, "guarded_multi_or_in_process")


class WorkerCheckingRunLauncher(dg.DefaultRunLauncher):
    """The default launcher, plus a worker health check for the daemon's run monitoring.

    Only a worker provably gone (same host, pid gone or reused) is reported FAILED; anything
    unknown reads as RUNNING, since run monitoring fails every run not RUNNING."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        identity = run.tags.get(WORKER_TAG)
        if worker_alive(identity) is False:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker {identity} is gone")
        return CheckRunHealthResult(WorkerStatus.RUNNING, identity and f"run worker {identity}")


@dg.run_failure_sensor(
    name="lineage_for_failed_runs",
    default_status=dg.DefaultSensorStatus.RUNNING,
    monitor_all_code_locations=False,
    description="Writes a `failed` lineage row for each asset a failed run did not materialize",
)
def lineage_for_failed_runs(context: dg.RunFailureSensorContext, lineage: LineageStore) -> None:
    reason = context.failure_event.message or "run failed"
    written = record_unfinished_assets(context.instance, context.dagster_run, lineage, reason)
    if written:
        context.log.info(f"failed lineage rows for run {context.dagster_run.run_id}: {', '.join(written)}")
