"""`make demo`: materialize the default asset graph on the embedded default, then print a summary.

Idempotent: assets reuse what is stored (unchanged pool sources are skipped, completed
training epochs and computed gradient rows are reused), so a second run is quick.
"""

from __future__ import annotations

import os
import sys
import time

import dagster as dg

from orchestration.definitions import defs
from orchestration.jobs import DEMO_JOB_NAME
from orchestration.partitions import DEFAULT_MODEL
from resources.settings import default_home


def main() -> int:
    if not os.environ.get("DAGSTER_HOME"):
        print("DAGSTER_HOME is not set; run through `make demo`, which points it at ./dagster_home", file=sys.stderr)
        return 2
    started = time.perf_counter()
    job = defs.resolve_job_def(DEMO_JOB_NAME)
    with dg.DagsterInstance.get() as instance:
        result = job.execute_in_process(instance=instance, partition_key=DEFAULT_MODEL, raise_on_error=False)
    elapsed = time.perf_counter() - started
    print(f"\nDemo {'succeeded' if result.success else 'FAILED'} in {elapsed:.0f} s; storage root: {default_home()}")
    if result.success:
        from orchestration.summary import print_summary

        print_summary(default_home())
    return 0 if result.success else 1


if __name__ == "__main__":
    sys.exit(main())
