"""Batched per-example LoRA gradients against a one-example-at-a-time autograd reference."""

from __future__ import annotations

import pytest
import torch

from selection.gradients import AdamMoments, PerExampleGradients, adam_feature, flatten_named, lora_slots
from selection.models import ModelSpec, add_lora, build_tiny_llama
from selection.tokenization import IGNORE_INDEX, TokenizedExample, collate

TINY_SPEC = ModelSpec(name="tiny", source="tiny", lora_r=4, lora_alpha=8, lora_dropout=0.1)


def tiny_lora_model(seed: int = 0) -> torch.nn.Module:
    """Tiny LoRA Llama with random lora_B too (peft starts B at 0, making lora_A grads 0)."""
    model = add_lora(build_tiny_llama(seed=seed), TINY_SPEC, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def random_examples(lengths: list[int], seed: int = 0, vocab: int = 128) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for length in lengths:
        ids = torch.randint(5, vocab, (length,), generator=generator).tolist()
        prompt = max(1, length // 3)
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        examples.append(TokenizedExample(ids, labels, False, length - prompt))
    return examples


def naive_gradient(model: torch.nn.Module, example: TokenizedExample) -> torch.Tensor:
    """LESS's way: batch of one, HF loss (mean over its target tokens), autograd, flatten."""
    model.eval()
    model.zero_grad(set_to_none=True)
    output = model(input_ids=torch.tensor([example.input_ids]), labels=torch.tensor([example.labels]))
    output.loss.backward()
    return torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters() if p.requires_grad])


def test_batched_per_example_gradients_match_naive_reference() -> None:
    model = tiny_lora_model()
    examples = random_examples([9, 23, 5, 17, 23, 12])  # mixed lengths -> right padding
    engine = PerExampleGradients(model)
    batched = engine(collate(examples, pad_token_id=2))
    assert batched.shape == (len(examples), engine.dim)
    for row, example in enumerate(examples):
        reference = naive_gradient(model, example)
        relative = (batched[row] - reference).norm() / reference.norm()
        assert relative < 1e-4, (row, relative.item())


def test_layout_is_named_parameters_order_and_lora_only() -> None:
    model = tiny_lora_model()
    engine = PerExampleGradients(model)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert engine.names == trainable
    assert engine.dim == sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.get_base_model().lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="not a LoRA"):
        PerExampleGradients(model)


def test_example_without_targets_is_refused() -> None:
    engine = PerExampleGradients(tiny_lora_model())
    example = TokenizedExample([5, 6, 7], [IGNORE_INDEX] * 3, False, 0)
    with pytest.raises(ValueError, match="no target tokens"):
        engine(collate([example], pad_token_id=2))


def test_adam_feature_matches_less_formula() -> None:
    g = torch.tensor([[0.5, -2.0, 0.0]])
    m = torch.tensor([0.1, 0.2, -0.3])
    v = torch.tensor([0.01, 0.0, 0.04])
    feature = adam_feature(g, m, v)
    m2 = 0.9 * m + 0.1 * g
    v2 = 0.999 * v + 0.001 * g**2
    torch.testing.assert_close(feature, m2 / torch.sqrt(v2 + 1e-8))
    # eps inside the root, no bias correction: a zero state and zero grad give exactly 0.
    assert adam_feature(torch.zeros(1, 2), torch.zeros(2), torch.zeros(2)).abs().max() == 0
    with pytest.raises(ValueError, match="shape mismatch"):
        adam_feature(g, m[:2], v[:2])


def test_moments_flatten_by_name_with_or_without_adapter_name() -> None:
    model = tiny_lora_model()
    slots = lora_slots(model)
    full = {slot.name: torch.full(slot.shape, float(i)) for i, slot in enumerate(slots)}
    short = {name.replace(".default.", "."): value for name, value in full.items()}
    flat = flatten_named(full, slots, "exp_avg")
    torch.testing.assert_close(flat, flatten_named(short, slots, "exp_avg"))
    assert flat[slots[1].offset].item() == 1.0
    moments = AdamMoments.from_named(full, full, slots)
    assert moments.transform(torch.zeros(2, flat.numel())).shape == (2, flat.numel())
    del full[slots[0].name]
    with pytest.raises(ValueError, match="lacks 1 LoRA"):
        flatten_named(full, slots, "exp_avg")
