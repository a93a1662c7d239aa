"""Seeded projections: determinism, JL inner-product preservation, fast vs exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selection.projection import ExactProjector, SparseProjector, make_projector


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_same_seed_same_matrix_and_shard_splits_agree(mode: str) -> None:
    options = {"block_rows": 100} if mode == "exact" else {}
    first = make_projector(mode, input_dim=1000, dim=64, seed=3, **options)
    second = make_projector(mode, input_dim=1000, dim=64, seed=3, **options)
    assert torch.equal(first.dense(), second.dense())
    assert first.fingerprint() == second.fingerprint()
    grads = torch.randn(10, 1000, generator=torch.Generator().manual_seed(0))
    whole = first.project(grads)
    split = torch.cat([second.project(grads[:4]), second.project(grads[4:])])
    # Equal up to float summation order (batched kernels vectorize over rows).
    torch.testing.assert_close(whole, split, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole, grads @ first.dense(), rtol=1e-5, atol=1e-5)
    other = make_projector(mode, input_dim=1000, dim=64, seed=4, **options)
    assert not torch.equal(first.dense(), other.dense())
    assert first.fingerprint_hash() != other.fingerprint_hash()


def test_exact_is_rademacher_and_uncached_blocks_regenerate_identically() -> None:
    cached = ExactProjector(input_dim=300, dim=32, seed=1, block_rows=64)
    uncached = ExactProjector(input_dim=300, dim=32, seed=1, block_rows=64, cache_bytes=0)
    matrix = cached.dense()
    assert set(np.unique(matrix.numpy() * np.sqrt(32)).round(6)) == {-1.0, 1.0}
    assert torch.equal(matrix, uncached.dense()) and torch.equal(uncached.block(4), cached.block(4))


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_inner_products_preserved_in_expectation(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    dim, input_dim = 2048, 4000
    a = torch.randn(input_dim, generator=generator)
    b = 0.6 * a + 0.8 * torch.randn(input_dim, generator=generator)
    x = torch.stack([a, b])
    true = float(a @ b)
    estimates = []
    for seed in range(4):
        projected = make_projector(mode, input_dim, dim, seed=seed).project(x)
        estimates.append(float(projected[0] @ projected[1]))
        # Norms preserved within a few JL standard deviations (sqrt(2/dim) ~ 3%).
        assert abs(float(projected[0].norm() / a.norm()) - 1) < 0.1
    # Std of one estimate ~ |a||b|/sqrt(dim); the mean of 4 is well within 10%.
    assert abs(np.mean(estimates) - true) / true < 0.1


def test_fast_agrees_with_exact_on_cosine_rankings() -> None:
    generator = torch.Generator().manual_seed(0)
    input_dim = 6000
    shared = torch.randn(input_dim, generator=generator)
    train = torch.randn(60, input_dim, generator=generator) + torch.linspace(0, 1.5, 60)[:, None] * shared
    target = torch.randn(3, input_dim, generator=generator) + shared

    def scores(x: torch.Tensor, t: torch.Tensor) -> np.ndarray:
        x = torch.nn.functional.normalize(x, dim=1)
        t = torch.nn.functional.normalize(t, dim=1)
        return (x @ t.T).mean(1).numpy()

    exact = make_projector("exact", input_dim, 1024, seed=0)
    fast = make_projector("fast", input_dim, 1024, seed=0)
    s_exact = scores(exact.project(train), exact.project(target))
    s_fast = scores(fast.project(train), fast.project(target))
    rank = lambda s: np.argsort(np.argsort(s))
    assert np.corrcoef(rank(s_exact), rank(s_fast))[0, 1] > 0.95


def test_unknown_mode_and_bad_shapes_refused() -> None:
    with pytest.raises(ValueError, match="unknown projection mode"):
        make_projector("approx", input_dim=10, dim=4)
    with pytest.raises(ValueError, match="divide dim"):
        SparseProjector(input_dim=10, dim=6, nonzeros=4)
    with pytest.raises(ValueError, match=r"expected grads \[B, 10\]"):
        make_projector("fast", input_dim=10, dim=4).project(torch.zeros(2, 11))
