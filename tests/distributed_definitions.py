"""`tests.tiny_definitions` on Celery workers, as `orchestration.distributed` deploys the real
graph, plus `train_gradients_job` with the tiny test's gradient config (a backfill takes no run config)."""

import dagster as dg

from orchestration.distributed import on_celery
from orchestration.jobs import TRAIN_GRADIENTS, TRAIN_GRADIENTS_JOB_NAME
from tests import tiny_definitions

GRADIENT_CONFIG = {"dims": [64], "mode": "fast", "seed": 0, "shard_size": 7}

train_gradients_job = dg.define_asset_job(
    TRAIN_GRADIENTS_JOB_NAME,
    selection=TRAIN_GRADIENTS,
    config={"ops": {"train_gradients": {"config": GRADIENT_CONFIG}}},
)

defs = on_celery(dg.Definitions.merge(tiny_definitions.defs, dg.Definitions(jobs=[train_gradients_job])))
