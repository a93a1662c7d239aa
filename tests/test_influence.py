"""Influence over the datastore: a pool cut into parts scores exactly like one store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from selection.influence.datastore import FeatureStore, compute_features, shard_key, shard_of
from selection.influence.gradients import PerExampleGradients
from selection.influence.projection import make_projector
from selection.influence.scores import ChunkedRows, compute_influence, load_scores
from tests.test_datastore import PAD, moments
from tests.test_gradients import random_examples, tiny_lora_model


def test_parts_give_the_scores_of_one_store(tmp_path: Path) -> None:
    model = tiny_lora_model()
    engine = PerExampleGradients(model)
    projector = make_projector("fast", engine.dim, 32, 0, engine.names_hash)
    train = list(zip([f"t{i}" for i in range(12)], random_examples([7 + i % 5 for i in range(12)], seed=2)))
    val = list(zip(["v0", "v1", "v2"], random_examples([9, 6, 12], seed=3)))
    exp_avg, exp_avg_sq = moments(model)

    def train_store(directory: Path, rows: list, part: str | None) -> FeatureStore:
        store = FeatureStore(directory, "tiny", "epoch_1", "train", projector, chunk_size=2, part=part)
        compute_features(model, rows, projector, store, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, pad_token_id=PAD)
        return store

    target = FeatureStore(tmp_path / "val", "tiny", "epoch_1", "target", projector)
    compute_features(model, val, projector, target, pad_token_id=PAD)
    whole = train_store(tmp_path / "whole", train, None)
    parts = [
        train_store(tmp_path / f"p{k}", [r for r in train if shard_of(r[0], 3) == k], shard_key(k, 3)) for k in range(3)
    ]
    assert sum(len(p) for p in parts) == len(whole) and all(len(p) for p in parts)
    assert ChunkedRows(parts).shape == (12, 32)

    compute_influence([whole], [target], [1.0], ["v0", "v1", "v2"], tmp_path / "scores_whole")
    compute_influence([parts], [target], [1.0], ["v0", "v1", "v2"], tmp_path / "scores_parts")
    whole_scores, whole_ids = load_scores(tmp_path / "scores_whole")
    part_scores, part_ids = load_scores(tmp_path / "scores_parts")
    assert sorted(part_ids) == sorted(whole_ids) and part_ids == [i for p in parts for i in p.ids()]
    order = [whole_ids.index(i) for i in part_ids]
    # Cosines: fp32 sums over another chunking may differ by about one ulp.
    np.testing.assert_allclose(part_scores, np.asarray(whole_scores)[order], rtol=1e-6, atol=1e-7)

    with pytest.raises(ValueError, match="other ids or another order"):
        compute_influence([parts, parts[::-1]], [target, target], [1.0, 1.0], ["v0"], tmp_path / "bad")
