"""Fake resources injected through `resources=`: a tiny random model instead of SmolLM2."""

from __future__ import annotations

from typing import Any

from resources.model_store import ModelStore
from selection.models import ModelSpec, build_tiny_llama
from tests.conftest import CHATML_TEMPLATE, make_tiny_tokenizer

TINY_MODEL = "tiny-random"


class TinyModelStore(ModelStore):
    """Every partition key resolves to a 2-layer random Llama with a byte-level tokenizer."""

    def spec(self, name: str) -> ModelSpec:
        return ModelSpec(name=name, source="tiny-random-llama", max_length=96, lora_r=4, lora_alpha=8, lora_dropout=0.0)

    def load(self, spec: ModelSpec, device: str) -> tuple[Any, Any]:
        tokenizer = make_tiny_tokenizer(chat_template=CHATML_TEMPLATE)
        model = build_tiny_llama(seed=0, vocab_size=len(tokenizer))
        model.config.pad_token_id = tokenizer.pad_token_id
        return model.to(device), tokenizer
