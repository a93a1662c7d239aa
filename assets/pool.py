"""Raw pool and target tasks: ingest files into DuckDB, with every record accounted for."""

import dagster as dg
from pydantic import Field

from assets.common import LineageTracker, code_version
from resources.lineage import LineageStore
from resources.settings import StorageSettings
from selection.common.markdown import markdown_table
from selection.data import default_data, overlap_store, pool_store, target_store, targets
from selection.data.formats import FORMATS
from selection.data.ingest import SourceSpec


class PoolSource(dg.Config):
    path: str = Field(description="JSONL, JSON array, Parquet file, or a `datasets.save_to_disk` folder")
    name: str | None = Field(default=None, description="Source label; defaults to the file or folder name")
    format: str = Field(default="auto", description=" | ".join(("auto", *FORMATS)))
    replaces: bool = Field(
        default=False,
        description="This path is the new version of the source already ingested under `name` from another "
        "path: its rows are compared as edits. Without it, a name already used by another path is refused",
    )


class RawPoolConfig(dg.Config):
    sources: list[PoolSource] = Field(
        default_factory=list, description="Files to add to the pool; empty uses the built-in packaged sample pool"
    )
    default_pool_size: int = Field(
        default=default_data.DEFAULT_POOL_SIZE, description="Size of the built-in pool when no sources are given"
    )


class TargetFileConfig(dg.Config):
    path: str
    task: str | None = Field(default=None, description="Overrides each record's `task`")


class TargetTasksConfig(dg.Config):
    files: list[TargetFileConfig] = Field(
        default_factory=list,
        description="Target files (the file types and record formats of pool sources); "
        "empty uses the built-in MMLU/code/math targets",
    )
    default_tasks: list[str] | None = Field(
        default=None,
        description=f"Built-in tasks to use when no files are given; None = all of {list(targets.DEFAULT_TASKS)}",
    )
    n_val: int = Field(default=targets.DEFAULT_N_VAL, description="Val (few-shot target) examples per subtask")
    max_test_per_task: int | None = Field(
        default=targets.DEFAULT_TEST_PER_TASK, description="Cap on held-out test examples per task"
    )


@dg.asset(
    group_name="pool",
    code_version=code_version(
        "selection.data.formats",
        "selection.data.ingest",
        "selection.data.pool_store",
        "selection.data.default_data",
        "selection.common.allocation",
    ),
    description="Instruction pool in DuckDB (`pool`, `pool_rejects`, `pool_duplicates`), append-only and versioned.",
)
def raw_pool(
    context: dg.AssetExecutionContext, config: RawPoolConfig, settings: StorageSettings, lineage: LineageStore
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    if config.sources:
        specs = [SourceSpec(path=s.path, name=s.name, format=s.format, replaces=s.replaces) for s in config.sources]
    else:
        builtin = default_data.write_default_pool(settings.subdir("builtin", "pool"), size=config.default_pool_size)
        specs = [SourceSpec(**spec) for spec in builtin]
        context.log.info(f"No sources configured: using the built-in pool ({len(specs)} packaged sources)")
    # Sources are read and staged with the database closed; it is opened only to commit.
    report = pool_store.ingest_with(lineage.connect, specs)
    for source in report.sources:
        context.log.info(
            f"{source.source}: {source.status}, read {source.n_read} = accepted {source.n_accepted} "
            f"+ rejected {source.n_rejected} + duplicates {source.n_duplicates}"
            + (f"; superseded {source.n_superseded} earlier rows (edited records)" if source.n_superseded else "")
            + (f"; replaces the source read from {source.replaced_path}" if source.replaced_path else "")
        )
    # The data version depends on the pool content only, so an unchanged re-ingest keeps downstream fresh.
    tracker.add_table("pool", report.pool_version, n_total=report.n_total)
    per_source = [
        {
            "source": s.source,
            "status": s.status,
            "read": s.n_read,
            "accepted": s.n_accepted,
            "rejected": s.n_rejected,
            "duplicates": s.n_duplicates,
            "superseded": s.n_superseded,
            "replaces": s.replaced_path,
        }
        for s in report.sources
    ]
    metrics = {
        "pool_version": report.pool_version,
        "n_total": report.n_total,
        "n_new": report.n_new,
        "n_read": report.n_read,
        "n_rejected": report.n_rejected,
        "n_duplicates": report.n_duplicates,
        "n_superseded": report.n_superseded,
        "n_revived": report.n_revived,
        "n_superseded_total": report.n_superseded_total,
        "rejects_by_reason": report.rejects_by_reason,
        "records_per_s": report.records_per_s,
        "sources": per_source,
    }
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "pool_version": report.pool_version,
            "parent_version": report.parent_version or "",
            "n_total": dg.MetadataValue.int(report.n_total),
            "n_new": dg.MetadataValue.int(report.n_new),
            "n_read": dg.MetadataValue.int(report.n_read),
            "n_rejected": dg.MetadataValue.int(report.n_rejected),
            "n_duplicates": dg.MetadataValue.int(report.n_duplicates),
            # Rows this ingest superseded (edited records), revived, and superseded in the pool now.
            "n_superseded": dg.MetadataValue.int(report.n_superseded),
            "n_revived": dg.MetadataValue.int(report.n_revived),
            "n_superseded_total": dg.MetadataValue.int(report.n_superseded_total),
            "records_per_s": dg.MetadataValue.float(float(report.records_per_s)),
            "rejects_by_reason": dg.MetadataValue.json(report.rejects_by_reason),
            "sources": dg.MetadataValue.md(markdown_table(per_source)),
        },
    )


@dg.asset(
    group_name="pool",
    code_version=code_version(
        "selection.data.formats",
        "selection.data.ingest",
        "selection.data.targets",
        "selection.data.target_store",
        "selection.data.default_data",
        "selection.data.decontamination",
        "selection.data.overlap_store",
    ),
    description="Target tasks (`targets` table): few `val` examples define each target, `test` is held out; "
    "pool rows that are target rows are found (`target_overlaps`) and left out of every selection.",
)
def target_tasks(
    context: dg.AssetExecutionContext, config: TargetTasksConfig, settings: StorageSettings, lineage: LineageStore
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    if config.files:
        files = [targets.TargetFile(path=f.path, task=f.task) for f in config.files]
    else:
        builtin = targets.write_default_targets(
            settings.subdir("builtin", "targets"), n_val=config.n_val, test_per_task=config.max_test_per_task
        )
        wanted = config.default_tasks or targets.DEFAULT_TASKS
        unknown = sorted(set(wanted) - set(targets.DEFAULT_TASKS))
        if unknown:
            raise ValueError(
                f"`default_tasks` {unknown} are not built-in tasks; choose from {list(targets.DEFAULT_TASKS)}"
            )
        files = [targets.TargetFile(**spec) for spec in builtin if spec["task"] in wanted]
        context.log.info(f"No target files configured: using the built-in targets ({len(files)} tasks)")
    target_set = targets.build_targets(files, n_val=config.n_val, max_test_per_task=config.max_test_per_task)
    for warning in target_set.warnings:
        context.log.warning(warning)
    with lineage.connect() as con:
        summary = target_store.write_targets(con, target_set.rows, target_set.rejects, target_set.warnings)
        # Against the pool as it is now; a selection recomputes them for the pool it reads.
        overlaps = overlap_store.current_overlaps(con)
    overlap_counts = overlaps.counts()
    n_overlapping = len(overlaps.example_ids)
    if overlaps.pool_version is None:
        context.log.info("No pool yet: target rows in the pool are found when a selection reads it")
    elif n_overlapping:
        context.log.warning(
            f"{n_overlapping} pool rows are target rows ({overlaps.describe()}); every selection leaves them out "
            f"unless its `{overlap_store.KEEP_FIELD}` is set (table target_overlaps)"
        )
    tracker.add_table("targets", summary["targets_version"], n_targets=summary["n_targets"])
    data_version = tracker.finish({**summary, "target_overlaps": overlaps.summary()})
    per_task = [{"task": task, **counts} for task, counts in summary["tasks"].items()]
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "targets_version": summary["targets_version"],
            "n_val": dg.MetadataValue.int(summary["n_val"]),
            "n_test": dg.MetadataValue.int(summary["n_test"]),
            "n_rejects": dg.MetadataValue.int(summary["n_rejects"]),
            "rejects_by_reason": dg.MetadataValue.json(summary["rejects_by_reason"]),
            "tasks": dg.MetadataValue.md(markdown_table(per_task)),
            "pool_version": overlaps.pool_version or "",
            "n_pool_rows_overlapping_targets": dg.MetadataValue.int(n_overlapping),
            "target_overlaps": dg.MetadataValue.md(
                markdown_table(overlap_counts)
                if overlap_counts
                else ("no pool yet" if overlaps.pool_version is None else "no pool row is a target row")
            ),
        },
    )
