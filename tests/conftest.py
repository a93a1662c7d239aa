"""Shared fixtures: a tiny in-memory tokenizer and a tiny random Llama (no downloads).

The tokenizer is byte-level BPE with no merges: every byte is one token, plus a few
special tokens, so it needs no training and is identical on every machine.
Use ``make_tiny_tokenizer(chat_template=...)`` for a variant with a chat template.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from selection.train.models import build_tiny_llama

TINY_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SAMPLE_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "6, of course."},
]


_DEFAULT_TORCH_THREADS = torch.get_num_threads()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tiny-model tests run single-threaded: on a small shared CPU, intra-op threads make
    them ~10-25x slower (thread contention); slow tests with real models keep all threads."""
    torch.set_num_threads(_DEFAULT_TORCH_THREADS if item.get_closest_marker("slow") else 1)


def make_tiny_tokenizer(chat_template: str | None = None, with_pad: bool = True) -> PreTrainedTokenizerFast:
    byte_vocab = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(TINY_SPECIAL_TOKENS + sorted(byte_vocab))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(TINY_SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if with_pad else None,
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """No chat template: tokenization falls back to the Tulu format."""
    return make_tiny_tokenizer()


@pytest.fixture
def chatml_tokenizer() -> PreTrainedTokenizerFast:
    return make_tiny_tokenizer(chat_template=CHATML_TEMPLATE)


@pytest.fixture
def tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> torch.nn.Module:
    """A 2-layer random LlamaForCausalLM sized to the tiny tokenizer (fp32, eval mode)."""
    return build_tiny_llama(seed=0, vocab_size=len(tiny_tokenizer))
