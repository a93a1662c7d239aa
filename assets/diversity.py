"""kMQ and iterative kMQ (Yu et al. 2024): embeddings -> clusters -> quality-weighted, cluster-proportional sampling."""

import time
from collections.abc import Callable

import dagster as dg
from pydantic import Field

from assets.common import LineageTracker, code_version
from assets.selections import KEEP_TARGET_OVERLAPS_DESCRIPTION, Decontamination, refuse_target_rows, selection_asset
from resources.lineage import LineageStore
from resources.model_store import DeviceSettings, ModelStore
from resources.settings import StorageSettings
from selection import kmq, registry, selection_store, selectors
from selection.common.markdown import bar_chart_markdown, markdown_table
from selection.data import pool_store
from selection.diversity import diversity_store, embeddings, kmq_run


class EmbeddingsConfig(dg.Config):
    mode: str = Field(
        default=embeddings.DEFAULT_EMBEDDING_MODE, description="user_turns (kMQ code default) or conversation"
    )
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
        "model's mean response log-likelihood) or 'reward_model' (the default when reward_model_path is set)",
    )
    reward_model_path: str | None = Field(
        default=None,
        description="Local reward model folder: the paper's quality score and iterative-kMQ feedback judge",
    )
    keep_target_overlaps: bool = Field(default=False, description=KEEP_TARGET_OVERLAPS_DESCRIPTION)

    def settings(self) -> dict:
        """The fields of the kMQ settings (the rest is the skin's)."""
        return self.model_dump(exclude={"keep_target_overlaps"})


class IterativeKmqConfig(KmqConfig):
    n_rounds: int = Field(default=3, description="Rounds; each adds budget/n_rounds examples")
    max_new_tokens: int = Field(default=64, description="Greedy generation length for the feedback score")
    learning_rate: float = 1e-4


@dg.asset(
    name="embeddings",
    deps=["raw_pool"],
    group_name="diversity",
    pool="accelerator",
    code_version=code_version("selection.diversity.embeddings", "selection.common.arrays"),
    description="Sentence embeddings of the pool, cached by example id and encoder (a refresh embeds only new ids).",
)
def embeddings_asset(
    context: dg.AssetExecutionContext,
    config: EmbeddingsConfig,
    settings: StorageSettings,
    lineage: LineageStore,
    device: DeviceSettings,
) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    with lineage.connect() as con:
        pool_version, ids, conversations = pool_store.read_pool(con)
    encoder = embeddings.SentenceEncoder(config.model_dir, device=device.resolve())
    cache = embeddings.EmbeddingCache(
        embeddings.cache_dir_for(settings.subdir("embeddings"), encoder.fingerprint(), config.mode, encoder.dim),
        encoder.fingerprint(),
        config.mode,
        encoder.dim,
    )
    texts = [embeddings.text_for_embedding(messages, config.mode) for messages in conversations]
    started = time.perf_counter()
    n_new = embeddings.fill_cache(
        cache,
        ids,
        texts,
        lambda batch: encoder.encode(batch, config.batch_size),
        on_chunk=lambda done, total: context.log.info(f"embedded {done}/{total} new examples"),
        on_damaged=lambda problem: context.log.warning(f"damaged embedding chunk dropped, re-embedding: {problem}"),
    )
    seconds = time.perf_counter() - started
    with lineage.connect() as con:
        diversity_store.record_embedding_run(
            con,
            pool_version,
            diversity_store.EmbeddingRun(str(cache.path), encoder.fingerprint(), config.mode, encoder.dim),
            len(ids),
        )
    tracker.add_table("embeddings", f"{encoder.fingerprint()}/{config.mode}/{pool_version}", n_rows=len(ids))
    metrics = {
        "pool_version": pool_version,
        "encoder": encoder.describe(),
        "mode": config.mode,
        "n_rows": len(ids),
        "n_new": n_new,
        "seconds": seconds,
    }
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "n_rows": dg.MetadataValue.int(len(ids)),
            "n_new": dg.MetadataValue.int(n_new),
            "dim": encoder.dim,
            "mode": config.mode,
            "encoder": dg.MetadataValue.json(encoder.describe()),
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
def clusters(context: dg.AssetExecutionContext, config: ClustersConfig, lineage: LineageStore) -> dg.MaterializeResult:
    tracker = LineageTracker(context, lineage)
    with lineage.connect() as con:
        pool_version, ids, _ = pool_store.read_pool(con)
        run = diversity_store.latest_embeddings(con)
    cache = embeddings.EmbeddingCache(run.cache_dir, run.encoder_fingerprint, run.mode, run.dim)
    clustering = kmq.cluster_pool(cache.load(ids), config.k, config.k_candidates, config.seed)
    k, curve, sizes = clustering.k, clustering.silhouette, clustering.sizes
    with lineage.connect() as con:
        diversity_store.replace_clusters(con, pool_version, run.encoder_fingerprint, k, ids, clustering.labels)
    tracker.add_table("clusters", f"{pool_version}/k{k}", k=k)
    metrics = {"k": int(k), "silhouette": {str(c): float(v) for c, v in curve.items()}, "sizes": sizes.tolist()}
    data_version = tracker.finish(metrics)
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "k": dg.MetadataValue.int(int(k)),
            "silhouette_curve": dg.MetadataValue.md(
                bar_chart_markdown({f"k={c}": v for c, v in curve.items()}, "silhouette score by k")
                if curve
                else f"k fixed at {k}"
            ),
            "cluster_sizes": dg.MetadataValue.md(
                bar_chart_markdown({str(i): float(s) for i, s in enumerate(sizes)}, "examples per cluster")
            ),
        },
    )


def _read_kmq_pool(lineage: LineageStore, keep_target_overlaps: bool) -> tuple[kmq_run.KmqPool, Decontamination]:
    """The current pool less its target rows (unless kept), with their sources and clusters."""
    with lineage.connect() as con:
        pool_version, ids, conversations = pool_store.read_pool(con)
        source_of = pool_store.example_sources(con, ids)
        label_of = diversity_store.cluster_labels(con, pool_version)
        decontamination = Decontamination.current(con, keep_target_overlaps)
    n_pool = len(ids)
    kept = decontamination.candidates(ids)
    if decontamination.excluded:
        ids, conversations = [ids[i] for i in kept], [conversations[i] for i in kept]
        # Clusters were made on the whole pool: the excluded rows' labels go with them.
        dropped = set(decontamination.excluded)
        label_of = {example_id: label for example_id, label in label_of.items() if example_id not in dropped}
    pool = kmq_run.KmqPool(
        pool_version,
        ids,
        conversations,
        [source_of[i] for i in ids],
        label_of,
        n_pool=n_pool,
        usable=decontamination.usable("current pool examples"),
    )
    return pool, decontamination


def _kmq_runtime(
    context: dg.AssetExecutionContext, lineage: LineageStore, model_store: ModelStore, device: DeviceSettings
) -> kmq_run.KmqRuntime:
    spec = model_store.spec(context.partition_key)
    resolved = device.resolve()
    return kmq_run.KmqRuntime(
        spec, lambda: model_store.load(spec, resolved), resolved, device.batch_size, lineage.connect, context.log
    )


def _quality_metadata(metrics: dict) -> dict:
    """Metadata on the quality signal: per-source distributions and eligibility counts."""
    return {
        "quality_by_source": dg.MetadataValue.md(
            "score = the scorer's output; weight = softmax(quality / T) sampling weight relative to the pool "
            "mean (1 = average, 0 = not eligible)\n\n" + markdown_table(metrics["quality_by_source"])
        ),
        "n_ineligible": dg.MetadataValue.int(metrics["n_ineligible"]),
    }


def run_kmq_selection(
    context: dg.AssetExecutionContext,
    lineage: LineageStore,
    model_store: ModelStore,
    device: DeviceSettings,
    method: registry.SelectionMethod,
    choose: Callable[[kmq_run.KmqRuntime], kmq_run.KmqResult],
    method_metadata: Callable[[kmq_run.KmqResult], dict],
    decontamination: Decontamination,
) -> dg.MaterializeResult:
    """Run a kMQ method (``choose``) and write its picks as one `selections` entry of the method (target `all`),
    then its lineage row and metadata (shared keys, the quality signal's, then ``method_metadata``'s).

    Refused before anything is written when a pick is a target row and ``decontamination`` does not keep them.
    """
    tracker = LineageTracker(context, lineage)
    runtime = _kmq_runtime(context, lineage, model_store, device)
    result = choose(runtime)
    model_name = runtime.spec.name
    selection = selection_store.Selection(
        model_name,
        method.name,
        selectors.ALL_TARGETS,
        result.example_ids,
        [float(s) for s in result.scores],
        result.pool_version,
        result.budget,
    )
    with lineage.connect() as con:
        n_overlapping = refuse_target_rows(con, selection.example_ids, decontamination, f"{method.name} selection")
        selection_store.write_selections(
            con, [selection], None, context.run.run_id, context.assets_def.code_versions_by_key.get(context.asset_key)
        )
    tracker.add_table("selections", f"{model_name}/{method.name}/{selection.budget}", rows=selection.budget)
    data_version = tracker.finish({**result.metrics, **decontamination.metrics(n_overlapping)})
    return dg.MaterializeResult(
        data_version=data_version,
        metadata={
            "budget": dg.MetadataValue.int(selection.budget),
            "pool_version": result.pool_version,
            "scorer": dg.MetadataValue.json(result.metrics["scorer"]),
            **method_metadata(result),
            **_quality_metadata(result.metrics),
            **decontamination.metadata(n_overlapping),
        },
    )


def _feedback_metadata(result: kmq_run.IterativeKmqResult) -> dict:
    """Metadata of iterative kMQ's rounds: what each added and the cluster weights it ended with."""
    rounds_table = [
        {"round": r.round, "new": len(r.new_indices), "weights": ", ".join(f"{w:.3f}" for w in r.weights)}
        for r in result.rounds
    ]
    final = result.metrics["final_weights"]
    return {
        "rounds": dg.MetadataValue.md(markdown_table(rounds_table)),
        "final_weights": dg.MetadataValue.md(
            bar_chart_markdown({str(c): float(w) for c, w in enumerate(final)}, "cluster weights after feedback")
        ),
    }


def from_clusters(method: registry.SelectionMethod) -> dg.AssetsDefinition:
    """The asset of a method that samples the pool's embedding clusters by quality (kMQ)."""

    @selection_asset(method, deps=["clusters", "raw_pool"], pool="accelerator")
    def _selection(
        context: dg.AssetExecutionContext,
        config: KmqConfig,
        lineage: LineageStore,
        model_store: ModelStore,
        device: DeviceSettings,
    ) -> dg.MaterializeResult:
        kmq_settings = kmq_run.KmqSettings(**config.settings())  # a bad setting fails before the pool is read
        pool, decontamination = _read_kmq_pool(lineage, config.keep_target_overlaps)
        return run_kmq_selection(
            context,
            lineage,
            model_store,
            device,
            method,
            lambda runtime: method.choose(pool, kmq_settings, runtime),
            lambda result: {
                "per_cluster_budget": dg.MetadataValue.md(
                    bar_chart_markdown(result.metrics["per_cluster"], "examples per cluster")
                )
            },
            decontamination,
        )

    return _selection


def from_clusters_with_feedback(method: registry.SelectionMethod) -> dg.AssetsDefinition:
    """The asset of a method that samples the clusters in rounds, with training feedback in between (iterative kMQ)."""

    @selection_asset(method, deps=["clusters", "raw_pool"], pool="accelerator")
    def _selection(
        context: dg.AssetExecutionContext,
        config: IterativeKmqConfig,
        settings: StorageSettings,
        lineage: LineageStore,
        model_store: ModelStore,
        device: DeviceSettings,
    ) -> dg.MaterializeResult:
        # A bad setting fails before the pool is read.
        kmq_settings = kmq_run.IterativeKmqSettings(**config.settings())
        pool, decontamination = _read_kmq_pool(lineage, config.keep_target_overlaps)

        def choose(runtime: kmq_run.KmqRuntime) -> kmq_run.KmqResult:
            feedback_dir = settings.path("models", runtime.spec.name, "kmq_feedback")
            return method.choose(pool, kmq_settings, runtime, feedback_dir, context.run.run_id)

        return run_kmq_selection(
            context, lineage, model_store, device, method, choose, _feedback_metadata, decontamination
        )

    return _selection
