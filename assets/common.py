"""What every asset does around its core call: code versions, lineage rows, output hashes."""

from __future__ import annotations

import hashlib
import importlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg

from assets.run_tags import profile_of_run
from resources import MODEL_STORE
from resources.lineage import LineageRecord, LineageStore

_HASH_CHUNK = 1 << 20


def code_version(*module_names: str) -> str:
    """Hash of the source files of the modules an asset's result depends on.

    Dagster marks an asset stale when this changes, and lineage records it per row.
    """
    digest = hashlib.sha256()
    for name in sorted(module_names):
        module = importlib.import_module(name)
        digest.update(name.encode())
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()[:16]


def sha256_path(path: Path) -> str:
    """sha256 of a file, or of a directory's relative file names and contents."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


def _is_partitioned(context: dg.AssetExecutionContext) -> bool:
    return context.assets_def.partitions_def is not None and context.has_partition_key


def _data_version(context: dg.AssetExecutionContext, dep_key: dg.AssetKey, partition: str | None) -> str | None:
    record = context.instance.get_latest_data_version_record(dep_key, partition_key=partition)
    if record is None or record.asset_materialization is None:
        return None
    return record.asset_materialization.tags.get("dagster/data_version")


def upstream_data_versions(context: dg.AssetExecutionContext) -> dict[str, Any]:
    """Upstream asset keys with the data versions this materialization read (per partition read)."""
    # job_def works both in a code location and under dg.materialize (which has no repository).
    asset_graph = context.job_def.asset_layer.asset_graph
    versions: dict[str, Any] = {}
    for dep_key in sorted(context.assets_def.asset_deps[context.asset_key], key=lambda k: k.to_user_string()):
        partitions = None  # the dep is read whole
        if _is_partitioned(context) and asset_graph.has(dep_key) and asset_graph.get(dep_key).partitions_def:
            # The partitions of the dep this partition reads, by the partition mapping the asset declares.
            partitions = sorted(
                asset_graph.get_parent_partition_keys_for_child(
                    context.partition_key, dep_key, context.asset_key
                ).partitions_subset.get_partition_keys()
            )
        if partitions is None or len(partitions) == 1:
            partition = partitions[0] if partitions else None
            versions[dep_key.to_user_string()] = {
                "partition": partition,
                "data_version": _data_version(context, dep_key, partition),
            }
        else:
            versions[dep_key.to_user_string()] = {
                "partitions": list(map(str, partitions)),
                "data_version": {str(p): _data_version(context, dep_key, p) for p in partitions},
            }
    return versions


class LineageTracker:
    """Collects one materialization's inputs, outputs and metrics; writes its `lineage` row."""

    def __init__(self, context: dg.AssetExecutionContext, lineage: LineageStore):
        self.context = context
        self.lineage = lineage
        self.started_at = datetime.now(UTC)
        self.inputs = upstream_data_versions(context)
        self.outputs: dict[str, Any] = {}

    def add_file(self, label: str, path: Path) -> str:
        sha = sha256_path(path)
        self.outputs[label] = {"path": str(path), "sha256": sha}
        return sha

    def add_table(self, table: str, version: str, **info: Any) -> None:
        self.outputs[f"table:{table}"] = {"version": version, **info}

    def data_version(self) -> str:
        return hashlib.sha256(json.dumps(self.outputs, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def finish(self, metrics: dict[str, Any]) -> dg.DataVersion:
        """Write the lineage row and return the data version to attach to the result.

        A run launched with a demo profile also records the profile (name and every value) in
        the metrics, and this asset's share of it, with why it departs from LESS, in the metadata.
        """
        version = self.data_version()
        context = self.context
        profile = profile_of_run(context.run.tags)
        if profile is not None:
            metrics = {**metrics, "profile": profile}
            context.add_output_metadata(profile_metadata(context, profile))
        self.lineage.record(
            LineageRecord(
                run_id=context.run.run_id,
                asset_key=context.asset_key.to_user_string(),
                # An unpartitioned asset run inside a partitioned job still sees the run's key.
                partition_key=context.partition_key if _is_partitioned(context) else None,
                code_version=context.assets_def.code_versions_by_key.get(context.asset_key),
                started_at=self.started_at,
                finished_at=datetime.now(UTC),
                inputs=self.inputs,
                outputs={**self.outputs, "data_version": version},
                metrics=metrics,
            )
        )
        return dg.DataVersion(version)


def profile_metadata(context: dg.AssetExecutionContext, profile: dict[str, Any]) -> dict[str, Any]:
    """The profile values that apply to this asset (its own config, and the model spec if it uses one) and why."""
    own = [context.asset_key.to_user_string()]
    if MODEL_STORE in context.assets_def.required_resource_keys:
        own.append(MODEL_STORE)
    why = profile.get("why", {})
    values = {key: value for key, value in profile.get("values", {}).items() if key.split(".")[0] in own}
    metadata = {"profile": profile["name"], "profile_values": dg.MetadataValue.json(values)}
    if any(part in why for part in own):
        metadata["why"] = "; ".join(why[part] for part in own if part in why)
    return metadata
