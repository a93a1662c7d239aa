"""Model registry (the `model` partition keys) and loading, with the GGUF conversion cached."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from selection.models import ModelSpec, default_model_spec, load_model_and_tokenizer

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


class ModelStore(dg.ConfigurableResource):
    """Resolves a partition key to a ModelSpec and loads it (GGUF converted once into `cache_dir`)."""

    cache_dir: str
    models_file: str | None = None

    def spec(self, name: str) -> ModelSpec:
        models = registered_models(self.models_file)
        if name not in models:
            raise ValueError(f"model {name!r} is not registered; known: {sorted(models)}")
        return models[name]

    def load(self, spec: ModelSpec, device: str) -> tuple[Any, Any]:
        return load_model_and_tokenizer(spec, Path(self.cache_dir), device=device)


CPU_PROJECTION_CACHE_BYTES = 256 * 2**20


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

    def resolve(self) -> str:
        import torch

        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available on this machine")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        return self.device
