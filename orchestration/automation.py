"""What launches runs on its own: the assets' automation conditions and the incoming-files sensor.

A refresh flows through the asset graph by declarative automation, evaluated by the
`refresh_automation` sensor (the UI's Automation tab shows these conditions; start the sensor
there or with `dagster sensor start refresh_automation`, and run the daemon, e.g. `dagster dev`):

- `raw_pool` and `target_tasks`: weekly (`on_cron`, Sunday 03:00 UTC), re-reading their default
  sources (unchanged files are skipped); `incoming_pool_files` ingests new files as they arrive.
- every other asset: `eager()` (run when a dependency updates), unless a blocking check of a
  dependency partition it reads failed: a bad partition holds back only what reads it.
- `influence_scores` of a model, in addition: once every `train_gradients` shard of that model is
  newer than the model's warmup checkpoints (a refresh's shard runs may finish in any order).

Assets that can run in one run (same partitioning) are requested in the same tick; the next step of
a refresh (say the shards after the warmup) is requested on the first tick after its inputs updated.
"""

from pathlib import Path

import dagster as dg

from orchestration.jobs import ingest_job
from resources.settings import default_home
from selection.data.ingest import file_type_of

WEEKLY_REFRESH_CRON = "0 3 * * 0"


class NewerThanDep(dg.AutomationCondition):
    """True for the partitions whose latest materialization is newer than the latest one of every
    partition of `dep` they read; the asset graph's partition mapping says which those are."""

    def __init__(self, dep: str):
        self.dep = dg.AssetKey(dep)

    @property
    def name(self) -> str:
        return f"newer_than_{self.dep.to_python_identifier()}"

    @property
    def description(self) -> str:
        return f"materialized after every {self.dep.to_user_string()} partition it reads"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        view = context.asset_graph_view
        latest = view.get_inner_queryer_for_back_compat().get_latest_materialization_or_observation_storage_id
        newer = set()
        for asset_partition in context.candidate_subset.expensively_compute_asset_partitions():
            own = latest(asset_partition)
            read = (
                view.get_asset_subset_from_asset_partitions(context.key, {asset_partition})
                .compute_parent_subset(self.dep)
                .expensively_compute_asset_partitions()
            )
            if own is not None and read and all((dep := latest(p)) is not None and dep < own for p in read):
                newer.add(asset_partition)
        return dg.AutomationResult(context, view.get_asset_subset_from_asset_partitions(context.key, newer))


# The weekly tick and an incoming file update the roots; everything else follows its dependencies.
ROOTS = dg.AutomationCondition.on_cron(WEEKLY_REFRESH_CRON)
# A failed blocking check holds back what reads that partition; a check not run yet does not (checks
# run in the same run as their asset, so a whole refresh can still be requested in one tick).
NO_DEP_FAILED_CHECK = ~dg.AutomationCondition.any_deps_match(
    dg.AutomationCondition.any_checks_match(dg.AutomationCondition.check_failed(), blocking_only=True)
).with_label("no blocking check of a dependency failed")
DOWNSTREAM = dg.AutomationCondition.eager() & NO_DEP_FAILED_CHECK
# Shards run as separate runs, finishing in any order: influence waits until no shard of its model
# is older than the model's warmup checkpoints.
SHARDS_CURRENT = ~dg.AutomationCondition.any_deps_match(~NewerThanDep("warmup_checkpoints")).allow(
    dg.AssetSelection.assets("train_gradients")
).with_label("every train_gradients shard newer than warmup")
CONDITIONS = {"raw_pool": ROOTS, "target_tasks": ROOTS, "influence_scores": DOWNSTREAM & SHARDS_CURRENT}


def with_automation(assets: list[dg.AssetsDefinition]) -> list[dg.AssetsDefinition]:
    """The assets, each with its automation condition from this module."""
    return dg.map_asset_specs(
        lambda spec: spec.replace_attributes(
            automation_condition=CONDITIONS.get(spec.key.to_user_string(), DOWNSTREAM)
        ),
        assets,
    )


refresh_automation = dg.AutomationConditionSensorDefinition(
    "refresh_automation",
    target=dg.AssetSelection.all(),
    default_status=dg.DefaultSensorStatus.STOPPED,
    # NewerThanDep is project code, so the conditions are evaluated in the code location.
    use_user_code_server=True,
    description=(
        "Evaluates every asset's automation condition: the weekly refresh and everything downstream of an update"
    ),
)


def _fingerprint(path: Path) -> str:
    """Changes when a file, or any file in a dataset folder, is rewritten."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    stats = [p.stat() for p in files]
    return f"{sum(s.st_size for s in stats)}:{max((s.st_mtime_ns for s in stats), default=0)}:{len(stats)}"


def incoming_files(folder: Path) -> list[Path]:
    """What ingestion accepts in `folder` (the same rule as `raw_pool`), by name."""
    return sorted(p for p in folder.iterdir() if file_type_of(p) is not None)


@dg.sensor(job=ingest_job, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED)
def incoming_pool_files(context: dg.SensorEvaluationContext):
    """Ingest any new or changed file or `save_to_disk` folder dropped into `$INSTRUCT_SELECT_HOME/incoming/`."""
    folder = Path(default_home()) / "incoming"
    if not folder.is_dir():
        yield dg.SkipReason(f"{folder} does not exist; create it and drop pool files there")
        return
    for path in incoming_files(folder):
        yield dg.RunRequest(
            run_key=f"{path.name}:{_fingerprint(path)}",
            run_config={"ops": {"raw_pool": {"config": {"sources": [{"path": str(path)}]}}}},
        )


all_sensors = [refresh_automation, incoming_pool_files]
