"""Small plots for Dagster metadata: markdown bar charts (render in the UI, need no image files)."""

from __future__ import annotations

from collections.abc import Mapping


def bar_chart_markdown(values: Mapping[str, float], title: str, width: int = 30) -> str:
    """A markdown table with a unicode bar per entry, scaled to the largest magnitude."""
    if not values:
        return f"**{title}**: _no data_"
    scale = max(abs(v) for v in values.values()) or 1.0
    lines = [f"**{title}**", "", "| key | value | |", "|---|---:|---|"]
    for key, value in values.items():
        bar = "█" * max(0, round(width * abs(value) / scale))
        lines.append(f"| {key} | {value:.4f} | {'-' if value < 0 else ''}{bar} |")
    return "\n".join(lines)
