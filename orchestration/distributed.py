"""The code location of a Celery deployment (README, "Running shards in parallel"):
the project's definitions, with every step sent to a Celery worker.

Needs the `distributed` extra. Broker and result backend come from `$DAGSTER_CELERY_BROKER_URL`
in every process (run workers submit steps, Celery workers take them), as in `deploy/celery.yaml`.
"""

import dagster as dg
from dagster_celery import celery_executor

from orchestration import definitions
from orchestration.runs import guarded

BROKER_ENV_VAR = "DAGSTER_CELERY_BROKER_URL"

guarded_celery_executor = guarded(celery_executor, "guarded_celery").configured(
    {"broker": {"env": BROKER_ENV_VAR}, "backend": {"env": BROKER_ENV_VAR}}
)


def on_celery(defs: dg.Definitions) -> dg.Definitions:
    """`defs` with the Celery executor for every job that does not name its own."""
    fields = {name: getattr(defs, name) for name in dg.Definitions._fields}
    return dg.Definitions(**{**fields, "executor": guarded_celery_executor})


defs = on_celery(definitions.defs)
