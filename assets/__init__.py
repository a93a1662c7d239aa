"""Asset families, one module each; `orchestration.definitions` loads them all."""

from assets import baselines, diversity, evaluation, finetune, gradients, influence, pool, selections, warmup

ASSET_MODULES = [pool, warmup, gradients, influence, selections, baselines, diversity, finetune, evaluation]
ALL_CHECKS = [*selections.selection_checks, *baselines.baseline_checks, *diversity.diversity_checks]
