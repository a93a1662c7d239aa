"""Seeded projections: determinism, JL inner-product preservation, fast vs exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selection.influence.projection import (
    DEFAULT_MODE,
    MODES,
    DeviceProjector,
    ExactProjector,
    SparseProjector,
    check_dim,
    check_dims,
    make_projector,
    mode_why,
    splitmix64,
)


@pytest.mark.parametrize("mode", ["exact", "fast", "device"])
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


@pytest.mark.parametrize("mode", ["exact", "fast", "device"])
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

    def rank(s):
        return np.argsort(np.argsort(s))

    assert np.corrcoef(rank(s_exact), rank(s_fast))[0, 1] > 0.95


def test_unknown_mode_and_bad_shapes_refused() -> None:
    with pytest.raises(ValueError, match="unknown projection mode"):
        make_projector("approx", input_dim=10, dim=4)
    with pytest.raises(ValueError, match="divide dim"):
        SparseProjector(input_dim=10, dim=6, nonzeros=4)
    with pytest.raises(ValueError, match=r"expected grads \[B, 10\]"):
        make_projector("fast", input_dim=10, dim=4).project(torch.zeros(2, 11))


def test_device_matrix_is_splitmix64_bits_whatever_the_block_size() -> None:
    # Reference: plain Python splitmix64 (uint64), entry (i, j) = bit (i*dim + j) % 64 of word (i*dim + j) // 64.
    mask = (1 << 64) - 1

    def reference(key: int, counter: int) -> int:
        z = (counter * 0x9E3779B97F4A7C15 + key) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    counters = torch.arange(0, 3000, dtype=torch.int64) * 7919 + (1 << 40)
    assert [int(v) & mask for v in splitmix64(12345, counters)] == [reference(12345, int(c)) for c in counters]
    small_blocks = DeviceProjector(1000, 48, seed=7, block_bytes=48 * 4 * 37)  # 37 rows: blocks cut words
    one_block = DeviceProjector(1000, 48, seed=7)
    assert small_blocks.block_rows == 37 and one_block.block_rows == 1000
    matrix = one_block.dense()
    assert torch.equal(small_blocks.dense(), matrix)
    key, flat = one_block._key, (matrix.reshape(-1) > 0).tolist()
    for entry in (0, 63, 64, 1001, 47_999):
        assert flat[entry] == bool(reference(key, entry // 64) >> (entry % 64) & 1)
    assert abs(float((matrix > 0).float().mean()) - 0.5) < 0.01  # Rademacher signs
    grads = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(small_blocks.project(grads), grads @ matrix, rtol=1e-5, atol=1e-5)
    bf16 = DeviceProjector(1000, 48, seed=7, dtype="bfloat16")
    assert bf16.fingerprint() != one_block.fingerprint()  # rounds differently: never mixed with float32
    torch.testing.assert_close(bf16.project(grads), grads @ matrix, rtol=0.05, atol=0.05)


def test_mode_why_names_only_departures_from_less() -> None:
    assert mode_why("exact") == mode_why("device") == ""  # LESS's dense Rademacher, wherever generated
    assert "sparse sign" in mode_why("fast") and "'device'" in mode_why("fast")
    assert DEFAULT_MODE in MODES
    with pytest.raises(ValueError, match="unknown projection mode 'dense'"):
        mode_why("dense")


def test_config_dims_are_checked_before_any_store_is_built() -> None:
    assert check_dims([64, 8192], "fast") == [64, 8192]
    assert check_dims([30], "exact") == [30]  # only `fast` splits the projection into blocks
    for dims, message in [
        ([], "`dims` is empty"),
        ([64, 64, 32, 32], "`dims` lists 32, 64 more than once"),
        ([0, -1], "`dims` holds 0, -1: every projection dim must be a positive integer"),
        ([30], "`dims` holds 30, not a multiple of 4"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_dims(dims, "fast")
    with pytest.raises(ValueError, match="`mode` 'dense' is not a projection mode"):
        check_dims([64], "dense")
    with pytest.raises(ValueError, match="`dim` holds 0"):
        check_dim(0, "exact")
    assert check_dim(30, "device") == 30
