"""The real asset graph on the tiny random model, as a code location a `dagster` CLI subprocess
can load (`-m tests.tiny_definitions`), with the project's executor and automation; storage root
from `$INSTRUCT_SELECT_HOME`."""

from pathlib import Path

import dagster as dg

from assets import ALL_CHECKS, ASSET_MODULES
from orchestration.automation import all_sensors, with_automation
from orchestration.runs import guarded_executor
from resources import build_resources
from resources.settings import default_home
from tests.fakes import TinyModelStore

ASSETS = with_automation(dg.load_assets_from_modules(ASSET_MODULES))
RESOURCES = {**build_resources(env="ci"), "model_store": TinyModelStore(cache_dir=str(Path(default_home()) / "cache"))}

defs = dg.Definitions(
    assets=ASSETS, asset_checks=ALL_CHECKS, sensors=all_sensors, resources=RESOURCES, executor=guarded_executor
)
