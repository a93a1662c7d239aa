"""Fault scenarios: bad settings and damaged metadata end in errors that name the field or file and the fix.

Config values are refused when the config is read, before any model loads (``NoModelStore``
fails the run if one does): projection ``dims`` (empty, repeated, not positive, not fitting the
projection mode) and selection ``budget`` (infinite, NaN, zero, negative, not whole, above the
pool; a fraction is below 1, 1 is one example). A truncated JSON metadata file (an array store's
manifest, influence scores' integrity record) is refused naming the file and the fix. A record
without its checksums is never trusted (an edited chunk record could serve one example's features
as another's; a checkpoint without file records could hold any adapter): it is refused naming the
file and the asset to rematerialize, which recomputes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from assets.gradients import target_gradients
from assets.influence import influence_scores
from assets.methods import SELECTION_ASSETS
from assets.partitions import DEFAULT_MODEL
from assets.pool import raw_pool, target_tasks
from resources import build_resources
from selection import selectors
from selection.common import arrays, integrity
from selection.common.integrity import ArtifactIntegrityError
from selection.influence import scores
from selection.train.training import ADAPTER_DIR, CHECKPOINT_FILE, verify_checkpoint
from tests.fakes import materialize_error, user_error_text
from tests.test_faults_inputs import NoModelStore

pytestmark = pytest.mark.faults

random_selection = next(a for a in SELECTION_ASSETS if a.key == dg.AssetKey("random_selection"))
ASSET = "train_gradients (shard 00-of-01)"


def _record(record_property, scenario: str, expected: str, observed: str) -> None:
    record_property("scenario", scenario)
    record_property("expected", expected)
    record_property("observed", observed)


@pytest.fixture
def resources(tmp_path: Path) -> dict:
    return {**build_resources(home=str(tmp_path / "home"), env="ci"), "model_store": NoModelStore(cache_dir="unused")}


@pytest.fixture
def warmup_recorded(tmp_path: Path, resources: dict, monkeypatch) -> None:
    """Target tasks and a recorded warmup run, so a gradient run gets as far as loading the model."""
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"task": "t", "prompt": "2+2?", "completion": "4"}) + "\n")
    dg.materialize(
        [target_tasks],
        resources=resources,
        run_config={"ops": {"target_tasks": {"config": {"files": [{"path": str(targets)}], "n_val": 1}}}},
    )
    monkeypatch.setattr(
        "selection.train.checkpoints.latest_run_checkpoints",
        lambda con, model, stage: pd.DataFrame(
            {"run_key": ["never-read"], "epoch": [1], "path": [str(tmp_path / "none")], "avg_lr": [1.0]}
        ),
    )


@pytest.mark.parametrize(
    "dims, named, fix",
    [
        ([], "`dims` is empty", "give at least one projection dim, e.g. [8192]"),
        ([64, 64], "`dims` lists 64 more than once", "list each dim once, e.g. [64]"),
        ([64, 0, -8], "`dims` holds 0, -8", "every projection dim must be a positive integer, e.g. [8192]"),
        ([64, 30], "`dims` holds 30, not a multiple of 4", "use multiples of 4 (e.g. 8192) or `mode` 'exact'"),
    ],
    ids=["empty", "repeated", "not-positive", "not-multiple-of-4"],
)
def test_bad_projection_dims_are_refused_before_the_model_loads(
    resources: dict, warmup_recorded, dims: list[int], named: str, fix: str, record_property
) -> None:
    config = {"ops": {"target_gradients": {"config": {"dims": dims}}}}
    observed = materialize_error([target_gradients], resources, config, DEFAULT_MODEL)
    _record(
        record_property,
        f"target_gradients with projection dims {dims}",
        "refused when the config is read, before the model loads, naming `dims` and the fix",
        user_error_text(observed, 300),
    )
    assert named in observed and fix in observed
    assert "model was loaded" not in observed
    assert "another process" not in observed and "empty sequence" not in observed


def test_bad_influence_dim_is_refused_when_the_config_is_read(resources: dict, record_property) -> None:
    config = {"ops": {"influence_scores": {"config": {"dim": 0}}}}
    observed = materialize_error([influence_scores], resources, config, DEFAULT_MODEL)
    _record(
        record_property,
        "influence_scores with projection dim 0",
        "refused when the config is read, naming `dim` and the fix",
        user_error_text(observed, 300),
    )
    assert "`dim` holds 0" in observed and "positive" in observed
    assert "warmup" not in observed  # not "materialize warmup_checkpoints first": the config is wrong


def _scored_pool(tmp_path: Path, resources: dict, monkeypatch, n: int = 4) -> None:
    """A pool of ``n`` examples and influence scores of every one (the scores are faked)."""
    pool = tmp_path / "p.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"q {i}", "completion": f"a {i}"}) + "\n" for i in range(n)))
    dg.materialize(
        [raw_pool],
        resources=resources,
        run_config={"ops": {"raw_pool": {"config": {"sources": [{"path": str(pool)}]}}}},
    )
    with resources["lineage"].connect() as con:
        (version,) = con.execute("SELECT pool_version FROM pool_versions").fetchone()
        ids = [r[0] for r in con.execute("SELECT example_id FROM pool ORDER BY line_no").fetchall()]
    run = {
        "scores_dir": "unused",
        "columns": [{"task": "t", "subtask": "s", "val_example_id": "v"}],
        "n_train": n,
        "n_val": 1,
        "pool_version": version,
    }
    monkeypatch.setattr("assets.selections.latest_influence", lambda con, model: run)
    monkeypatch.setattr(
        "assets.selections.influence.load_scores", lambda _: (np.arange(n, dtype=np.float32)[:, None], ids)
    )


@pytest.mark.parametrize(
    "budget, named",
    [
        (float("inf"), "`budget` inf is not a finite number"),
        (float("nan"), "`budget` nan is not a finite number"),
        (0.0, "`budget` 0.0 must be positive"),
        (-3.0, "`budget` -3.0 must be positive"),
        (2.5, "`budget` 2.5 is >= 1, so a count of examples, and must be whole"),
    ],
    ids=["infinity", "nan", "zero", "negative", "not-whole"],
)
def test_bad_budget_is_refused_naming_the_rule(
    tmp_path: Path, resources: dict, monkeypatch, budget: float, named: str, record_property
) -> None:
    _scored_pool(tmp_path, resources, monkeypatch)
    config = {"ops": {"random_selection": {"config": {"budget": budget}}}}
    observed = materialize_error([random_selection], resources, config, DEFAULT_MODEL)
    _record(
        record_property,
        f"random_selection with budget {budget}",
        "refused naming `budget` and the rule: a whole count >= 1 (1 is one example) or a fraction below 1",
        user_error_text(observed, 300),
    )
    assert named in observed
    assert "a whole count >= 1 (1 means one example) or a fraction of the pool between 0 and 1" in observed
    assert "cannot convert" not in observed


def test_budget_hint_never_offers_a_fraction_of_one(
    tmp_path: Path, resources: dict, monkeypatch, record_property
) -> None:
    _scored_pool(tmp_path, resources, monkeypatch)
    config = {"ops": {"random_selection": {"config": {"budget": 1e18}}}}
    observed = materialize_error([random_selection], resources, config, DEFAULT_MODEL)
    _record(
        record_property,
        "random_selection with budget 1e18 on a 4-example pool, every example scored",
        "lower `budget` to at most 4, or a fraction below 1 (a budget of 1 is one example, not the whole pool)",
        user_error_text(observed, 300),
    )
    assert "`budget` 1000000000000000000 is above the pool of 4 current examples" in observed
    assert "fraction <= 1.0" not in observed
    assert "lower `budget` to at most 4 (or a fraction below 1: 1 means one example)" in observed


def _store(directory: Path) -> arrays.ArrayStore:
    return arrays.ArrayStore(directory, {"kind": "test"}, lambda existing: None, dtype="float32", width=2, asset=ASSET)


def test_truncated_manifest_is_refused_naming_the_file(tmp_path: Path, record_property) -> None:
    directory = tmp_path / "store"
    _store(directory).commit(["a"], np.ones((1, 2), np.float32))
    manifest = directory / arrays.MANIFEST_FILE
    manifest.write_text(manifest.read_text()[:5])  # a writer killed mid-write, or a disk that filled up
    with pytest.raises(Exception) as raised:
        _store(directory)
    observed = str(raised.value)
    _record(
        record_property,
        "array store whose manifest.json is truncated",
        "refused naming manifest.json, the store folder and the asset to rematerialize after deleting the folder",
        " ".join(observed.split())[:300],
    )
    assert isinstance(raised.value, ArtifactIntegrityError)
    assert str(manifest) in observed and "not valid JSON" in observed
    assert f"delete {directory}" in observed and f"rematerialize {ASSET}" in observed


def test_chunk_record_without_its_checksum_is_never_trusted(tmp_path: Path, record_property) -> None:
    directory = tmp_path / "store"
    store = _store(directory)
    store.commit(["a", "b"], np.array([[1, 0], [0, 1]], np.float32))
    record_path = directory / "shard-00000.json"
    record = json.loads(record_path.read_text())
    del record["record_sha256"]  # read as an old-format record before the fix
    record["ids"] = ["b", "a"]  # swapped: a's features would be served as b's
    record_path.write_text(json.dumps(record))
    integrity.forget_digests()
    reopened = _store(directory)
    with pytest.raises(ArtifactIntegrityError) as raised:
        reopened.absent(["a"])  # what readers ask before reading rows
    observed = str(raised.value)
    _record(
        record_property,
        "chunk commit record with record_sha256 removed and its ids swapped",
        "the chunk is damaged, never read: the error names the record, the store folder and the asset",
        " ".join(observed.split())[:300],
    )
    assert str(record_path) in observed and "no record_sha256" in observed
    assert f"rematerialize {ASSET}" in observed
    assert 0 in reopened.damaged and "a" not in reopened


def test_chunk_record_without_the_file_digest_is_never_trusted(tmp_path: Path, record_property) -> None:
    directory = tmp_path / "store"
    _store(directory).commit(["a"], np.ones((1, 2), np.float32))
    record_path = directory / "shard-00000.json"
    record = json.loads(record_path.read_text())
    del record["record_sha256"], record["sha256"]
    record["record_sha256"] = arrays._record_checksum(record)  # a consistent record, but without the digest
    record_path.write_text(json.dumps(record))
    reopened = _store(directory)
    with pytest.raises(ArtifactIntegrityError) as raised:
        reopened.array(0)
    observed = str(raised.value)
    _record(
        record_property,
        "chunk commit record without the sha256 of its .npy",
        "the chunk is damaged, never read unchecked: the error names the record and the asset",
        " ".join(observed.split())[:300],
    )
    assert str(record_path) in observed and "no sha256" in observed and f"rematerialize {ASSET}" in observed


def test_truncated_score_record_is_refused_naming_the_file(tmp_path: Path, record_property) -> None:
    out_dir = tmp_path / "scores"
    out_dir.mkdir()
    (out_dir / scores.SCORES_FILE).write_bytes(b"")
    (out_dir / scores.IDS_FILE).write_text("[]")
    (out_dir / scores.RECORD_FILE).write_text('{"train_ids.json": {"sha2')  # cut mid-write
    with pytest.raises(Exception) as raised:
        scores.load_scores(out_dir)
    observed = str(raised.value)
    _record(
        record_property,
        "influence scores whose integrity.json is truncated",
        "refused naming integrity.json and influence_scores, the asset to rematerialize",
        " ".join(observed.split())[:300],
    )
    assert isinstance(raised.value, ArtifactIntegrityError)
    assert str(out_dir / scores.RECORD_FILE) in observed and "rematerialize influence_scores" in observed


def test_checkpoint_without_file_records_is_never_trusted(tmp_path: Path, record_property) -> None:
    epoch = tmp_path / "epoch_1"
    (epoch / ADAPTER_DIR).mkdir(parents=True)
    (epoch / ADAPTER_DIR / "adapter_model.safetensors").write_bytes(b"weights edited by hand")
    (epoch / CHECKPOINT_FILE).write_text(json.dumps({"global_step": 3, "avg_lr": 1e-4}))  # no "files"
    with pytest.raises(ArtifactIntegrityError) as raised:
        verify_checkpoint(epoch)
    observed = str(raised.value)
    _record(
        record_property,
        "warmup checkpoint whose checkpoint.json has no sha256 records of its files",
        "refused (its adapter and moments cannot be checked), naming checkpoint.json and warmup_checkpoints",
        " ".join(observed.split())[:300],
    )
    assert str(epoch / CHECKPOINT_FILE) in observed and "no sha256 records" in observed
    assert "rematerialize warmup_checkpoints" in observed


def test_bad_kmq_budget_is_refused_before_the_pool_is_read(resources: dict, record_property) -> None:
    kmq_selection = next(a for a in SELECTION_ASSETS if a.key == dg.AssetKey("kmq_selection"))
    config = {"ops": {"kmq_selection": {"config": {"budget": float("inf")}}}}
    observed = materialize_error([kmq_selection], resources, config, DEFAULT_MODEL)
    _record(
        record_property,
        "kmq_selection with budget Infinity, before any pool or clusters exist",
        "refused when the settings are made, before the pool is read or a model loads, naming `budget`",
        user_error_text(observed, 300),
    )
    assert "`budget` inf is not a finite number" in observed and selectors.BUDGET_RULE in observed
    assert "model was loaded" not in observed
