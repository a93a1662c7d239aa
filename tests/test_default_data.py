"""Built-in default pool from the packaged real data (selection.data.default_data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from selection.data import default_data as dd
from selection.data.formats import canonicalize, example_id
from selection.data.targets import write_default_targets


def read_jsonl(path: str | Path) -> list[dict]:
    # Split on "\n" only: str.splitlines() also splits on U+2028 inside JSON strings.
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line]


@pytest.fixture(scope="module")
def default_pool(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    return dd.write_default_pool(tmp_path_factory.mktemp("pool"))


def test_default_mix_and_labels(default_pool: list[dict[str, str]]) -> None:
    expected = {"alpaca_eval": 420, "arena_hard": 180, "mmlu": 420, "humaneval": 60, "champ": 120}
    assert dd.plan_pool() == expected
    assert [spec["name"] for spec in default_pool] == list(dd.SOURCE_NAMES)
    for spec in default_pool:
        assert spec["format"] == "messages" and Path(spec["path"]).name == f"{spec['name']}.jsonl"
        records = read_jsonl(spec["path"])
        assert len(records) == expected[spec["name"]]
        assert {record["dataset"] for record in records} == {spec["name"]}
        ids = [example_id(record["messages"]) for record in records]
        assert len(set(ids)) == len(ids), "no duplicate conversations within a source"
        for record in records[:50]:
            # Already canonical: ingestion computes the same ids from these lines.
            assert canonicalize(record, "messages") == record["messages"]


def test_rewrite_is_byte_identical_and_untouched(default_pool: list[dict[str, str]], tmp_path: Path) -> None:
    paths = [Path(spec["path"]) for spec in default_pool]
    before = {path: (path.read_bytes(), path.stat().st_mtime_ns) for path in paths}
    again = dd.write_default_pool(Path(default_pool[0]["path"]).parent)
    assert again == default_pool
    for path, (data, mtime) in before.items():
        assert path.read_bytes() == data and path.stat().st_mtime_ns == mtime
    elsewhere = dd.write_default_pool(tmp_path)
    for spec, other in zip(default_pool, elsewhere):
        assert Path(spec["path"]).read_bytes() == Path(other["path"]).read_bytes()


def test_seed_changes_sample_not_counts(tmp_path: Path) -> None:
    first = dd.write_default_pool(tmp_path / "a", size={"alpaca_eval": 30}, seed=0)
    second = dd.write_default_pool(tmp_path / "b", size={"alpaca_eval": 30}, seed=1)
    a, b = read_jsonl(first[0]["path"]), read_jsonl(second[0]["path"])
    assert len(a) == len(b) == 30 and a != b


def test_size_knob(tmp_path: Path) -> None:
    assert sum(dd.plan_pool(100).values()) == 100
    capacity = len(dd.pool_side("humaneval"))
    plan = dd.plan_pool({"mmlu": 7, "humaneval": 10_000})
    assert plan == {"alpaca_eval": 0, "arena_hard": 0, "mmlu": 7, "humaneval": capacity, "champ": 0}
    specs = dd.write_default_pool(tmp_path, size={"mmlu": 7})
    assert [spec["name"] for spec in specs] == ["mmlu"] and len(read_jsonl(specs[0]["path"])) == 7
    # A total larger than some sources' capacity spills over to the others.
    big = dd.plan_pool(3000)
    assert sum(big.values()) == 3000 and big["humaneval"] == capacity and big["alpaca_eval"] == 805
    for bad in (-1, 10**6, {"nope": 3}, {"mmlu": -2}):
        with pytest.raises(ValueError):
            dd.plan_pool(bad)


def test_source_counts() -> None:
    counts = {source: len(dd.load_source(source)) for source in dd.SOURCE_NAMES}
    assert counts["alpaca_eval"] == 805
    assert counts["arena_hard"] == 750
    assert counts["humaneval"] == 164
    assert counts["champ"] == 270
    # 14,042 questions - 2 placeholder lines - verbatim repeats.
    assert 13_900 < counts["mmlu"] < 14_040
    for source in dd.SOURCE_NAMES:
        assert len(dd.pool_side(source)) + len(dd.target_side(source)) == counts[source]
    assert not dd.target_side("alpaca_eval") and not dd.target_side("arena_hard")


def test_mmlu_rendering_and_placeholder_lines_dropped() -> None:
    user, answer = dd.render_mmlu("What is 2+2? ", ("3", "4", "5", "22"), "B", "elementary mathematics")
    assert user == (
        "The following is a multiple choice question about elementary mathematics.\n\n"
        "What is 2+2?\n\nA. 3\nB. 4\nC. 5\nD. 22\n\n"
        "Answer with the letter and the text of the correct choice."
    )
    assert answer == "B. 4"
    items = dd.load_source("mmlu")
    assert all(item.key != "question" for item in items)
    assert all(item.messages[1]["content"][:3] in {"A. ", "B. ", "C. ", "D. "} for item in items)
    assert len({item.meta["subject"] for item in items}) == 57


def test_humaneval_and_arena_hard_rendering() -> None:
    for item in dd.load_source("humaneval")[:20]:
        code = item.messages[1]["content"].removeprefix("```python\n").removesuffix("```")
        compile(code, item.ref, "exec")  # the whole function survives stripping
    question_file = dd.package_dir("eval_framework") / "tasks/arena_hard/data/arena-hard-v2.0/question.jsonl"
    questions = {record["uid"]: record["prompt"] for record in read_jsonl(question_file)}
    for item in dd.load_source("arena_hard")[:50]:
        assert item.messages[0]["content"] == questions[item.key].strip()
        assert item.messages[1]["role"] == "assistant" and item.messages[1]["content"]


def test_pool_never_overlaps_default_targets(default_pool: list[dict[str, str]], tmp_path: Path) -> None:
    # Whole pool side vs whole target side (any size/seed draws from these).
    for source in dd.HOLDOUT_FRACTION:
        pool, held = dd.pool_side(source), dd.target_side(source)
        assert {item.example_id for item in pool}.isdisjoint(item.example_id for item in held)
        assert {item.key for item in pool}.isdisjoint(item.key for item in held)
    # The written files, by id and by prompt text.
    pool_records = [record for spec in default_pool for record in read_jsonl(spec["path"])]
    target_records = [record for spec in write_default_targets(tmp_path) for record in read_jsonl(spec["path"])]
    pool_ids = {example_id(record["messages"]) for record in pool_records}
    assert pool_ids.isdisjoint(example_id(record["messages"]) for record in target_records)
    pool_prompts = {record["messages"][0]["content"] for record in pool_records}
    assert pool_prompts.isdisjoint(record["messages"][0]["content"] for record in target_records)


def test_missing_package_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not installed"):
        dd.package_dir("no_such_data_package_xyz")
    with pytest.raises(ValueError, match="unknown default source"):
        dd.load_source("dolly")
