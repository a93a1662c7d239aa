"""Markdown for Dagster metadata and reports: tables and bar charts (they render in the UI and
need no image files)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

MAX_CELL_CHARS = 120  # a record cell longer than this is cut, so one long text cannot swamp the table


def table(
    header: Sequence[str],
    rows: Iterable[Sequence[Any]],
    cell: Callable[[Any], str] = str,
    align: Sequence[str] | None = None,
) -> str:
    """A markdown table: the `header` line, then one line per row with each value rendered by
    `cell`. `align` holds one marker per column (`---` left, `---:` right); all left by default."""
    markers = align if align is not None else ["---"] * len(header)
    lines = [_line(header), "|" + "".join(f"{marker}|" for marker in markers)]
    lines += [_line(cell(value) for value in row) for row in rows]
    return "\n".join(lines)


def _line(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _record_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")[:MAX_CELL_CHARS]


def markdown_table(rows: Sequence[Mapping[str, Any]], max_rows: int = 20) -> str:
    """The first `max_rows` records as a table, columns from the first record, each cell on one
    line; `_none_` when there are none."""
    if not rows:
        return "_none_"
    columns = list(rows[0])
    text = table(columns, ([row[column] for column in columns] for row in rows[:max_rows]), cell=_record_cell)
    if len(rows) > max_rows:
        text += f"\n\n_{len(rows) - max_rows} more rows not shown_"
    return text


def bar_chart_markdown(values: Mapping[str, float], title: str, width: int = 30) -> str:
    """A markdown table with a unicode bar per entry, scaled to the largest magnitude."""
    if not values:
        return f"**{title}**: _no data_"
    scale = max(abs(v) for v in values.values()) or 1.0
    rows = [
        (key, f"{value:.4f}", ("-" if value < 0 else "") + "█" * max(0, round(width * abs(value) / scale)))
        for key, value in values.items()
    ]
    return f"**{title}**\n\n" + table(["key", "value", ""], rows, align=["---", "---:", "---"])
