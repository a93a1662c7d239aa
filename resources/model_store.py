"""Model registry (the `model` partition keys) and loading, with the GGUF conversion cached."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from selection.train.models import (
    ModelSpec,
    cap_max_length,
    context_length,
    default_model_spec,
    load_model_and_tokenizer,
    resolve_device,
)

MODELS_FILE_ENV = "INSTRUCT_SELECT_MODELS"


def registered_models(models_file: str | None = None) -> dict[str, ModelSpec]:
    """The built-in default model plus any listed in `$INSTRUCT_SELECT_MODELS` (a JSON list of ModelSpec dicts).

    Each name becomes a partition key of every per-model asset.
    """
    default = default_model_spec()
    models = {default.name: default}
    path = models_file or os.environ.get(MODELS_FILE_ENV)
    if not path:
        return models
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{MODELS_FILE_ENV}={path}: cannot read a JSON list of model specs: {error}") from error
    if not isinstance(entries, list):
        raise ValueError(f"{MODELS_FILE_ENV}={path}: expected a JSON list of model specs")
    for index, entry in enumerate(entries):
        try:
            spec = ModelSpec.from_dict(entry)
        except (TypeError, ValueError) as error:  # bad field names, values or model name
            raise ValueError(f"{MODELS_FILE_ENV}={path}: entry {index}: {error}") from error
        if spec.name in models:
            raise ValueError(f"{MODELS_FILE_ENV}={path}: model name {spec.name!r} is registered twice")
        models[spec.name] = spec
    return models


OVERRIDE_HELP = "Replaces every registered model's `{}` (None: the spec's own, LESS's by default)"


class ModelStore(dg.ConfigurableResource):
    """Resolves a partition key to a ModelSpec and loads it (GGUF converted once into `cache_dir`).

    The override fields let a run (e.g. a `make demo` profile) shrink the model setup explicitly:
    the spec they make is the one fingerprinted, so its checkpoints and caches are its own.
    """

    cache_dir: str
    models_file: str | None = None
    max_length: int | None = Field(default=None, description=OVERRIDE_HELP.format("max_length"))
    lora_r: int | None = Field(default=None, description=OVERRIDE_HELP.format("lora_r"))
    lora_alpha: int | None = Field(default=None, description=OVERRIDE_HELP.format("lora_alpha"))

    def overrides(self) -> dict[str, int]:
        return {
            key: value for key in ("max_length", "lora_r", "lora_alpha") if (value := getattr(self, key)) is not None
        }

    def spec(self, name: str) -> ModelSpec:
        """The registered spec with this resource's overrides, `max_length` capped by the model's context."""
        models = registered_models(self.models_file)
        if name not in models:
            raise ValueError(f"model {name!r} is not registered; known: {sorted(models)}")
        spec = dataclasses.replace(models[name], **self.overrides())
        return cap_max_length(spec, context_length(spec, Path(self.cache_dir)))

    def load(self, spec: ModelSpec, device: str) -> tuple[Any, Any]:
        return load_model_and_tokenizer(spec, Path(self.cache_dir), device=device)


CPU_PROJECTION_CACHE_BYTES = 256 * 2**20
DEVICE_TAG = "instruct_select/device"  # run tag that overrides DeviceSettings.device for one run


class DeviceSettings(dg.ConfigurableResource):
    """Where and how big: `auto` picks CUDA when present. Assets that use it also declare the
    Dagster pool `accelerator`, so two runs never share one GPU by accident."""

    device: str = "auto"
    batch_size: int = 8
    max_tokens_per_batch: int = 4096
    num_threads: int | None = None
    # The dense `exact` projection matrix is regenerated for every group of examples unless it
    # fits here (SmolLM2-135M, r=8, 8192 dims: 28 GiB). Default: 256 MiB on the CPU, half of
    # the free memory on a GPU, where keeping it makes exact mode as fast as the floor.
    projection_cache_gb: float | None = None

    def projection_cache_bytes(self, device: str) -> int:
        if self.projection_cache_gb is not None:
            if self.projection_cache_gb < 0:
                raise ValueError(f"projection_cache_gb must be >= 0, got {self.projection_cache_gb}")
            return int(self.projection_cache_gb * 2**30)
        if device.startswith("cuda"):
            import torch

            free, _ = torch.cuda.mem_get_info(torch.device(device))
            return free // 2
        return CPU_PROJECTION_CACHE_BYTES

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # One shard run per GPU: a run tagged `instruct_select/device: cuda:3` uses that GPU.
        tags = context.dagster_run.tags if context.dagster_run is not None else {}
        self._run_device = tags.get(DEVICE_TAG)

    def resolve(self) -> str:
        import torch

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        device = getattr(self, "_run_device", None) or self.device
        if device not in ("auto", "cpu") and not device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        return str(resolve_device(device))
