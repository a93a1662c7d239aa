"""Influence-based selections (LESS, BIDS) and baselines (random, task-wise round robin).

One asset per method, built by one factory; each writes the `selections` table, the
"why was this chosen" explanations and a JSONL export (asset checks: assets/checks.py).
"""

import json
from collections.abc import Callable

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, code_version, markdown_table
from assets.influence import latest_influence
from assets.partitions import model_partitions
from resources.lineage import LineageStore
from resources.settings import StorageSettings
from selection import selection_store, selectors
from selection.data import export, pool_store
from selection.influence import diagnostics, scores as influence
from selection.train import preflight
from selection.common.plots import bar_chart_markdown

SELECTION_CODE = code_version("selection.selectors", "selection.less", "selection.bids", "selection.baselines")
# Methods whose picks follow the influence scores (random ignores them).
SCORE_BASED_METHODS = frozenset({"less", "bids", "round_robin"})


class SelectionConfig(dg.Config):
    budget: float = Field(default=0.05, description="A count (>= 1, whole) or a fraction of the pool (< 1)")
    seed: int = Field(default=0, description="Seed for methods that sample (random)")


Chooser = Callable[[np.ndarray, list[dict], int, int], list[selectors.RankedPicks]]

CHOOSERS: dict[str, tuple[Chooser, str]] = {
    "less": (
        lambda scores, columns, budget, seed: selectors.less_selections(scores, columns, budget),
        "LESS (Xia et al. 2024): top-k by target score per task, and multi-target (`all`: max over tasks).",
    ),
    "bids": (
        lambda scores, columns, budget, seed: selectors.bids_selection(scores, budget),
        "BIDS (Dai et al. 2025): per-target z-scores, iterative pick for the most underrepresented target.",
    ),
    "round_robin": (
        lambda scores, columns, budget, seed: selectors.round_robin_selection(scores, columns, budget),
        "Baseline: task-wise round robin over the LESS per-task rankings.",
    ),
    "random": (
        lambda scores, columns, budget, seed: selectors.random_selection(scores.shape[0], budget, seed),
        "Baseline: uniform random sample of the scored pool (seeded).",
    ),
}


def export_jsonl(path, example_ids: list[str], con) -> None:
    """Selected examples in selection order, each in its source's own format, with id and source."""
    frame = pd.DataFrame({"example_id": example_ids, "rank": range(len(example_ids))})
    rows = con.execute(
        "SELECT f.example_id, p.source, p.format, p.messages FROM frame f JOIN pool p USING (example_id) ORDER BY f.rank"
    ).fetchall()
    if len(rows) != len(example_ids):
        raise ValueError(f"{len(example_ids) - len(rows)} selected ids are missing from the pool; cannot export")
    with open(path, "w", encoding="utf-8") as handle:
        for example_id, source, fmt, messages in rows:
            record = export.to_source_format(json.loads(messages), fmt)
            handle.write(json.dumps({"id": example_id, "source": source, **record}, ensure_ascii=False) + "\n")


def score_histogram(scores: np.ndarray, bins: int = 10) -> dict[str, float]:
    finite = scores[np.isfinite(scores)]
    if finite.size == 0:
        return {}
    counts, edges = np.histogram(finite, bins=bins)
    return {f"{lo:.3g}..{hi:.3g}": float(c) for lo, hi, c in zip(edges[:-1], edges[1:], counts)}


def record_picks(
    context: dg.AssetExecutionContext, tracker: LineageTracker, lineage: LineageStore, settings: StorageSettings,
    method: str, picks: list[selectors.RankedPicks], row_ids: list[str], pool_version: str, budget: int,
    scores: np.ndarray | None = None, columns: list[dict] | None = None, extra_metrics: dict | None = None,
    extra_metadata: dict | None = None,
) -> dg.MaterializeResult:
    """Write selections (+ explanations when a score matrix is given), exports, lineage and metadata."""
    model = context.partition_key
    selections, explained = [], []
    for pick in picks:
        ids = [row_ids[i] for i in pick.indices]
        selections.append(
            selection_store.Selection(model, method, pick.target, ids, [float(s) for s in pick.scores], pool_version,
                                      budget)
        )
        if scores is not None:
            why = selectors.explanations(scores, columns, pick)
            why["example_id"] = [row_ids[r] for r in why["row"]]
            explained.append(why.assign(model=model, method=method, target=pick.target, budget=budget))
    # Targets are task names: every export path is checked to stay under the root before any write.
    exports = [settings.path("selections", model, method, f"{s.target}-{budget}.jsonl") for s in selections]
    export_dir = settings.subdir("selections", model, method)
    with lineage.connect() as con:
        n_rows = selection_store.write_selections(
            con, selections, pd.concat(explained, ignore_index=True) if explained else None, context.run.run_id,
            context.assets_def.code_versions_by_key.get(context.asset_key),
        )
        for selection, path in zip(selections, exports):
            export_jsonl(path, selection.example_ids, con)
            tracker.add_file(f"export/{selection.target}", path)
    tracker.add_table("selections", f"{model}/{method}/{budget}", rows=n_rows)
    overall = next((p for p in picks if p.target == selectors.ALL_TARGETS), picks[0])
    metadata: dict = {}
    metrics = {"budget": budget, "pool_version": pool_version, "targets": [p.target for p in picks],
               **(extra_metrics or {})}
    if scores is not None:
        balance = selectors.task_balance(scores, columns, overall.indices)
        top = explained[picks.index(overall)]
        share = top[top["reason_rank"] == 0]["val_task"].value_counts(normalize=True).round(3).to_dict()
        metrics.update({"task_share_by_top_reason": share, "mean_normalized_influence_by_task": balance})
        metadata["task_share"] = dg.MetadataValue.md(bar_chart_markdown(share, "share of picks by the task that drove them"))
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
            **metadata,
            **(extra_metadata or {}),
        },
    )


def pool_size_of(con, pool_version: str) -> int:
    return con.execute("SELECT n_examples FROM pool_versions WHERE pool_version = ?", [pool_version]).fetchall()[0][0]


def build_selection_asset(method: str) -> dg.AssetsDefinition:
    chooser, description = CHOOSERS[method]

    @dg.asset(
        name=f"{method}_selection",
        partitions_def=model_partitions,
        deps=["influence_scores", "raw_pool"],
        group_name="selections",
        code_version=SELECTION_CODE,
        description=description,
    )
    def _selection(
        context: dg.AssetExecutionContext, config: SelectionConfig, settings: StorageSettings, lineage: LineageStore
    ) -> dg.MaterializeResult:
        tracker = LineageTracker(context, lineage)
        with lineage.connect() as con:
            run = latest_influence(con, context.partition_key)
            pool_size = pool_size_of(con, run["pool_version"])
            current = set(pool_store.pool_ids(con))
            informative, why = (diagnostics.collapsed_feature_reason(
                con, context.partition_key, run["warmup_run_key"], run["mode"], run["dim"], run["seed"])
                if method in SCORE_BASED_METHODS else (None, ""))
        scores, train_ids = influence.load_scores(run["scores_dir"])
        # Score rows of examples superseded since the scores were computed are never picked.
        rows = [row for row, example_id in enumerate(train_ids) if example_id in current]
        # Every method's budget is a share of the same pool version (not of the scored subset),
        # refused before anything is chosen or written when it is above what can be picked.
        budget = preflight.resolve_selection_budget(config.budget, pool_size, len(rows),
                                                    "current examples with influence scores")
        if len(rows) < len(train_ids):
            context.log.warning(f"{len(train_ids) - len(rows)} scored examples are superseded or gone from the pool "
                                "and are left out")
            scores, train_ids = np.asarray(scores[rows]), [train_ids[row] for row in rows]
        picks = chooser(scores, run["columns"], budget, config.seed)
        trust: dict = {}
        if method in SCORE_BASED_METHODS:
            trust["scores_informative_reason"] = why
            if informative is not None:
                trust["scores_informative"] = informative
            if informative is False:
                context.log.warning(f"{method} picks follow uninformative influence scores: {why}")
        return record_picks(context, tracker, lineage, settings, method, picks, train_ids, run["pool_version"], budget,
                            scores, run["columns"], {"scores_dir": run["scores_dir"], **trust},
                            {key: dg.MetadataValue.bool(value) if isinstance(value, bool) else value
                             for key, value in trust.items()})

    return _selection


less_selection = build_selection_asset("less")
bids_selection = build_selection_asset("bids")
round_robin_selection = build_selection_asset("round_robin")
random_selection = build_selection_asset("random")
