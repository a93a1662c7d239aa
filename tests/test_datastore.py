"""Feature store: compute, skip, resume to identical bytes, refuse mixes, one writer at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from selection.common.arrays import StoreBusyError
from selection.common.integrity import ArtifactIntegrityError
from selection.data.tokenization import IGNORE_INDEX, TokenizedExample
from selection.influence.datastore import (
    FeatureStore,
    Progress,
    align_stores,
    check_compatible,
    compute_features,
    parse_shard_key,
    repair_stores,
    shard_key,
    shard_of,
    store_directory,
    target_scores,
)
from selection.influence.gradients import PerExampleGradients, lora_slots
from selection.influence.projection import make_projector
from tests.test_gradients import random_examples, tiny_lora_model

PAD = 2


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_lora_model()


@pytest.fixture(scope="module")
def examples() -> list:
    tokenized = random_examples([8, 15, 6, 11, 15, 9, 13], seed=1)
    return [(f"ex{i}", example) for i, example in enumerate(tokenized)]


def make_store(
    directory: Path,
    model: torch.nn.Module,
    kind: str = "target",
    mode: str = "fast",
    dim: int = 32,
    seed: int = 0,
    checkpoint: str = "epoch_1",
    chunk_size: int = 3,
) -> tuple:
    engine = PerExampleGradients(model)
    projector = make_projector(mode, engine.dim, dim, seed, engine.names_hash)
    return projector, FeatureStore(directory, "tiny-model", checkpoint, kind, projector, chunk_size=chunk_size)


def moments(model: torch.nn.Module) -> tuple[dict, dict]:
    slots = lora_slots(model)
    exp_avg = {slot.name: torch.full(slot.shape, 1e-3) for slot in slots}
    exp_avg_sq = {slot.name: torch.full(slot.shape, 1e-4) for slot in slots}
    return exp_avg, exp_avg_sq


def chunk_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.glob("shard-*"))}


def test_compute_skip_and_resume_give_identical_bytes(tmp_path: Path, model, examples) -> None:
    projector, store = make_store(tmp_path / "full", model)
    reports: list[Progress] = []
    assert compute_features(
        model, examples, projector, store, pad_token_id=PAD, max_batch_size=2, progress_cb=reports.append
    ) == len(examples)
    assert reports[-1].done == reports[-1].total == len(examples) and reports[-1].eta_s == 0
    features = store.features()
    assert features.dtype == np.float16 and features.shape == (7, 32)
    np.testing.assert_allclose(np.linalg.norm(features.astype(np.float32), axis=1), 1, atol=1e-3)
    assert store.ids() == [example_id for example_id, _ in examples]
    # Everything is stored: a rerun computes nothing.
    assert compute_features(model, examples, projector, store, pad_token_id=PAD, max_batch_size=2) == 0

    # A killed run: first 4 examples (one committed chunk + one chunk never committed).
    projector, partial = make_store(tmp_path / "resumed", model)
    compute_features(model, examples[:3], projector, partial, pad_token_id=PAD, max_batch_size=2)
    (tmp_path / "resumed" / "shard-00001.npy").write_bytes(b"half-written garbage")
    projector, reopened = make_store(tmp_path / "resumed", model)
    assert len(reopened) == 3
    assert compute_features(model, examples, projector, reopened, pad_token_id=PAD, max_batch_size=2) == 4
    assert chunk_bytes(tmp_path / "resumed") == chunk_bytes(tmp_path / "full")


def test_chunks_and_batching_do_not_change_features(tmp_path: Path, model, examples) -> None:
    projector, one = make_store(tmp_path / "one", model, chunk_size=100)
    compute_features(model, examples, projector, one, pad_token_id=PAD, max_batch_size=8)
    projector, many = make_store(tmp_path / "many", model, chunk_size=2)
    compute_features(model, examples, projector, many, pad_token_id=PAD, max_batch_size=1)
    assert many.n_chunks == 4
    ids = [example_id for example_id, _ in examples]
    np.testing.assert_allclose(one.features(ids).astype(np.float32), many.features(ids).astype(np.float32), atol=2e-3)


def test_refuses_mixing_other_features(tmp_path: Path, model) -> None:
    directory = tmp_path / "store"
    make_store(directory, model)
    for change, match in [
        ({"dim": 64}, "dim 32 != 64"),
        ({"seed": 1}, "seed 0 != 1"),
        ({"mode": "exact"}, "mode 'fast' != 'exact'"),
        ({"checkpoint": "epoch_2"}, "checkpoint"),
        ({"kind": "train"}, "kind"),
    ]:
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
        compute_features(model, examples, projector, target, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, pad_token_id=PAD)
    compute_features(model, examples[4:], projector, target, pad_token_id=PAD)
    assert target_scores(train, target).shape == (4, 3)
    _, other_seed = make_store(tmp_path / "target2", model, kind="target", seed=5)
    with pytest.raises(ValueError, match="not comparable: projection.seed"):
        check_compatible(train, other_seed)
    wrong_projector = make_projector("fast", projector.input_dim, 32, 9, projector.names_hash)
    with pytest.raises(ValueError, match="projector does not match store"):
        compute_features(model, examples, wrong_projector, target, pad_token_id=PAD)


def test_canonical_directory_and_rows_by_id(tmp_path: Path, model, examples) -> None:
    projector, _ = make_store(tmp_path / "unused", model)
    directory = store_directory(tmp_path, "tiny-model", "epoch_1", "target", projector)
    store = FeatureStore(directory, "tiny-model", "epoch_1", "target", projector, chunk_size=3)
    compute_features(model, examples, projector, store, pad_token_id=PAD)
    assert [ids for ids, _ in store.iter_chunks()] == [["ex0", "ex1", "ex2"], ["ex3", "ex4", "ex5"], ["ex6"]]
    np.testing.assert_array_equal(store.chunk(1)[1], store.features(["ex4"])[0])
    np.testing.assert_array_equal(store.features(["ex6", "ex0"]), store.features()[[6, 0]])


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
    projector, store = make_store(tmp_path / "s", model, chunk_size=3)
    assert compute_features(model, mixed, projector, store, pad_token_id=PAD) == len(examples)
    assert "empty" not in store.ids() and store.ids() == [i for i, _ in examples]
    assert store.excluded() == {"empty": "no_target_tokens: no assistant token left after truncation"}
    reopened = FeatureStore(tmp_path / "s", "tiny-model", "epoch_1", "target", projector, chunk_size=3)
    assert reopened.excluded() == store.excluded() and "empty" in reopened.covered()
    assert compute_features(model, mixed, projector, reopened, pad_token_id=PAD) == 0
    # A chunk with nothing but excluded ids still commits a (zero-row) chunk recording them.
    _, alone = make_store(tmp_path / "alone", model)
    assert compute_features(model, [("empty", no_target)], projector, alone, pad_token_id=PAD) == 0
    assert alone.n_chunks == 1 and len(alone) == 0 and alone.chunk(0).shape == (0, 32)


def test_align_stores_drops_a_half_committed_chunk_and_refuses_a_late_dim(tmp_path: Path, model, examples) -> None:
    engine = PerExampleGradients(model)
    projectors = [make_projector("fast", engine.dim, dim, 0, engine.names_hash) for dim in (16, 32)]

    def stores(tag: str) -> list[FeatureStore]:
        return [
            FeatureStore(tmp_path / tag / str(p.dim), "tiny-model", "epoch_1", "target", p, chunk_size=3)
            for p in projectors
        ]

    reference = stores("reference")
    compute_features(model, examples, projectors, reference, pad_token_id=PAD)
    killed = stores("killed")
    compute_features(model, examples[:3], projectors, killed, pad_token_id=PAD)
    compute_features(model, examples[3:6], projectors[1], killed[1], pad_token_id=PAD)  # the kill: dim 32 only
    with pytest.raises(ValueError, match="different example sets"):
        compute_features(model, examples, projectors, killed, pad_token_id=PAD)
    assert align_stores(killed) == 1 and [s.n_chunks for s in killed] == [1, 1]
    compute_features(model, examples, projectors, killed, pad_token_id=PAD)
    for done, expected in zip(killed, reference):
        assert chunk_bytes(done.directory) == chunk_bytes(expected.directory)

    late = stores("late")
    compute_features(model, examples, projectors[0], late[0], pad_token_id=PAD)  # 3 chunks, the other dim none
    with pytest.raises(ValueError, match="hold different examples"):
        align_stores(late)
    assert late[0].n_chunks == 3  # nothing was dropped


def test_one_writer_per_store(tmp_path: Path, model) -> None:
    _, store = make_store(tmp_path / "s", model)
    with (
        store.exclusive(),
        pytest.raises(StoreBusyError, match="another process is filling"),
        FeatureStore(
            store.directory, "tiny-model", "epoch_1", "target", store.manifest["projection"], chunk_size=3
        ).exclusive(),
    ):
        pass
    with store.exclusive():  # released
        pass


def test_train_transform_is_part_of_the_identity_and_of_the_features(tmp_path: Path, model, examples) -> None:
    engine = PerExampleGradients(model)
    projector = make_projector("fast", engine.dim, 32, 0, engine.names_hash)
    exp_avg, exp_avg_sq = moments(model)
    # Every transform has its own canonical folder (LESS's adam keeps the one it always had).
    folders = {
        t: store_directory(tmp_path, "tiny-model", "epoch_1", "train", projector, "00-of-01", transform=t)
        for t in ("adam", "adam_no_momentum", "sgd")
    }
    assert len(set(folders.values())) == 3
    assert folders["adam"] == store_directory(tmp_path, "tiny-model", "epoch_1", "train", projector, "00-of-01")
    assert folders["sgd"].parent.name.startswith("sgd-")
    stores = {
        t: FeatureStore(folders[t], "tiny-model", "epoch_1", "train", projector, part="00-of-01", transform=t)
        for t in folders
    }
    for store in stores.values():
        compute_features(
            model, examples[:4], projector, store, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, pad_token_id=PAD
        )
    # The features are the store's transform of the plain gradients, projected and normalized.
    target = FeatureStore(tmp_path / "target", "tiny-model", "epoch_1", "target", projector)
    compute_features(model, examples[:4], projector, target, pad_token_id=PAD)
    np.testing.assert_allclose(
        stores["sgd"].features().astype(np.float32), target.features().astype(np.float32), atol=2e-3
    )
    assert not np.allclose(
        stores["adam"].features().astype(np.float32),
        stores["adam_no_momentum"].features().astype(np.float32),
        atol=1e-2,
    )
    # Every transform compares with the same (plain-gradient) target features.
    for store in stores.values():
        check_compatible(store, target)
    # A store never takes features of another transform, nor is it reopened as one.
    with pytest.raises(ValueError, match="transform 'adam_no_momentum' != 'sgd'"):
        FeatureStore(
            folders["adam_no_momentum"], "tiny-model", "epoch_1", "train", projector, part="00-of-01", transform="sgd"
        )
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
        compute_features(
            model, examples[:2], projector, store, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, pad_token_id=PAD
        )
    assert (
        compute_features(
            model, examples[:2], projector, store, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, adam_step=3, pad_token_id=PAD
        )
        == 2
    )


def test_a_changed_commit_record_is_refused_then_dropped_with_the_chunks_after_it(
    tmp_path: Path, model, examples
) -> None:
    projector, store = make_store(tmp_path / "s", model)
    compute_features(model, examples, projector, store, pad_token_id=PAD)
    original = chunk_bytes(store.directory)
    record_path = store.directory / "shard-00001.json"
    record = json.loads(record_path.read_text())
    record["ids"] = ["ex4", "ex3", "ex5"]  # still valid JSON: only the record's checksum tells
    record_path.write_text(json.dumps(record))
    _, reopened = make_store(tmp_path / "s", model)
    with pytest.raises(ArtifactIntegrityError, match=r"shard-00001\.json: commit record differs"):
        reopened.features()
    with pytest.raises(ArtifactIntegrityError, match=r"shard-00001\.json"):
        reopened.features(["ex4"])  # not "has no features": the damaged chunk may hold it
    with pytest.raises(ArtifactIntegrityError, match="rematerialize target_gradients"):
        reopened.chunk(1)
    problems = repair_stores([reopened])
    assert len(problems) == 1 and "shard-00001.json" in problems[0] and reopened.n_chunks == 1
    assert compute_features(model, examples, projector, reopened, pad_token_id=PAD) == 4
    assert chunk_bytes(store.directory) == original


def test_writers_see_each_others_commits(tmp_path: Path, model, examples) -> None:
    projector, first = make_store(tmp_path / "s", model)
    _, second = make_store(tmp_path / "s", model)  # opened before the first one commits
    compute_features(model, examples[:3], projector, first, pad_token_id=PAD)
    rows = np.ones((1, 32), np.float16)
    with pytest.raises(ValueError, match="already stored"):
        second.write_chunk(["ex1"], rows)
    assert second.write_chunk(["other"], rows) == 1  # after the first writer's chunk 0, not over it
    assert first.ids() == ["ex0", "ex1", "ex2"]  # a reader's view changes only when it writes or reopens
    _, reopened = make_store(tmp_path / "s", model)
    assert reopened.ids() == ["ex0", "ex1", "ex2", "other"] and reopened.n_chunks == 2
