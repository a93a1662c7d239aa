"""finetuned_checkpoints -> evaluation -> comparison_report on a tiny random model: seeds, stratified
test rows, stored per-row results and intervals that can be recomputed from them."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pydantic
import pytest

from assets.evaluation import comparison_report, evaluation_asset
from assets.finetune import finetuned_checkpoints
from assets.partitions import DEFAULT_MODEL
from assets.pool import raw_pool, target_tasks
from resources import build_resources
from selection import selection_store
from selection.data import pool_store
from selection.evaluate import stats
from selection.evaluate.evaluation_store import current_finetunes
from tests.fakes import TinyModelStore


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.fixture
def home(tmp_path: Path) -> dict:
    resources = {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    pool = _write_jsonl(
        tmp_path / "pool.jsonl",
        [
            {
                "instruction": f"Question {i} about {topic}",
                "input": "",
                "output": f"Answer {i}: {topic} " + "y" * (i % 5),
            }
            for i, topic in enumerate(["sums", "poems", "maps", "code", "tea", "ships", "birds", "rain"] * 2)
        ],
    )
    # math has three subtasks of 4 (1 val + 3 test each), writing one.
    targets = _write_jsonl(
        tmp_path / "targets.jsonl",
        [
            {"task": task, "subtask": subtask, "prompt": f"{task} {subtask} item {i}", "completion": f"{subtask} {i}"}
            for task, subtasks in (("math", "abc"), ("writing", "w"))
            for subtask in subtasks
            for i in range(4)
        ],
    )
    config = {
        "ops": {
            "raw_pool": {"config": {"sources": [{"path": str(pool)}]}},
            "target_tasks": {"config": {"files": [{"path": str(targets)}], "n_val": 1}},
        }
    }
    assert dg.materialize([raw_pool, target_tasks], resources=resources, run_config=config).success
    with duckdb.connect(resources["lineage"].db_path) as con:
        version = pool_store.latest_pool_version(con)[0]
        ids = [r[0] for r in con.execute("SELECT example_id FROM pool ORDER BY example_id").fetchall()]
        selection_store.write_selections(
            con,
            [
                selection_store.Selection(DEFAULT_MODEL, "random", "all", ids[:4], [None] * 4, version),
                selection_store.Selection(DEFAULT_MODEL, "less", "all", ids[4:8], [1.0] * 4, version),
            ],
        )
    return resources


def _materialize(resources: dict, assets: list, config: dict) -> dg.ExecuteInProcessResult:
    result = dg.materialize(assets, resources=resources, run_config={"ops": config}, partition_key=DEFAULT_MODEL)
    assert result.success
    return result


def test_seeds_stratified_rows_and_recomputable_intervals(home: dict) -> None:
    _materialize(
        home, [finetuned_checkpoints], {"finetuned_checkpoints": {"config": {"epochs": 1, "batch_size": 4, "seeds": 2}}}
    )
    evaluated = _materialize(home, [evaluation_asset], {"evaluation": {"config": {"max_test_per_task": 2}}})
    _materialize(
        home, [comparison_report], {"comparison_report": {"config": {"n_resamples": 300, "bootstrap_seed": 5}}}
    )

    with duckdb.connect(home["lineage"].db_path) as con:
        finetuned = con.execute(
            "SELECT method, seed, run_key, path FROM checkpoints WHERE stage = 'finetune' ORDER BY method, seed"
        ).fetchall()
        runs = con.execute("SELECT name, seed FROM evaluation_runs ORDER BY name, seed").fetchall()
        rows = con.execute("SELECT name, seed, task, subtask, example_id, nll FROM evaluation_rows").df()
        comparison = con.execute("SELECT * FROM comparison").df().set_index(["method", "task"])
        # Recompute the paired deltas from the stored rows alone: average over seeds per row, then over rows.
        recomputed = con.execute(
            """WITH per_row AS (SELECT name, task, example_id, avg(nll) AS nll FROM evaluation_rows GROUP BY ALL)
               SELECT m.task, m.example_id, m.nll - b.nll AS difference FROM per_row m JOIN per_row b
               USING (task, example_id) WHERE m.name = 'less/all' AND b.name = 'random/all'
               ORDER BY m.task, m.example_id"""
        ).df()
        current = current_finetunes(con, DEFAULT_MODEL)

    # Two seeds per selection: distinct checkpoints, recorded with their seed.
    assert [(m, s) for m, s, _, _ in finetuned] == [("less", 0), ("less", 1), ("random", 0), ("random", 1)]
    assert len({r[2] for r in finetuned}) == 4 and len({r[3] for r in finetuned}) == 4
    assert runs == [("base", None), ("less/all", 0), ("less/all", 1), ("random/all", 0), ("random/all", 1)]
    assert len(current) == 4

    # A cap of 2 is raised to math's three subtasks; every subtask has a row.
    coverage = evaluated.asset_materializations_for_node("evaluation")[0].metadata["test_rows_per_task"].value
    assert "| math | 3 | 9 | 3 | 3 | True |" in coverage
    assert set(rows.loc[rows["task"] == "math", "subtask"]) == {"a", "b", "c"}
    assert len(rows) == 5 * (3 + 2)

    less = comparison.loc[("less/all", "math")]
    assert less["n_seeds"] == 2 and comparison.loc[("base", "math"), "n_seeds"] == 1
    math_differences = recomputed.loc[recomputed["task"] == "math", "difference"].to_numpy()
    # The interval from the stored per-seed rows alone: [seed, row] for each side, rows by example id.
    per_seed = rows[rows["task"] == "math"].pivot_table(index=["name", "seed"], columns="example_id", values="nll")
    interval = stats.paired_delta(
        per_seed.loc["less/all"].to_numpy(), per_seed.loc["random/all"].to_numpy(), n_resamples=300, seed=5
    )
    assert interval.mean == pytest.approx(math_differences.mean())
    assert less["delta_nll"] == pytest.approx(interval.mean)
    assert (less["delta_nll_ci_low"], less["delta_nll_ci_high"]) == pytest.approx((interval.low, interval.high))
    assert (less["ci_low"], less["ci_high"], less["p_value"]) == pytest.approx(
        (interval.low, interval.high, interval.p_value)
    )
    assert bool(less["significant"]) == bool(less["p_holm"] < 0.05) == bool(less["significant_holm"])
    random = comparison.loc[("random/all", "writing")]
    assert (random["delta_nll"], random["ci_low"], random["ci_high"], bool(random["significant"])) == (0, 0, 0, False)
    report = (Path(home["settings"].home) / "reports" / DEFAULT_MODEL / "comparison.md").read_text()
    assert "## Worst task per method" in report and "2 finetuning seeds" in report
    # 3 math rows, 2 writing rows: too few to show a winner, said under the title.
    assert report.split("\n")[2].startswith("**This report has only 2 test rows per task, 2 finetuning seeds")
    assert "trained on the same examples" not in report  # random and less picked different examples

    # A later materialization with one seed: evaluation takes only that run's seeds.
    _materialize(
        home, [finetuned_checkpoints], {"finetuned_checkpoints": {"config": {"epochs": 1, "batch_size": 4, "seeds": 1}}}
    )
    with duckdb.connect(home["lineage"].db_path) as con:
        current = current_finetunes(con, DEFAULT_MODEL)
    assert sorted(zip(current["method"], current["seed"])) == [("less", 0), ("random", 0)]


def test_methods_that_picked_the_same_examples_are_named_in_the_report(home: dict) -> None:
    with duckdb.connect(home["lineage"].db_path) as con:  # round robin picks what `home` gave LESS
        version = pool_store.latest_pool_version(con)[0]
        ids = [r[0] for r in con.execute("SELECT example_id FROM pool ORDER BY example_id").fetchall()]
        selection_store.write_selections(
            con, [selection_store.Selection(DEFAULT_MODEL, "round_robin", "all", ids[4:8][::-1], [1.0] * 4, version)]
        )
    _materialize(home, [finetuned_checkpoints], {"finetuned_checkpoints": {"config": {"epochs": 1, "batch_size": 4}}})
    _materialize(home, [evaluation_asset], {"evaluation": {"config": {"max_test_per_task": 1}}})
    reported = _materialize(home, [comparison_report], {"comparison_report": {"config": {"n_resamples": 100}}})

    metadata = reported.asset_materializations_for_node("comparison_report")[0].metadata
    assert metadata["shared_training_sets"].value == [["less/all", "round_robin/all"]]
    report = metadata["report"].value
    assert "## Methods that trained on the same examples" in report
    assert "- less/all = round_robin/all (4 examples)" in report and "random/all =" not in report


def test_seed_count_is_validated(home: dict) -> None:
    with pytest.raises(pydantic.ValidationError, match="seeds\n  Input should be greater than or equal to 1"):
        dg.materialize(
            [finetuned_checkpoints],
            resources=home,
            partition_key=DEFAULT_MODEL,
            run_config={"ops": {"finetuned_checkpoints": {"config": {"seeds": 0}}}},
        )
