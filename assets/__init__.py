"""Asset families, one module each; `orchestration.definitions` loads them all."""

from assets import baselines, diversity, evaluation, finetune, gradients, influence, pool, selections, warmup
from assets.checks import ALL_CHECKS

__all__ = ["ALL_CHECKS", "ASSET_MODULES"]

ASSET_MODULES = [pool, warmup, gradients, influence, selections, baselines, diversity, finetune, evaluation]
