"""kMQ and iterative kMQ (Yu et al. 2024): embeddings -> clusters -> quality-weighted, cluster-proportional sampling."""

import json
import time

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, atomic_write_text, code_version, markdown_table, read_pool, transaction
from assets.selections import build_selection_check
from orchestration.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection import (
    checkpoints, embeddings, generation, kmq, models, quality, selection_store, selectors, tokenization, training,
)
from selection.plots import bar_chart_markdown

EMBEDDING_RUNS_DDL = """CREATE TABLE IF NOT EXISTS embedding_runs (
    pool_version VARCHAR, cache_dir VARCHAR, encoder_fingerprint VARCHAR, mode VARCHAR, dim INTEGER, n_rows INTEGER,
    created_at TIMESTAMPTZ)"""
CLUSTERS_DDL = """CREATE TABLE IF NOT EXISTS clusters (
    pool_version VARCHAR, encoder_fingerprint VARCHAR, k INTEGER, example_id VARCHAR, cluster INTEGER)"""
QUALITY_DDL = """CREATE TABLE IF NOT EXISTS quality_scores (
    scorer_fingerprint VARCHAR, example_id VARCHAR, score DOUBLE, scorer JSON)"""
ROUNDS_DDL = """CREATE TABLE IF NOT EXISTS kmq_rounds (
    model VARCHAR, budget INTEGER, round INTEGER, weights JSON, cluster_scores JSON, updated_weights JSON,
    new_example_ids JSON, feedback JSON, run_id VARCHAR, created_at TIMESTAMPTZ)"""


class EmbeddingsConfig(dg.Config):
    mode: str = Field(default=embeddings.DEFAULT_EMBEDDING_MODE, description="user_turns (kMQ code default) or conversation")
    model_dir: str | None = Field(default=None, description="A sentence-transformers folder; default all-MiniLM-L6-v2")
    batch_size: int = 64


class ClustersConfig(dg.Config):
    k_candidates: list[int] = Field(default=[4, 8, 16, 32], description="k grid searched by silhouette score")
    k: int | None = Field(default=None, description="Fix k instead of searching")
    seed: int = 0


class KmqConfig(dg.Config):
    budget: float = Field(default=0.05, description="A count (>= 1, whole) or a fraction of the pool (< 1)")
    temperature: float = Field(default=1.0, description="Softmax temperature of the quality weights within a cluster")
    seed: int = 0
    reward_model_path: str | None = Field(default=None, description="Local reward model folder; default: LM log-likelihood")


class IterativeKmqConfig(KmqConfig):
    n_rounds: int = Field(default=3, description="Rounds; each adds budget/n_rounds examples")
    max_new_tokens: int = Field(default=64, description="Greedy generation length for the feedback score")
    learning_rate: float = 1e-4


def _latest_embeddings(con) -> tuple[str, str, str, int]:
    con.execute(EMBEDDING_RUNS_DDL)
    row = con.execute(
        "SELECT cache_dir, encoder_fingerprint, mode, dim FROM embedding_runs ORDER BY created_at DESC LIMIT 1"
    ).fetchone()
    if row is None:
        raise ValueError("no embeddings stored; materialize embeddings first")
    return row


@dg.asset(
    name="embeddings",
    deps=["raw_pool"],
    group_name="diversity",
    pool="accelerator",
    code_version=code_version("selection.embeddings"),
    description="Sentence embeddings of the pool, cached by example id and encoder (a refresh embeds only new ids).",
)
def embeddings_asset(
    context: dg.AssetExecutionContext, config: EmbeddingsConfig, settings: StorageSettings, lineage: LineageStore,
    device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    with lineage.connect() as con:
        pool_version, ids, conversations = read_pool(con)
    encoder = embeddings.SentenceEncoder(config.model_dir, device=device.resolve())
    cache = embeddings.EmbeddingCache(
        embeddings.cache_dir_for(settings.subdir("embeddings"), encoder.fingerprint(), config.mode, encoder.dim),
        encoder.fingerprint(), config.mode, encoder.dim,
    )
    texts = [embeddings.text_for_embedding(messages, config.mode) for messages in conversations]
    started = time.perf_counter()
    n_new = embeddings.fill_cache(
        cache, ids, texts, lambda batch: encoder.encode(batch, config.batch_size),
        on_chunk=lambda done, total: context.log.info(f"embedded {done}/{total} new examples"),
    )
    seconds = time.perf_counter() - started
    with lineage.connect() as con:
        con.execute(EMBEDDING_RUNS_DDL)
        con.execute("INSERT INTO embedding_runs VALUES (?, ?, ?, ?, ?, ?, now())",
                    [pool_version, str(cache.path), encoder.fingerprint(), config.mode, encoder.dim, len(ids)])
    tracker.add_table("embeddings", f"{encoder.fingerprint()}/{config.mode}/{pool_version}", n_rows=len(ids))
    metrics = {"pool_version": pool_version, "encoder": encoder.describe(), "mode": config.mode, "n_rows": len(ids),
               "n_new": n_new, "seconds": seconds}
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "n_rows": dg.MetadataValue.int(len(ids)), "n_new": dg.MetadataValue.int(n_new), "dim": encoder.dim,
            "mode": config.mode, "encoder": dg.MetadataValue.json(encoder.describe()),
            "texts_per_s": dg.MetadataValue.float(n_new / seconds if n_new and seconds > 0 else 0.0),
            "cache_dir": dg.MetadataValue.path(str(cache.path)),
        },
    )


@dg.asset(
    deps=["embeddings"],
    group_name="diversity",
    code_version=code_version("selection.kmq"),
    description="k-means clusters of the pool embeddings, k chosen by silhouette score.",
)
def clusters(
    context: dg.AssetExecutionContext, config: ClustersConfig, lineage: LineageStore
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    with lineage.connect() as con:
        pool_version, ids, _ = read_pool(con)
        cache_dir, fingerprint, mode, dim = _latest_embeddings(con)
    cache = embeddings.EmbeddingCache(cache_dir, fingerprint, mode, dim)
    vectors = cache.load(ids)
    curve: dict[int, float] = {}
    k = config.k
    if k is None:
        candidates = [c for c in config.k_candidates if 2 <= c < len(ids)]
        if not candidates:
            raise ValueError(f"no k candidate in {config.k_candidates} fits a pool of {len(ids)}")
        k, curve = kmq.choose_k_by_silhouette(vectors, candidates, config.seed)
    labels, _ = kmq.cluster(vectors, k, config.seed)
    frame = pd.DataFrame({"pool_version": pool_version, "encoder_fingerprint": fingerprint, "k": k,
                          "example_id": ids, "cluster": labels.astype(int)})
    with lineage.connect() as con:
        con.execute(CLUSTERS_DDL)
        with transaction(con):
            con.execute("DELETE FROM clusters WHERE pool_version = ?", [pool_version])
            con.execute("INSERT INTO clusters SELECT * FROM frame")
    sizes = np.bincount(labels, minlength=k)
    tracker.add_table("clusters", f"{pool_version}/k{k}", k=k)
    metrics = {"k": int(k), "silhouette": {str(c): float(v) for c, v in curve.items()}, "sizes": sizes.tolist()}
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "k": dg.MetadataValue.int(int(k)),
            "silhouette_curve": dg.MetadataValue.md(
                bar_chart_markdown({f"k={c}": v for c, v in curve.items()}, "silhouette score by k")
                if curve else f"k fixed at {k}"),
            "cluster_sizes": dg.MetadataValue.md(bar_chart_markdown({str(i): float(s) for i, s in enumerate(sizes)},
                                                                    "examples per cluster")),
        },
    )


def _scorer(config: KmqConfig, model, tokenizer, spec, device: str):
    if config.reward_model_path:
        return quality.RewardModelScorer(config.reward_model_path, device=device)
    return quality.LogLikelihoodScorer(model, tokenizer, spec.fingerprint(), max_length=spec.max_length)


def _quality_scores(context, lineage: LineageStore, scorer, ids: list[str], conversations: list) -> np.ndarray:
    """Quality per example, cached by scorer fingerprint: only unscored ids are computed."""
    with lineage.connect() as con:
        con.execute(QUALITY_DDL)
        known = dict(con.execute(
            "SELECT example_id, score FROM quality_scores WHERE scorer_fingerprint = ?", [scorer.fingerprint()]
        ).fetchall())
    todo = [i for i, example_id in enumerate(ids) if example_id not in known]
    if todo:
        context.log.info(f"scoring quality of {len(todo)} examples with {scorer.describe()['kind']}")
        values = scorer.score([conversations[i] for i in todo])
        frame = pd.DataFrame({"scorer_fingerprint": scorer.fingerprint(), "example_id": [ids[i] for i in todo],
                              "score": values, "scorer": json.dumps(scorer.describe(), default=str)})
        with lineage.connect() as con:
            con.execute("INSERT INTO quality_scores SELECT * FROM frame")
        known.update(zip(frame["example_id"], frame["score"]))
    return np.array([known[i] if known[i] is not None else np.nan for i in ids], dtype=np.float64)


def _kmq_inputs(context, config: KmqConfig, lineage: LineageStore, model_store: ModelStore, device: DeviceSettings):
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        pool_version, ids, conversations = read_pool(con)
        con.execute(CLUSTERS_DDL)
        label_of = dict(con.execute("SELECT example_id, cluster FROM clusters WHERE pool_version = ?",
                                    [pool_version]).fetchall())
    if len(label_of) != len(ids):
        raise ValueError(f"clusters cover {len(label_of)} of {len(ids)} pool examples; rematerialize clusters")
    model, tokenizer = model_store.load(spec, device.resolve())
    scorer = _scorer(config, model, tokenizer, spec, device.resolve())
    scores = _quality_scores(context, lineage, scorer, ids, conversations)
    scored = np.flatnonzero(np.isfinite(scores))
    if len(scored) < len(ids):
        context.log.warning(f"{len(ids) - len(scored)} examples have no quality score (no response tokens left "
                            "after truncation) and are not eligible")
    return spec, pool_version, ids, conversations, label_of, scorer, scores, scored, model, tokenizer


def _write_kmq(context, lineage, model_name, method, pool_version, chosen_ids, chosen_scores, metrics, tracker, extra_md):
    selection = selection_store.Selection(model_name, method, selectors.ALL_TARGETS, chosen_ids,
                                          [float(s) for s in chosen_scores], pool_version)
    with lineage.connect() as con:
        selection_store.write_selections(con, [selection], None, context.run.run_id,
                                         context.assets_def.code_versions_by_key.get(context.asset_key))
    tracker.add_table("selections", f"{model_name}/{method}/{selection.budget}", rows=selection.budget)
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={"budget": dg.MetadataValue.int(selection.budget), "pool_version": pool_version,
                  "scorer": dg.MetadataValue.json(metrics["scorer"]), **extra_md},
    )


@dg.asset(
    partitions_def=model_partitions,
    deps=["clusters", "raw_pool"],
    group_name="selections",
    pool="accelerator",
    code_version=code_version("selection.kmq", "selection.quality"),
    description="kMQ: budget per cluster proportional to its size, quality-weighted sampling within clusters.",
)
def kmq_selection(
    context: dg.AssetExecutionContext, config: KmqConfig, lineage: LineageStore, model_store: ModelStore,
    device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec, pool_version, ids, _, label_of, scorer, scores, scored, _, _ = _kmq_inputs(
        context, config, lineage, model_store, device)
    labels = np.array([label_of[ids[i]] for i in scored])
    budget = selectors.resolve_budget_setting(config.budget, len(ids))
    result = kmq.kmq_select(scores[scored], budget, labels=labels, seed=config.seed, temperature=config.temperature)
    chosen = scored[result.indices]
    per_cluster = {str(c): int(b) for c, b in enumerate(result.per_cluster_budget)}
    metrics = {"budget": budget, "pool_version": pool_version, "scorer": scorer.describe(), "per_cluster": per_cluster,
               "n_unscored": int(len(ids) - len(scored))}
    return _write_kmq(
        context, lineage, spec.name, "kmq", pool_version, [ids[i] for i in chosen], scores[chosen], metrics, tracker,
        {"per_cluster_budget": dg.MetadataValue.md(bar_chart_markdown(per_cluster, "examples per cluster"))},
    )


@dg.asset(
    partitions_def=model_partitions,
    deps=["clusters", "raw_pool"],
    group_name="selections",
    pool="accelerator",
    code_version=code_version("selection.kmq", "selection.quality", "selection.generation", "selection.training"),
    description="Iterative kMQ: rounds of b/N examples; cluster weights follow training feedback (gold vs generated).",
)
def kmq_iterative_selection(
    context: dg.AssetExecutionContext, config: IterativeKmqConfig, settings: StorageSettings, lineage: LineageStore,
    model_store: ModelStore, device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec, pool_version, ids, conversations, label_of, scorer, scores, scored, model, tokenizer = _kmq_inputs(
        context, config, lineage, model_store, device)
    labels = np.array([label_of[ids[i]] for i in scored])
    budget = selectors.resolve_budget_setting(config.budget, len(ids))
    train_config = training.TrainingConfig(epochs=1, learning_rate=config.learning_rate, batch_size=8,
                                           micro_batch_size=device.batch_size, seed=config.seed)
    feedback_log: list[dict] = []

    def feedback(selected_local: np.ndarray) -> np.ndarray:
        """Train a fresh LoRA for one epoch on the selection so far, then score gold vs greedy generations."""
        chosen_ids = [ids[scored[i]] for i in selected_local]
        chosen = [conversations[scored[i]] for i in selected_local]
        # Keyed by what determines the feedback, so a rerun reuses trained adapters and scores.
        round_key = checkpoints.training_run_key(
            spec.fingerprint(), {**train_config.to_dict(), "max_new_tokens": config.max_new_tokens}, chosen_ids)
        round_dir = settings.subdir("models", spec.name, "kmq_feedback", round_key)
        cached = round_dir / "feedback.json"
        if cached.is_file():
            stored = json.loads(cached.read_text())
            feedback_log.append({**stored["log"], "reused": True})
            return np.array([np.nan if s is None else s for s in stored["scores"]], dtype=np.float64)
        examples, stats = tokenization.tokenize_many(tokenizer, chosen, spec.max_length)
        usable = stats.usable_indices()
        peft_model = models.add_lora(model, spec, seed=config.seed)
        training.train_lora(peft_model, [examples[i] for i in usable], train_config, round_dir / "adapter_run",
                            tokenizer.pad_token_id, save_moments=False)
        result = generation.compute_feedback(peft_model, tokenizer, chosen, max_new_tokens=config.max_new_tokens,
                                             max_length=spec.max_length, batch_size=device.batch_size,
                                             model_fingerprint=f"{spec.fingerprint()}-{round_key}")
        peft_model.unload()  # back to the plain base model for the next round
        log = {"round": len(feedback_log), "round_key": round_key, "n_scored": int(np.isfinite(result.scores).sum()),
               "n_unscored": len(result.unscored_indices), "scorer": result.scorer}
        atomic_write_text(cached, json.dumps(
            {"log": log, "scores": [None if np.isnan(s) else float(s) for s in result.scores]}, default=str))
        feedback_log.append(log)
        context.log.info(f"feedback round {len(feedback_log)}: mean S {np.nanmean(result.scores):.4f}")
        return result.scores

    selected, records = kmq.run_iterative_kmq(labels, scores[scored], budget, config.n_rounds, feedback,
                                              seed=config.seed, temperature=config.temperature)
    chosen = scored[selected]
    with lineage.connect() as con:
        con.execute(ROUNDS_DDL)
        with transaction(con):
            con.execute("DELETE FROM kmq_rounds WHERE model = ? AND budget = ?", [spec.name, budget])
            for record in records:
                con.execute(
                    "INSERT INTO kmq_rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
                    [spec.name, budget, record.round, json.dumps(record.weights.tolist()),
                     json.dumps(None if record.cluster_scores is None else
                                [None if np.isnan(v) else float(v) for v in record.cluster_scores]),
                     json.dumps(None if record.updated_weights is None else record.updated_weights.tolist()),
                     json.dumps([ids[scored[i]] for i in record.new_indices]),
                     json.dumps(feedback_log[record.round] if record.round < len(feedback_log) else None, default=str),
                     context.run.run_id],
                )
    final = records[-1].updated_weights if records[-1].updated_weights is not None else records[-1].weights
    rounds_table = [{"round": r.round, "new": len(r.new_indices),
                     "weights": ", ".join(f"{w:.3f}" for w in r.weights)} for r in records]
    metrics = {"budget": budget, "pool_version": pool_version, "scorer": scorer.describe(), "n_rounds": config.n_rounds,
               "final_weights": [float(w) for w in final], "feedback": feedback_log}
    return _write_kmq(
        context, lineage, spec.name, "kmq_iterative", pool_version, [ids[i] for i in chosen], scores[chosen], metrics,
        tracker,
        {"rounds": dg.MetadataValue.md(markdown_table(rounds_table)),
         "final_weights": dg.MetadataValue.md(bar_chart_markdown({str(c): float(w) for c, w in enumerate(final)},
                                                                 "cluster weights after feedback"))},
    )


kmq_selection_check = build_selection_check(kmq_selection, "kmq")
kmq_iterative_selection_check = build_selection_check(kmq_iterative_selection, "kmq_iterative")
diversity_checks = [kmq_selection_check, kmq_iterative_selection_check]
