"""The skins of the baselines that need no gradients: methods over the model's hidden states (RDS,
representation similarity) and over the whole pool (full data)."""

from collections.abc import Callable

import dagster as dg
import numpy as np

from assets.common import LineageTracker
from assets.selections import Decontamination, DecontaminationConfig, SelectionConfig, record_picks, selection_asset
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection import baselines, registry, selectors
from selection.common import progress
from selection.data import pool_store, target_store
from selection.diversity import embeddings
from selection.train import preflight


def _causal_lm_embeddings(
    cache_root,
    spec,
    model,
    tokenizer,
    ids,
    conversations,
    batch_size: int,
    log: Callable[[str], None],
    label: str,
    asset: str,
) -> np.ndarray:
    """Mean last-layer hidden states of whole conversations, cached by example id per model."""
    dim = int(model.config.hidden_size)
    fingerprint = f"{spec.fingerprint()}-mean-hidden"
    cache = embeddings.EmbeddingCache(
        embeddings.cache_dir_for(cache_root, fingerprint, "conversation", dim),
        fingerprint,
        "conversation",
        dim,
        asset=asset,
    )
    texts = [embeddings.text_for_embedding(messages, "conversation") for messages in conversations]
    reporter = progress.ProgressReporter(f"RDS hidden states of {label}", len(cache.missing(ids)), log)
    embeddings.fill_cache(
        cache,
        ids,
        texts,
        lambda batch: embeddings.embed_with_causal_lm(
            batch, model, tokenizer, batch_size=batch_size, max_length=spec.max_length, progress=reporter.update
        ),
    )
    return cache.load(ids)


def from_hidden_states(method: registry.SelectionMethod) -> dg.AssetsDefinition:
    """The asset of a method that chooses from the similarity of the model's hidden states (pool x target val)."""

    @selection_asset(method, deps=["raw_pool", "target_tasks"], pool="accelerator")
    def _selection(
        context: dg.AssetExecutionContext,
        config: SelectionConfig,
        settings: StorageSettings,
        lineage: LineageStore,
        model_store: ModelStore,
        device: DeviceSettings,
    ) -> dg.MaterializeResult:
        tracker = LineageTracker(context, lineage)
        spec = model_store.spec(context.partition_key)
        with lineage.connect() as con:
            pool_version, ids, conversations = pool_store.read_pool(con)
            val_rows = target_store.read_targets(con, "val")
            decontamination = Decontamination.current(con, config.keep_target_overlaps)
        n_pool = len(ids)
        kept = decontamination.candidates(ids)
        ids, conversations = [ids[i] for i in kept], [conversations[i] for i in kept]
        # Refused before the model is loaded and anything embedded.
        budget = preflight.resolve_selection_budget(
            config.budget, n_pool, len(ids), decontamination.usable("current pool examples")
        )
        model, tokenizer = model_store.load(spec, device.resolve())
        cache_root = settings.subdir("rds", spec.name)
        pool_emb = _causal_lm_embeddings(
            cache_root,
            spec,
            model,
            tokenizer,
            ids,
            conversations,
            device.batch_size,
            context.log.info,
            "the pool",
            method.asset,
        )
        val_ids = list(dict.fromkeys(i for _, _, i, _ in val_rows))
        by_val = {i: m for _, _, i, m in val_rows}
        val_emb = _causal_lm_embeddings(
            cache_root,
            spec,
            model,
            tokenizer,
            val_ids,
            [by_val[i] for i in val_ids],
            device.batch_size,
            context.log.info,
            "the target val examples",
            method.asset,
        )
        position = {i: n for n, i in enumerate(val_ids)}
        columns = [{"task": t, "subtask": s, "val_example_id": i} for t, s, i, _ in val_rows]
        similarity = baselines.cosine_similarity_matrix(
            pool_emb, val_emb[[position[c["val_example_id"]] for c in columns]]
        )
        scored = selectors.ScoredPool(similarity, columns, config.seed)
        picks = method.choose(scored, budget)
        return record_picks(
            context,
            tracker,
            lineage,
            settings,
            method.name,
            picks,
            ids,
            pool_version,
            budget,
            scored,
            {"embedding": "mean last-layer hidden state, whole conversation"},
            decontamination=decontamination,
        )

    return _selection


def from_pool(method: registry.SelectionMethod) -> dg.AssetsDefinition:
    """The asset of a method that takes the whole current pool, scoring nothing (but the target rows in it)."""

    @selection_asset(method, deps=["raw_pool"])
    def _selection(
        context: dg.AssetExecutionContext,
        config: DecontaminationConfig,
        settings: StorageSettings,
        lineage: LineageStore,
    ) -> dg.MaterializeResult:
        tracker = LineageTracker(context, lineage)
        with lineage.connect() as con:
            pool_version, ids, _ = pool_store.read_pool(con)
            decontamination = Decontamination.current(con, config.keep_target_overlaps)
        ids = [ids[i] for i in decontamination.candidates(ids)]
        if not ids:
            raise ValueError(f"there are no {decontamination.usable('current pool examples')} to select from")
        # The budget is what is taken: the pool less the target rows in it.
        picks = method.choose(len(ids))
        return record_picks(
            context,
            tracker,
            lineage,
            settings,
            method.name,
            picks,
            ids,
            pool_version,
            len(ids),
            decontamination=decontamination,
        )

    return _selection
