"""Resources chosen by environment (`INSTRUCT_SELECT_ENV`: `local` default, `ci` for tests)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import LINEAGE_DB_FILE, StorageSettings, default_home

ENV_VAR = "INSTRUCT_SELECT_ENV"
# The model store's resource key: assets take it as their `model_store` parameter.
MODEL_STORE = "model_store"


def build_resources(home: str | None = None, env: str | None = None) -> dict[str, Any]:
    """The resource set for an environment; tests inject fakes through `resources=` instead.

    `ci` pins the device to the CPU so tests behave the same on a machine with a GPU.
    """
    env = env or os.environ.get(ENV_VAR, "local")
    if env not in {"local", "ci"}:
        raise ValueError(f"{ENV_VAR}={env!r} is not a known environment; use 'local' or 'ci'")
    settings = StorageSettings(home=home or default_home())
    root = Path(settings.home)
    return {
        "settings": settings,
        "lineage": LineageStore(db_path=str(root / LINEAGE_DB_FILE)),
        MODEL_STORE: ModelStore(cache_dir=str(root / "model_cache")),
        "device": DeviceSettings(device="cpu") if env == "ci" else DeviceSettings(),
    }
