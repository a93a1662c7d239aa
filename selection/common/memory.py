"""Batching per-example gradients by memory, and halving a batch that runs out of memory.

Pure functions (no device calls except in ``free_bytes``), so the plan and the retry are
unit-tested without a GPU. At paper scale (a 7B Llama, LoRA r=128 on q/k/v/o: ~134M LoRA
dims) one example's fp32 gradient is 536 MB, so a batch is bounded by memory long before
it is bounded by tokens.

Estimate of one batch of ``n`` examples padded to ``t`` tokens (bytes): the larger of its two
phases, since the pass frees its activations before the transform starts::

    pass:      min(loss_chunk, n * t) * loss_bytes_per_position + n * t * bytes_per_token
               + n * lora_dims * 4                      (the flat per-example gradients)
    transform: n * lora_dims * 4 * GRADIENT_COPIES

``GRADIENT_COPIES``: the flat fp32 gradient plus the two working copies of the Adam transform
(``selection.influence.gradients.adam_feature`` works in place to stay at two).
``bytes_per_token`` (``activation_bytes_per_token``): per layer, what the per-example
capture keeps in fp32 for every LoRA module (input of lora_A, input and output of lora_B,
output gradient: ``(in + r + 2 out) * 4``), the base model's activations kept for the
backward pass (``hidden * HIDDEN_ACTIVATIONS + intermediate * MLP_ACTIVATIONS`` values of
the weight dtype per layer; with gradient checkpointing only the layer inputs plus one
layer), and the loss's hidden states with their gradient (``hidden * weight_bytes * 2``).
``loss_chunk`` positions: the lm_head + cross-entropy run over a chunk of positions at a time
(``selection.influence.gradients.ChunkedLinearCrossEntropy``), so their fp32 logits (and the
copy cast for the gradient's matmul), ``loss_bytes_per_position = vocab * (4 + weight_bytes)``,
are held for one chunk per batch (fewer when the batch has fewer positions), not per token:
with whole-sequence loss at a 128K vocabulary, per-token logits would be ~1 MB a token. The
constants were fitted on the CPU (``tests/test_scale.py``, with both loss kinds); the budget
keeps a margin.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

GRADIENT_COPIES = 3
HIDDEN_ACTIVATIONS = 12
MLP_ACTIVATIONS = 4
SAFETY = 0.8  # share of the free memory a batch may plan to use

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class GradientMemory:
    """Memory of per-example gradients: bytes per example (fixed) and per padded token."""

    lora_dims: int
    bytes_per_token: int
    loss_chunk: int = 0  # positions of one lm_head + cross-entropy chunk
    loss_bytes_per_position: int = 0  # its logits' bytes per position

    @property
    def bytes_per_example(self) -> int:
        return self.lora_dims * 4 * GRADIENT_COPIES

    @property
    def loss_chunk_bytes(self) -> int:
        return self.loss_chunk * self.loss_bytes_per_position

    def batch_bytes(self, n_examples: int, padded_tokens: int) -> int:
        loss = min(self.loss_chunk, n_examples * padded_tokens) * self.loss_bytes_per_position
        gradient = self.lora_dims * 4
        forward_backward = loss + n_examples * (padded_tokens * self.bytes_per_token + gradient)
        return max(forward_backward, n_examples * self.bytes_per_example)

    def max_rows(self, budget_bytes: int) -> Callable[[int], int]:
        """Rows a batch may hold when its longest row has ``tokens`` tokens (at least 1): the most
        rows whose :meth:`batch_bytes` fit (it grows with the rows, so a bisection finds them)."""

        def rows(tokens: int) -> int:
            low, high = 1, max(2, budget_bytes // (self.lora_dims * 4) + 2)
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if self.batch_bytes(middle, tokens) <= budget_bytes else (low, middle)
            return low

        return rows


def activation_bytes_per_token(
    config: Any, lora_r: int, lora_modules: Sequence[str], weight_bytes: int, checkpointing: bool = False
) -> int:
    """Estimated activation bytes per token of a Llama-style config (see the module docstring)."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    kv = head_dim * getattr(config, "num_key_value_heads", config.num_attention_heads)
    shapes = {
        "q_proj": (hidden, head_dim * config.num_attention_heads),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (head_dim * config.num_attention_heads, hidden),
        "gate_proj": (hidden, config.intermediate_size),
        "up_proj": (hidden, config.intermediate_size),
        "down_proj": (config.intermediate_size, hidden),
    }
    capture = sum((shapes[m][0] + lora_r + 2 * shapes[m][1]) * 4 for m in lora_modules)
    per_layer = (HIDDEN_ACTIVATIONS * hidden + MLP_ACTIVATIONS * config.intermediate_size) * weight_bytes
    base = layers * hidden * weight_bytes + per_layer if checkpointing else layers * per_layer
    return layers * capture + base + hidden * weight_bytes * 2


# Logit bytes one chunk of the lm_head + cross-entropy may hold (fp32 logits, overwritten in place
# by their gradient): 256 MiB is 1,365 positions at SmolLM2's 49K vocabulary, 523 at a 128K one.
# Smaller chunks cost matmul efficiency on the CPU (64 MiB: +15% for the loss), larger ones save
# little (measured on 2,048 positions of SmolLM2's lm_head: 1.86 s at 341, 1.63 s at 1,365).
LOSS_CHUNK_BYTES = 256 << 20


def loss_chunk_positions(vocab_size: int, chunk_bytes: int = LOSS_CHUNK_BYTES) -> int:
    """Positions per chunk of the chunked lm_head + cross-entropy for a vocabulary (at least 1)."""
    return max(1, chunk_bytes // (4 * vocab_size))


def loss_bytes_per_position(config: Any, weight_bytes: int) -> int:
    """Bytes per position of the chunked lm_head + cross-entropy: fp32 logits (their gradient is
    built in place) and the copy cast to the weights' dtype for the gradient's matmul."""
    return config.vocab_size * (4 + weight_bytes)


def gradient_memory(model: Any, lora_dims: int) -> GradientMemory:
    """The estimate for a peft LoRA model (its base config, LoRA r and modules, weight dtype, checkpointing)."""
    base = model.get_base_model()
    lora = next(iter(model.peft_config.values()))
    weight_bytes = base.get_input_embeddings().weight.element_size()
    checkpointing = bool(getattr(base, "is_gradient_checkpointing", False))
    return GradientMemory(
        lora_dims,
        activation_bytes_per_token(base.config, lora.r, sorted(lora.target_modules), weight_bytes, checkpointing),
        loss_chunk_positions(base.config.vocab_size),
        loss_bytes_per_position(base.config, weight_bytes),
    )


def free_bytes(device: str | torch.device, budget_bytes: int | None = None) -> int:
    """Memory a batch may use: ``budget_bytes`` when set, else the device's free memory
    (``torch.cuda.mem_get_info`` on CUDA, psutil's available memory on the CPU) times SAFETY."""
    if budget_bytes is not None:
        return budget_bytes
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(free * SAFETY)


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error)
    )


def run_halving_on_oom(
    batches: Sequence[Sequence[int]], step: Callable[[list[int]], T], log: Callable[[str], None] | None = None
) -> Iterator[tuple[list[int], T]]:
    """Yield ``(rows, step(rows))`` for every batch; a batch that runs out of memory is halved and
    retried, and later batches are capped at the size that worked (``log``, default this module's
    logger, is told). A single row that runs out of memory raises. Rows come back in order."""
    log = log or logger.warning
    cap = max((len(batch) for batch in batches), default=1)
    for batch in batches:
        queue = [list(batch[i : i + cap]) for i in range(0, len(batch), cap)]
        while queue:
            rows = queue.pop(0)
            try:
                result = step(rows)
            except (torch.OutOfMemoryError, RuntimeError) as error:
                if not is_out_of_memory(error) or len(rows) == 1:
                    raise
                failed = True
            else:
                failed = False
            if failed:  # outside the except block, so the failed step's tensors are already freed
                cap = len(rows) // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                log(f"out of memory at a batch of {len(rows)} examples; retrying in batches of at most {cap}")
                remaining = rows + [row for later in queue for row in later]
                queue = [remaining[i : i + cap] for i in range(0, len(remaining), cap)]
                continue
            yield rows, result
