"""Jobs users launch from the UI, the CLI, or a schedule."""

import dagster as dg

from orchestration.partitions import model_partitions

DEMO_JOB_NAME = "demo_job"

pool_job = dg.define_asset_job(
    "pool_job", selection=dg.AssetSelection.groups("pool"), description="Ingest the pool and the target tasks"
)

demo_job = dg.define_asset_job(
    DEMO_JOB_NAME,
    selection=dg.AssetSelection.all(),
    partitions_def=model_partitions,
    description="The whole graph for one model partition: pool -> warmup -> gradients -> influence -> selections",
)

all_jobs = [pool_job, demo_job]
