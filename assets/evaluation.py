"""Evaluation of the base model and every finetuned checkpoint on the held-out `test` targets, and the report."""

import hashlib
import json
import math
import time

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, atomic_write_text, code_version, markdown_table, read_targets, transaction
from assets.partitions import model_partitions
from assets.run_tags import describe_profile, profile_of_run
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from assets.finetune import latest_selections
from selection.common import progress
from selection.evaluate import evaluation, stats
from selection.train import checkpoints, models
from selection.data.targets import DEFAULT_TEST_PER_TASK
from selection.common.names import path_under

BASE = "base"
EVALUATION_DDL = (
    """CREATE TABLE IF NOT EXISTS evaluation_runs (
    model VARCHAR, name VARCHAR, stage VARCHAR, run_key VARCHAR, method VARCHAR, target VARCHAR, budget INTEGER,
    result_path VARCHAR, summary JSON, run_id VARCHAR, created_at TIMESTAMPTZ, seed INTEGER)""",
    "ALTER TABLE evaluation_runs ADD COLUMN IF NOT EXISTS seed INTEGER",  # tables made before seeds
    # One row per evaluated test row: enough to recompute every delta and interval of the report.
    """CREATE TABLE IF NOT EXISTS evaluation_rows (
    model VARCHAR, run_id VARCHAR, name VARCHAR, seed INTEGER, run_key VARCHAR, task VARCHAR, subtask VARCHAR,
    example_id VARCHAR, nll DOUBLE, correct BOOLEAN, truncated BOOLEAN, gold_letter VARCHAR, predicted_letter VARCHAR,
    reject_reason VARCHAR, generation_correct BOOLEAN)""",
)


def ensure_evaluation_tables(con) -> None:
    for ddl in EVALUATION_DDL:
        con.execute(ddl)


class EvaluationConfig(dg.Config):
    max_test_per_task: int | None = Field(
        default=DEFAULT_TEST_PER_TASK, ge=1,
        description="Test rows per task, round robin over its subtasks; raised to the task's subtask count when "
                    "below it, so every subtask is represented. None = every stored test row",
    )
    batch_size: int = 8


class ReportConfig(dg.Config):
    baseline: str = Field(default="random/all", description="Name deltas are computed against ('base' = no finetuning)")
    n_resamples: int = Field(default=stats.DEFAULT_RESAMPLES, ge=1, description="Bootstrap resamples of the test rows")
    confidence: float = Field(default=stats.DEFAULT_CONFIDENCE, gt=0, lt=1, description="Interval coverage")
    bootstrap_seed: int = Field(default=0, description="Seed of the bootstrap resampling")


def current_finetunes(con, model: str) -> pd.DataFrame:
    """The checkpoints of each current selection's latest finetuning (one budget per method and target): one per seed.

    The latest checkpoint of a (method, target) lists the seeds of its materialization in its config; each of
    those seeds' latest checkpoint with the same training settings is taken. Checkpoints recorded before seeds
    were (no `seeds` in the config) stand alone.
    """
    for ddl in checkpoints.CHECKPOINT_TABLES:
        con.execute(ddl)
    current = pd.DataFrame(latest_selections(con, model, ["all"], None) or [], columns=["method", "target", "budget", "pv"])
    current = current[["method", "target", "budget"]]
    frame = con.execute(
        """SELECT c.* FROM checkpoints c JOIN current USING (method, target, budget)
           WHERE c.model = ? AND c.stage = 'finetune'
           ORDER BY c.method, c.target, c.created_at DESC, c.epoch DESC""",
        [model],
    ).df()
    chosen = []
    for (method, target), group in frame.groupby(["method", "target"], sort=True):
        latest = group.iloc[0]
        config = json.loads(latest["config"])
        seeds = config.get("seeds")
        if seeds is None:
            chosen.append(latest)
            continue
        settings = {k: v for k, v in config.get("training", {}).items() if k != "seed"}
        for seed in seeds:
            same = [row for _, row in group.iterrows() if row["seed"] == seed and {
                k: v for k, v in json.loads(row["config"]).get("training", {}).items() if k != "seed"} == settings]
            if not same:
                raise ValueError(f"{method}/{target}: the latest finetuning (seeds {seeds}) has no checkpoint for "
                                 f"seed {seed}; rematerialize finetuned_checkpoints")
            chosen.append(same[0])
    return pd.DataFrame(chosen, columns=frame.columns).reset_index(drop=True)


def _test_rows(con, cap: int | None) -> tuple[list[dict], list[evaluation.TaskCoverage]]:
    stored = [{"task": task, "subtask": subtask, "example_id": example_id, "messages": messages}
              for task, subtask, example_id, messages in read_targets(con, "test")]
    return evaluation.stratified_test_rows(stored, cap)


def _evaluate(model, tokenizer, spec, row, test_rows: list[dict], config: EvaluationConfig,
              reporter: progress.ProgressReporter) -> evaluation.EvalResult:
    """The base model (row None) or the model with a finetuned adapter loaded."""
    if row is None:
        return evaluation.evaluate_model(model, tokenizer, test_rows, max_length=spec.max_length,
                                         batch_size=config.batch_size, progress=reporter.update)
    evaluated = models.add_lora(model, spec)
    checkpoints.load_adapter_weights(evaluated, row.path, asset="finetuned_checkpoints")
    evaluated.eval()  # new LoRA dropout modules start in training mode
    try:
        return evaluation.evaluate_model(evaluated, tokenizer, test_rows, max_length=spec.max_length,
                                         batch_size=config.batch_size, progress=reporter.update)
    finally:
        evaluated.unload()


@dg.asset(
    name="evaluation",
    partitions_def=model_partitions,
    deps=["finetuned_checkpoints", "target_tasks"],
    group_name="evaluation",
    pool="accelerator",
    code_version=code_version("selection.evaluate.evaluation", "selection.diversity.quality"),
    description="Per-task NLL (and MMLU choice accuracy) of the base model and each finetuned checkpoint on test rows.",
)
def evaluation_asset(
    context: dg.AssetExecutionContext, config: EvaluationConfig, settings: StorageSettings, lineage: LineageStore,
    model_store: ModelStore, device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        test_rows, coverage = _test_rows(con, config.max_test_per_task)
        finetunes = current_finetunes(con, spec.name)
    for task in coverage:
        if task.cap_raised:
            context.log.warning(f"task {task.task!r}: max_test_per_task={config.max_test_per_task} is below its "
                                f"{task.n_subtasks} subtasks; evaluating {task.n_rows} rows so that each has one")
    model, tokenizer = model_store.load(spec, device.resolve())
    out_dir = settings.subdir("evaluation", spec.name)
    candidates = [(BASE, None)] + [(f"{r.method}/{r.target}", r) for r in finetunes.itertuples()]
    coverage_rows = [{"task": c.task, "subtasks": c.n_subtasks, "available": c.n_available, "rows": c.n_rows,
                      "cap": c.cap, "cap_raised": c.cap_raised} for c in coverage]
    summary = []
    rows_key = hashlib.sha256(json.dumps([[r["task"], r["example_id"]] for r in test_rows]).encode()).hexdigest()[:12]
    per_checkpoint = evaluation.n_scored_conversations(test_rows)
    reporter = progress.ProgressReporter(f"evaluating {len(candidates)} checkpoints",
                                         per_checkpoint * len(candidates), context.log.info, unit="conversations")
    for name, row in candidates:
        started = time.perf_counter()
        seed = None if row is None or pd.isna(row.seed) else int(row.seed)
        # Results are reused when the checkpoint, the test rows and the settings are unchanged.
        result_key = hashlib.sha256(json.dumps(
            [spec.fingerprint(), "base" if row is None else row.run_key, rows_key, config.batch_size]).encode()
        ).hexdigest()[:16]
        stem = name.replace("/", "-") + ("" if seed is None else f"-seed{seed}")
        path = path_under(out_dir, f"{stem}-{result_key}.json")  # name holds a stored target
        if path.is_file():
            result = evaluation.EvalResult.from_dict(json.loads(path.read_text()))
            context.log.info(f"{name}: reusing {path.name}")
            reporter.total -= per_checkpoint  # nothing to score: out of the ETA
        else:
            result = _evaluate(model, tokenizer, spec, row, test_rows, config, reporter)
            atomic_write_text(path, json.dumps(result.to_dict()))
        tracker.add_file(name if seed is None else f"{name}/seed-{seed}", path)
        run_key = None if row is None else row.run_key
        row_frame = _row_frame(result, spec.name, context.run.run_id, name, seed, run_key)
        with lineage.connect() as con:
            ensure_evaluation_tables(con)
            with transaction(con):
                con.execute(
                    "INSERT INTO evaluation_runs (model, name, stage, run_key, method, target, budget, result_path, "
                    "summary, run_id, created_at, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now(), ?)",
                    [spec.name, name, "base" if row is None else "finetune", run_key,
                     None if row is None else row.method, None if row is None else row.target,
                     None if row is None else int(row.budget), str(path), json.dumps(result.summary()),
                     context.run.run_id, seed],
                )
                con.execute("INSERT INTO evaluation_rows BY NAME SELECT * FROM row_frame")
        mean_nll = pd.Series([m.mean_nll for m in result.per_task.values()]).mean()
        summary.append({"name": name, "seed": seed, "mean_task_nll": round(float(mean_nll), 4),
                        "seconds": round(time.perf_counter() - started, 1)})
        context.log.info(f"evaluated {name}{'' if seed is None else f' seed {seed}'}: mean task NLL {mean_nll:.4f}")
    data_version = tracker.finish({"evaluated": summary, "n_test_rows": len(test_rows), "test_rows": coverage_rows})
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={"n_test_rows": dg.MetadataValue.int(len(test_rows)),
                  "test_rows_per_task": dg.MetadataValue.md(markdown_table(coverage_rows)),
                  "evaluated": dg.MetadataValue.md(markdown_table(summary, max_rows=100))},
    )


def _row_frame(result: evaluation.EvalResult, model: str, run_id: str, name: str, seed: int | None,
               run_key: str | None) -> pd.DataFrame:
    """The `evaluation_rows` of one evaluated checkpoint (an unscored NLL is NULL)."""
    frame = pd.DataFrame.from_records(
        [(model, run_id, name, seed, run_key, r.task, r.subtask, r.example_id,
          None if math.isnan(r.nll) else r.nll, r.correct, r.truncated, r.gold_letter, r.predicted_letter,
          r.reject_reason, r.generation_correct) for r in result.rows],
        columns=["model", "run_id", "name", "seed", "run_key", "task", "subtask", "example_id", "nll", "correct",
                 "truncated", "gold_letter", "predicted_letter", "reject_reason", "generation_correct"],
    )
    frame["seed"] = frame["seed"].astype("Int64")
    frame["nll"] = frame["nll"].astype("float64")
    for column in ("correct", "generation_correct"):
        frame[column] = frame[column].astype("boolean")
    return frame


@dg.asset(
    partitions_def=model_partitions,
    deps=["evaluation"],
    group_name="evaluation",
    code_version=code_version("selection.evaluate.evaluation"),
    description="Comparison of every method's finetuned checkpoint per task: deltas vs a baseline and average ranks.",
)
def comparison_report(
    context: dg.AssetExecutionContext, config: ReportConfig, settings: StorageSettings, lineage: LineageStore,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    model = context.partition_key
    with lineage.connect() as con:
        ensure_evaluation_tables(con)
        runs = con.execute(
            """SELECT name, seed, result_path FROM evaluation_runs WHERE model = ? AND run_id = (
                   SELECT run_id FROM evaluation_runs WHERE model = ? ORDER BY created_at DESC LIMIT 1)
               ORDER BY name, seed""",
            [model, model],
        ).fetchall()
    if not runs:
        raise ValueError(f"no evaluation results for model {model!r}; materialize evaluation first")
    results: dict[str, list[evaluation.EvalResult]] = {}
    for name, _, path in runs:  # one result per finetuning seed
        results.setdefault(name, []).append(evaluation.EvalResult.from_dict(json.loads(open(path).read())))
    if config.baseline not in results:
        raise ValueError(f"baseline {config.baseline!r} was not evaluated; evaluated: {sorted(results)}")
    comparison_frame = evaluation.comparison_table(results, baseline=config.baseline, n_resamples=config.n_resamples,
                                                   confidence=config.confidence, seed=config.bootstrap_seed)
    report = evaluation.markdown_report(comparison_frame, title=f"Evaluation comparison for {model}")
    profile = profile_of_run(context.run.tags)
    if profile is not None:  # right under the title: these numbers come from a small demo setup
        title, _, rest = report.partition("\n")
        report = f"{title}\n\n{describe_profile(profile)} (LESS's recipe outside the demo)\n{rest}"
    out_dir = settings.subdir("reports", model)
    (out_dir / "comparison.md").write_text(report)
    comparison_frame.to_csv(out_dir / "comparison.csv", index=False)
    with lineage.connect() as con:
        con.execute("CREATE TABLE IF NOT EXISTS comparison AS SELECT ''::VARCHAR AS model, * FROM comparison_frame LIMIT 0")
        # A table made by an earlier version lacks the interval columns: add them (older rows read NULL).
        existing = {r[0] for r in con.execute(
            "SELECT column_name FROM duckdb_columns() WHERE table_name = 'comparison'").fetchall()}
        for column, column_type, *_ in con.execute("DESCRIBE SELECT * FROM comparison_frame").fetchall():
            if column not in existing:
                con.execute(f'ALTER TABLE comparison ADD COLUMN "{column}" {column_type}')
        with transaction(con):
            con.execute("DELETE FROM comparison WHERE model = ?", [model])
            con.execute("INSERT INTO comparison BY NAME SELECT ? AS model, * FROM comparison_frame", [model])
    tracker.add_file("report", out_dir / "comparison.md")
    ranks = evaluation.average_ranks(comparison_frame)
    worst = evaluation.worst_tasks(comparison_frame)
    significant = comparison_frame[comparison_frame["significant"]]
    data_version = tracker.finish({
        "baseline": config.baseline, "bootstrap": comparison_frame.attrs["bootstrap"],
        "average_ranks": ranks.to_dict("records"),
        "worst_tasks": json.loads(worst.to_json(orient="records")),
        "significant_primary_deltas": [f"{r.method}/{r.task}" for r in significant.itertuples()],
    })
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={"report": dg.MetadataValue.md(report), "baseline": config.baseline,
                  "report_path": dg.MetadataValue.path(str(out_dir / "comparison.md"))},
    )
