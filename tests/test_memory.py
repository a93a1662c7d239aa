"""Batching by memory and halving on out-of-memory (selection/common/memory.py), without a GPU."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig

from selection.common import memory
from selection.data.tokenization import TokenizedExample, length_sorted_batches


def example(tokens: int) -> TokenizedExample:
    return TokenizedExample(list(range(tokens)), list(range(tokens)), False, tokens - 1)


def test_batches_fit_the_budget_and_shrink_with_length() -> None:
    model = memory.GradientMemory(lora_dims=1000, bytes_per_token=100)
    budget = model.batch_bytes(4, 100)  # exactly 4 rows of 100 tokens
    examples = [example(t) for t in (100, 100, 100, 100, 100, 400, 400, 20, 20, 20, 20, 20, 20)]
    batches = length_sorted_batches(examples, max_batch_size=64, max_rows=model.max_rows(budget))
    assert sorted(i for b in batches for i in b) == list(range(len(examples)))
    for rows in batches:
        longest = max(len(examples[i].input_ids) for i in rows)
        assert len(rows) == 1 or model.batch_bytes(len(rows), longest) <= budget
    # 400-token rows alone; the fifth 100-token row heads a batch of 4, then 3 short rows.
    assert [len(b) for b in batches] == [1, 1, 4, 4, 3]
    # A budget below one example still yields one-row batches rather than none.
    assert model.max_rows(1)(10_000) == 1


def test_oom_halves_the_batch_retries_and_caps_later_batches() -> None:
    calls: list[int] = []
    logged: list[str] = []

    def step(rows: list[int]) -> list[int]:
        calls.append(len(rows))
        if len(rows) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [r * 10 for r in rows]

    out = list(memory.run_halving_on_oom([list(range(8)), [8, 9, 10, 11, 12]], step, logged.append))
    assert [rows for rows, _ in out] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12]]
    assert [x for _, result in out for x in result] == [r * 10 for r in range(13)]
    assert calls[:3] == [8, 4, 2] and max(calls[3:]) <= 2  # later batches start at the size that worked
    assert len(logged) == 2 and "out of memory at a batch of 8" in logged[0]


def test_runtime_oom_message_is_recognized_but_other_errors_and_single_rows_raise() -> None:
    def oom(rows: list[int]) -> None:
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        list(memory.run_halving_on_oom([[0, 1, 2]], oom, lambda _: None))  # halves down to 1 row, then raises

    def broken(rows: list[int]) -> None:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(memory.run_halving_on_oom([[0, 1, 2]], broken, lambda _: None))
    assert memory.is_out_of_memory(torch.OutOfMemoryError("x")) and not memory.is_out_of_memory(ValueError("x"))


def test_estimate_at_7b_and_free_memory_budget() -> None:
    config = LlamaConfig(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008, vocab_size=32000
    )
    dims = 32 * 4 * 2 * 128 * 4096
    assert dims == 134_217_728
    model = memory.GradientMemory(
        dims,
        memory.activation_bytes_per_token(
            config, 128, ("q_proj", "k_proj", "v_proj", "o_proj"), weight_bytes=2, checkpointing=True
        ),
    )
    assert model.bytes_per_example == dims * 4 * memory.GRADIENT_COPIES  # 1.07 GB
    checkpointed = model.bytes_per_token
    full = memory.activation_bytes_per_token(config, 128, ("q_proj", "k_proj", "v_proj", "o_proj"), 2)
    assert checkpointed < full
    # 60 GB free: a 2048-token row fits a handful of times, 256-token rows several times more.
    rows = model.max_rows(60 * 2**30)
    assert 1 <= rows(2048) < rows(256)
    assert memory.free_bytes("cpu", budget_bytes=123) == 123 and memory.free_bytes("cpu") > 0


def test_loss_memory_is_one_chunk_per_batch_not_logits_per_token() -> None:
    """At 7B with a 128K vocabulary, per-token logits would be ~1 MB a token (2 GB for a 2,048-token
    row); the chunked loss holds one chunk of logits per batch, whatever the length or vocabulary."""
    shapes = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 14336}
    small, large = LlamaConfig(vocab_size=32000, **shapes), LlamaConfig(vocab_size=128256, **shapes)
    modules = ("q_proj", "k_proj", "v_proj", "o_proj")
    per_token = [memory.activation_bytes_per_token(c, 128, modules, 2, checkpointing=True) for c in (small, large)]
    assert per_token[0] == per_token[1]  # the vocabulary no longer costs per token
    positions = memory.loss_chunk_positions(128256)
    assert positions * 128256 * 4 <= memory.LOSS_CHUNK_BYTES
    estimate = memory.GradientMemory(
        32 * 4 * 2 * 128 * 4096, per_token[1], positions, memory.loss_bytes_per_position(large, 2)
    )
    chunk = estimate.loss_chunk_bytes
    assert chunk <= 400 * 2**20
    # An 80 GB GPU with 70 GB free: several 2,048-token rows per batch, and the chunk counted once.
    rows = estimate.max_rows(70 * 2**30)(2048)
    assert rows >= 4 and estimate.batch_bytes(rows, 2048) <= 70 * 2**30
    assert estimate.batch_bytes(2, 2048) - estimate.batch_bytes(1, 2048) == estimate.batch_bytes(1, 2048) - chunk


def test_max_rows_is_the_largest_batch_that_fits_around_the_loss_chunk() -> None:
    estimate = memory.GradientMemory(1000, 10, loss_chunk=500, loss_bytes_per_position=100)
    for budget in (5_000, 60_000, 123_456, 1_000_000):
        for tokens in (1, 7, 64, 499, 500, 900):
            rows = estimate.max_rows(budget)(tokens)
            fits = estimate.batch_bytes(rows, tokens) <= budget
            assert fits or rows == 1, (budget, tokens, rows)
            assert estimate.batch_bytes(rows + 1, tokens) > budget, (budget, tokens, rows)
