"""Embeddings: pooling/normalization against a manual computation, and the on-disk cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from selection.diversity.embeddings import (
    EmbeddingCache,
    EmbeddingCacheMismatch,
    SentenceEncoder,
    cache_dir_for,
    embed_texts,
    embed_with_causal_lm,
    fill_cache,
    text_for_embedding,
)
from tests.conftest import SAMPLE_CONVERSATION

TEXTS = ["short", "a somewhat longer sentence here", "mid length text", "x", "another one of middling size"]


def _write_tiny_sentence_model(folder: Path, tokenizer: Any, pooling_key: str = "pooling_mode_mean_tokens") -> Path:
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, pooling_key: True}))
    return folder


@pytest.fixture
def tiny_sentence_model(tmp_path: Path, tiny_tokenizer: Any) -> Path:
    return _write_tiny_sentence_model(tmp_path / "tiny_st", tiny_tokenizer)


def test_embed_texts_matches_manual_mean_pooling(tiny_sentence_model: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    got = embed_texts(TEXTS, model_dir=tiny_sentence_model, batch_size=2, max_length=8)
    tokenizer = AutoTokenizer.from_pretrained(tiny_sentence_model)
    model = AutoModel.from_pretrained(tiny_sentence_model).eval()
    for row, text in enumerate(TEXTS):  # one at a time: no padding involved
        ids = tokenizer(text, truncation=True, max_length=8, return_tensors="pt")
        with torch.no_grad():
            mean = model(**ids).last_hidden_state[0].mean(dim=0)
        np.testing.assert_allclose(got[row], (mean / mean.norm()).numpy(), atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)


def test_sentence_encoder_fingerprint_and_pooling_errors(
    tiny_sentence_model: Path, tmp_path: Path, tiny_tokenizer: Any
) -> None:
    encoder = SentenceEncoder(tiny_sentence_model, max_length=8)
    assert encoder.fingerprint() == SentenceEncoder(tiny_sentence_model, max_length=8).fingerprint()
    assert encoder.fingerprint() != SentenceEncoder(tiny_sentence_model, max_length=16).fingerprint()
    assert encoder.encode([]).shape == (0, 16)
    with pytest.raises(ValueError, match="pooling"):
        SentenceEncoder(_write_tiny_sentence_model(tmp_path / "m", tiny_tokenizer, "pooling_mode_max_tokens"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        SentenceEncoder(tmp_path)
    with pytest.raises(ValueError, match="single string"):
        encoder.encode("not a list")


def test_text_for_embedding_modes() -> None:
    assert text_for_embedding(SAMPLE_CONVERSATION) == "What is 2+2?\n\nAnd 3+3?"
    full = text_for_embedding(SAMPLE_CONVERSATION, mode="conversation")
    assert full.startswith("system: Be brief.\n\nuser: What is 2+2?") and full.endswith("assistant: 6, of course.")
    with pytest.raises(ValueError, match="unknown embedding mode"):
        text_for_embedding(SAMPLE_CONVERSATION, mode="answers")
    with pytest.raises(ValueError, match="no text"):
        text_for_embedding([{"role": "assistant", "content": "hi"}])


def test_embed_with_causal_lm_matches_manual(tiny_llama: torch.nn.Module, tiny_tokenizer) -> None:
    got = embed_with_causal_lm(TEXTS, tiny_llama, tiny_tokenizer, batch_size=3, max_length=16)
    raw = embed_with_causal_lm(TEXTS, tiny_llama, tiny_tokenizer, batch_size=1, max_length=16, normalize=False)
    for row, text in enumerate(TEXTS):
        ids = tiny_tokenizer(text, truncation=True, max_length=16, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            hidden = tiny_llama(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
        mean = hidden.mean(dim=0).numpy()
        np.testing.assert_allclose(raw[row], mean, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got[row], mean / np.linalg.norm(mean), rtol=1e-4, atol=1e-5)


def _vectors(n: int, dim: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def test_cache_incremental_add_and_ordered_load(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path, "fp", "user_turns", 4, chunk_rows=3)
    ids = [f"id{i}" for i in range(7)]
    vectors = _vectors(7)
    assert cache.missing(ids + ["id0"]) == ids
    cache.add(ids[:5], vectors[:5])  # two chunks (3 + 2 rows)
    assert cache.missing(ids) == ids[5:]
    cache.add(ids[5:], vectors[5:])
    assert len(list(tmp_path.glob("shard-*.npy"))) == 3
    order = [6, 0, 3, 3, 5, 1]
    np.testing.assert_array_equal(cache.load([ids[i] for i in order]), vectors[order])
    reopened = EmbeddingCache(tmp_path, "fp", "user_turns", 4)
    assert len(reopened) == 7 and reopened.missing(ids) == []
    np.testing.assert_array_equal(reopened.load(ids), vectors)
    with pytest.raises(KeyError, match="not in the embedding cache"):
        reopened.load(["id0", "nope"])
    with pytest.raises(ValueError, match="already cached"):
        reopened.add(["id1"], vectors[:1])


def test_cache_refuses_mismatch_and_bad_input(tmp_path: Path) -> None:
    EmbeddingCache(tmp_path, "fp", "user_turns", 4).add(["a"], _vectors(1))
    for key in [("other", "user_turns", 4), ("fp", "conversation", 4), ("fp", "user_turns", 8)]:
        with pytest.raises(EmbeddingCacheMismatch, match="different embedder"):
            EmbeddingCache(tmp_path, *key)
    cache = EmbeddingCache(tmp_path, "fp", "user_turns", 4)
    with pytest.raises(ValueError, match="shape"):
        cache.add(["b"], _vectors(1, dim=3))
    with pytest.raises(ValueError, match="NaN"):
        cache.add(["b"], np.full((1, 4), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="duplicates"):
        cache.add(["b", "b"], _vectors(2))
    with pytest.raises(ValueError, match="single-line"):
        cache.add(["b\nc"], _vectors(1))
    assert cache_dir_for(tmp_path, "fp", "user_turns", 4) != cache_dir_for(tmp_path, "fp", "conversation", 4)


def test_fill_cache_resumes_after_a_crash(tmp_path: Path) -> None:
    ids = [f"id{i}" for i in range(10)]
    texts = [f"text {i}" for i in range(10)]
    embedded: list[str] = []
    crash_after = [4]

    def embed(batch: list[str]) -> np.ndarray:
        if len(embedded) >= crash_after[0]:
            raise RuntimeError("killed")
        embedded.extend(batch)
        return np.stack([np.full(4, float(t.split()[1]), dtype=np.float32) for t in batch])

    cache = EmbeddingCache(tmp_path, "fp", "user_turns", 4)
    with pytest.raises(RuntimeError, match="killed"):
        fill_cache(cache, ids, texts, embed, chunk_size=4)
    (tmp_path / "shard-orphan.npy").write_bytes(b"half written")  # left by a killed writer
    resumed = EmbeddingCache(tmp_path, "fp", "user_turns", 4)
    assert resumed.missing(ids) == ids[4:]
    embedded.clear()
    crash_after[0] = 100
    progress: list[tuple[int, int]] = []
    assert fill_cache(resumed, ids, texts, embed, chunk_size=4, on_chunk=lambda d, t: progress.append((d, t))) == 6
    assert embedded == texts[4:8] + texts[8:] and progress == [(4, 6), (6, 6)]
    assert not (tmp_path / "shard-orphan.npy").exists()
    np.testing.assert_array_equal(resumed.load(ids)[:, 0], np.arange(10, dtype=np.float32))


@pytest.mark.slow
def test_minilm_paraphrase_is_closer_than_unrelated() -> None:
    vectors = embed_texts(
        [
            "How do I bake a chocolate cake?",
            "What is a good recipe for chocolate cake?",
            "The stock market fell sharply on Tuesday.",
        ]
    )
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.3
