"""Per-model partitions: every model-dependent asset is materialized once per registered model."""

import dagster as dg

from resources.model_store import registered_models
from selection.models import default_model_spec

DEFAULT_MODEL = default_model_spec().name

model_partitions = dg.StaticPartitionsDefinition(list(registered_models()))
