"""A selection method registered in `selection.registry` becomes an asset, with its blocking check,
upstream of finetuning; the project's own definitions hold exactly the registered methods."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np

from assets.checks import selection_check
from assets.finetune import finetuned_checkpoints_of
from assets.methods import selection_assets
from assets.partitions import DEFAULT_MODEL
from assets.pool import raw_pool
from orchestration.definitions import defs
from resources import build_resources
from selection import registry
from selection.selectors import ALL_TARGETS, RankedPicks, ScoredPool

FINETUNE = dg.AssetKey("finetuned_checkpoints")


def reverse_influence(pool: ScoredPool, budget: int) -> list[RankedPicks]:
    """The toy method: the examples with the lowest mean influence first."""
    mean = pool.scores.mean(axis=1)
    chosen = np.argsort(mean, kind="stable")[:budget]
    return [RankedPicks(ALL_TARGETS, chosen, mean[chosen])]


REVERSE = registry.SelectionMethod(
    "reverse",
    "Toy: the least influential examples first.",
    registry.Input.INFLUENCE_SCORES,
    reverse_influence,
    (__name__,),
)


def _selection_graph(methods, home: Path):
    return dg.Definitions(
        assets=[*selection_assets(methods), finetuned_checkpoints_of(methods)],
        asset_checks=[selection_check(method) for method in methods],
        resources=build_resources(home=str(home), env="ci"),
    ).resolve_asset_graph()


def test_a_registered_method_has_an_asset_a_blocking_check_and_feeds_finetuning(tmp_path: Path) -> None:
    graph = _selection_graph((*registry.METHODS, REVERSE), tmp_path)
    key = dg.AssetKey("reverse_selection")
    assert key in graph.get_all_asset_keys()
    assert graph.get(key).group_name == "selections" and graph.get(key).partitions_def is not None
    assert {dg.AssetKey("influence_scores"), dg.AssetKey("raw_pool")} <= graph.get(key).parent_keys
    assert key in graph.get(FINETUNE).parent_keys
    check = dg.AssetCheckKey(key, "reverse_selection_is_valid")
    assert check in graph.asset_check_keys and graph.get(check).blocking


def test_the_project_definitions_are_the_registry() -> None:
    graph = defs.resolve_asset_graph()
    selections = {dg.AssetKey(method.asset) for method in registry.METHODS}
    assert {key for key in graph.get_all_asset_keys() if graph.get(key).group_name == "selections"} == selections
    assert selections <= graph.get(FINETUNE).parent_keys
    assert {
        check.asset_key for check in graph.asset_check_keys if check.name.endswith("_selection_is_valid")
    } == selections
    assert len({method.name for method in registry.METHODS}) == len(registry.METHODS)


def test_the_toy_method_selects_and_passes_its_check(tmp_path: Path, monkeypatch) -> None:
    resources = build_resources(home=str(tmp_path / "home"), env="ci")
    pool = tmp_path / "pool.jsonl"
    pool.write_text(
        "".join(json.dumps({"prompt": f"question {i}", "completion": f"answer {i}"}) + "\n" for i in range(5))
    )
    assert dg.materialize(
        [raw_pool],
        resources=resources,
        run_config={"ops": {"raw_pool": {"config": {"sources": [{"path": str(pool)}]}}}},
    ).success
    with duckdb.connect(resources["lineage"].db_path) as con:
        (version,) = con.execute("SELECT pool_version FROM pool_versions").fetchone()
        ids = [row[0] for row in con.execute("SELECT example_id FROM pool ORDER BY example_id").fetchall()]
    run = {
        "scores_dir": "unused",
        "columns": [{"task": "t", "subtask": "s", "val_example_id": "v"}],
        "n_train": len(ids),
        "n_val": 1,
        "pool_version": version,
    }
    monkeypatch.setattr("assets.selections.latest_influence", lambda con, model: run)
    influence = np.array([0.5, 0.1, 0.9, 0.3, 0.7], dtype=np.float32)[:, None]
    monkeypatch.setattr("assets.selections.influence.load_scores", lambda _: (influence, ids))
    (asset,) = selection_assets([REVERSE])
    result = dg.materialize(
        [asset, selection_check(REVERSE)],
        resources=resources,
        partition_key=DEFAULT_MODEL,
        run_config={"ops": {"reverse_selection": {"config": {"budget": 3}}}},
    )
    (evaluation,) = result.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.check_name == "reverse_selection_is_valid"
    with duckdb.connect(resources["lineage"].db_path, read_only=True) as con:
        picked = [
            row[0]
            for row in con.execute(
                "SELECT example_id FROM selections WHERE method = 'reverse' ORDER BY rank"
            ).fetchall()
        ]
    assert picked == [ids[1], ids[3], ids[0]]
