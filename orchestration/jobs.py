"""Jobs users launch from the UI, the CLI, or a schedule."""

import dagster as dg

pool_job = dg.define_asset_job("pool_job", selection=dg.AssetSelection.groups("pool"), description="Ingest pool and targets")

all_jobs = [pool_job]
