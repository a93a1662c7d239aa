"""The progress reporter: done/total, rate and ETA, at most once per interval (fake clock)."""

from __future__ import annotations

from selection.common.progress import ProgressReporter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_reports_done_total_rate_eta_and_respects_the_interval() -> None:
    clock, lines = FakeClock(), []
    reporter = ProgressReporter("warmup", 10, lines.append, unit="steps", min_interval=30.0, clock=clock)
    clock.now += 5
    reporter.update(1)  # the first update reports at once
    assert lines == ["warmup: 1/10 steps, 0.20 steps/s, elapsed 5 s, ETA 45 s"]
    clock.now += 10
    reporter.update(2)  # 10 s after the last line: quiet
    assert len(lines) == 1
    clock.now += 20
    reporter.update(1, detail="loss 1.2")  # 30 s after the last line
    assert lines[-1] == "warmup: 4/10 steps, 0.11 steps/s, elapsed 35 s, ETA 52 s; loss 1.2"
    clock.now += 1
    reporter.update(6)  # the total is reached: always reported
    assert lines[-1] == "warmup: 10/10 steps, 0.28 steps/s, elapsed 36 s, ETA 0 s"
    assert len(lines) == 3


def test_no_rate_yet_gives_an_unknown_eta() -> None:
    clock, lines = FakeClock(), []
    ProgressReporter("evaluation", 5, lines.append, clock=clock).update(0)
    assert lines == ["evaluation: 0/5 examples, 0.00 examples/s, elapsed 0 s, ETA unknown"]
