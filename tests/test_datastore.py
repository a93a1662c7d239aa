"""Feature store: compute, skip, resume to identical bytes, refuse mixes, DuckDB index."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch

from selection.influence.datastore import (
    FeatureStore,
    StoreBusyError,
    align_stores,
    Progress,
    check_compatible,
    compute_features,
    parse_shard_key,
    read_index,
    shard_key,
    shard_of,
    store_directory,
    target_scores,
    write_index,
)
from selection.influence.gradients import PerExampleGradients, lora_slots
from selection.influence.projection import make_projector
from selection.data.tokenization import IGNORE_INDEX, TokenizedExample
from tests.test_gradients import random_examples, tiny_lora_model

PAD = 2


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_lora_model()


@pytest.fixture(scope="module")
def examples() -> list:
    tokenized = random_examples([8, 15, 6, 11, 15, 9, 13], seed=1)
    return [(f"ex{i}", example) for i, example in enumerate(tokenized)]


def make_store(directory: Path, model: torch.nn.Module, kind: str = "target", mode: str = "fast",
               dim: int = 32, seed: int = 0, checkpoint: str = "epoch_1", shard_size: int = 3) -> tuple:
    engine = PerExampleGradients(model)
    projector = make_projector(mode, engine.dim, dim, seed, engine.names_hash)
    return projector, FeatureStore(directory, "tiny-model", checkpoint, kind, projector, shard_size=shard_size)


def moments(model: torch.nn.Module) -> tuple[dict, dict]:
    slots = lora_slots(model)
    exp_avg = {slot.name: torch.full(slot.shape, 1e-3) for slot in slots}
    exp_avg_sq = {slot.name: torch.full(slot.shape, 1e-4) for slot in slots}
    return exp_avg, exp_avg_sq


def shard_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("shard-*"))}


def test_compute_skip_and_resume_give_identical_bytes(tmp_path: Path, model, examples) -> None:
    projector, store = make_store(tmp_path / "full", model)
    reports: list[Progress] = []
    assert compute_features(model, examples, projector, store, pad_token_id=PAD, max_batch_size=2,
                            progress_cb=reports.append) == len(examples)
    assert reports[-1].done == reports[-1].total == len(examples) and reports[-1].eta_s == 0
    features = store.features()
    assert features.dtype == np.float16 and features.shape == (7, 32)
    np.testing.assert_allclose(np.linalg.norm(features.astype(np.float32), axis=1), 1, atol=1e-3)
    assert store.ids() == [example_id for example_id, _ in examples]
    # Everything is stored: a rerun computes nothing.
    assert compute_features(model, examples, projector, store, pad_token_id=PAD, max_batch_size=2) == 0

    # A killed run: first 4 examples (one committed shard + one shard never committed).
    projector, partial = make_store(tmp_path / "resumed", model)
    compute_features(model, examples[:3], projector, partial, pad_token_id=PAD, max_batch_size=2)
    (tmp_path / "resumed" / "shard-00001.npy").write_bytes(b"half-written garbage")
    projector, reopened = make_store(tmp_path / "resumed", model)
    assert len(reopened) == 3
    assert compute_features(model, examples, projector, reopened, pad_token_id=PAD, max_batch_size=2) == 4
    assert shard_bytes(tmp_path / "resumed") == shard_bytes(tmp_path / "full")


def test_shards_and_batching_do_not_change_features(tmp_path: Path, model, examples) -> None:
    projector, one = make_store(tmp_path / "one", model, shard_size=100)
    compute_features(model, examples, projector, one, pad_token_id=PAD, max_batch_size=8)
    projector, many = make_store(tmp_path / "many", model, shard_size=2)
    compute_features(model, examples, projector, many, pad_token_id=PAD, max_batch_size=1)
    assert many.n_shards == 4
    ids = [example_id for example_id, _ in examples]
    np.testing.assert_allclose(one.features(ids).astype(np.float32), many.features(ids).astype(np.float32),
                               atol=2e-3)


def test_refuses_mixing_other_features(tmp_path: Path, model) -> None:
    directory = tmp_path / "store"
    make_store(directory, model)
    for change, match in [({"dim": 64}, "dim 32 != 64"), ({"seed": 1}, "seed 0 != 1"),
                          ({"mode": "exact"}, "mode 'fast' != 'exact'"),
                          ({"checkpoint": "epoch_2"}, "checkpoint"), ({"kind": "train"}, "kind")]:
        with pytest.raises(ValueError, match=match):
            make_store(directory, model, **change)
    engine = PerExampleGradients(model)
    projector = make_projector("fast", engine.dim, 32, 0, engine.names_hash)
    with pytest.raises(ValueError, match="model 'tiny-model' != 'other-model'"):
        FeatureStore(directory, "other-model", "epoch_1", "target", projector)


def test_train_needs_moments_and_stores_must_match(tmp_path: Path, model, examples) -> None:
    projector, train = make_store(tmp_path / "train", model, kind="train")
    with pytest.raises(ValueError, match="Adam moments"):
        compute_features(model, examples, projector, train, pad_token_id=PAD)
    exp_avg, exp_avg_sq = moments(model)
    compute_features(model, examples[:4], projector, train, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, pad_token_id=PAD)
    _, target = make_store(tmp_path / "target", model, kind="target")
    with pytest.raises(ValueError, match="plain gradients"):
        compute_features(model, examples, projector, target, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                         pad_token_id=PAD)
    compute_features(model, examples[4:], projector, target, pad_token_id=PAD)
    assert target_scores(train, target).shape == (4, 3)
    _, other_seed = make_store(tmp_path / "target2", model, kind="target", seed=5)
    with pytest.raises(ValueError, match="not comparable: projection.seed"):
        check_compatible(train, other_seed)
    wrong_projector = make_projector("fast", projector.input_dim, 32, 9, projector.names_hash)
    with pytest.raises(ValueError, match="projector does not match store"):
        compute_features(model, examples, wrong_projector, target, pad_token_id=PAD)


def test_duckdb_index_round_trip_and_canonical_directory(tmp_path: Path, model, examples) -> None:
    projector, _ = make_store(tmp_path / "unused", model)
    directory = store_directory(tmp_path, "tiny-model", "epoch_1", "target", projector)
    store = FeatureStore(directory, "tiny-model", "epoch_1", "target", projector, shard_size=3)
    compute_features(model, examples, projector, store, pad_token_id=PAD)
    con = duckdb.connect()
    assert write_index(con, store) == len(examples)
    assert write_index(con, store) == len(examples)  # replaces, never duplicates
    index = read_index(con, store)
    assert con.execute("SELECT count(*) FROM feature_index").fetchone()[0] == len(examples)
    assert index["ex4"] == (1, 1)
    np.testing.assert_array_equal(store.shard(1)[1], store.features(["ex4"])[0])


def test_shard_of_is_stable_balanced_and_keys_round_trip() -> None:
    ids = [f"example-{i}" for i in range(4000)]
    shards = [shard_of(i, 8) for i in ids]
    assert shards == [shard_of(i, 8) for i in ids]  # a function of the id alone
    counts = np.bincount(shards, minlength=8)
    assert counts.min() > 400 and counts.max() < 600  # about 500 each
    assert parse_shard_key(shard_key(3, 8)) == (3, 8) and shard_key(3, 8) == "03-of-08"
    for bad in ("3", "08-of-08", "a-of-2", "-of-4"):
        with pytest.raises(ValueError, match="not a shard key"):
            parse_shard_key(bad)
    with pytest.raises(ValueError):
        shard_of("x", 0)


def test_parts_are_part_of_the_identity_but_still_match_targets(tmp_path: Path, model) -> None:
    engine = PerExampleGradients(model)
    projector = make_projector("fast", engine.dim, 32, 0, engine.names_hash)
    directory = store_directory(tmp_path, "tiny-model", "epoch_1", "train", projector, part="01-of-04")
    assert directory.name == "01-of-04"
    part = FeatureStore(directory, "tiny-model", "epoch_1", "train", projector, part="01-of-04")
    assert part.part == "01-of-04"
    with pytest.raises(ValueError, match="part"):
        FeatureStore(directory, "tiny-model", "epoch_1", "train", projector, part="02-of-04")
    with pytest.raises(ValueError, match="not a shard key"):
        FeatureStore(tmp_path / "bad", "tiny-model", "epoch_1", "train", projector, part="first")
    target = FeatureStore(tmp_path / "target", "tiny-model", "epoch_1", "target", projector)
    check_compatible(part, target)  # parts of train features compare with unsharded targets


def test_examples_without_targets_are_recorded_and_not_revisited(tmp_path: Path, model, examples) -> None:
    no_target = TokenizedExample([5, 6, 7], [IGNORE_INDEX] * 3, True, 0)
    mixed = examples[:2] + [("empty", no_target)] + examples[2:]
    projector, store = make_store(tmp_path / "s", model, shard_size=3)
    assert compute_features(model, mixed, projector, store, pad_token_id=PAD) == len(examples)
    assert "empty" not in store.ids() and store.ids() == [i for i, _ in examples]
    assert store.excluded() == {"empty": "no_target_tokens: no assistant token left after truncation"}
    reopened = FeatureStore(tmp_path / "s", "tiny-model", "epoch_1", "target", projector, shard_size=3)
    assert reopened.excluded() == store.excluded() and "empty" in reopened.covered()
    assert compute_features(model, mixed, projector, reopened, pad_token_id=PAD) == 0
    # A chunk with nothing but excluded ids still commits a (zero-row) shard recording them.
    _, alone = make_store(tmp_path / "alone", model)
    assert compute_features(model, [("empty", no_target)], projector, alone, pad_token_id=PAD) == 0
    assert alone.n_shards == 1 and len(alone) == 0 and alone.shard(0).shape == (0, 32)


def test_index_is_incremental_per_shard(tmp_path: Path, model, examples) -> None:
    projector, store = make_store(tmp_path / "s", model, shard_size=3)
    con = duckdb.connect()
    compute_features(model, examples[:3], projector, store, pad_token_id=PAD)
    assert write_index(con, store) == 3
    compute_features(model, examples, projector, store, pad_token_id=PAD)
    con.execute("UPDATE feature_index SET row_in_shard = -1 WHERE shard = 0")  # mark the rows already there
    assert write_index(con, store) == len(examples)
    assert con.execute("SELECT count(*) FROM feature_index WHERE row_in_shard = -1").fetchone()[0] == 3
    assert con.execute("SELECT DISTINCT part FROM feature_index").fetchall() == [(None,)]


def test_align_stores_drops_a_half_committed_chunk_and_refuses_a_late_dim(tmp_path: Path, model, examples) -> None:
    engine = PerExampleGradients(model)
    projectors = [make_projector("fast", engine.dim, dim, 0, engine.names_hash) for dim in (16, 32)]

    def stores(tag: str) -> list[FeatureStore]:
        return [FeatureStore(tmp_path / tag / str(p.dim), "tiny-model", "epoch_1", "target", p, shard_size=3)
                for p in projectors]

    reference = stores("reference")
    compute_features(model, examples, projectors, reference, pad_token_id=PAD)
    killed = stores("killed")
    compute_features(model, examples[:3], projectors, killed, pad_token_id=PAD)
    compute_features(model, examples[3:6], projectors[1], killed[1], pad_token_id=PAD)  # the kill: dim 32 only
    with pytest.raises(ValueError, match="different example sets"):
        compute_features(model, examples, projectors, killed, pad_token_id=PAD)
    assert align_stores(killed) == 1 and [s.n_shards for s in killed] == [1, 1]
    compute_features(model, examples, projectors, killed, pad_token_id=PAD)
    for done, expected in zip(killed, reference):
        assert shard_bytes(done.directory) == shard_bytes(expected.directory)

    late = stores("late")
    compute_features(model, examples, projectors[0], late[0], pad_token_id=PAD)  # 3 shards, the other dim none
    with pytest.raises(ValueError, match="hold different examples"):
        align_stores(late)
    assert late[0].n_shards == 3  # nothing was dropped


def test_one_writer_per_store(tmp_path: Path, model) -> None:
    _, store = make_store(tmp_path / "s", model)
    with store.exclusive():
        with pytest.raises(StoreBusyError, match="another process is filling"):
            with FeatureStore(store.directory, "tiny-model", "epoch_1", "target", store.manifest["projection"],
                              shard_size=3).exclusive():
                pass
    with store.exclusive():  # released
        pass


def test_index_written_by_older_code_is_migrated(tmp_path: Path, model, examples) -> None:
    projector, store = make_store(tmp_path / "s", model)
    compute_features(model, examples[:3], projector, store, pad_token_id=PAD)
    con = duckdb.connect()
    con.execute(  # the table as the code before shards created it: no `part` column
        "CREATE TABLE feature_index (store_id VARCHAR, model VARCHAR, checkpoint VARCHAR, kind VARCHAR, mode VARCHAR, "
        "dim INTEGER, seed BIGINT, directory VARCHAR, example_id VARCHAR, shard INTEGER, row_in_shard INTEGER)")
    assert write_index(con, store) == 3
    assert con.execute("SELECT count(*) FROM feature_index WHERE part IS NULL").fetchone()[0] == 3


def test_train_transform_is_part_of_the_identity_and_of_the_features(tmp_path: Path, model, examples) -> None:
    engine = PerExampleGradients(model)
    projector = make_projector("fast", engine.dim, 32, 0, engine.names_hash)
    exp_avg, exp_avg_sq = moments(model)
    # Every transform has its own canonical folder (LESS's adam keeps the one it always had).
    folders = {t: store_directory(tmp_path, "tiny-model", "epoch_1", "train", projector, "00-of-01", transform=t)
               for t in ("adam", "adam_no_momentum", "sgd")}
    assert len(set(folders.values())) == 3
    assert folders["adam"] == store_directory(tmp_path, "tiny-model", "epoch_1", "train", projector, "00-of-01")
    assert folders["sgd"].parent.name.startswith("sgd-")
    stores = {t: FeatureStore(folders[t], "tiny-model", "epoch_1", "train", projector, part="00-of-01", transform=t)
              for t in folders}
    for store in stores.values():
        compute_features(model, examples[:4], projector, store, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                         pad_token_id=PAD)
    # The features are the store's transform of the plain gradients, projected and normalized.
    target = FeatureStore(tmp_path / "target", "tiny-model", "epoch_1", "target", projector)
    compute_features(model, examples[:4], projector, target, pad_token_id=PAD)
    np.testing.assert_allclose(stores["sgd"].features().astype(np.float32), target.features().astype(np.float32),
                               atol=2e-3)
    assert not np.allclose(stores["adam"].features().astype(np.float32),
                           stores["adam_no_momentum"].features().astype(np.float32), atol=1e-2)
    # Every transform compares with the same (plain-gradient) target features.
    for store in stores.values():
        check_compatible(store, target)
    # A store never takes features of another transform, nor is it reopened as one.
    with pytest.raises(ValueError, match="transform 'adam_no_momentum' != 'sgd'"):
        FeatureStore(folders["adam_no_momentum"], "tiny-model", "epoch_1", "train", projector, part="00-of-01",
                     transform="sgd")
    assert stores["adam"].store_id != stores["sgd"].store_id
    with pytest.raises(ValueError, match="target features are plain gradients"):
        FeatureStore(tmp_path / "t2", "tiny-model", "epoch_1", "target", projector, transform="adam")
    with pytest.raises(ValueError, match="unknown train transform"):
        FeatureStore(tmp_path / "t3", "tiny-model", "epoch_1", "train", projector, transform="adamw")


def test_train_store_written_before_transforms_reopens_as_less_adam(tmp_path: Path, model) -> None:
    import json

    projector, store = make_store(tmp_path / "old", model, kind="train")
    manifest_path = store.directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest.pop("transform") == "adam"
    manifest_path.write_text(json.dumps(manifest))  # as older code wrote it
    assert FeatureStore(store.directory, "tiny-model", "epoch_1", "train", projector).transform == "adam"
    with pytest.raises(ValueError, match="transform"):
        FeatureStore(store.directory, "tiny-model", "epoch_1", "train", projector, transform="adam_no_momentum")


def test_bias_corrected_train_features_need_the_step_count(tmp_path: Path, model, examples) -> None:
    engine = PerExampleGradients(model)
    projector = make_projector("fast", engine.dim, 32, 0, engine.names_hash)
    exp_avg, exp_avg_sq = moments(model)
    store = FeatureStore(tmp_path / "bc", "tiny-model", "epoch_1", "train", projector, transform="adam_bias_corrected")
    with pytest.raises(ValueError, match="adam_step"):
        compute_features(model, examples[:2], projector, store, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                         pad_token_id=PAD)
    assert compute_features(model, examples[:2], projector, store, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq,
                            adam_step=3, pad_token_id=PAD) == 2
