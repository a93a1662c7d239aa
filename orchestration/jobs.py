"""Jobs users launch from the UI, the CLI, or a schedule."""

import dagster as dg

from orchestration.partitions import model_partitions

DEMO_JOB_NAME = "demo_job"

# The demo is sized for a 2-core CPU (about 40 minutes): a 300-example built-in pool, 2 target
# val examples per subtask instead of LESS's 5, 2 warmup epochs instead of 4, 1 finetuning
# epoch, 10 test rows per task. Every value is a normal run config field; the launchpad
# shows and edits them, and a plain `dagster asset materialize` uses the full defaults.
DEMO_RUN_CONFIG = {
    "ops": {
        "raw_pool": {"config": {"default_pool_size": 300}},
        "target_tasks": {"config": {"n_val": 2}},
        "warmup_checkpoints": {"config": {"epochs": 2}},
        "finetuned_checkpoints": {"config": {"epochs": 1}},
        "kmq_iterative_selection": {"config": {"max_new_tokens": 32}},
        "evaluation": {"config": {"max_test_per_task": 10}},
    }
}

pool_job = dg.define_asset_job(
    "pool_job", selection=dg.AssetSelection.groups("pool"), description="Ingest the pool and the target tasks"
)

ingest_job = dg.define_asset_job(
    "ingest_job", selection=dg.AssetSelection.assets("raw_pool"), description="Add files to the pool"
)

demo_job = dg.define_asset_job(
    DEMO_JOB_NAME,
    selection=dg.AssetSelection.all(),
    partitions_def=model_partitions,
    config=DEMO_RUN_CONFIG,
    description="The whole graph for one model partition, sized for a CPU demo (see DEMO_RUN_CONFIG)",
)

all_jobs = [pool_job, ingest_job, demo_job]
