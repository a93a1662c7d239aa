"""Where the pipeline keeps everything it writes."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from selection.common import files
from selection.common.names import path_under

PROJECT_ROOT = Path(__file__).resolve().parents[1]
HOME_ENV_VAR = "INSTRUCT_SELECT_HOME"
# The DuckDB file, directly under the storage root, that holds the lineage and every stage's tables.
LINEAGE_DB_FILE = "lineage.duckdb"


def default_home() -> str:
    """The storage root: `$INSTRUCT_SELECT_HOME` when set, else `./storage` under the project."""
    return os.environ.get(HOME_ENV_VAR) or str(PROJECT_ROOT / "storage")


def check_root_path(path: Path) -> None:
    """Refuse a root DuckDB cannot hold: it reads a '?' in a file path as the start of connection
    options and then opens another file than the one named."""
    if "?" in str(path):
        raise ValueError(
            f"storage root {path} contains '?', which DuckDB reads as the start of connection options; "
            f"set {HOME_ENV_VAR} (or the `settings` resource's `home`) to a path without '?'"
        )


class StorageSettings(dg.ConfigurableResource):
    """Storage root. Every artifact, cache and the DuckDB file live under `home`."""

    home: str

    @property
    def root(self) -> Path:
        """The resolved root, created; every later write under it is confined to it (symlinks included)."""
        path = Path(self.home).expanduser().resolve()
        check_root_path(path)
        path.mkdir(parents=True, exist_ok=True)
        return files.register_root(path)

    def path(self, *parts: str) -> Path:
        """`root/parts...`, refused (ValueError) if it would leave the storage root; nothing is created."""
        return path_under(self.root, *parts)

    def subdir(self, *parts: str) -> Path:
        """The folder `root/parts...`, created; refused if it would leave the storage root."""
        return files.make_dirs(self.path(*parts))


GRADIENT_SHARDS_ENV_VAR = "INSTRUCT_SELECT_GRADIENT_SHARDS"
DEFAULT_GRADIENT_SHARDS = 4


def gradient_shard_count() -> int:
    """How many parts `train_gradients` cuts the pool into (`$INSTRUCT_SELECT_GRADIENT_SHARDS`, default 4).

    Each part is one partition, so a run launcher or executor can compute them in parallel
    on separate machines. Changing the count makes new partition keys and new store folders:
    features stored under the old layout are not reused, and layouts are never mixed.
    """
    raw = os.environ.get(GRADIENT_SHARDS_ENV_VAR, str(DEFAULT_GRADIENT_SHARDS))
    if not raw.isdigit() or not 1 <= int(raw) <= 999:
        raise ValueError(f"{GRADIENT_SHARDS_ENV_VAR}={raw!r}: expected a whole number from 1 to 999")
    return int(raw)
