"""The README's asset graph is the one generated from the Dagster definitions."""

from pathlib import Path

import pytest

from orchestration.definitions import defs
from orchestration.graph import graph_block_mismatch, main, render_asset_graph

README = Path(__file__).resolve().parent.parent / "README.md"


@pytest.fixture(scope="module")
def block() -> str:
    return render_asset_graph(defs)


def test_readme_graph_is_current(block):
    mismatch = graph_block_mismatch(README.read_text(), block)
    assert mismatch is None, mismatch
    diagram = block.splitlines()[2:-1]  # between "```mermaid", "graph LR" and the closing fence
    named = {name for line in diagram for name in line.split() if name != "-->"}
    assert named == {key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}


def test_stale_readme_is_reported_and_rewritten(block, tmp_path):
    readme = README.read_text()
    lines = readme.splitlines(keepends=True)
    stale = "".join(line for line in lines if not ("-->" in line and "rds_selection" in line))
    assert stale != readme
    path = tmp_path / "README.md"
    path.write_text(stale)

    mismatch = graph_block_mismatch(stale, block)
    assert mismatch is not None
    assert "+    raw_pool --> rds_selection" in mismatch
    assert "+    rds_selection --> finetuned_checkpoints" in mismatch

    main(["--write", str(path)])
    assert graph_block_mismatch(path.read_text(), block) is None
    assert path.read_text() == readme  # only the block between the markers changed


def test_missing_markers_are_an_error(block):
    with pytest.raises(ValueError, match="no asset-graph block"):
        graph_block_mismatch("# a README without the markers\n", block)
