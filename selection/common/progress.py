"""Progress lines for long loops: done/total, rate and ETA, at most once per interval.

Pure (no Dagster): the caller passes where a line goes, e.g. ``context.log.info``. Loops call
``update(n)`` after each unit of work; a line is emitted on the first update (so the total and
a first rate show early), then whenever ``min_interval`` seconds have passed since the last
line, and when the total is reached.
"""

from __future__ import annotations

import time
from collections.abc import Callable

DEFAULT_INTERVAL_S = 30.0


class ProgressReporter:
    def __init__(
        self,
        label: str,
        total: int,
        emit: Callable[[str], None],
        *,
        unit: str = "examples",
        min_interval: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.label, self.total, self.emit, self.unit = label, total, emit, unit
        self.min_interval, self.clock = min_interval, clock
        self.done = 0
        self.started = clock()
        self.last_emit: float | None = None

    def update(self, n: int = 1, detail: str = "") -> None:
        """Count ``n`` more units done; ``detail`` (e.g. the current loss) ends the line when one is due."""
        self.done += n
        now = self.clock()
        due = self.last_emit is None or now - self.last_emit >= self.min_interval or self.done >= self.total
        if due:
            self.last_emit = now
            self.emit(self.line(now) + (f"; {detail}" if detail else ""))

    def line(self, now: float) -> str:
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = max(self.total - self.done, 0)
        eta = f"{left / rate:.0f} s" if rate > 0 else "unknown"
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit}, {rate:.2f} {self.unit}/s, "
            f"elapsed {elapsed:.0f} s, ETA {eta}"
        )
