"""Asset families, one module each; `orchestration.definitions` loads them all."""

from assets import diversity, evaluation, finetune, gradients, influence, pool, selections, warmup

ASSET_MODULES = [pool, warmup, gradients, influence, selections, diversity, finetune, evaluation]
ALL_CHECKS = [*selections.selection_checks, *diversity.diversity_checks]
