"""Evaluation of the base model and every finetuned checkpoint on the held-out `test` targets, and the report."""

import hashlib
import json
import time

import dagster as dg
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, code_version
from assets.partitions import model_partitions
from assets.run_tags import describe_profile, profile_of_run
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection.common import files, integrity, progress
from selection.common.markdown import markdown_table
from selection.common.names import path_under
from selection.data import overlap_store, target_store
from selection.data.targets import DEFAULT_TEST_PER_TASK
from selection.evaluate import evaluation, evaluation_store, stats
from selection.train import checkpoints, models

BASE = "base"


class EvaluationConfig(dg.Config):
    max_test_per_task: int | None = Field(
        default=DEFAULT_TEST_PER_TASK,
        ge=1,
        description="Test rows per task, round robin over its subtasks; raised to the task's subtask count when "
        "below it, so every subtask is represented. None = every stored test row",
    )
    batch_size: int = 8


class ReportConfig(dg.Config):
    baseline: str = Field(default="random/all", description="Name deltas are computed against ('base' = no finetuning)")
    n_resamples: int = Field(
        default=stats.DEFAULT_RESAMPLES, ge=1, description="Hierarchical bootstrap resamples (seeds, then test rows)"
    )
    confidence: float = Field(default=stats.DEFAULT_CONFIDENCE, gt=0, lt=1, description="Interval coverage")
    bootstrap_seed: int = Field(default=0, description="Seed of the bootstrap resampling")


def _test_rows(con, cap: int | None) -> tuple[list[dict], list[evaluation.TaskCoverage]]:
    stored = [
        {"task": task, "subtask": subtask, "example_id": example_id, "messages": messages}
        for task, subtask, example_id, messages in target_store.read_targets(con, "test")
    ]
    return evaluation.stratified_test_rows(stored, cap)


def _evaluate(
    model, tokenizer, spec, row, test_rows: list[dict], config: EvaluationConfig, reporter: progress.ProgressReporter
) -> evaluation.EvalResult:
    """The base model (row None) or the model with a finetuned adapter loaded."""

    def run(evaluated) -> evaluation.EvalResult:
        return evaluation.evaluate_model(
            evaluated,
            tokenizer,
            test_rows,
            max_length=spec.max_length,
            batch_size=config.batch_size,
            progress=reporter.update,
        )

    if row is None:
        return run(model)
    evaluated = models.add_lora(model, spec)
    checkpoints.load_adapter_weights(evaluated, row.path, asset="finetuned_checkpoints")
    evaluated.eval()  # new LoRA dropout modules start in training mode
    try:
        return run(evaluated)
    finally:
        evaluated.unload()


@dg.asset(
    name="evaluation",
    partitions_def=model_partitions,
    deps=["finetuned_checkpoints", "target_tasks"],
    group_name="evaluation",
    pool="accelerator",
    code_version=code_version(
        "selection.evaluate.evaluation", "selection.diversity.quality", "selection.train.generation"
    ),
    description="Per-task NLL (and MMLU choice accuracy) of the base model and each finetuned checkpoint on test rows.",
)
def evaluation_asset(
    context: dg.AssetExecutionContext,
    config: EvaluationConfig,
    settings: StorageSettings,
    lineage: LineageStore,
    model_store: ModelStore,
    device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        test_rows, coverage = _test_rows(con, config.max_test_per_task)
        finetunes = evaluation_store.current_finetunes(con, spec.name)
    for task in coverage:
        if task.cap_raised:
            context.log.warning(
                f"task {task.task!r}: max_test_per_task={config.max_test_per_task} is below its "
                f"{task.n_subtasks} subtasks; evaluating {task.n_rows} rows so that each has one"
            )
    model, tokenizer = model_store.load(spec, device.resolve())
    out_dir = settings.subdir("evaluation", spec.name)
    candidates = [(BASE, None)] + [(f"{r.method}/{r.target}", r) for r in finetunes.itertuples()]
    coverage_rows = [
        {
            "task": c.task,
            "subtasks": c.n_subtasks,
            "available": c.n_available,
            "rows": c.n_rows,
            "cap": c.cap,
            "cap_raised": c.cap_raised,
        }
        for c in coverage
    ]
    summary = []
    rows_key = hashlib.sha256(json.dumps([[r["task"], r["example_id"]] for r in test_rows]).encode()).hexdigest()[:12]
    per_checkpoint = evaluation.n_scored_conversations(test_rows)
    reporter = progress.ProgressReporter(
        f"evaluating {len(candidates)} checkpoints",
        per_checkpoint * len(candidates),
        context.log.info,
        unit="conversations",
    )
    for name, row in candidates:
        started = time.perf_counter()
        seed = None if row is None or pd.isna(row.seed) else int(row.seed)
        # Results are reused when the checkpoint, the test rows and the settings are unchanged.
        result_key = hashlib.sha256(
            json.dumps(
                [spec.fingerprint(), "base" if row is None else row.run_key, rows_key, config.batch_size]
            ).encode()
        ).hexdigest()[:16]
        stem = name.replace("/", "-") + ("" if seed is None else f"-seed{seed}")
        path = path_under(out_dir, f"{stem}-{result_key}.json")  # name holds a stored target
        if path.is_file():
            # A damaged result would be reused by every rerun: the fix deletes it.
            result = evaluation.EvalResult.from_dict(
                integrity.read_json(path, asset=None, fix="delete it and rematerialize evaluation to recompute it")
            )
            context.log.info(f"{name}: reusing {path.name}")
            reporter.total -= per_checkpoint  # nothing to score: out of the ETA
        else:
            result = _evaluate(model, tokenizer, spec, row, test_rows, config, reporter)
            files.write_text(path, json.dumps(result.to_dict()))
        tracker.add_file(name if seed is None else f"{name}/seed-{seed}", path)
        checkpoint = (
            evaluation_store.EvaluatedCheckpoint(name)
            if row is None
            else evaluation_store.EvaluatedCheckpoint(name, seed, row.run_key, row.method, row.target, int(row.budget))
        )
        with lineage.connect() as con:
            evaluation_store.record_evaluation(con, spec.name, context.run.run_id, checkpoint, str(path), result)
        mean_nll = pd.Series([m.mean_nll for m in result.per_task.values()]).mean()
        summary.append(
            {
                "name": name,
                "seed": seed,
                "mean_task_nll": round(float(mean_nll), 4),
                "seconds": round(time.perf_counter() - started, 1),
            }
        )
        context.log.info(f"evaluated {name}{'' if seed is None else f' seed {seed}'}: mean task NLL {mean_nll:.4f}")
    data_version = tracker.finish({"evaluated": summary, "n_test_rows": len(test_rows), "test_rows": coverage_rows})
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "n_test_rows": dg.MetadataValue.int(len(test_rows)),
            "test_rows_per_task": dg.MetadataValue.md(markdown_table(coverage_rows)),
            "evaluated": dg.MetadataValue.md(markdown_table(summary, max_rows=100)),
        },
    )


@dg.asset(
    partitions_def=model_partitions,
    deps=["evaluation"],
    group_name="evaluation",
    code_version=code_version("selection.evaluate.evaluation", "selection.evaluate.stats"),
    description="Comparison of every method's finetuned checkpoint per task: deltas vs a baseline and average ranks.",
)
def comparison_report(
    context: dg.AssetExecutionContext,
    config: ReportConfig,
    settings: StorageSettings,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    model = context.partition_key
    with lineage.connect() as con:
        runs = evaluation_store.latest_evaluation(con, model)
        shared = evaluation_store.shared_training_sets(con, model)
        trained_on = evaluation_store.evaluated_training_examples(con, model)
        overlaps = overlap_store.current_overlaps(con)
    trained_overlaps = {name: found for name, ids in trained_on.items() if (found := overlaps.trained(ids))["rows"]}
    overlap_report = evaluation.TargetOverlapReport(overlaps.counts(), len(overlaps.example_ids), trained_overlaps)
    shared_names = [list(group.names) for group in shared]
    if not runs:
        raise ValueError(f"no evaluation results for model {model!r}; materialize evaluation first")
    results: dict[str, list[evaluation.EvalResult]] = {}
    for run in runs:  # one result per finetuning seed
        results.setdefault(run.name, []).append(
            evaluation.EvalResult.from_dict(
                integrity.read_json(
                    run.result_path, asset=None, fix="delete it and rematerialize evaluation to recompute it"
                )
            )
        )
    if config.baseline not in results:
        raise ValueError(f"baseline {config.baseline!r} was not evaluated; evaluated: {sorted(results)}")
    comparison_frame = evaluation.comparison_table(
        results,
        baseline=config.baseline,
        n_resamples=config.n_resamples,
        confidence=config.confidence,
        seed=config.bootstrap_seed,
    )
    profile = profile_of_run(context.run.tags)
    # Right under the title: whether the numbers can show a winner, and the demo setup they come from.
    report = evaluation.markdown_report(
        comparison_frame,
        title=f"Evaluation comparison for {model}",
        shared_training_sets=[(group.names, group.n_examples) for group in shared],
        target_overlaps=overlap_report,
        profile=None if profile is None else profile["name"],
        preface=() if profile is None else [f"{describe_profile(profile)} (LESS's recipe outside the demo)"],
    )
    out_dir = settings.subdir("reports", model)
    files.write_text(out_dir / "comparison.md", report)
    files.write_text(out_dir / "comparison.csv", comparison_frame.to_csv(index=False))
    with lineage.connect() as con:
        evaluation_store.replace_comparison(con, model, comparison_frame)
    tracker.add_file("report", out_dir / "comparison.md")
    ranks = evaluation.average_ranks(comparison_frame)
    null_rates = evaluation.null_rates(comparison_frame)  # cached: the report computed them
    worst = evaluation.worst_tasks(comparison_frame)
    significant = comparison_frame[comparison_frame["significant"]]
    data_version = tracker.finish(
        {
            "baseline": config.baseline,
            "bootstrap": comparison_frame.attrs["bootstrap"],
            "holm_comparisons": comparison_frame.attrs["comparisons"],
            "null_false_positive_rates": {f"{n} rows x {seeds} seeds": rate for (n, seeds), rate in null_rates.items()},
            "average_ranks": ranks.to_dict("records"),
            "worst_tasks": json.loads(worst.to_json(orient="records")),
            "significant_primary_deltas": [f"{r.method}/{r.task}" for r in significant.itertuples()],
            "shared_training_sets": shared_names,
            "target_overlaps": {**overlaps.summary(), "trained_on": trained_overlaps},
        }
    )
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "report": dg.MetadataValue.md(report),
            "baseline": config.baseline,
            "shared_training_sets": dg.MetadataValue.json(shared_names),
            "n_pool_rows_overlapping_targets": dg.MetadataValue.int(len(overlaps.example_ids)),
            "n_checkpoints_trained_on_target_rows": dg.MetadataValue.int(len(trained_overlaps)),
            "report_path": dg.MetadataValue.path(str(out_dir / "comparison.md")),
        },
    )
