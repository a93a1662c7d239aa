"""The demo's closing lines: report path and baseline come from the report's own lineage row."""

from datetime import UTC, datetime

from orchestration.summary import print_next_steps
from resources.lineage import LineageRecord, LineageStore

MODEL = "smollm2-135m-instruct"


def test_next_steps_name_the_recorded_report_and_baseline(tmp_path, capsys) -> None:
    store = LineageStore(db_path=str(tmp_path / "lineage.duckdb"))
    report = tmp_path / "elsewhere" / "comparison.md"  # not the conventional reports/<model>/ folder
    store.record(
        LineageRecord(
            run_id="r1",
            asset_key="comparison_report",
            partition_key=MODEL,
            code_version="1",
            started_at=datetime.now(UTC),
            outputs={"report": {"path": str(report)}},
            metrics={"baseline": "kmq/all"},
        )
    )
    with store.connect() as con:
        con.execute(
            "CREATE TABLE comparison (model VARCHAR, method VARCHAR, task VARCHAR, delta_nll DOUBLE, "
            "delta_nll_ci_low DOUBLE, delta_nll_ci_high DOUBLE, delta_nll_significant BOOLEAN)"
        )
        con.execute("INSERT INTO comparison VALUES (?, 'less/all', 'code', -0.5, -0.7, -0.3, true)", [MODEL])
    (tmp_path / "selections" / MODEL / "less").mkdir(parents=True)
    (tmp_path / "selections" / MODEL / "less" / "code-6.jsonl").write_text("")

    print_next_steps(tmp_path, MODEL)
    out = capsys.readouterr().out
    assert f"Report: {report}" in out
    assert "vs the baseline (kmq/all)" in out
    assert "less/all             code -0.5000 [-0.7000, -0.3000] *" in out
    assert str(tmp_path / "selections" / MODEL / "less" / "code-6.jsonl") in out  # per-task exports are listed
