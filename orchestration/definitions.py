"""The one Definitions object: `dagster dev` and `dagster asset materialize -m orchestration.definitions`."""

import dagster as dg

from assets import ALL_CHECKS, ASSET_MODULES
from orchestration.automation import all_sensors, with_automation
from orchestration.jobs import all_jobs
from orchestration.runs import guarded_executor, lineage_for_failed_runs
from resources import build_resources

defs = dg.Definitions(
    assets=with_automation(dg.load_assets_from_modules(ASSET_MODULES)),
    asset_checks=ALL_CHECKS,
    jobs=all_jobs,
    sensors=[*all_sensors, lineage_for_failed_runs],
    resources=build_resources(),
    # Releases runs whose worker died before any step claims a pool slot (orchestration/runs.py).
    executor=guarded_executor,
)
