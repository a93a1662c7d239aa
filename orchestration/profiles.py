"""`make demo`'s named profiles: the run config of each refresh job, sized for a 2-core CPU.

Outside a profile every asset uses LESS's recipe (asset config defaults, `ModelSpec` defaults).
A profile sets its smaller values explicitly, as run config: asset config under `ops`, and the
model spec's `max_length` and LoRA rank through the `model_store` resource, so the spec that
is fingerprinted (and keys every checkpoint and cache) is the one that ran. Each run is tagged
with the profile's name and values (`PROFILE_TAG`, `PROFILE_VALUES_TAG`); assets copy them, with
`why` each value departs from LESS, into their lineage metrics and metadata.

- `quick` (`make demo`): the whole graph in minutes: a 60-example pool, 2 target tasks (code,
  math) with one val example per subtask, 1024 projection dims, 6-example selections, 5 test rows per task.
- `full` (`make demo PROFILE=full`): the earlier demo: a 300-example pool, all 6 target tasks
  with 2 val examples per subtask, 8192 projection dims, 20 test rows per task.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from assets.run_tags import PROFILE_TAG, PROFILE_VALUES_TAG, describe_profile
from orchestration.jobs import PREPARE_JOB_NAME, SELECT_AND_EVALUATE_JOB_NAME, TRAIN_GRADIENTS_JOB_NAME
from resources import MODEL_STORE
from selection.registry import METHODS, Input
from selection.train import training
from selection.train.models import DEMO_SPEC_OVERRIDES

DEMO_TRAINING = training.DEMO_TRAINING_CONFIG

_CPU = "CPU demo"
_MODEL_WHY = (
    f"{_CPU}: LESS's LoRA r=128/alpha=512 and 2048-token max_length cost about 16x the gradient dims and "
    "8x the tokens; r=8/alpha=32 (alpha/r 4 as LESS) and 256 tokens keep every step to minutes"
)
_WARMUP_WHY = (
    f"{_CPU}: a warmup slice of a small pool cannot fill LESS's 32-example steps (the schedule would give "
    "epoch 1 an average lr of 0); smaller steps at a higher lr make the adapter move in few steps"
)
_FINETUNE_WHY = f"{_CPU}: one epoch at LESS's warmup step size instead of 4 epochs at lr 2e-5 and 32-example steps"


@dataclass(frozen=True)
class Profile:
    name: str
    model: dict[str, int]  # model_store overrides (ModelSpec fields)
    ops: dict[str, dict[str, dict[str, Any]]]  # job -> asset -> config values
    why: dict[str, str]  # asset (or "model_store") -> why its values depart from LESS

    def run_config(self, job_name: str, model_store_config: dict[str, Any]) -> dict[str, Any]:
        """The run config of one refresh job; `model_store_config` is the resource's own (e.g. `cache_dir`),
        since a run that configures a resource must give all of its fields."""
        return {
            "ops": {asset: {"config": values} for asset, values in self.ops.get(job_name, {}).items()},
            "resources": {MODEL_STORE: {"config": {**model_store_config, **self.model}}},
        }

    def values(self) -> dict[str, Any]:
        """Every value the profile sets, as `asset.field` (`model_store.field` for the model spec)."""
        flat = {f"{MODEL_STORE}.{key}": value for key, value in self.model.items()}
        for assets in self.ops.values():
            flat.update({f"{asset}.{key}": value for asset, values in assets.items() for key, value in values.items()})
        return flat

    def tags(self) -> dict[str, str]:
        return {PROFILE_TAG: self.name, PROFILE_VALUES_TAG: json.dumps({"values": self.values(), "why": self.why})}

    def describe(self) -> str:
        return describe_profile({"name": self.name, "values": self.values()})


_DEMO_MODEL = DEMO_SPEC_OVERRIDES
# 10% of the quick pool, so every method trains on 6 examples and each of iterative kMQ's 2 rounds
# adds 3 (a 1-example round whose prompt leaves no room to generate has no feedback at all).
_QUICK_BUDGET = {"budget": 6}
_QUICK_BUDGET_WHY = f"{_CPU}: 6 examples, 10% of the 60-example pool (LESS: 5%, 3 examples here)"


def _selection_assets(*, consumes: Collection[Input] | None = None, skip: Collection[Input] = ()) -> list[str]:
    """The selection assets of the registered methods over `consumes` (None: any input) but not `skip`."""
    return [m.asset for m in METHODS if (consumes is None or m.consumes in consumes) and m.consumes not in skip]


# Every registered method but those that take the whole pool (no budget) gets the quick budget:
# those over the influence scores run after the pool's gradients, the others in the prepare job,
# where iterative kMQ's rounds (they generate text for their feedback) also get fewer, shorter ones.
_SCORE_SELECTIONS = _selection_assets(consumes={Input.INFLUENCE_SCORES})
_FEEDBACK_SELECTIONS = _selection_assets(consumes={Input.CLUSTERS_WITH_FEEDBACK})
_PREPARE_SELECTIONS = _selection_assets(skip={Input.POOL, Input.INFLUENCE_SCORES, Input.CLUSTERS_WITH_FEEDBACK})
_QUICK_ROUNDS = {"n_rounds": 2, "max_new_tokens": 16}
_DEMO_WARMUP = {"learning_rate": DEMO_TRAINING.learning_rate}
_DEMO_FINETUNE = {"epochs": 1, "learning_rate": DEMO_TRAINING.learning_rate, "batch_size": DEMO_TRAINING.batch_size}

PROFILES = {
    "quick": Profile(
        name="quick",
        model=_DEMO_MODEL,
        ops={
            PREPARE_JOB_NAME: {
                "raw_pool": {"default_pool_size": 60},
                "target_tasks": {"default_tasks": ["code", "math"], "n_val": 1},
                "warmup_checkpoints": {"fraction": 0.1, "epochs": 2, "batch_size": 2, **_DEMO_WARMUP},
                "target_gradients": {"dims": [1024]},
                **dict.fromkeys(_PREPARE_SELECTIONS, _QUICK_BUDGET),
                **{asset: {**_QUICK_BUDGET, **_QUICK_ROUNDS} for asset in _FEEDBACK_SELECTIONS},
            },
            TRAIN_GRADIENTS_JOB_NAME: {"train_gradients": {"dims": [1024]}},
            SELECT_AND_EVALUATE_JOB_NAME: {
                "influence_scores": {"dim": 1024},
                **dict.fromkeys(_SCORE_SELECTIONS, _QUICK_BUDGET),
                # 2-example steps: 6 examples in one 8-example step would be the warmup step, at lr 0.
                "finetuned_checkpoints": {**_DEMO_FINETUNE, "batch_size": 2},
                "evaluation": {"max_test_per_task": 5},
            },
        },
        why={
            MODEL_STORE: _MODEL_WHY,
            "target_tasks": f"{_CPU}: 2 of the 6 tasks and 1 val example per subtask (LESS: 5) bound the target "
            "gradients and the evaluation; no MMLU group, since each has 12-18 subjects and every "
            "subject needs a test row, scored over 4 choices, for every checkpoint",
            "warmup_checkpoints": f"{_WARMUP_WHY}; 2 epochs (LESS: 4) and 10% of the pool (LESS: 5%, 3 examples "
            "here) halve the gradient passes",
            "target_gradients": f"{_CPU}: 1024 projection dims (LESS: 8192) make the dense projection 8x cheaper",
            "train_gradients": f"{_CPU}: 1024 projection dims (LESS: 8192) make the dense projection 8x cheaper",
            "influence_scores": f"{_CPU}: reads the 1024-dim features the gradient assets computed",
            "finetuned_checkpoints": f"{_FINETUNE_WHY}; 2-example steps, since 6 examples make one 8-example step, "
            "the warmup step at lr 0",
            **dict.fromkeys((*_SCORE_SELECTIONS, *_PREPARE_SELECTIONS), _QUICK_BUDGET_WHY),
            **dict.fromkeys(_FEEDBACK_SELECTIONS, f"{_QUICK_BUDGET_WHY}, in 2 rounds of 3"),
        },
    ),
    "full": Profile(
        name="full",
        model=_DEMO_MODEL,
        ops={
            PREPARE_JOB_NAME: {
                "raw_pool": {"default_pool_size": 300},
                "target_tasks": {"n_val": 2},
                "warmup_checkpoints": {"epochs": 2, "batch_size": DEMO_TRAINING.batch_size, **_DEMO_WARMUP},
                **{asset: {"max_new_tokens": 32} for asset in _FEEDBACK_SELECTIONS},
            },
            SELECT_AND_EVALUATE_JOB_NAME: {
                "finetuned_checkpoints": _DEMO_FINETUNE,
                "evaluation": {"max_test_per_task": 20},
            },
        },
        why={
            MODEL_STORE: _MODEL_WHY,
            "target_tasks": f"{_CPU}: 2 val examples per subtask (LESS: 5) bound the target gradients",
            "warmup_checkpoints": f"{_WARMUP_WHY}; 2 epochs (LESS: 4) halve the gradient passes",
            "finetuned_checkpoints": _FINETUNE_WHY,
        },
    ),
}
DEFAULT_PROFILE = "quick"


def get_profile(name: str) -> Profile:
    if name not in PROFILES:
        raise ValueError(f"unknown demo profile {name!r}; valid profiles: {', '.join(PROFILES)}")
    return PROFILES[name]
