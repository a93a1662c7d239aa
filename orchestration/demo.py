"""`make demo [PROFILE=quick|full]`: materialize the default asset graph on the embedded default
with a named profile's run config (orchestration/profiles.py), then say what to look at.

The graph runs as its three refresh jobs (orchestration/jobs.py): prepare_job, then one
train_gradients_job run per shard, then select_and_evaluate_job, each in this process, tagged
with the profile. The terminal shows the assets' INFO lines (progress with rate and ETA), one
line per finished job with its time, and at the end the report's headline, the selection
exports, a lineage query and the command that opens the UI on the same storage.

Idempotent: assets reuse what is stored (unchanged pool sources are skipped, completed
training epochs and computed gradient rows are reused), so a second run is quick.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import dagster as dg

from assets.partitions import DEFAULT_MODEL
from orchestration.definitions import defs
from orchestration.jobs import refresh_steps
from orchestration.profiles import DEFAULT_PROFILE, PROFILES, Profile, get_profile
from orchestration.runs import WORKER_TAG, record_unfinished_assets, release_dead_runs, worker_identity
from resources import build_resources
from resources.settings import default_home

# Dagster's DEBUG events (step starts, handled outputs, ...) would bury the assets' own lines.
QUIET_LOGGER = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}


def run_profile(profile: Profile) -> bool:
    resources = build_resources()
    lineage, model_store = resources["lineage"], resources["model_store"]
    store_config = {"cache_dir": model_store.cache_dir} | (
        {"models_file": model_store.models_file} if model_store.models_file else {}
    )
    with dg.DagsterInstance.get() as instance:
        # execute_in_process replaces the job's executor (orchestration/runs.py), so the demo
        # releases runs whose worker died and records failed assets itself.
        for run_id in release_dead_runs(instance, lineage):
            print(f"released interrupted run {run_id}")
        for job_name, _, partition_key in refresh_steps(DEFAULT_MODEL):
            step_started = time.perf_counter()
            result = defs.resolve_job_def(job_name).execute_in_process(
                instance=instance,
                partition_key=partition_key,
                run_config={**profile.run_config(job_name, store_config), **QUIET_LOGGER},
                raise_on_error=False,
                tags={WORKER_TAG: worker_identity(), **profile.tags()},
            )
            print(
                f"== {job_name} [{partition_key}]: {'ok' if result.success else 'FAILED'} "
                f"in {time.perf_counter() - step_started:.0f} s",
                flush=True,
            )
            if not result.success:
                record_unfinished_assets(instance, instance.get_run_by_id(result.run_id), lineage, "the run failed")
                return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.demo", description=__doc__.splitlines()[0])
    parser.add_argument("profile", nargs="?", default=DEFAULT_PROFILE, help=f"one of: {', '.join(PROFILES)}")
    try:
        profile = get_profile(parser.parse_args(argv).profile)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set; run through `make demo`, which points it at ./dagster_home", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the per-load weights bar; the assets log their own progress
    print(f"Demo, {profile.describe()}", flush=True)
    started = time.perf_counter()
    success = run_profile(profile)
    elapsed = time.perf_counter() - started
    print(
        f"\nDemo ({profile.name} profile) {'succeeded' if success else 'FAILED'} in {elapsed:.0f} s; "
        f"storage root: {default_home()}"
    )
    if success:
        from orchestration.summary import print_next_steps, print_summary

        print_summary(default_home())
        print_next_steps(Path(default_home()), DEFAULT_MODEL)
    return 0 if success else 1


if __name__ == "__main__":
    sys.exit(main())
