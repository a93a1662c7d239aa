"""`make demo`: materialize the default asset graph on the embedded default, then print a summary.

The graph runs as its three refresh jobs (orchestration/jobs.py): prepare_job, then one
train_gradients_job run per shard, then select_and_evaluate_job, each in this process.

Idempotent: assets reuse what is stored (unchanged pool sources are skipped, completed
training epochs and computed gradient rows are reused), so a second run is quick.
"""

from __future__ import annotations

import os
import sys
import time

import dagster as dg

from orchestration.definitions import defs
from orchestration.jobs import DEMO_RUN_CONFIG, refresh_steps
from orchestration.partitions import DEFAULT_MODEL
from resources.settings import default_home


LAUNCHER_TAG = "instruct_select/launcher"
PID_TAG = "instruct_select/pid"


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_interrupted_demo_runs(instance: dg.DagsterInstance) -> list[str]:
    """A demo killed mid-run (Ctrl-C, closed terminal) leaves its run STARTED, holding the
    `accelerator` pool slot. Only runs launched by `make demo` whose process is gone are released."""
    started = instance.get_runs(
        filters=dg.RunsFilter(
            tags={LAUNCHER_TAG: "make-demo"}, statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING],
        )
    )
    stale = [run for run in started if not process_alive(int(run.tags.get(PID_TAG, "0") or 0))]
    for run in stale:
        instance.report_run_failed(run, "a later `make demo` found this in-process run interrupted")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
    return [run.run_id for run in stale]


def main() -> int:
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set; run through `make demo`, which points it at ./dagster_home", file=sys.stderr)
        return 2
    started = time.perf_counter()
    success = True
    with dg.DagsterInstance.get() as instance:
        for run_id in release_interrupted_demo_runs(instance):
            print(f"released interrupted demo run {run_id}")
        for job_name, _, partition_key in refresh_steps(DEFAULT_MODEL):
            step_started = time.perf_counter()
            result = defs.resolve_job_def(job_name).execute_in_process(
                instance=instance, partition_key=partition_key, run_config=DEMO_RUN_CONFIG[job_name],
                raise_on_error=False, tags={LAUNCHER_TAG: "make-demo", PID_TAG: str(os.getpid())},
            )
            print(f"{job_name} [{partition_key}]: {'ok' if result.success else 'FAILED'} "
                  f"in {time.perf_counter() - step_started:.0f} s", flush=True)
            if not result.success:
                success = False
                break
    elapsed = time.perf_counter() - started
    print(f"\nDemo {'succeeded' if success else 'FAILED'} in {elapsed:.0f} s; storage root: {default_home()}")
    if success:
        from orchestration.summary import print_summary

        print_summary(default_home())
    return 0 if success else 1


if __name__ == "__main__":
    sys.exit(main())
