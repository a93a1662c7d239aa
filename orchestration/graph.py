"""The asset graph of the Definitions as a mermaid diagram, and the README block that shows it.

`python -m orchestration.graph` prints the diagram; `python -m orchestration.graph --write README.md`
replaces the block between the two markers. tests/test_readme_graph.py fails while that block is stale.
"""

import argparse
import difflib
import graphlib
import sys
from pathlib import Path

import dagster as dg

from orchestration.definitions import defs

BEGIN_MARKER = "<!-- asset-graph:begin (generated: edit the definitions, not this block) -->"
END_MARKER = "<!-- asset-graph:end -->"


def render_asset_graph(definitions: dg.Definitions) -> str:
    """A mermaid `graph LR` block, one `upstream --> downstream` line per dependency.

    Downstream assets come in topological order, level by level, by name within a level, and each
    one's upstreams by name, so the text changes only when the graph does. An asset with neither
    upstreams nor downstreams gets a line of its own.
    """
    graph = definitions.resolve_asset_graph()
    parents = {
        key.to_user_string(): sorted(parent.to_user_string() for parent in graph.get(key).parent_keys)
        for key in graph.get_all_asset_keys()
    }
    upstreams = {parent for names in parents.values() for parent in names}
    sorter = graphlib.TopologicalSorter(parents)
    sorter.prepare()
    lines = ["```mermaid", "graph LR"]
    while sorter.is_active():
        level = sorted(sorter.get_ready())
        for name in level:
            if not parents[name] and name not in upstreams:
                lines.append(f"    {name}")
            lines.extend(f"    {parent} --> {name}" for parent in parents[name])
        sorter.done(*level)
    lines.append("```")
    return "\n".join(lines)


def _split(text: str) -> tuple[str, str, str]:
    """(text up to and with the begin marker, the block between the markers, the rest)."""
    begin = text.find(BEGIN_MARKER)
    end = text.find(END_MARKER, begin)
    if begin < 0 or end < 0:
        raise ValueError(f"no asset-graph block: expected {BEGIN_MARKER!r} followed by {END_MARKER!r}")
    begin += len(BEGIN_MARKER)
    return text[:begin], text[begin:end].strip("\n"), text[end:]


def replace_graph_block(text: str, block: str) -> str:
    """`text` with the block between the markers replaced by `block`; everything else unchanged."""
    head, _, tail = _split(text)
    return f"{head}\n{block}\n{tail}"


def graph_block_mismatch(text: str, block: str) -> str | None:
    """None when the block between the markers in `text` is `block`, else a diff from it to `block`."""
    current = _split(text)[1]
    if current == block:
        return None
    diff = difflib.unified_diff(current.splitlines(), block.splitlines(), "README", "definitions", lineterm="")
    return "the README's asset graph is stale (python -m orchestration.graph --write README.md):\n" + "\n".join(diff)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render the asset graph of orchestration.definitions.defs.")
    parser.add_argument("--write", type=Path, metavar="README", help="replace the block between the markers")
    args = parser.parse_args(argv)
    block = render_asset_graph(defs)
    if args.write is None:
        sys.stdout.write(block + "\n")
        return
    args.write.write_text(replace_graph_block(args.write.read_text(), block))


if __name__ == "__main__":
    main()
