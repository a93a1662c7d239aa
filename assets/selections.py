"""What every selection asset shares, and the skin of the methods that choose from influence scores.

`selection_asset` declares the asset of a method registered in `selection.registry` (the skin of
the input it consumes supplies the body: `from_influence_scores` here, RDS and full data in
assets/baselines.py, kMQ in assets/diversity.py; assets/methods.py makes them all). `record_picks`
writes what a method picked: the `selections` table, the "why was this chosen" explanations and a
JSONL export per target (asset checks: assets/checks.py).

Decontamination: every skin drops the pool rows that are target rows (`target_overlaps`, see
`selection.data.decontamination`) from its candidates before choosing, unless the config's
`keep_target_overlaps` is set; `record_picks` refuses picks that are target rows otherwise.
"""

from collections.abc import Callable, Sequence

import dagster as dg
import duckdb
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, code_version
from assets.partitions import model_partitions
from resources.lineage import LineageStore
from resources.settings import StorageSettings
from selection import registry, selection_store, selectors
from selection.common.markdown import bar_chart_markdown, markdown_table
from selection.data import overlap_store, pool_store
from selection.influence import diagnostics
from selection.influence import scores as influence
from selection.influence.influence_store import FeatureKey, latest_influence
from selection.train import preflight

KEEP_TARGET_OVERLAPS_DESCRIPTION = (
    "Keep pool rows that are target val/test rows (exactly or nearly: table `target_overlaps`) among the "
    "candidates. Off by default: on, target rows can be trained on, and evaluation then measures memorisation"
)


class DecontaminationConfig(dg.Config):
    keep_target_overlaps: bool = Field(default=False, description=KEEP_TARGET_OVERLAPS_DESCRIPTION)


class SelectionConfig(DecontaminationConfig):
    budget: float = Field(default=0.05, description="A count (>= 1, whole) or a fraction of the pool (< 1)")
    seed: int = Field(default=0, description="Seed for methods that sample (random)")


class Decontamination:
    """The pool rows a selection leaves out because they are target rows, and what it reports about them."""

    def __init__(self, overlaps: overlap_store.OverlapSet, keep: bool) -> None:
        self.overlaps = overlaps
        self.keep = keep
        self.excluded: list[str] = []  # candidates dropped by `candidates`

    @classmethod
    def current(cls, con: duckdb.DuckDBPyConnection, keep: bool) -> "Decontamination":
        """The overlaps of the current pool and targets (computed if they changed)."""
        return cls(overlap_store.current_overlaps(con), keep)

    def candidates(self, ids: Sequence[str]) -> list[int]:
        """Positions in ``ids`` to choose from: those that are not target rows (all of them when keeping)."""
        overlapping = frozenset() if self.keep else self.overlaps.example_ids
        kept = [i for i, example_id in enumerate(ids) if example_id not in overlapping]
        self.excluded = [example_id for example_id in ids if example_id in overlapping]
        return kept

    def usable(self, what: str) -> str:
        """``what`` the candidates are, for the budget preflight's message."""
        if not self.excluded:
            return what
        return (
            f"{what} and not target rows ({len(self.excluded)} pool rows overlapping target rows are excluded: "
            f"{self.overlaps.describe(set(self.excluded))}; `{overlap_store.KEEP_FIELD}: true` keeps them)"
        )

    def metrics(self, n_picked: int) -> dict:
        return {
            overlap_store.KEEP_FIELD: self.keep,
            "n_target_overlaps_excluded": len(self.excluded),
            "n_target_overlaps_picked": n_picked,
            "target_overlaps": self.overlaps.summary(),
        }

    def metadata(self, n_picked: int) -> dict:
        return {
            overlap_store.KEEP_FIELD: dg.MetadataValue.bool(self.keep),
            "n_target_overlaps_excluded": dg.MetadataValue.int(len(self.excluded)),
            "n_target_overlaps_picked": dg.MetadataValue.int(n_picked),
        }


def refuse_target_rows(
    con: duckdb.DuckDBPyConnection, picked: Sequence[str], decontamination: Decontamination, selection: str
) -> int:
    """The final guard before a selection is written: picks that are target rows of the current
    targets are refused unless the selection keeps them; returns how many picks are target rows.

    Read again here rather than trusted from the skin, so a skin that forgot to filter fails loudly.
    """
    current = overlap_store.current_overlaps(con)
    return overlap_store.refuse_overlapping_picks(current, picked, decontamination.keep, selection)


def score_histogram(scores: np.ndarray, bins: int = 10) -> dict[str, float]:
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return {}
    counts, edges = np.histogram(finite, bins=bins)
    return {f"{lo:.3g}..{hi:.3g}": float(c) for lo, hi, c in zip(edges[:-1], edges[1:], counts)}


def record_picks(
    context: dg.AssetExecutionContext,
    tracker: LineageTracker,
    lineage: LineageStore,
    settings: StorageSettings,
    method: str,
    picks: list[selectors.RankedPicks],
    row_ids: list[str],
    pool_version: str,
    budget: int,
    scored: selectors.ScoredPool | None = None,
    extra_metrics: dict | None = None,
    extra_metadata: dict | None = None,
    decontamination: Decontamination | None = None,
) -> dg.MaterializeResult:
    """Write selections (+ explanations when the picks came from a score matrix), exports, lineage and metadata.

    Refused, before anything is written, when a pick is a target row and ``decontamination`` does
    not keep them (None: a skin that does not say keeps nothing).
    """
    model = context.partition_key
    selections, explained = [], []
    for pick in picks:
        ids = [row_ids[i] for i in pick.indices]
        selections.append(
            selection_store.Selection(
                model, method, pick.target, ids, [float(s) for s in pick.scores], pool_version, budget
            )
        )
        if scored is not None:
            why = selectors.explanations(scored.scores, scored.columns, pick)
            why["example_id"] = [row_ids[r] for r in why["row"]]
            explained.append(why.assign(model=model, method=method, target=pick.target, budget=budget))
    # Targets are task names: every export path is checked to stay under the root before any write.
    exports = [settings.path("selections", model, method, f"{s.target}-{budget}.jsonl") for s in selections]
    export_dir = settings.subdir("selections", model, method)
    with lineage.connect() as con:
        if decontamination is None:
            decontamination = Decontamination.current(con, keep=False)
        n_overlapping = refuse_target_rows(
            con, [i for s in selections for i in s.example_ids], decontamination, f"{method} selection"
        )
        n_rows = selection_store.write_selections(
            con,
            selections,
            pd.concat(explained, ignore_index=True) if explained else None,
            context.run.run_id,
            context.assets_def.code_versions_by_key.get(context.asset_key),
        )
        for selection, path in zip(selections, exports):
            selection_store.export_jsonl(con, path, selection.example_ids)
            tracker.add_file(f"export/{selection.target}", path)
    tracker.add_table("selections", f"{model}/{method}/{budget}", rows=n_rows)
    overall = next((p for p in picks if p.target == selectors.ALL_TARGETS), picks[0])
    metadata: dict = {}
    metrics = {
        "budget": budget,
        "pool_version": pool_version,
        "targets": [p.target for p in picks],
        **decontamination.metrics(n_overlapping),
        **(extra_metrics or {}),
    }
    if scored is not None:
        balance = selectors.task_balance(scored.scores, scored.columns, overall.indices)
        top = explained[picks.index(overall)]
        share = top[top["reason_rank"] == 0]["val_task"].value_counts(normalize=True).round(3).to_dict()
        metrics.update({"task_share_by_top_reason": share, "mean_normalized_influence_by_task": balance})
        metadata["task_share"] = dg.MetadataValue.md(
            bar_chart_markdown(share, "share of picks by the task that drove them")
        )
        metadata["balance"] = dg.MetadataValue.md(bar_chart_markdown(balance, "mean normalized influence by task"))
    histogram = score_histogram(np.asarray(overall.scores, dtype=np.float64))
    if histogram:
        metadata["score_histogram"] = dg.MetadataValue.md(bar_chart_markdown(histogram, "scores of the picks"))
    preview = [
        {"rank": r, "example_id": row_ids[i], "score": f"{s:.4f}" if np.isfinite(s) else ""}
        for r, (i, s) in enumerate(zip(overall.indices[:10], overall.scores[:10]))
    ]
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "budget": dg.MetadataValue.int(budget),
            "pool_version": pool_version,
            "targets": dg.MetadataValue.json([p.target for p in picks]),
            "top_examples": dg.MetadataValue.md(markdown_table(preview)),
            "export_dir": dg.MetadataValue.path(str(export_dir)),
            **decontamination.metadata(n_overlapping),
            **metadata,
            **(extra_metadata or {}),
        },
    )


def _metadata_value(value: object) -> object:
    if isinstance(value, bool):
        return dg.MetadataValue.bool(value)
    return dg.MetadataValue.json(value) if isinstance(value, dict) else value


def selection_asset(
    method: registry.SelectionMethod, deps: list[str], **asset_args
) -> Callable[[Callable[..., dg.MaterializeResult]], dg.AssetsDefinition]:
    """Decorates the body of a method's asset: key, description and code version come from its registry entry."""
    return dg.asset(
        name=method.asset,
        partitions_def=model_partitions,
        deps=deps,
        group_name="selections",
        # Which pool rows are target rows decides the candidates of every method.
        code_version=code_version(*method.code, "selection.data.decontamination"),
        description=method.description,
        **asset_args,
    )


def from_influence_scores(method: registry.SelectionMethod) -> dg.AssetsDefinition:
    """The asset of a method that chooses from the model's latest influence scores of the current pool."""

    @selection_asset(method, deps=["influence_scores", "raw_pool"])
    def _selection(
        context: dg.AssetExecutionContext, config: SelectionConfig, settings: StorageSettings, lineage: LineageStore
    ) -> dg.MaterializeResult:
        tracker = LineageTracker(context, lineage)
        with lineage.connect() as con:
            run = latest_influence(con, context.partition_key)
            pool_size = pool_store.pool_version_size(con, run["pool_version"])
            current = set(pool_store.pool_ids(con))
            decontamination = Decontamination.current(con, config.keep_target_overlaps)
            collapse = (
                diagnostics.assess_collapse(
                    con,
                    context.partition_key,
                    run["warmup_run_key"],
                    FeatureKey(run["mode"], run["dim"], run["seed"], run["train_transform"], run["loss_tokens"]),
                    run["dropped_directions"],
                    run["scored_diagnostics"],
                )
                if method.follows_scores
                else None
            )
        scores, train_ids = influence.load_scores(run["scores_dir"])
        # Score rows of examples superseded since the scores were computed are never picked.
        current_rows = [row for row, example_id in enumerate(train_ids) if example_id in current]
        rows = [current_rows[i] for i in decontamination.candidates([train_ids[row] for row in current_rows])]
        # Every method's budget is a share of the same pool version (not of the scored subset),
        # refused before anything is chosen or written when it is above what can be picked.
        budget = preflight.resolve_selection_budget(
            config.budget, pool_size, len(rows), decontamination.usable("current examples with influence scores")
        )
        if len(current_rows) < len(train_ids):
            context.log.warning(
                f"{len(train_ids) - len(current_rows)} scored examples are superseded or gone from the pool and are "
                "left out"
            )
        if decontamination.excluded:
            context.log.info(f"{len(decontamination.excluded)} scored examples are target rows and are left out")
        if len(rows) < len(train_ids):
            scores, train_ids = np.asarray(scores[rows]), [train_ids[row] for row in rows]
        scored = selectors.ScoredPool(scores, run["columns"], config.seed)
        picks = method.choose(scored, budget)
        trust: dict = {}
        if collapse is not None:
            trust["feature_recipe"] = influence.feature_recipe(
                run["mode"],
                run["train_transform"],
                run["loss_tokens"],
                run["dropped_directions"],
                run["recipe"],
                run["recipe_overrides"],
            )
            trust["scores_informative_reason"] = collapse.reason
            if collapse.informative is not None:
                trust["scores_informative"] = collapse.informative
            # Train and target collapse apart: removing the pool's directions only centres the train side.
            trust.update({name: value for name, value in collapse.metadata().items() if value is not None})
            if collapse.informative is False:
                context.log.warning(f"{method.name} picks follow uninformative influence scores: {collapse.reason}")
        return record_picks(
            context,
            tracker,
            lineage,
            settings,
            method.name,
            picks,
            train_ids,
            run["pool_version"],
            budget,
            scored,
            {"scores_dir": run["scores_dir"], **trust},
            {key: _metadata_value(value) for key, value in trust.items()},
            decontamination,
        )

    return _selection
