"""The one Definitions object: `dagster dev` and `dagster asset materialize -m orchestration.definitions`."""

import dagster as dg

from assets import ALL_CHECKS, ASSET_MODULES
from orchestration.jobs import all_jobs
from orchestration.schedules import all_schedules, all_sensors
from resources import build_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(ASSET_MODULES),
    asset_checks=ALL_CHECKS,
    jobs=all_jobs,
    schedules=all_schedules,
    sensors=all_sensors,
    resources=build_resources(),
)
