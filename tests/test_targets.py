"""Target tasks: parsing, rejects, val/test split, defaults, DuckDB storage."""

from __future__ import annotations

import gzip
import json
import random
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from selection.data import default_data
from selection.data import targets as tg
from selection.data.formats import example_id, reason_code
from selection.data.target_store import ensure_target_tables, write_targets


def conversation(question: str, answer: str = "ok") -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def write_lines(path: Path, lines: list[object]) -> str:
    """Objects are JSON-encoded; str lines are written verbatim; bytes raw."""
    with path.open("wb") as handle:
        for line in lines:
            if isinstance(line, bytes):
                handle.write(line + b"\n")
            elif isinstance(line, str):
                handle.write(line.encode("utf-8") + b"\n")
            else:
                handle.write(json.dumps(line).encode("utf-8") + b"\n")
    return str(path)


def examples(task: str, subtask: str, n: int, prefix: str = "q") -> list[tg.TargetExample]:
    conversations = [conversation(f"{prefix}{i}") for i in range(n)]
    return [tg.TargetExample(task, subtask, example_id(c), c, "mem", i) for i, c in enumerate(conversations)]


def test_parse_both_formats_subtask_default_and_override(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            {"task": "qa", "subtask": "geo", "messages": conversation("Capital of France?", "Paris.")},
            {"task": "qa", "prompt": "  2+2?  ", "completion": "4", "id": "extra keys are ignored"},
            "",
            {"prompt": "no task here", "completion": "fine with an override"},
        ],
    )
    plain = tg.build_targets([{"path": path}])
    assert [(r.task, r.subtask) for r in sorted(plain.rows, key=lambda r: r.line_no)] == [("qa", "geo"), ("qa", "qa")]
    # Record numbers, as for pool sources: the blank line is not counted.
    assert [reason_code(r.reason) for r in plain.rejects] == [tg.MISSING_TASK] and plain.rejects[0].line_no == 3
    second = next(r for r in plain.rows if r.line_no == 2)
    assert second.messages == conversation("2+2?", "4")
    assert second.example_id == example_id(second.messages)

    overridden = tg.build_targets([{"path": path, "task": "mine"}])
    assert not overridden.rejects
    assert sorted((r.task, r.subtask) for r in overridden.rows) == [("mine", "geo"), ("mine", "mine"), ("mine", "mine")]


def test_bad_lines_become_rejects_with_reasons(tmp_path: Path) -> None:
    good = {"task": "t", "messages": conversation("fine")}
    path = write_lines(
        tmp_path / "mixed.jsonl",
        [
            good,
            "{not json",
            "[1, 2]",
            {"task": 3, "messages": conversation("a")},
            {"task": "all", "messages": conversation("b")},
            {"task": "t", "question": "no known record format", "answer": "x"},
            {"task": "t", "prompt": "no completion"},
            {"task": "t", "messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
            {"task": "t", "subtask": ["x"], "messages": conversation("c")},
            good,
            b"\xff\xfe not utf-8",
        ],
    )
    result = tg.build_targets([tg.TargetFile(path)])
    codes = {r.line_no: reason_code(r.reason) for r in result.rejects}
    assert codes == {
        2: "malformed_json",
        3: "not_object",
        4: "wrong_type",
        5: tg.BAD_NAME,
        6: "unknown_schema",
        7: "missing_response",
        8: "bad_role",
        9: "wrong_type",
        10: tg.DUPLICATE,
        11: "invalid_utf8",
    }
    assert all(r.reason.split(": ", 1)[1] and r.file == path for r in result.rejects)
    assert result.rejects[0].raw == "{not json"
    assert "mixed.jsonl:1" in next(r.reason for r in result.rejects if r.line_no == 10)
    assert len(result.rows) == 1


def test_file_level_problems_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        tg.build_targets([{"path": str(tmp_path / "missing.jsonl")}])
    with pytest.raises(ValueError, match="no records"):
        tg.build_targets([{"path": write_lines(tmp_path / "empty.jsonl", ["", "  "])}])
    with pytest.raises(ValueError, match="none of its 2 records is usable"):
        tg.build_targets([{"path": write_lines(tmp_path / "bad.jsonl", ["a,b", "c,d"])}])
    with pytest.raises(ValueError, match="no target files"):
        tg.build_targets([])
    for config in (
        {"file": []},
        {"files": [{"task": "x"}]},
        {"files": [{"path": "p", "tsk": "x"}]},
        {"files": [{"path": "p", "task": "all"}]},
        {"files": [{"path": "p", "task": "a b"}]},
    ):
        with pytest.raises(ValueError):
            tg.parse_targets_config(config)
    assert tg.parse_targets_config({"files": [{"path": "p", "task": "x"}]}) == [tg.TargetFile("p", "x")]
    assert tg.parse_targets_config({}) == []


def test_split_sizes_determinism_and_warnings() -> None:
    pool = examples("a", "big", 12) + examples("a", "small", 3, prefix="s") + examples("b", "b", 6, prefix="b")
    rows, warnings = tg.split_targets(pool)
    counts = Counter((r.task, r.subtask, r.split) for r in rows)
    assert counts == {
        ("a", "big", "val"): 5,
        ("a", "big", "test"): 7,
        ("a", "small", "val"): 3,
        ("b", "b", "val"): 5,
        ("b", "b", "test"): 1,
    }
    assert len(warnings) == 1 and "'small'" in warnings[0] and "test split is empty" in warnings[0]
    shuffled = pool[:]
    random.Random(1).shuffle(shuffled)
    assert tg.split_targets(shuffled)[0] == rows  # independent of file order
    assert Counter(r.split for r in tg.split_targets(pool, n_val=2)[0]) == {"val": 6, "test": 15}
    with pytest.raises(ValueError):
        tg.split_targets(pool, n_val=0)


def test_adding_examples_never_moves_test_into_val() -> None:
    base = examples("a", "a", 20)
    grown = base + examples("a", "a", 10, prefix="new")
    before = {r.example_id: r.split for r in tg.split_targets(base)[0]}
    after = {r.example_id: r.split for r in tg.split_targets(grown)[0]}
    assert all(after[identity] == "test" for identity, split in before.items() if split == "test")
    # Old val examples leave val only to make room for new ones that sort before them.
    moved_out = sum(split == "val" and after[identity] == "test" for identity, split in before.items())
    new_in_val = sum(split == "val" for identity, split in after.items() if identity not in before)
    assert moved_out == new_in_val


def test_test_cap_is_stratified_over_subtasks() -> None:
    pool = [e for index in range(4) for e in examples("t", f"s{index}", 15, prefix=f"{index}-")]
    rows, warnings = tg.split_targets(pool, max_test_per_task=9)
    test = Counter(r.subtask for r in rows if r.split == "test")
    assert sum(test.values()) == 9 and min(test.values()) == 2 and max(test.values()) == 3
    assert Counter(r.split for r in rows)["val"] == 20
    assert any("capped at 9 of 40" in warning for warning in warnings)


@pytest.fixture(scope="module")
def default_target_specs(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return tg.write_default_targets(tmp_path_factory.mktemp("targets"))


def test_default_targets(default_target_specs: list[dict[str, str]]) -> None:
    assert [spec["task"] for spec in default_target_specs] == list(tg.DEFAULT_TASKS)
    result = tg.build_targets(default_target_specs)
    assert not result.rejects and not result.warnings
    per_task = Counter((r.task, r.split) for r in result.rows)
    for task in tg.DEFAULT_TASKS:
        assert per_task[(task, "test")] == tg.DEFAULT_TEST_PER_TASK
    val_per_subtask = Counter((r.task, r.subtask) for r in result.rows if r.split == "val")
    assert set(val_per_subtask.values()) == {tg.DEFAULT_N_VAL}
    mmlu_subtasks = {subtask for task, subtask in val_per_subtask if task in tg.MMLU_GROUPS}
    assert mmlu_subtasks == set(tg.MMLU_SUBJECT_GROUP) and len(mmlu_subtasks) == 57
    math_subtasks = {subtask for task, subtask in val_per_subtask if task == "math"}
    assert math_subtasks == {"combinatorics", "inequality", "number_theory", "polynomial", "sequence"}
    # Re-splitting everything held out with the same knobs gives exactly the written split.
    expected, _ = tg.split_targets(tg.default_target_examples(), max_test_per_task=tg.DEFAULT_TEST_PER_TASK)
    assert {(r.task, r.subtask, r.split, r.example_id) for r in expected} == {
        (r.task, r.subtask, r.split, r.example_id) for r in result.rows
    }


def test_default_targets_idempotent_and_all_mmlu_subjects_mapped(default_target_specs: list[dict[str, str]]) -> None:
    before = [Path(spec["path"]).read_bytes() for spec in default_target_specs]
    assert tg.write_default_targets(Path(default_target_specs[0]["path"]).parent) == default_target_specs
    assert [Path(spec["path"]).read_bytes() for spec in default_target_specs] == before
    subjects = {item.meta["subject"] for item in default_data.load_source("mmlu")}
    assert subjects == set(tg.MMLU_SUBJECT_GROUP)
    assert Counter(tg.MMLU_SUBJECT_GROUP.values()) == {"stem": 18, "humanities": 13, "social_sciences": 12, "other": 14}


def test_duckdb_round_trip_and_atomic_replace(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "t.jsonl",
        [
            *({"task": "qa", "subtask": f"s{i % 2}", "messages": conversation(f"question {i}")} for i in range(14)),
            "{broken",
        ],
    )
    result = tg.build_targets([{"path": path}])
    con = duckdb.connect(str(tmp_path / "lineage.duckdb"))
    ensure_target_tables(con)
    summary = write_targets(con, result.rows, result.rejects, result.warnings)
    assert summary["tasks"] == {"qa": {"val": 10, "test": 4, "subtasks": 2}}
    assert summary["rejects_by_reason"] == {"malformed_json": 1} and summary["n_targets"] == 14

    stored = con.execute(
        "SELECT task, subtask, split, example_id, messages FROM targets ORDER BY task, subtask, split_rank"
    ).fetchall()
    expected = [(r.task, r.subtask, r.split, r.example_id, r.messages) for r in result.rows]
    assert [(t, s, sp, i, json.loads(m)) for t, s, sp, i, m in stored] == expected
    assert con.execute("SELECT file, line_no, reason, raw FROM target_rejects").fetchall() == [
        (path, 15, result.rejects[0].reason, "{broken")
    ]

    # A failing write leaves the previous targets in place.
    bad_row = tg.TargetRow("qa", "s0", "val", "x", [], 0, "f", "not a number")  # type: ignore[arg-type]
    broken = [*result.rows[:3], bad_row]
    with pytest.raises(duckdb.Error):
        write_targets(con, broken)
    assert con.execute("SELECT count(*) FROM targets").fetchone() == (14,)

    # Re-materialization replaces everything.
    smaller = tg.build_targets([{"path": path, "task": "other"}])
    write_targets(con, smaller.rows[:2])
    assert con.execute("SELECT DISTINCT task FROM targets").fetchall() == [("other",)]
    assert con.execute("SELECT count(*) FROM target_rejects").fetchone() == (0,)
    with pytest.raises(ValueError, match="unknown split"):
        write_targets(con, [tg.TargetRow("qa", "s", "train", "x", [], 0, "f", 1)])


def test_target_files_are_read_like_pool_sources(tmp_path: Path) -> None:
    alpaca = write_lines(
        tmp_path / "alpaca.jsonl",
        [
            {"task": "qa", "subtask": "geo", "instruction": "Capital of France?", "output": "Paris."},
            {"task": "qa", "instruction": "Add:", "input": "2+2", "output": "4"},
        ],
    )
    result = tg.build_targets([{"path": alpaca}], n_val=1)
    assert not result.rejects
    by_line = {r.line_no: r for r in result.rows}
    assert (by_line[1].task, by_line[1].subtask) == ("qa", "geo")
    assert by_line[1].messages == conversation("Capital of France?", "Paris.")
    assert (by_line[2].subtask, by_line[2].messages) == ("qa", conversation("Add:\n\n2+2", "4"))
    assert by_line[1].example_id == example_id(by_line[1].messages) and by_line[1].file == alpaca

    # ShareGPT records in a JSON array, gzipped: the task comes from the config entry.
    sharegpt = tmp_path / "sharegpt.json.gz"
    with gzip.open(sharegpt, "wt", encoding="utf-8") as handle:
        json.dump(
            [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]} for i in range(3)]
            + [{"conversations": []}],
            handle,
        )
    result = tg.build_targets([{"path": str(sharegpt), "task": "chat"}], n_val=1)
    assert sorted(r.messages[0]["content"] for r in result.rows) == ["q0", "q1", "q2"]
    assert {(r.task, r.subtask) for r in result.rows} == {("chat", "chat")}
    assert [(r.file, r.line_no, reason_code(r.reason)) for r in result.rejects] == [(str(sharegpt), 4, "no_user_turn")]
