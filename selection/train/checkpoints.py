"""Which examples trained which LoRA checkpoint, and loading a checkpoint's adapter back."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import torch

from selection.common.db import transaction
from selection.train.training import ADAPTER_DIR, WARMUP_ASSET, EpochCheckpoint, verify_checkpoint

CHECKPOINT_TABLES = (
    """CREATE TABLE IF NOT EXISTS checkpoints (
        model VARCHAR NOT NULL, stage VARCHAR NOT NULL, run_key VARCHAR NOT NULL, epoch INTEGER NOT NULL,
        path VARCHAR NOT NULL, avg_lr DOUBLE, mean_loss DOUBLE, n_examples INTEGER, pool_version VARCHAR,
        method VARCHAR, target VARCHAR, budget INTEGER, config JSON, created_at TIMESTAMPTZ, seed INTEGER
    )""",
    """CREATE TABLE IF NOT EXISTS checkpoint_examples (
        model VARCHAR NOT NULL, stage VARCHAR NOT NULL, run_key VARCHAR NOT NULL, example_id VARCHAR NOT NULL
    )""",
    # Tables made before finetuning recorded its seed (rows from then read NULL).
    "ALTER TABLE checkpoints ADD COLUMN IF NOT EXISTS seed INTEGER",
)


def ensure_checkpoint_tables(con: duckdb.DuckDBPyConnection) -> None:
    """Create (or bring up to date) `checkpoints` and `checkpoint_examples`."""
    for ddl in CHECKPOINT_TABLES:
        con.execute(ddl)


@dataclass(frozen=True)
class CheckpointRow:
    model: str
    stage: str  # "warmup" or "finetune"
    run_key: str
    epoch: int
    path: str
    avg_lr: float
    mean_loss: float
    n_examples: int
    pool_version: str
    method: str | None = None
    target: str | None = None
    budget: int | None = None
    config: dict[str, Any] | None = None
    seed: int | None = None  # the training seed (finetuning records it; one checkpoint per seed)

    @classmethod
    def of_epoch(
        cls,
        checkpoint: EpochCheckpoint,
        model: str,
        stage: str,
        run_key: str,
        n_examples: int,
        pool_version: str,
        **details: Any,
    ) -> CheckpointRow:
        """The row of one saved epoch of a training run; ``details`` sets the optional fields."""
        return cls(
            model,
            stage,
            run_key,
            checkpoint.epoch,
            str(checkpoint.path),
            checkpoint.avg_lr,
            checkpoint.mean_loss,
            n_examples,
            pool_version,
            **details,
        )


def training_run_key(model_fingerprint: str, config: dict[str, Any], example_ids: Sequence[str]) -> str:
    """Identity of a training run: the model, the training config and the exact examples."""
    payload = json.dumps([model_fingerprint, config, sorted(example_ids)], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def record_training_run(
    con: duckdb.DuckDBPyConnection, rows: Sequence[CheckpointRow], example_ids: Sequence[str]
) -> None:
    """Replace the rows of this (model, stage, run_key) atomically: checkpoints and their examples."""
    if not rows:
        raise ValueError("a training run without checkpoints cannot be recorded")
    keys = {(r.model, r.stage, r.run_key) for r in rows}
    if len(keys) != 1:
        raise ValueError(f"rows of several runs given at once: {sorted(keys)}")
    model, stage, run_key = keys.pop()
    ensure_checkpoint_tables(con)
    now = datetime.now(UTC)
    checkpoint_frame = pd.DataFrame(  # columns by name: the INSERT below matches them BY NAME
        [{**asdict(r), "config": json.dumps(r.config or {}, sort_keys=True), "created_at": now} for r in rows]
    )
    checkpoint_frame["seed"] = checkpoint_frame["seed"].astype("Int64")  # all-None would otherwise be an object column
    example_frame = pd.DataFrame({"model": model, "stage": stage, "run_key": run_key, "example_id": list(example_ids)})  # noqa: F841  (DuckDB reads it by name in the SQL)
    where = "WHERE model = ? AND stage = ? AND run_key = ?"
    with transaction(con):
        con.execute(f"DELETE FROM checkpoints {where}", [model, stage, run_key])
        con.execute(f"DELETE FROM checkpoint_examples {where}", [model, stage, run_key])
        con.execute("INSERT INTO checkpoints BY NAME SELECT * FROM checkpoint_frame")
        con.execute("INSERT INTO checkpoint_examples SELECT * FROM example_frame")


def examples_of_latest_run(con: duckdb.DuckDBPyConnection, model: str, stage: str, config_key: str) -> list[str] | None:
    """Example ids of the latest recorded run of (model, stage) whose config carries `config_key`, if any."""
    ensure_checkpoint_tables(con)
    rows = con.execute(
        """SELECT run_key FROM checkpoints
           WHERE model = ? AND stage = ? AND json_extract_string(config, '$.config_key') = ?
           ORDER BY created_at DESC LIMIT 1""",
        [model, stage, config_key],
    ).fetchall()
    if not rows:
        return None
    ids = con.execute(
        "SELECT example_id FROM checkpoint_examples WHERE model = ? AND stage = ? AND run_key = ? ORDER BY example_id",
        [model, stage, rows[0][0]],
    ).fetchall()
    return [r[0] for r in ids]


def latest_run_checkpoints(con: duckdb.DuckDBPyConnection, model: str, stage: str) -> pd.DataFrame:
    """Checkpoints of the most recently recorded run of `stage` for `model`, by epoch."""
    ensure_checkpoint_tables(con)
    frame = con.execute(
        """SELECT * FROM checkpoints WHERE model = ? AND stage = ? AND run_key = (
               SELECT run_key FROM checkpoints WHERE model = ? AND stage = ? ORDER BY created_at DESC LIMIT 1)
           ORDER BY epoch""",
        [model, stage, model, stage],
    ).df()
    if frame.empty:
        raise ValueError(f"no {stage} checkpoints recorded for model {model!r}; materialize warmup_checkpoints first")
    return frame


def load_adapter_weights(peft_model: torch.nn.Module, checkpoint_dir: str | Path, asset: str = WARMUP_ASSET) -> None:
    """Put a saved epoch's adapter weights into `peft_model` (same LoRA config), keeping them trainable.

    The folder is first checked against its commit record (`ArtifactIntegrityError` naming the file
    and `asset`, the asset that wrote it, if anything changed since)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights_path = Path(checkpoint_dir) / ADAPTER_DIR / "adapter_model.safetensors"
    if not weights_path.is_file():
        raise ValueError(f"{checkpoint_dir} has no adapter weights at {weights_path}")
    verify_checkpoint(checkpoint_dir, asset)
    result = set_peft_model_state_dict(peft_model, load_file(str(weights_path)))
    missing_lora = [key for key in result.missing_keys if "lora_" in key]
    if missing_lora or result.unexpected_keys:
        raise ValueError(
            f"adapter at {weights_path} does not fit the model: missing {missing_lora[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
