"""Partitions: every model-dependent asset is materialized once per registered model, and the
pool's gradient features once per (model, shard) so that shards can run on separate machines."""

import dagster as dg

from resources.model_store import registered_models
from resources.settings import gradient_shard_count
from selection.influence.datastore import shard_key
from selection.train.models import default_model_spec

DEFAULT_MODEL = default_model_spec().name
MODEL_DIMENSION = "model"
SHARD_DIMENSION = "shard"

model_partitions = dg.StaticPartitionsDefinition(list(registered_models()))

_shards = gradient_shard_count()
shard_partitions = dg.StaticPartitionsDefinition([shard_key(index, _shards) for index in range(_shards)])

# Keys read "<model>|<shard>", e.g. "smollm2-135m-instruct|02-of-04".
model_shard_partitions = dg.MultiPartitionsDefinition(
    {MODEL_DIMENSION: model_partitions, SHARD_DIMENSION: shard_partitions}
)


def model_shard_keys(model: str) -> list[dg.MultiPartitionKey]:
    """Every shard partition of one model."""
    return [
        dg.MultiPartitionKey({MODEL_DIMENSION: model, SHARD_DIMENSION: shard})
        for shard in shard_partitions.get_partition_keys()
    ]
