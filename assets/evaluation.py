"""Evaluation of the base model and every finetuned checkpoint on the held-out `test` targets, and the report."""

import hashlib
import json
import time

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, atomic_write_text, code_version, markdown_table, read_targets, transaction
from orchestration.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from assets.finetune import latest_selections
from selection import checkpoints, evaluation, models

BASE = "base"
EVALUATION_DDL = """CREATE TABLE IF NOT EXISTS evaluation_runs (
    model VARCHAR, name VARCHAR, stage VARCHAR, run_key VARCHAR, method VARCHAR, target VARCHAR, budget INTEGER,
    result_path VARCHAR, summary JSON, run_id VARCHAR, created_at TIMESTAMPTZ)"""


class EvaluationConfig(dg.Config):
    max_test_per_task: int | None = Field(default=20, description="Cap on test rows per task (CPU-friendly); None = all")
    batch_size: int = 8


class ReportConfig(dg.Config):
    baseline: str = Field(default="random/all", description="Name deltas are computed against ('base' = no finetuning)")


def current_finetunes(con, model: str) -> pd.DataFrame:
    """The most recent finetuned checkpoint of each current selection (one budget per method and target)."""
    for ddl in checkpoints.CHECKPOINT_TABLES:
        con.execute(ddl)
    current = pd.DataFrame(latest_selections(con, model, ["all"], None) or [], columns=["method", "target", "budget", "pv"])
    current = current[["method", "target", "budget"]]
    return con.execute(
        """SELECT c.* FROM checkpoints c JOIN current USING (method, target, budget)
           WHERE c.model = ? AND c.stage = 'finetune'
           QUALIFY row_number() OVER (PARTITION BY c.method, c.target ORDER BY c.created_at DESC, c.epoch DESC) = 1
           ORDER BY c.method, c.target""",
        [model],
    ).df()


def _capped_test_rows(rows: list, cap: int | None) -> list[dict]:
    kept, per_task = [], {}
    for task, subtask, example_id, messages in rows:
        per_task[task] = per_task.get(task, 0) + 1
        if cap is None or per_task[task] <= cap:
            kept.append({"task": task, "subtask": subtask, "example_id": example_id, "messages": messages})
    return kept


def _evaluate(model, tokenizer, spec, row, test_rows: list[dict], config: EvaluationConfig) -> evaluation.EvalResult:
    """The base model (row None) or the model with a finetuned adapter loaded."""
    if row is None:
        return evaluation.evaluate_model(model, tokenizer, test_rows, max_length=spec.max_length,
                                         batch_size=config.batch_size)
    evaluated = models.add_lora(model, spec)
    checkpoints.load_adapter_weights(evaluated, row.path)
    evaluated.eval()  # new LoRA dropout modules start in training mode
    try:
        return evaluation.evaluate_model(evaluated, tokenizer, test_rows, max_length=spec.max_length,
                                         batch_size=config.batch_size)
    finally:
        evaluated.unload()


@dg.asset(
    name="evaluation",
    partitions_def=model_partitions,
    deps=["finetuned_checkpoints", "target_tasks"],
    group_name="evaluation",
    pool="accelerator",
    code_version=code_version("selection.evaluation", "selection.quality"),
    description="Per-task NLL (and MMLU choice accuracy) of the base model and each finetuned checkpoint on test rows.",
)
def evaluation_asset(
    context: dg.AssetExecutionContext, config: EvaluationConfig, settings: StorageSettings, lineage: LineageStore,
    model_store: ModelStore, device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        test_rows = _capped_test_rows(read_targets(con, "test"), config.max_test_per_task)
        finetunes = current_finetunes(con, spec.name)
    model, tokenizer = model_store.load(spec, device.resolve())
    out_dir = settings.subdir("evaluation", spec.name)
    candidates = [(BASE, None)] + [(f"{r.method}/{r.target}", r) for r in finetunes.itertuples()]
    summary = []
    rows_key = hashlib.sha256(json.dumps([[r["task"], r["example_id"]] for r in test_rows]).encode()).hexdigest()[:12]
    for name, row in candidates:
        started = time.perf_counter()
        # Results are reused when the checkpoint, the test rows and the settings are unchanged.
        result_key = hashlib.sha256(json.dumps(
            [spec.fingerprint(), "base" if row is None else row.run_key, rows_key, config.batch_size]).encode()
        ).hexdigest()[:16]
        path = out_dir / f"{name.replace('/', '-')}-{result_key}.json"
        if path.is_file():
            result = evaluation.EvalResult.from_dict(json.loads(path.read_text()))
            context.log.info(f"{name}: reusing {path.name}")
        else:
            result = _evaluate(model, tokenizer, spec, row, test_rows, config)
            atomic_write_text(path, json.dumps(result.to_dict()))
        tracker.add_file(name, path)
        with lineage.connect() as con:
            con.execute(EVALUATION_DDL)
            con.execute(
                "INSERT INTO evaluation_runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                [spec.name, name, "base" if row is None else "finetune", None if row is None else row.run_key,
                 None if row is None else row.method, None if row is None else row.target,
                 None if row is None else int(row.budget), str(path), json.dumps(result.summary()),
                 context.run.run_id],
            )
        mean_nll = pd.Series([m.mean_nll for m in result.per_task.values()]).mean()
        summary.append({"name": name, "mean_task_nll": round(float(mean_nll), 4),
                        "seconds": round(time.perf_counter() - started, 1)})
        context.log.info(f"evaluated {name}: mean task NLL {mean_nll:.4f}")
    data_version = tracker.finish({"evaluated": summary, "n_test_rows": len(test_rows)})
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={"n_test_rows": dg.MetadataValue.int(len(test_rows)),
                  "evaluated": dg.MetadataValue.md(markdown_table(summary))},
    )


@dg.asset(
    partitions_def=model_partitions,
    deps=["evaluation"],
    group_name="evaluation",
    code_version=code_version("selection.evaluation"),
    description="Comparison of every method's finetuned checkpoint per task: deltas vs a baseline and average ranks.",
)
def comparison_report(
    context: dg.AssetExecutionContext, config: ReportConfig, settings: StorageSettings, lineage: LineageStore,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    model = context.partition_key
    with lineage.connect() as con:
        con.execute(EVALUATION_DDL)
        runs = con.execute(
            """SELECT name, result_path FROM evaluation_runs WHERE model = ? AND run_id = (
                   SELECT run_id FROM evaluation_runs WHERE model = ? ORDER BY created_at DESC LIMIT 1)
               ORDER BY name""",
            [model, model],
        ).fetchall()
    if not runs:
        raise ValueError(f"no evaluation results for model {model!r}; materialize evaluation first")
    results = {name: evaluation.EvalResult.from_dict(json.loads(open(path).read())) for name, path in runs}
    if config.baseline not in results:
        raise ValueError(f"baseline {config.baseline!r} was not evaluated; evaluated: {sorted(results)}")
    comparison_frame = evaluation.comparison_table(results, baseline=config.baseline)
    report = evaluation.markdown_report(comparison_frame, title=f"Evaluation comparison for {model}")
    out_dir = settings.subdir("reports", model)
    (out_dir / "comparison.md").write_text(report)
    comparison_frame.to_csv(out_dir / "comparison.csv", index=False)
    with lineage.connect() as con:
        con.execute("CREATE TABLE IF NOT EXISTS comparison AS SELECT ''::VARCHAR AS model, * FROM comparison_frame LIMIT 0")
        with transaction(con):
            con.execute("DELETE FROM comparison WHERE model = ?", [model])
            con.execute("INSERT INTO comparison BY NAME SELECT ? AS model, * FROM comparison_frame", [model])
    tracker.add_file("report", out_dir / "comparison.md")
    ranks = evaluation.average_ranks(comparison_frame)
    data_version = tracker.finish({"baseline": config.baseline, "average_ranks": ranks.to_dict("records")})
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={"report": dg.MetadataValue.md(report), "baseline": config.baseline,
                  "report_path": dg.MetadataValue.path(str(out_dir / "comparison.md"))},
    )
