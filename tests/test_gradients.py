"""Batched per-example LoRA gradients against a one-example-at-a-time autograd reference."""

from __future__ import annotations

import pytest
import torch

from selection.data.tokenization import IGNORE_INDEX, TokenizedExample, collate
from selection.influence.gradients import (
    DEFAULT_TRAIN_TRANSFORM,
    TRAIN_TRANSFORMS,
    AdamMoments,
    PerExampleGradients,
    adam_bias_corrected_feature,
    adam_feature,
    adam_no_momentum_feature,
    flatten_named,
    lora_slots,
    loss_chunk_positions,
    sum_of_example_losses,
    train_feature,
)
from selection.influence.recipes import transform_why
from selection.train.models import ModelSpec, add_lora, build_tiny_llama

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


def sequence_examples(lengths: list[int], seed: int = 0) -> list[TokenizedExample]:
    """Whole-sequence loss: every token but the first is a target."""
    return [TokenizedExample(e.input_ids, list(e.input_ids), False, len(e) - 1) for e in random_examples(lengths, seed)]


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_linear_cross_entropy_equals_plain_autograd(chunk: int, softcap: float | None) -> None:
    model = tiny_lora_model()
    model.get_base_model().config.final_logit_softcapping = softcap
    batch = collate(sequence_examples([9, 23, 5, 17]), pad_token_id=2)
    plain = PerExampleGradients(model, loss_chunk_positions=None)(batch)
    chunked = PerExampleGradients(model, loss_chunk_positions=chunk)(batch)
    relative = ((chunked - plain).norm(dim=1) / plain.norm(dim=1)).max().item()
    assert relative < 1e-6, relative
    model.eval()  # LoRA dropout off, as in the engine
    with torch.no_grad():
        plain_loss = sum_of_example_losses(model, batch, None)
        chunked_loss = sum_of_example_losses(model, batch, chunk)
    assert torch.allclose(chunked_loss, plain_loss, rtol=1e-6), (chunked_loss, plain_loss)


def test_chunked_loss_never_holds_more_than_a_chunk_of_logits(monkeypatch) -> None:
    """Peak logits are O(chunk x vocab), not O(positions x vocab): every lm_head call is one chunk."""
    from selection.influence import gradients

    model = tiny_lora_model()
    batch = collate(sequence_examples([40, 33, 28]), pad_token_id=2)
    widest: list[int] = []
    real_linear = gradients.F.linear

    def recording_linear(inputs, weight, bias=None):
        out = real_linear(inputs, weight, bias)
        if weight.shape[0] == model.get_base_model().config.vocab_size:
            widest.append(out.shape[0])
        return out

    monkeypatch.setattr(gradients.F, "linear", recording_linear)
    PerExampleGradients(model, loss_chunk_positions=16)(batch)
    assert widest and max(widest) <= 16 and sum(widest) == 40 + 33 + 28 - 3
    assert loss_chunk_positions(49152) == 1365 and loss_chunk_positions(128256) == 523


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


G = torch.tensor([[0.5, -2.0, 0.0], [0.01, 0.0, 1.0]])
M = torch.tensor([0.1, 0.2, -0.3])
V = torch.tensor([0.01, 0.0, 0.04])


def test_adam_no_momentum_is_the_gradient_over_adams_updated_root() -> None:
    feature = adam_no_momentum_feature(G, V)
    # By hand, row 0: v' = 0.999 v + 0.001 g^2 = [0.01024, 0.004, 0.03996]; g / sqrt(v' + 1e-8).
    expected0 = torch.tensor([0.5 / (0.01024 + 1e-8) ** 0.5, -2.0 / (0.004 + 1e-8) ** 0.5, 0.0])
    torch.testing.assert_close(feature[0], expected0)
    torch.testing.assert_close(feature, G / torch.sqrt(0.999 * V + 0.001 * G**2 + 1e-8))
    # The shared momentum is gone: the feature of a zero gradient is zero whatever m is.
    assert train_feature("adam_no_momentum", torch.zeros(1, 3), M, V).abs().max() == 0
    assert train_feature("adam", torch.zeros(1, 3), M, V).abs().max() > 0
    with pytest.raises(ValueError, match="shape mismatch"):
        adam_no_momentum_feature(G, V[:2])


def test_adam_bias_corrected_divides_the_moments_by_the_next_steps_corrections() -> None:
    feature = adam_bias_corrected_feature(G, M, V, step=4)
    # The hypothetical step is the 5th: m' / (1 - 0.9^5), v' / (1 - 0.999^5).
    m_hat = (0.9 * M + 0.1 * G) / (1 - 0.9**5)
    v_hat = (0.999 * V + 0.001 * G**2) / (1 - 0.999**5)
    torch.testing.assert_close(feature, m_hat / torch.sqrt(v_hat + 1e-8))
    assert abs(float(1 - 0.9**5) - 0.40951) < 1e-6  # the hand figure behind the line above
    with pytest.raises(ValueError, match="step"):
        adam_bias_corrected_feature(G, M, V, step=-1)


def test_train_feature_dispatches_every_transform() -> None:
    torch.testing.assert_close(train_feature("adam", G, M, V), adam_feature(G, M, V))
    torch.testing.assert_close(train_feature("sgd", G, M, V), G)
    torch.testing.assert_close(
        train_feature("adam_bias_corrected", G, M, V, step=2), adam_bias_corrected_feature(G, M, V, 2)
    )
    with pytest.raises(ValueError, match="step count"):
        train_feature("adam_bias_corrected", G, M, V)
    with pytest.raises(ValueError, match="unknown train transform"):
        train_feature("adamw", G, M, V)
    moments = AdamMoments(M, V, step=2)
    for name in TRAIN_TRANSFORMS:
        torch.testing.assert_close(moments.transform(G, name), train_feature(name, G, M, V, 2))
    torch.testing.assert_close(moments.transform(G), adam_feature(G, M, V))  # the literal LESS step by default
    # A default other than LESS's own says why.
    assert transform_why("adam", "sequence", 8) == ""
    assert all(transform_why(t, "sequence", 8) for t in TRAIN_TRANSFORMS if t != "adam")
    # The measured default (planted recall with sequence loss and 8 directions removed: sgd 7.3x, adam 3.3x).
    assert DEFAULT_TRAIN_TRANSFORM == "sgd" and "7.33x" in transform_why("sgd", "sequence", 8)


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
