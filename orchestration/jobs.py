"""Jobs users launch from the UI, the CLI, a schedule or a sensor.

A model refresh is three jobs, because `train_gradients` is partitioned by (model, shard)
while everything else per model is partitioned by model alone:

1. `prepare_job` (partition: model): pool, targets, warmup, target gradients, embeddings,
   clusters and the selections that need no influence scores (kMQ, iterative kMQ, RDS, full data).
2. `train_gradients_job` (partition: model|shard), one run per shard; a run launcher or
   executor can put each on its own machine (README, "Running shards in parallel").
3. `select_and_evaluate_job` (partition: model): influence scores, the selections over them
   (LESS, BIDS, round robin, and random, which samples the scored rows), finetuning, evaluation
   and the comparison report.

`make demo` runs them in this order, with a named profile's run config (orchestration/profiles.py:
`quick` by default, `full`); in a deployment the assets' automation conditions chain the same
steps (orchestration/automation.py). Launched without run config (UI, CLI, automation, sensors),
every asset uses LESS's recipe: its config defaults and `ModelSpec`'s.
"""

import dagster as dg

from assets.partitions import model_shard_keys

TRAIN_GRADIENTS = dg.AssetSelection.assets("train_gradients")
AFTER_TRAIN_GRADIENTS = TRAIN_GRADIENTS.downstream(include_self=False)
BEFORE_TRAIN_GRADIENTS = dg.AssetSelection.all() - TRAIN_GRADIENTS - AFTER_TRAIN_GRADIENTS

PREPARE_JOB_NAME = "prepare_job"
TRAIN_GRADIENTS_JOB_NAME = "train_gradients_job"
SELECT_AND_EVALUATE_JOB_NAME = "select_and_evaluate_job"

pool_job = dg.define_asset_job(
    "pool_job", selection=dg.AssetSelection.groups("pool"), description="Ingest the pool and the target tasks"
)

ingest_job = dg.define_asset_job(
    "ingest_job", selection=dg.AssetSelection.assets("raw_pool"), description="Add files to the pool"
)

prepare_job = dg.define_asset_job(
    PREPARE_JOB_NAME,
    selection=BEFORE_TRAIN_GRADIENTS,
    description="Step 1 of a model refresh: everything that does not need the pool's gradient features",
)

train_gradients_job = dg.define_asset_job(
    TRAIN_GRADIENTS_JOB_NAME,
    selection=TRAIN_GRADIENTS,
    description="Step 2 of a model refresh: the pool's gradient features, one run per (model, shard)",
)

select_and_evaluate_job = dg.define_asset_job(
    SELECT_AND_EVALUATE_JOB_NAME,
    selection=AFTER_TRAIN_GRADIENTS,
    description="Step 3 of a model refresh: influence, LESS/BIDS, finetuning, evaluation, comparison report",
)


def refresh_steps(model: str) -> list[tuple[str, dg.AssetSelection, str]]:
    """One model refresh in order: (job name, its asset selection, partition key) of each run."""
    return [
        (PREPARE_JOB_NAME, BEFORE_TRAIN_GRADIENTS, model),
        *[(TRAIN_GRADIENTS_JOB_NAME, TRAIN_GRADIENTS, str(key)) for key in model_shard_keys(model)],
        (SELECT_AND_EVALUATE_JOB_NAME, AFTER_TRAIN_GRADIENTS, model),
    ]


all_jobs = [pool_job, ingest_job, prepare_job, train_gradients_job, select_and_evaluate_job]
