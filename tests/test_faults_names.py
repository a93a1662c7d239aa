"""Fault scenarios: user-supplied names are data, never paths or SQL.

Traversal (`../`, absolute paths, `..\\`, NUL bytes, empty, very long) and SQL injection are
tried on every config field that reaches a path or SQL; each scenario asserts the run fails
with an error naming the field, that nothing is written outside the storage root and that no
table or row appears. Also: unreadable pool files (a fake .gz, random bytes named .parquet)
fail with an error naming the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import pydantic
import pytest

from assets.finetune import FinetuneConfig, finetuned_checkpoints
from assets.methods import SELECTION_ASSETS
from assets.partitions import DEFAULT_MODEL
from assets.pool import raw_pool, target_tasks
from resources import build_resources
from resources.lineage import LineageStore
from resources.model_store import MODELS_FILE_ENV, registered_models
from resources.settings import StorageSettings
from selection import selection_store
from selection.common import names
from selection.data import targets
from selection.data.ingest import SourceSpec
from selection.data.pool_store import ingest_sources
from tests.fakes import materialize_error, user_error_text

pytestmark = pytest.mark.faults

less_selection = next(a for a in SELECTION_ASSETS if a.key == dg.AssetKey("less_selection"))

MARK = "ESCAPED"
# (label, value): every way a name could try to leave the storage root.
TRAVERSALS = [
    ("dotdot", f"../../../../{MARK}"),
    ("absolute", f"/tmp/{MARK}"),
    ("backslash", f"..\\..\\{MARK}"),
    ("nul", f"ok\x00{MARK}"),
    ("empty", ""),
    ("long", MARK * 40),
]
INJECTIONS = [
    "1GB'; CREATE TABLE x AS SELECT 1; --",
    "1GB'; COPY (SELECT 42) TO '{outside}'; --",
    "1GB; DROP TABLE pool",
    "",
    "lots",
]


def _escaped(tmp_path: Path) -> list[str]:
    """Files or folders named after MARK anywhere near the test (where an escape would land)."""
    found = [str(p) for p in tmp_path.parent.rglob(f"*{MARK}*")] + [str(p) for p in Path("/tmp").glob(f"{MARK}*")]
    return sorted(found)


def _tables(db_path: str) -> set[str]:
    if not Path(db_path).exists():
        return set()
    with duckdb.connect(db_path, read_only=True) as con:
        return {row[0] for row in con.execute("SHOW TABLES").fetchall()}


def _count(db_path: str, table: str) -> int:
    if table not in _tables(db_path):
        return 0
    with duckdb.connect(db_path, read_only=True) as con:
        return con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # table: a constant of this test


def _pool_file(path: Path, n: int = 4) -> Path:
    path.write_text(
        "".join(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) + "\n" for i in range(n))
    )
    return path


@pytest.fixture
def resources(tmp_path: Path) -> dict:
    return build_resources(home=str(tmp_path / "home"), env="ci")


def _report_refusal(record_property, scenario: str, expected: str, observed: str) -> None:
    record_property("scenario", scenario)
    record_property("expected", expected)
    record_property("observed", user_error_text(observed, 160))


def _assert_nothing_written(tmp_path: Path, resources: dict, table: str) -> None:
    """Nothing escaped the storage root and ``table`` has no row."""
    assert _escaped(tmp_path) == []
    assert _count(resources["lineage"].db_path, table) == 0


def _ingest_pool(tmp_path: Path, resources: dict) -> tuple[list[str], str]:
    """Materialize raw_pool from a small pool file; its example ids (sorted) and pool version."""
    dg.materialize(
        [raw_pool],
        resources=resources,
        run_config={"ops": {"raw_pool": {"config": {"sources": [{"path": str(_pool_file(tmp_path / "p.jsonl"))}]}}}},
    )
    with resources["lineage"].connect() as con:
        ids = [row[0] for row in con.execute("SELECT example_id FROM pool ORDER BY example_id").fetchall()]
        (version,) = con.execute("SELECT pool_version FROM pool_versions").fetchone()
    return ids, version


def _target_task_config(tmp_path: Path, task: str) -> dict:
    target_file = tmp_path / "targets.jsonl"
    target_file.write_text(json.dumps({"prompt": "q", "completion": "a"}) + "\n")
    return {"ops": {"target_tasks": {"config": {"files": [{"path": str(target_file), "task": task}]}}}}


def _pool_source_config(tmp_path: Path, name: str) -> dict:
    source = {"path": str(_pool_file(tmp_path / "p.jsonl")), "name": name}
    return {"ops": {"raw_pool": {"config": {"sources": [source]}}}}


# Config names checked before any write: (asset, its config with the name, the table it would write,
# the scenario's prefix, what is expected, the fragments the error must contain).
CONFIG_NAMES = {
    "target_task": (
        target_tasks,
        _target_task_config,
        "targets",
        "target_tasks config task",
        "config error naming the task before any write; nothing outside the root",
        ("task", "must be 1-64 characters"),
    ),
    "pool_source": (
        raw_pool,
        _pool_source_config,
        "pool",
        "raw_pool source name",
        "config error naming the source before any write",
        ("source", "printable characters"),
    ),
}


@pytest.mark.parametrize("field", CONFIG_NAMES)
@pytest.mark.parametrize("label,value", TRAVERSALS, ids=[t[0] for t in TRAVERSALS])
def test_name_from_config_is_refused_before_any_write(
    tmp_path: Path, resources: dict, field: str, label: str, value: str, record_property
) -> None:
    asset, config_with, table, scenario, expected, fragments = CONFIG_NAMES[field]
    observed = materialize_error([asset], resources, config_with(tmp_path, value))
    _report_refusal(record_property, f"{scenario} = {label} ({value[:24]!r})", expected, observed)
    assert all(fragment in observed for fragment in fragments)
    _assert_nothing_written(tmp_path, resources, table)
    assert _count(resources["lineage"].db_path, "lineage") == 0


def test_target_task_override_is_checked_however_built() -> None:
    """The reported bug: the asset built TargetFile directly, skipping the config check."""
    with pytest.raises(ValueError, match=r"target file t\.jsonl: task '\.\./x'"):
        targets.TargetFile(path="t.jsonl", task="../x")
    assert targets.TargetFile(path="t.jsonl", task=" code ").task == "code"


def test_bad_names_in_records_become_rejects(tmp_path: Path, record_property) -> None:
    good = {"task": "qa", "subtask": "geo", "prompt": "Capital of France?", "completion": "Paris."}
    lines = [
        {**good, "task": f"../../{MARK}", "prompt": "p1"},
        {**good, "subtask": f"a/../../{MARK}", "prompt": "p2"},
        {**good, "subtask": "a\x00b", "prompt": "p3"},
        {**good, "subtask": "x" * 201, "prompt": "p4"},
        good,
    ]
    path = tmp_path / "targets.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = targets.build_targets([{"path": str(path)}], n_val=1)
    reasons = {reject.line_no: reject.reason for reject in result.rejects}
    record_property("scenario", "target records with traversal / NUL / overlong task or subtask")
    record_property("expected", "each a recorded bad_name reject naming the field; the good record kept")
    record_property(
        "observed",
        f"{len(result.rejects)} rejects: {sorted({r.split(':')[0] for r in reasons.values()})}; "
        f"{len(result.rows)} row(s) kept",
    )
    assert sorted(reasons) == [1, 2, 3, 4]
    assert all(reason.startswith(f"{targets.BAD_NAME}: field '") for reason in reasons.values())
    assert "field 'task'" in reasons[1] and all("field 'subtask'" in reasons[n] for n in (2, 3, 4))
    assert [(row.task, row.subtask) for row in result.rows] == [("qa", "geo")]


def test_source_names_that_are_labels_are_kept() -> None:
    assert SourceSpec("/data/My Pool.jsonl").name == "My Pool"
    assert SourceSpec("/data/x.jsonl", name=" alpaca (v2) ").name == "alpaca (v2)"


@pytest.mark.parametrize("value", INJECTIONS, ids=["create", "copy", "drop", "empty", "word"])
def test_memory_limit_injection_fails_before_any_write(tmp_path: Path, value: str, record_property) -> None:
    outside = tmp_path / f"{MARK}.csv"
    value = value.format(outside=outside)
    home = tmp_path / "home"
    db_path = str(home / "lineage.duckdb")
    with pytest.raises(pydantic.ValidationError, match="LineageStore.memory_limit"):
        LineageStore(db_path=db_path, memory_limit=value)
    resources = {**build_resources(home=str(home), env="ci"), "lineage": LineageStore.configure_at_launch()}
    config = {
        "ops": {"raw_pool": {"config": {"sources": [{"path": str(_pool_file(tmp_path / "p.jsonl"))}]}}},
        "resources": {"lineage": {"config": {"db_path": db_path, "memory_limit": value}}},
    }
    observed = materialize_error([raw_pool], resources, config)
    _report_refusal(
        record_property,
        f"LineageStore memory_limit = {value[:40]!r}",
        "resource fails to build: no table created, no file written, pool unchanged",
        observed,
    )
    assert "is not a memory size" in observed
    assert not outside.exists() and _escaped(tmp_path) == []
    assert _tables(db_path) == set()


def test_memory_limit_sizes_are_applied(tmp_path: Path) -> None:
    for value, shown in (("512MiB", "512.0 MiB"), ("2 GiB", "2.0 GiB"), ("1gb", "953.6 MiB")):
        store = LineageStore(db_path=str(tmp_path / "l.duckdb"), memory_limit=value)
        with store.connect() as con:
            assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == shown


@pytest.mark.parametrize(
    "label,value", TRAVERSALS + [("pipe", "model|01-of-04")], ids=[t[0] for t in TRAVERSALS] + ["pipe"]
)
def test_model_names_from_env_are_checked(tmp_path: Path, monkeypatch, label: str, value: str, record_property) -> None:
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps([{"name": "fine-model.v2", "source": "/m"}, {"name": value, "source": "/m"}]))
    monkeypatch.setenv(MODELS_FILE_ENV, str(models_file))
    with pytest.raises(ValueError) as caught:
        registered_models()
    record_property("scenario", f"{MODELS_FILE_ENV} model name = {label} ({value[:24]!r})")
    record_property("expected", "error naming the env var, the entry and the name")
    record_property("observed", str(caught.value)[:160])
    assert f"{MODELS_FILE_ENV}={models_file}: entry 1:" in str(caught.value) and "model" in str(caught.value)
    models_file.write_text(json.dumps([{"name": "fine-model.v2", "source": "/m"}]))
    assert "fine-model.v2" in registered_models()


@pytest.mark.parametrize("field", ["targets", "methods"])
@pytest.mark.parametrize("label,value", TRAVERSALS, ids=[t[0] for t in TRAVERSALS])
def test_finetune_config_names_are_checked(field: str, label: str, value: str, record_property) -> None:
    with pytest.raises(pydantic.ValidationError) as caught:
        FinetuneConfig(**{field: [value]})
    record_property("scenario", f"finetuned_checkpoints config {field} = {label}")
    record_property("expected", "config error naming the field")
    record_property("observed", str(caught.value).splitlines()[1][:160])
    assert f"{field}[0]" in str(caught.value)
    assert FinetuneConfig(targets=["all", "code"], methods=["less"]).targets == ["all", "code"]


def test_finetune_refuses_a_stored_name_that_would_escape(tmp_path: Path, resources: dict, record_property) -> None:
    ids, version = _ingest_pool(tmp_path, resources)
    with resources["lineage"].connect() as con:
        selection_store.write_selections(
            con, [selection_store.Selection(DEFAULT_MODEL, f"../../../../{MARK}", "all", ids[:2], [1.0, 0.5], version)]
        )
    observed = materialize_error([finetuned_checkpoints], resources, partition_key=DEFAULT_MODEL)
    _report_refusal(
        record_property,
        "a selection stored with a traversal method name, then finetuned_checkpoints",
        "refused before any training; no folder outside the root",
        observed,
    )
    assert "without '..'" in observed
    _assert_nothing_written(tmp_path, resources, "checkpoints")


def test_less_export_with_an_escaping_target_writes_nothing(
    tmp_path: Path, resources: dict, monkeypatch, record_property
) -> None:
    """The reported chain: a task name reaching the LESS export. Scores are faked; the target is
    the task of the score column, as if an unchecked name had reached the targets table."""
    ids, version = _ingest_pool(tmp_path, resources)
    columns = [{"task": f"../../../../{MARK}", "subtask": "s", "val_example_id": "v0"}]
    run = {
        "scores_dir": str(tmp_path / "scores"),
        "columns": columns,
        "n_train": len(ids),
        "n_val": 1,
        "pool_version": version,
        "warmup_run_key": "w",
        "mode": "fast",
        "dim": 8,
        "seed": 0,
        "train_transform": "sgd",
        "loss_tokens": "sequence",
        "dropped_directions": 0,
        "recipe": None,
        "recipe_overrides": None,
        "scored_diagnostics": None,
    }
    monkeypatch.setattr("assets.selections.latest_influence", lambda con, model: run)
    monkeypatch.setattr(
        "assets.selections.influence.load_scores",
        lambda _: (np.linspace(0, 1, len(ids), dtype=np.float32)[:, None], ids),
    )
    config = {"ops": {"less_selection": {"config": {"budget": 2}}}}
    observed = materialize_error([less_selection], resources, config, partition_key=DEFAULT_MODEL)
    _report_refusal(
        record_property,
        "LESS selection whose target task is '../../../../ESCAPED'",
        "refused before any write: no export outside the root, no selection rows",
        observed,
    )
    assert "without '..'" in observed
    _assert_nothing_written(tmp_path, resources, "selections")


@pytest.mark.parametrize(
    "parts", [("..",), ("a", "..", "..", MARK), ("/etc",), ("a\\..\\b",), ("a\x00b",), ("",), (f"x/../../{MARK}",)]
)
def test_path_under_refuses_parts_that_leave_the_root(tmp_path: Path, parts: tuple[str, ...]) -> None:
    settings = StorageSettings(home=str(tmp_path / "home"))
    with pytest.raises(ValueError, match="must be a non-empty relative name"):
        settings.subdir(*parts)
    assert _escaped(tmp_path) == [] and not (tmp_path / "a").exists()


def test_path_under_follows_symlinks_and_keeps_good_paths(tmp_path: Path, record_property) -> None:
    root = tmp_path / "home"
    root.mkdir()
    os.symlink(tmp_path, root / "link")
    with pytest.raises(ValueError, match="outside the storage root") as caught:
        names.path_under(root, "link", MARK)
    record_property("scenario", "a path through a symlink inside the root that points outside")
    record_property("expected", "refused: resolves outside the storage root")
    record_property("observed", str(caught.value)[:160])
    assert names.path_under(root, "models", "m", "finetune") == root.resolve() / "models" / "m" / "finetune"
    assert StorageSettings(home=str(root)).subdir("reports", "m").is_dir()


@pytest.mark.parametrize(
    "name,content",
    [
        ("fake.jsonl.gz", b'{"prompt": "a", "completion": "b"}\n'),
        ("fake.json.gz", b'[{"prompt": "a", "completion": "b"}]'),
        ("garbage.parquet", bytes(range(256)) * 3),
    ],
)
def test_unreadable_pool_file_error_names_the_file(tmp_path: Path, name: str, content: bytes, record_property) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    con = duckdb.connect(str(tmp_path / "l.duckdb"))
    with pytest.raises(ValueError) as caught:
        ingest_sources(con, [SourceSpec(path)])
    record_property("scenario", f"pool source {name}: bytes that are not what the name says")
    record_property("expected", "an error naming the file; nothing ingested")
    record_property("observed", str(caught.value)[:160])
    assert str(path) in str(caught.value)
    assert con.execute("SELECT count(*) FROM pool").fetchone()[0] == 0
    con.close()


def test_sql_identifiers_are_checked() -> None:
    assert names.check_identifier("gradient_stores", "table") == "gradient_stores"
    for bad in ("x; DROP TABLE pool", "a b", "", "1abc", 'x"'):
        with pytest.raises(ValueError, match="not a plain SQL identifier"):
            names.check_identifier(bad, "table")
