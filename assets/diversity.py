"""kMQ and iterative kMQ (Yu et al. 2024): embeddings -> clusters -> quality-weighted, cluster-proportional sampling."""

import json
import time
from dataclasses import dataclass
from typing import Any

import dagster as dg
import numpy as np
import pandas as pd
from pydantic import Field

from assets.common import LineageTracker, atomic_write_text, code_version, markdown_table, read_pool, transaction
from assets.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection import kmq, selection_store, selectors
from selection.common import progress
from selection.data import tokenization
from selection.diversity import embeddings, quality
from selection.train import checkpoints, generation, models, preflight, training
from selection.common.plots import bar_chart_markdown

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
    quality: str | None = Field(
        default=None,
        description="Quality signal for sampling within clusters: 'ifd' (instruction-following difficulty under the "
                    "base model, Li et al. 2024; the default without a reward model), 'log_likelihood' (the base "
                    "model's mean response log-likelihood) or 'reward_model' (the default when reward_model_path is set)")
    reward_model_path: str | None = Field(
        default=None, description="Local reward model folder: the paper's quality score and iterative-kMQ feedback judge")


class IterativeKmqConfig(KmqConfig):
    n_rounds: int = Field(default=3, description="Rounds; each adds budget/n_rounds examples")
    max_new_tokens: int = Field(default=64, description="Greedy generation length for the feedback score")
    learning_rate: float = 1e-4


def latest_embeddings(con) -> tuple[str, str, str, int]:
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
    code_version=code_version("selection.diversity.embeddings"),
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
        on_damaged=lambda problem: context.log.warning(f"damaged embedding shard dropped, re-embedding: {problem}"),
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
        cache_dir, fingerprint, mode, dim = latest_embeddings(con)
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


QUALITY_KINDS = ("ifd", "log_likelihood", "reward_model")
ELIGIBLE = "eligible examples (a quality score, and IFD < 1 with quality 'ifd')"


def _quality_kind(config: KmqConfig) -> str:
    kind = config.quality or ("reward_model" if config.reward_model_path else "ifd")
    if kind not in QUALITY_KINDS:
        raise ValueError(f"`quality` {kind!r} is not one of {', '.join(QUALITY_KINDS)}")
    if kind == "reward_model" and not config.reward_model_path:
        raise ValueError("`quality` 'reward_model' needs `reward_model_path` (a local reward model folder)")
    return kind


def _scorer(config: KmqConfig, model, tokenizer, spec, device: str):
    kind = _quality_kind(config)
    if kind == "reward_model":
        return quality.RewardModelScorer(config.reward_model_path, device=device)
    if kind == "log_likelihood":
        return quality.LogLikelihoodScorer(model, tokenizer, spec.fingerprint(), max_length=spec.max_length)
    return quality.IFDScorer(model, tokenizer, spec.fingerprint(), max_length=spec.max_length)


def _feedback_judge(config: KmqConfig, quality_scorer, device: str):
    """Iterative kMQ's judge: the reward model when configured (the paper), else None (the trained model's surprise)."""
    if not config.reward_model_path:
        return None
    if _quality_kind(config) == "reward_model":
        return quality_scorer
    return quality.RewardModelScorer(config.reward_model_path, device=device)


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


@dataclass
class KmqInputs:
    spec: Any
    pool_version: str
    ids: list[str]
    conversations: list
    sources: list[str]
    label_of: dict[str, int]
    scorer: Any
    scores: np.ndarray  # the scorer's output (IFD, log-likelihood or reward); NaN = unscored
    quality: np.ndarray  # what kMQ samples with (quality.sampling_quality); NaN = not eligible
    eligible: np.ndarray  # indices with a finite quality
    model: Any
    tokenizer: Any

    def by_source(self, temperature: float) -> list[dict]:
        """Per-source score and relative sampling weight (mean 1 over the pool, 0 if not eligible)."""
        weights = quality.relative_sampling_weights(self.quality, temperature)
        rows = quality.summarize_by_group(self.sources, {"score": self.scores, "weight": weights})
        sources = np.asarray(self.sources, dtype=object)
        n_eligible = {s: int(np.isfinite(self.quality[sources == s]).sum()) for s in set(self.sources)}
        return [{"source": r["source"], "n": r["n"], "n_eligible": n_eligible[r["source"]],
                 **{k: v for k, v in r.items() if k not in ("source", "n")}} for r in rows]


def _kmq_inputs(context, config: KmqConfig, lineage: LineageStore, model_store: ModelStore,
                device: DeviceSettings) -> KmqInputs:
    spec = model_store.spec(context.partition_key)
    _quality_kind(config)  # a bad setting fails before anything is loaded
    with lineage.connect() as con:
        pool_version, ids, conversations = read_pool(con)
        source_of = dict(con.execute("SELECT example_id, source FROM pool").fetchall())
        con.execute(CLUSTERS_DDL)
        label_of = dict(con.execute("SELECT example_id, cluster FROM clusters WHERE pool_version = ?",
                                    [pool_version]).fetchall())
    if len(label_of) != len(ids):
        raise ValueError(f"clusters cover {len(label_of)} of {len(ids)} pool examples; rematerialize clusters")
    # Refused before the model is loaded and the pool scored.
    preflight.resolve_selection_budget(config.budget, len(ids), len(ids), "current pool examples")
    model, tokenizer = model_store.load(spec, device.resolve())
    scorer = _scorer(config, model, tokenizer, spec, device.resolve())
    scores = _quality_scores(context, lineage, scorer, ids, conversations)
    sampling = quality.sampling_quality(scorer, scores)
    n_unscored = int(np.isnan(scores).sum())
    n_filtered = int((np.isfinite(scores) & ~np.isfinite(sampling)).sum())
    if n_unscored:
        context.log.warning(f"{n_unscored} examples have no quality score (no response token to score) and are "
                            "not eligible")
    if n_filtered:
        context.log.info(f"{n_filtered} examples have IFD >= 1 (the prompt does not help predict the answer) and are "
                         "not eligible, as in Li et al. 2024")
    return KmqInputs(spec, pool_version, ids, conversations, [source_of[i] for i in ids], label_of, scorer, scores,
                     sampling, np.flatnonzero(np.isfinite(sampling)), model, tokenizer)


def _quality_report(inputs: KmqInputs, temperature: float) -> tuple[dict, dict]:
    """(metrics, metadata) on the quality signal: per-source distributions and eligibility counts."""
    rows = inputs.by_source(temperature)
    n_unscored = int(np.isnan(inputs.scores).sum())
    metrics = {"quality_kind": inputs.scorer.describe()["kind"], "quality_by_source": rows,
               "n_unscored": n_unscored, "n_ineligible": int(len(inputs.ids) - len(inputs.eligible) - n_unscored)}
    metadata = {"quality_by_source": dg.MetadataValue.md(
                    "score = the scorer's output; weight = softmax(quality / T) sampling weight relative to the pool "
                    "mean (1 = average, 0 = not eligible)\n\n" + markdown_table(rows)),
                "n_ineligible": dg.MetadataValue.int(metrics["n_ineligible"])}
    return metrics, metadata


def _write_kmq(context, lineage, model_name, method, pool_version, chosen_ids, chosen_scores, metrics, tracker, extra_md):
    selection = selection_store.Selection(model_name, method, selectors.ALL_TARGETS, chosen_ids,
                                          [float(s) for s in chosen_scores], pool_version, metrics["budget"])
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
    code_version=code_version("selection.kmq", "selection.diversity.quality"),
    description="kMQ: budget per cluster proportional to its size, quality-weighted sampling within clusters.",
)
def kmq_selection(
    context: dg.AssetExecutionContext, config: KmqConfig, lineage: LineageStore, model_store: ModelStore,
    device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    inputs = _kmq_inputs(context, config, lineage, model_store, device)
    spec, pool_version, ids, label_of, scorer, scores = (
        inputs.spec, inputs.pool_version, inputs.ids, inputs.label_of, inputs.scorer, inputs.scores)
    scored = inputs.eligible
    labels = np.array([label_of[ids[i]] for i in scored])
    budget = preflight.resolve_selection_budget(config.budget, len(ids), len(scored), ELIGIBLE)
    result = kmq.kmq_select(inputs.quality[scored], budget, labels=labels, seed=config.seed,
                            temperature=config.temperature)
    chosen = scored[result.indices]
    per_cluster = {str(c): int(b) for c, b in enumerate(result.per_cluster_budget)}
    quality_metrics, quality_md = _quality_report(inputs, config.temperature)
    metrics = {"budget": budget, "pool_version": pool_version, "scorer": scorer.describe(), "per_cluster": per_cluster,
               "temperature": config.temperature, **quality_metrics}
    return _write_kmq(
        context, lineage, spec.name, "kmq", pool_version, [ids[i] for i in chosen], scores[chosen], metrics, tracker,
        {"per_cluster_budget": dg.MetadataValue.md(bar_chart_markdown(per_cluster, "examples per cluster")),
         **quality_md},
    )


@dg.asset(
    partitions_def=model_partitions,
    deps=["clusters", "raw_pool"],
    group_name="selections",
    pool="accelerator",
    code_version=code_version("selection.kmq", "selection.diversity.quality", "selection.train.generation", "selection.train.training"),
    description="Iterative kMQ: rounds of b/N examples; cluster weights follow training feedback (gold vs generated).",
)
def kmq_iterative_selection(
    context: dg.AssetExecutionContext, config: IterativeKmqConfig, settings: StorageSettings, lineage: LineageStore,
    model_store: ModelStore, device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    inputs = _kmq_inputs(context, config, lineage, model_store, device)
    spec, pool_version, ids, conversations, label_of, scorer, scores, model, tokenizer = (
        inputs.spec, inputs.pool_version, inputs.ids, inputs.conversations, inputs.label_of, inputs.scorer,
        inputs.scores, inputs.model, inputs.tokenizer)
    scored = inputs.eligible
    judge = _feedback_judge(config, scorer, device.resolve())
    labels = np.array([label_of[ids[i]] for i in scored])
    budget = preflight.resolve_selection_budget(config.budget, len(ids), len(scored), ELIGIBLE)
    train_config = training.TrainingConfig(epochs=1, learning_rate=config.learning_rate, batch_size=8,
                                           micro_batch_size=device.batch_size, seed=config.seed)
    feedback_log: list[dict] = []

    def feedback(selected_local: np.ndarray) -> np.ndarray:
        """Train a fresh LoRA for one epoch on the selection so far, then score gold vs greedy generations."""
        chosen_ids = [ids[scored[i]] for i in selected_local]
        chosen = [conversations[scored[i]] for i in selected_local]
        # Keyed by what determines the feedback, so a rerun reuses trained adapters and scores.
        round_key = checkpoints.training_run_key(
            spec.fingerprint(), {**train_config.to_dict(), "max_new_tokens": config.max_new_tokens,
                                 "feedback_judge": judge.fingerprint() if judge is not None else "self_likelihood"},
            chosen_ids)
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
        reporter = progress.ProgressReporter(f"iterative kMQ round {len(feedback_log) + 1} of {config.n_rounds}: "
                                             "greedy generation", len(chosen), context.log.info, unit="prompts")
        result = generation.compute_feedback(peft_model, tokenizer, chosen, max_new_tokens=config.max_new_tokens,
                                             max_length=spec.max_length, batch_size=device.batch_size,
                                             scorer=judge, model_fingerprint=f"{spec.fingerprint()}-{round_key}",
                                             progress=reporter.update)
        peft_model.unload()  # back to the plain base model for the next round
        log = {"round": len(feedback_log), "round_key": round_key, "n_scored": int(np.isfinite(result.scores).sum()),
               "n_unscored": len(result.unscored_indices), "scorer": result.scorer}
        atomic_write_text(cached, json.dumps(
            {"log": log, "scores": [None if np.isnan(s) else float(s) for s in result.scores]}, default=str))
        feedback_log.append(log)
        context.log.info(f"feedback round {len(feedback_log)}: mean S {np.nanmean(result.scores):.4f}")
        return result.scores

    selected, records = kmq.run_iterative_kmq(labels, inputs.quality[scored], budget, config.n_rounds, feedback,
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
    quality_metrics, quality_md = _quality_report(inputs, config.temperature)
    metrics = {"budget": budget, "pool_version": pool_version, "scorer": scorer.describe(), "n_rounds": config.n_rounds,
               "temperature": config.temperature, "final_weights": [float(w) for w in final], "feedback": feedback_log,
               "feedback_judge": judge.describe() if judge is not None else "self_likelihood", **quality_metrics}
    return _write_kmq(
        context, lineage, spec.name, "kmq_iterative", pool_version, [ids[i] for i in chosen], scores[chosen], metrics,
        tracker,
        {"rounds": dg.MetadataValue.md(markdown_table(rounds_table)),
         "final_weights": dg.MetadataValue.md(bar_chart_markdown({str(c): float(w) for c, w in enumerate(final)},
                                                                 "cluster weights after feedback")),
         **quality_md},
    )

