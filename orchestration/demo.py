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
from orchestration.runs import WORKER_TAG, record_unfinished_assets, release_dead_runs, worker_identity
from resources import build_resources
from resources.settings import default_home


def main() -> int:
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set; run through `make demo`, which points it at ./dagster_home", file=sys.stderr)
        return 2
    started = time.perf_counter()
    success = True
    with dg.DagsterInstance.get() as instance:
        # execute_in_process replaces the job's executor (orchestration/runs.py), so the demo
        # releases runs whose worker died and records failed assets itself.
        lineage = build_resources()["lineage"]
        for run_id in release_dead_runs(instance, lineage):
            print(f"released interrupted run {run_id}")
        for job_name, _, partition_key in refresh_steps(DEFAULT_MODEL):
            step_started = time.perf_counter()
            result = defs.resolve_job_def(job_name).execute_in_process(
                instance=instance, partition_key=partition_key, run_config=DEMO_RUN_CONFIG[job_name],
                raise_on_error=False, tags={WORKER_TAG: worker_identity()},
            )
            print(f"{job_name} [{partition_key}]: {'ok' if result.success else 'FAILED'} "
                  f"in {time.perf_counter() - step_started:.0f} s", flush=True)
            if not result.success:
                record_unfinished_assets(instance, instance.get_run_by_id(result.run_id), lineage, "the run failed")
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
