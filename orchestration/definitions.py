"""The one Definitions object: `dagster dev` and `dagster asset materialize -m orchestration.definitions`."""

import dagster as dg

from assets import gradients, influence, pool, selections, warmup
from orchestration.jobs import all_jobs
from resources import build_resources

defs = dg.Definitions(
    assets=dg.load_assets_from_modules([pool, warmup, gradients, influence, selections]),
    asset_checks=list(selections.selection_checks),
    jobs=all_jobs,
    resources=build_resources(),
)
