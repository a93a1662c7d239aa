"""Asset families, one module each (every selection method's asset is in `methods`, made from
`selection.registry`); `orchestration.definitions` loads them all."""

from assets import diversity, evaluation, finetune, gradients, influence, methods, pool, warmup
from assets.checks import ALL_CHECKS

__all__ = ["ALL_CHECKS", "ASSET_MODULES"]

ASSET_MODULES = [pool, warmup, gradients, influence, methods, diversity, finetune, evaluation]
