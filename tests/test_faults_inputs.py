"""Fault scenarios: nothing corrupt is ever used.

Invalid combinations of settings and data are refused before the expensive step, with the
fix in the message (warmup schedule, selection budget, val set); an edited pool record's old
version is superseded and never selected again, with every record still accounted for.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from assets.gradients import target_gradients
from assets.methods import SELECTION_ASSETS
from assets.partitions import DEFAULT_MODEL
from assets.pool import raw_pool, target_tasks
from assets.warmup import warmup_checkpoints
from resources import build_resources
from selection.data import tokenization
from selection.diversity.diversity_store import CLUSTERS_DDL
from tests.fakes import TinyModelStore, materialize_error, user_error_text

pytestmark = pytest.mark.faults

kmq_selection, random_selection = (
    next(a for a in SELECTION_ASSETS if a.key == dg.AssetKey(name)) for name in ("kmq_selection", "random_selection")
)


class NoModelStore(TinyModelStore):
    """Proves a refusal came before the expensive step: loading the model fails the test."""

    def load(self, spec, device):
        raise AssertionError("the model was loaded before the refusal")


def _write_pool(path: Path, answers: list[str]) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"question {i}", "completion": a}) + "\n" for i, a in enumerate(answers))
    )
    return path


@pytest.fixture
def resources(tmp_path: Path) -> dict:
    return {**build_resources(home=str(tmp_path / "home"), env="ci"), "model_store": NoModelStore(cache_dir="unused")}


def _ingest(resources: dict, path: Path) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [raw_pool],
        resources=resources,
        run_config={"ops": {"raw_pool": {"config": {"sources": [{"path": str(path)}]}}}},
    )


def _count(resources: dict, query: str) -> int:
    with resources["lineage"].connect() as con:
        return con.execute(query).fetchone()[0]


def test_warmup_with_a_zero_lr_epoch_is_refused_before_training(
    tmp_path: Path, resources: dict, record_property
) -> None:
    _ingest(resources, _write_pool(tmp_path / "p.jsonl", [f"answer {i}" for i in range(100)]))
    # 5 examples at 8 per step: one step per epoch, epoch 1's step is the warmup step at lr 0.
    config = {
        "ops": {
            "warmup_checkpoints": {"config": {"fraction": 0.05, "batch_size": 8, "epochs": 4, "warmup_ratio": 0.03}}
        }
    }
    observed = materialize_error([warmup_checkpoints], resources, config, DEFAULT_MODEL)
    record_property("scenario", "warmup on a 100-example pool: fraction 0.05, batch 8, warmup ratio 0.03")
    record_property("expected", "refused before the model loads, naming fraction / batch_size / warmup_ratio")
    record_property("observed", user_error_text(observed, 200))
    assert "average learning rate of 0" in observed
    assert all(f"`{field}`" in observed for field in ("fraction", "batch_size", "warmup_ratio"))
    assert "model was loaded" not in observed
    assert not (tmp_path / "home" / "models").exists()


def test_budget_above_the_pool_is_refused_before_scoring(tmp_path: Path, resources: dict, record_property) -> None:
    _ingest(resources, _write_pool(tmp_path / "p.jsonl", [f"answer {i}" for i in range(6)]))
    with resources["lineage"].connect() as con:
        (version,) = con.execute("SELECT pool_version FROM pool_versions").fetchone()
        con.execute(CLUSTERS_DDL)
        frame = pd.DataFrame(  # noqa: F841  (DuckDB reads it by name in the SQL)
            {
                "pool_version": version,
                "encoder_fingerprint": "e",
                "k": 2,
                "example_id": [r[0] for r in con.execute("SELECT example_id FROM pool").fetchall()],
                "cluster": [0, 1, 0, 1, 0, 1],
            }
        )
        con.execute("INSERT INTO clusters SELECT * FROM frame")
    observed = materialize_error(
        [kmq_selection], resources, {"ops": {"kmq_selection": {"config": {"budget": 7}}}}, DEFAULT_MODEL
    )
    record_property("scenario", "kmq_selection with budget 7 on a 6-example pool")
    record_property("expected", "refused before quality scoring, naming `budget` and its largest valid value")
    record_property("observed", user_error_text(observed, 200))
    assert "`budget` 7 is above the pool of 6 current examples; lower `budget` to at most 6" in observed
    assert "model was loaded" not in observed
    assert _count(resources, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'selections'") == 0


def test_val_task_without_target_tokens_is_refused_before_gradients(
    tmp_path: Path, resources: dict, monkeypatch, record_property
) -> None:
    lines = [
        {"task": "short", "prompt": "2+2?", "completion": "4"},
        {"task": "long", "prompt": "UNUSABLE " * 40, "completion": "cut away by max_length"},
    ]
    target_file = tmp_path / "targets.jsonl"
    target_file.write_text("".join(json.dumps(line) + "\n" for line in lines))
    dg.materialize(
        [target_tasks],
        resources=resources,
        run_config={"ops": {"target_tasks": {"config": {"files": [{"path": str(target_file)}], "n_val": 1}}}},
    )
    monkeypatch.setattr(
        "selection.train.checkpoints.latest_run_checkpoints",
        lambda con, model, stage: pd.DataFrame(
            {"run_key": ["never-read"], "epoch": [1], "path": [str(tmp_path / "none")], "avg_lr": [1.0]}
        ),
    )
    # Truncation now keeps part of every response, so "no target tokens within max_length" is
    # produced here by the tokenizer wrapper: the check and its place before any gradient are tested.
    real = tokenization.tokenize_many

    def tokenize_many(tokenizer, conversations, max_length):
        conversations = list(conversations)
        examples, stats = real(tokenizer, conversations, max_length)
        cut = tuple(i for i, c in enumerate(conversations) if "UNUSABLE" in c[0]["content"])
        return examples, dataclasses.replace(stats, no_target_indices=cut)

    monkeypatch.setattr("selection.data.tokenization.tokenize_many", tokenize_many)
    computed = []
    monkeypatch.setattr("selection.influence.datastore.compute_features", lambda *a, **k: computed.append(1))
    resources = {**resources, "model_store": TinyModelStore(cache_dir="unused")}  # max_length 96
    observed = materialize_error([target_gradients], resources, None, DEFAULT_MODEL)
    record_property("scenario", "target task whose only val example has no target tokens within max_length")
    record_property("expected", "target_gradients refused before any gradient, naming the task and max_length")
    record_property("observed", user_error_text(observed, 200))
    assert "tasks ['long'] have no usable val example" in observed and "max_length 96" in observed
    assert computed == []


def test_edited_record_is_superseded_and_never_selected(
    tmp_path: Path, resources: dict, monkeypatch, record_property
) -> None:
    path = _write_pool(tmp_path / "p.jsonl", ["a0", "a1", "a2", "a3"])
    _ingest(resources, path)
    with resources["lineage"].connect() as con:
        old_ids = [r[0] for r in con.execute("SELECT example_id FROM pool ORDER BY line_no").fetchall()]
    _write_pool(path, ["a0", "a1 (corrected)", "a2", "a3"])
    report = _ingest(resources, path)
    metadata = report.asset_materializations_for_node("raw_pool")[0].metadata
    with resources["lineage"].connect() as con:
        (version,) = con.execute("SELECT pool_version FROM pool_versions ORDER BY seq DESC LIMIT 1").fetchone()
        read, accepted, rejected, duplicates = con.execute(
            "SELECT n_read, n_accepted, n_rejected, n_duplicates FROM pool_sources ORDER BY ingested_at DESC LIMIT 1"
        ).fetchone()
    # Influence scores computed before the edit still hold the old row.
    run = {
        "scores_dir": "unused",
        "columns": [{"task": "t", "subtask": "s", "val_example_id": "v"}],
        "n_train": len(old_ids),
        "n_val": 1,
        "pool_version": version,
    }
    monkeypatch.setattr("assets.selections.latest_influence", lambda con, model: run)
    monkeypatch.setattr(
        "assets.selections.influence.load_scores",
        lambda _: (np.arange(len(old_ids), dtype=np.float32)[:, None], old_ids),
    )
    too_many = materialize_error(
        [random_selection], resources, {"ops": {"random_selection": {"config": {"budget": 4}}}}, DEFAULT_MODEL
    )
    dg.materialize(
        [random_selection],
        resources=resources,
        run_config={"ops": {"random_selection": {"config": {"budget": 3}}}},
        partition_key=DEFAULT_MODEL,
    )
    with resources["lineage"].connect() as con:
        picked = {r[0] for r in con.execute("SELECT example_id FROM selections").fetchall()}
    record_property("scenario", "pool record on line 2 edited, source re-ingested, then random selection")
    record_property(
        "expected",
        "old row superseded (counted in raw_pool metadata), never selected; accepted + rejected + duplicates = read",
    )
    record_property(
        "observed",
        f"n_superseded={metadata['n_superseded'].value}, old row selected: "
        f"{old_ids[1] in picked}; budget 4 of 4 scored rows: "
        f"{too_many.split(' | ')[-1][:80] or 'accepted'}",
    )
    assert metadata["n_superseded"].value == 1 and metadata["n_total"].value == 4
    assert accepted + rejected + duplicates == read == 4
    assert old_ids[1] not in picked and len(picked) == 3
    assert "only 3 of the 4 current pool examples are current examples with influence scores" in too_many
