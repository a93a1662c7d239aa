"""The one Definitions object: `dagster dev` and `dagster asset materialize -m orchestration.definitions`."""

import dagster as dg

from assets import ASSET_MODULES, ALL_CHECKS
from orchestration.jobs import all_jobs
from resources import build_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules(ASSET_MODULES),
    asset_checks=ALL_CHECKS,
    jobs=all_jobs,
    resources=build_resources(),
)
