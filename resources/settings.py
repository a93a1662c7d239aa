"""Where the pipeline keeps everything it writes."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOME_ENV_VAR = "INSTRUCT_SELECT_HOME"


def default_home() -> str:
    """`$INSTRUCT_SELECT_HOME`, else `./storage` under the project (CONTRACT.md)."""
    return os.environ.get(HOME_ENV_VAR) or str(PROJECT_ROOT / "storage")


class StorageSettings(dg.ConfigurableResource):
    """Storage root. Every artifact, cache and the DuckDB file live under `home`."""

    home: str

    @property
    def root(self) -> Path:
        path = Path(self.home).expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def duckdb_path(self) -> Path:
        return self.root / "lineage.duckdb"

    def subdir(self, *parts: str) -> Path:
        path = self.root.joinpath(*parts)
        path.mkdir(parents=True, exist_ok=True)
        return path
