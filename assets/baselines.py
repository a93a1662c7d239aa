"""Baselines users compare against that need no gradients: RDS (representation similarity) and full data."""

from collections.abc import Callable

import dagster as dg
import numpy as np

from assets.common import LineageTracker, code_version, read_pool, read_targets
from assets.selections import SelectionConfig, pool_size_of, record_picks
from assets.partitions import model_partitions
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection import baselines, selectors
from selection.common import progress
from selection.diversity import embeddings
from selection.train import preflight


def _causal_lm_embeddings(cache_root, spec, model, tokenizer, ids, conversations, batch_size: int,
                          log: Callable[[str], None], label: str) -> np.ndarray:
    """Mean last-layer hidden states of whole conversations, cached by example id per model."""
    dim = int(model.config.hidden_size)
    fingerprint = f"{spec.fingerprint()}-mean-hidden"
    cache = embeddings.EmbeddingCache(
        embeddings.cache_dir_for(cache_root, fingerprint, "conversation", dim), fingerprint, "conversation", dim,
        asset="rds_selection")
    texts = [embeddings.text_for_embedding(messages, "conversation") for messages in conversations]
    reporter = progress.ProgressReporter(f"RDS hidden states of {label}", len(cache.missing(ids)), log)
    embeddings.fill_cache(cache, ids, texts, lambda batch: embeddings.embed_with_causal_lm(
        batch, model, tokenizer, batch_size=batch_size, max_length=spec.max_length, progress=reporter.update))
    return cache.load(ids)


@dg.asset(
    partitions_def=model_partitions,
    deps=["raw_pool", "target_tasks"],
    group_name="selections",
    pool="accelerator",
    code_version=code_version("selection.baselines", "selection.diversity.embeddings", "selection.selectors"),
    description="RDS baseline (LESS paper): cosine similarity of the model's mean last-layer hidden states between "
    "pool and target val examples, aggregated per task like LESS; top-k per task and multi-target.",
)
def rds_selection(
    context: dg.AssetExecutionContext, config: SelectionConfig, settings: StorageSettings, lineage: LineageStore,
    model_store: ModelStore, device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    spec = model_store.spec(context.partition_key)
    with lineage.connect() as con:
        pool_version, ids, conversations = read_pool(con)
        val_rows = read_targets(con, "val")
    # Refused before the model is loaded and anything embedded.
    budget = preflight.resolve_selection_budget(config.budget, len(ids), len(ids), "current pool examples")
    model, tokenizer = model_store.load(spec, device.resolve())
    cache_root = settings.subdir("rds", spec.name)
    pool_emb = _causal_lm_embeddings(cache_root, spec, model, tokenizer, ids, conversations, device.batch_size,
                                     context.log.info, "the pool")
    val_ids = list(dict.fromkeys(i for _, _, i, _ in val_rows))
    by_val = {i: m for _, _, i, m in val_rows}
    val_emb = _causal_lm_embeddings(cache_root, spec, model, tokenizer, val_ids, [by_val[i] for i in val_ids],
                                    device.batch_size, context.log.info, "the target val examples")
    position = {i: n for n, i in enumerate(val_ids)}
    columns = [{"task": t, "subtask": s, "val_example_id": i} for t, s, i, _ in val_rows]
    similarity = baselines.cosine_similarity_matrix(pool_emb, val_emb[[position[c["val_example_id"]] for c in columns]])
    picks = selectors.less_selections(similarity, columns, budget)
    return record_picks(context, tracker, lineage, settings, "rds", picks, ids, pool_version, budget, similarity,
                        columns, {"embedding": "mean last-layer hidden state, whole conversation"})


@dg.asset(
    partitions_def=model_partitions,
    deps=["raw_pool"],
    group_name="selections",
    code_version=code_version("selection.selectors"),
    description="Full-data baseline: the whole pool, so finetuning on it can be compared with every selection.",
)
def full_selection(
    context: dg.AssetExecutionContext, settings: StorageSettings, lineage: LineageStore
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    with lineage.connect() as con:
        pool_version, ids, _ = read_pool(con)
        budget = pool_size_of(con, pool_version)
    picks = [selectors.RankedPicks(selectors.ALL_TARGETS, baselines.full_data(len(ids)), np.full(len(ids), np.nan))]
    return record_picks(context, tracker, lineage, settings, "full", picks, ids, pool_version, budget)

