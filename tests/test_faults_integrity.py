"""Fault scenarios: nothing corrupt is ever used.

Artifacts are damaged on disk after their commit (rewritten with other values of the same
shape, truncated, an adapter scaled x10); readers must refuse them with an error naming
the file and the asset to rematerialize, and writers rerun over them must recompute.
Each test damages files in this process, so it drops the digest cache first, as a
fresh process would start without it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from selection.common import integrity
from selection.common.integrity import ArtifactIntegrityError
from selection.diversity.embeddings import EmbeddingCache, fill_cache
from selection.influence.datastore import FeatureStore, compute_features, repair_stores
from selection.influence.gradients import PerExampleGradients
from selection.influence.projection import make_projector
from selection.influence.scores import compute_influence, load_scores
from selection.train.checkpoints import load_adapter_weights
from selection.train.training import ADAPTER_DIR, TrainingConfig, load_checkpoint, train_lora
from tests.test_datastore import PAD, moments
from tests.test_gradients import random_examples, tiny_lora_model
from tests.test_training import examples, fresh_model, tokenizer  # noqa: F401 (fixtures)

pytestmark = pytest.mark.faults

VAL_IDS = ["v0", "v1"]


def damaged(path: Path) -> Path:
    """After a file was damaged by hand: forget cached digests, as a new process would."""
    integrity.forget_digests()
    return path


def record(record_property, scenario: str, expected: str, observed: str) -> None:
    record_property("scenario", scenario)
    record_property("expected", expected)
    record_property("observed", observed)


@pytest.fixture
def stores(tmp_path: Path):
    """A train store of 4 chunks (2 rows each) and a target store, filled by compute_features."""
    model = tiny_lora_model()
    engine = PerExampleGradients(model)
    projector = make_projector("fast", engine.dim, 16, 0, engine.names_hash)
    train_rows = list(zip([f"t{i}" for i in range(8)], random_examples([7 + i % 4 for i in range(8)], seed=2)))
    exp_avg, exp_avg_sq = moments(model)

    def fill_train() -> FeatureStore:
        store = FeatureStore(tmp_path / "train", "tiny", "epoch_1", "train", projector, chunk_size=2, part="00-of-01")
        compute_features(model, train_rows, projector, store, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, pad_token_id=PAD)
        return store

    target = FeatureStore(tmp_path / "val", "tiny", "epoch_1", "target", projector)
    compute_features(model, list(zip(VAL_IDS, random_examples([9, 6], seed=3))), projector, target, pad_token_id=PAD)
    return fill_train, target


def leftovers(scores_root: Path) -> list[str]:
    return sorted(p.name for p in scores_root.iterdir()) if scores_root.exists() else []


def test_feature_chunk_rewritten_with_same_shape_is_refused_then_recomputed(tmp_path, stores, record_property):
    fill_train, target = stores
    train = fill_train()
    scores_root = tmp_path / "scores"
    compute_influence([[train]], [target], [1.0], VAL_IDS, scores_root / "run")
    good_scores, _ = load_scores(scores_root / "run")
    good_scores = np.array(good_scores)
    chunk = train.directory / "shard-00001.npy"
    original = chunk.read_bytes()
    values = np.load(chunk)
    np.save(chunk, -values)  # same shape and dtype, still unit rows: only the recorded sha256 tells
    damaged(chunk)

    with pytest.raises(ArtifactIntegrityError) as error:
        compute_influence(
            [[FeatureStore(train.directory, **_identity(train))]], [target], [1.0], VAL_IDS, scores_root / "run"
        )
    message = str(error.value)
    assert str(chunk) in message and "rematerialize train_gradients (shard 00-of-01)" in message
    assert leftovers(scores_root) == ["run"]  # no staging folder; the earlier scores are untouched
    np.testing.assert_array_equal(load_scores(scores_root / "run")[0], good_scores)

    # A rerun of the writer drops the damaged chunk and the ones after it and recomputes the same bytes.
    reopened = FeatureStore(train.directory, **_identity(train))
    problems = repair_stores([reopened])
    assert len(problems) == 1 and "shard-00001.npy" in problems[0] and reopened.n_chunks == 1
    repaired = fill_train()
    assert repaired.n_chunks == 4 and chunk.read_bytes() == original
    compute_influence([[repaired]], [target], [1.0], VAL_IDS, scores_root / "run")
    np.testing.assert_array_equal(load_scores(scores_root / "run")[0], good_scores)
    record(
        record_property,
        "feature chunk rewritten with other values of the right shape",
        "influence refuses naming the chunk; train_gradients rerun recomputes it",
        f"refused: {message.split(': ', 1)[1][:70]}...; rerun rebuilt identical bytes: "
        f"{chunk.read_bytes() == original}",
    )


def _identity(store: FeatureStore) -> dict:
    manifest = store.manifest
    return {
        "model_fingerprint": manifest["model"],
        "checkpoint": manifest["checkpoint"],
        "kind": manifest["kind"],
        "projector": manifest["projection"],
        "chunk_size": store.chunk_size,
        "part": store.part,
    }


def test_truncated_chunk_is_named_and_leaves_no_temp_folder(tmp_path, stores, record_property):
    fill_train, target = stores
    train = fill_train()
    chunk = train.directory / "shard-00002.npy"
    with open(chunk, "r+b") as handle:
        handle.truncate(chunk.stat().st_size - 10)
    damaged(chunk)
    scores_root = tmp_path / "scores"
    scores_root.mkdir()
    with pytest.raises(ArtifactIntegrityError) as error:
        compute_influence(
            [[FeatureStore(train.directory, **_identity(train))]], [target], [1.0], VAL_IDS, scores_root / "run"
        )
    message = str(error.value)
    assert str(chunk) in message and "truncated" in message and "mmap length" not in message
    assert leftovers(scores_root) == []
    record(
        record_property,
        "feature chunk truncated",
        "error names the file; nothing left under scores/",
        f"{chunk.name}: {message.split(': ', 1)[1][:60]}...; left under scores/: {leftovers(scores_root)}",
    )


def test_influence_matrix_changed_after_commit_is_refused(tmp_path, stores, record_property):
    fill_train, target = stores
    out = tmp_path / "scores" / "run"
    compute_influence([[fill_train()]], [target], [1.0], VAL_IDS, out)
    scores = np.array(load_scores(out)[0])  # a good matrix passes
    matrix = np.lib.format.open_memmap(out / "influence.npy", mode="r+")
    matrix[0, 0] += 1.0
    matrix.flush()
    del matrix
    damaged(out / "influence.npy")
    with pytest.raises(ArtifactIntegrityError, match="influence.npy: sha256 .* rematerialize influence_scores") as e:
        load_scores(out)
    (out / "integrity.json").unlink()
    with pytest.raises(ArtifactIntegrityError, match="integrity.json: is missing"):
        load_scores(out)
    assert scores.shape == (8, 2)
    record(
        record_property,
        "influence matrix edited after it was written",
        "selections refuse the matrix, naming it",
        str(e.value).split("/")[-1][:80],
    )


def test_adapter_scaled_x10_is_refused_and_warmup_rerun_retrains(tmp_path, tokenizer, examples, record_property):
    config = TrainingConfig(epochs=2, learning_rate=1e-2, warmup_ratio=0.1, batch_size=4, micro_batch_size=4, seed=7)
    train_lora(fresh_model(tokenizer), examples, config, tmp_path, tokenizer.pad_token_id)
    weights = tmp_path / "epoch_1" / ADAPTER_DIR / "adapter_model.safetensors"
    original = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    load_adapter_weights(fresh_model(tokenizer), tmp_path / "epoch_1")  # a good adapter loads
    save_file({k: v * 10 for k, v in load_file(weights).items()}, weights)
    damaged(weights)

    # Gradient steps refuse it: the adapter and the moments are read only after the check.
    with pytest.raises(ArtifactIntegrityError) as error:
        load_adapter_weights(fresh_model(tokenizer), tmp_path / "epoch_1")
    message = str(error.value)
    assert str(weights) in message and "rematerialize warmup_checkpoints" in message
    with pytest.raises(ArtifactIntegrityError, match="adapter_model.safetensors"):
        load_checkpoint(tmp_path / "epoch_1")

    # The warmup rerun retrains epoch 1 and the epoch after it, to the same bytes.
    result = train_lora(fresh_model(tokenizer), examples, config, tmp_path, tokenizer.pad_token_id)
    assert result.resumed_from_epoch == 0 and len(result.metrics["discarded_damaged_epochs"]) == 1
    rebuilt = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert rebuilt == original
    load_adapter_weights(fresh_model(tokenizer), tmp_path / "epoch_1")
    record(
        record_property,
        "warmup adapter of epoch 1 scaled x10",
        "gradient steps refuse it; warmup_checkpoints rerun retrains epochs 1-2",
        f"refused ({weights.name}); rerun discarded "
        f"{len(result.metrics['discarded_damaged_epochs'])} damaged epoch, retrained from epoch "
        f"{result.resumed_from_epoch + 1}, bytes identical: {rebuilt == original}",
    )


def test_later_epoch_damaged_keeps_earlier_ones(tmp_path, tokenizer, examples):
    config = TrainingConfig(epochs=2, learning_rate=1e-2, warmup_ratio=0.1, batch_size=4, micro_batch_size=4, seed=7)
    train_lora(fresh_model(tokenizer), examples, config, tmp_path, tokenizer.pad_token_id)
    moments_file = tmp_path / "epoch_2" / "exp_avg.safetensors"
    moments_file.write_bytes(moments_file.read_bytes()[:-4])
    damaged(moments_file)
    result = train_lora(fresh_model(tokenizer), examples, config, tmp_path, tokenizer.pad_token_id)
    assert result.resumed_from_epoch == 1 and "exp_avg.safetensors" in result.metrics["discarded_damaged_epochs"][0]
    load_checkpoint(tmp_path / "epoch_2")


def test_embedding_cache_damage_is_refused_then_reembedded(tmp_path, record_property):
    ids = [f"id{i}" for i in range(5)]
    vectors = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    embed_calls = []

    def embed(texts):
        embed_calls.append(len(texts))
        return vectors[[int(t) for t in texts]]

    cache = EmbeddingCache(tmp_path, "fp", "user_turns", 4, chunk_rows=3)
    fill_cache(cache, ids, [str(i) for i in range(5)], embed)
    np.testing.assert_array_equal(cache.load(ids), vectors)  # good chunks pass
    first = EmbeddingCache(tmp_path, "fp", "user_turns", 4).arrays.numbers()[0]
    npy, _ = cache.arrays.paths(first)
    np.save(npy, np.load(npy)[::-1].copy())
    damaged(npy)
    reader = EmbeddingCache(tmp_path, "fp", "user_turns", 4)
    with pytest.raises(ArtifactIntegrityError) as error:
        reader.load(ids)
    assert str(npy) in str(error.value) and "rematerialize embeddings" in str(error.value)

    problems = []
    writer = EmbeddingCache(tmp_path, "fp", "user_turns", 4, chunk_rows=3)
    assert fill_cache(writer, ids, [str(i) for i in range(5)], embed, on_damaged=problems.append) == 3
    assert len(problems) == 1 and not npy.exists()
    np.testing.assert_array_equal(EmbeddingCache(tmp_path, "fp", "user_turns", 4).load(ids), vectors)

    # Ids changed in a commit record: readers refuse (rather than "not cached"), a writer re-embeds those ids.
    _, second = writer.arrays.paths(writer.arrays.numbers()[0])
    changed = json.loads(second.read_text())
    changed["ids"] = ["id9", "id8"]
    second.write_text(json.dumps(changed))
    damaged(second)
    with pytest.raises(ArtifactIntegrityError, match=rf"{second.stem}\.json: .*commit record differs"):
        EmbeddingCache(tmp_path, "fp", "user_turns", 4).load(ids)
    fill_cache(EmbeddingCache(tmp_path, "fp", "user_turns", 4, chunk_rows=3), ids, [str(i) for i in range(5)], embed)
    np.testing.assert_array_equal(EmbeddingCache(tmp_path, "fp", "user_turns", 4).load(ids), vectors)
    record(
        record_property,
        "embedding cache chunk rewritten / ids in its commit record changed",
        "readers refuse naming the chunk; the embeddings rerun re-embeds its ids",
        f"refused ({npy.name}); rerun re-embedded {embed_calls[1]} ids; commit-record damage re-embedded "
        f"{embed_calls[2]}",
    )


def test_assets_refuse_a_bad_adapter_and_reruns_recompute(tmp_path, record_property):
    """Through Dagster: target_gradients refuses a damaged warmup adapter; a warmup_checkpoints rerun
    retrains it (logging the same sha256 as before); a gradient rerun recomputes a damaged chunk."""
    import dagster as dg
    import duckdb

    from assets import ASSET_MODULES
    from assets.partitions import DEFAULT_MODEL
    from resources import build_resources
    from tests.fakes import TinyModelStore
    from tests.test_pipeline_tiny import run_config as pipeline_config

    config = pipeline_config.__wrapped__(tmp_path)["ops"]
    resources = {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    assets = dg.load_assets_from_modules(ASSET_MODULES)

    def run(*names: str) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            assets,
            selection=dg.AssetSelection.assets(*names),
            resources=resources,
            run_config={"ops": {n: config[n] for n in names}},
            partition_key=DEFAULT_MODEL,
            instance=instance,
            raise_on_error=False,
        )

    def failure(result: dg.ExecuteInProcessResult) -> str:
        error = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE").step_failure_data.error
        return error.message + (error.cause.message if error.cause else "")

    def warmup_sha(con) -> list[str]:
        rows = con.execute(
            "SELECT outputs FROM lineage WHERE asset_key = 'warmup_checkpoints' ORDER BY finished_at"
        ).fetchall()
        return [json.loads(r[0])["epoch_1"]["sha256"] for r in rows]

    with dg.instance_for_test() as instance:
        assert run("raw_pool", "target_tasks", "warmup_checkpoints").success
        weights = next((tmp_path / "home" / "models").rglob("epoch_1/adapter/adapter_model.safetensors"))
        save_file({k: v * 10 for k, v in load_file(weights).items()}, weights)
        damaged(weights)
        refused = run("target_gradients")
        assert not refused.success
        message = failure(refused)
        assert str(weights) in message and "rematerialize warmup_checkpoints" in message

        rerun = run("warmup_checkpoints")
        assert rerun.success
        assert run("target_gradients").success
        chunk = next((tmp_path / "home" / "gradients").rglob("*-epoch_1/target/*/shard-00000.npy"))
        np.save(chunk, -np.load(chunk))
        damaged(chunk)
        repaired = run("target_gradients")
        assert repaired.success
        computed = repaired.asset_materializations_for_node("target_gradients")[0].metadata["n_computed"].value
        assert computed > 0
    with duckdb.connect(resources["lineage"].db_path) as con:
        shas = warmup_sha(con)
    assert len(shas) == 2 and shas[0] == shas[1]  # retrained to the bytes first recorded, not a new hash
    record(
        record_property,
        "adapter scaled x10, then a target feature chunk rewritten (Dagster runs)",
        "target_gradients refuses; warmup rerun retrains to the recorded sha256; gradient rerun recomputes",
        f"refused naming {weights.name}; warmup sha256 before/after equal: {shas[0] == shas[1]}; "
        f"target_gradients recomputed {computed} examples",
    )
