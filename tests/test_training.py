from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import get_linear_schedule_with_warmup

from selection.data.tokenization import tokenize_many
from selection.train.models import ModelSpec, add_lora, build_tiny_llama, trainable_parameter_names
from selection.train.training import (
    TrainingConfig,
    TrainingProgress,
    complete_epochs,
    linear_warmup_lr,
    load_checkpoint,
    train_lora,
)
from tests.conftest import CHATML_TEMPLATE, make_tiny_tokenizer

SPEC = ModelSpec(name="tiny", source="unused", lora_r=4, lora_alpha=8, lora_dropout=0.1)
CONFIG = TrainingConfig(epochs=3, learning_rate=1e-2, warmup_ratio=0.1, batch_size=4, micro_batch_size=4, seed=7)


@pytest.fixture
def tokenizer():
    return make_tiny_tokenizer(chat_template=CHATML_TEMPLATE)


@pytest.fixture
def examples(tokenizer):
    conversations = [
        [{"role": "user", "content": f"q{i} " * (i % 4 + 1)}, {"role": "assistant", "content": f"a{i}" * (i % 3 + 1)}]
        for i in range(10)
    ]
    tokenized, stats = tokenize_many(tokenizer, conversations, max_length=64)
    assert stats.n_no_target == 0
    return tokenized


def fresh_model(tokenizer, spec: ModelSpec = SPEC):
    return add_lora(build_tiny_llama(seed=1, vocab_size=len(tokenizer)), spec, seed=2)


def test_saves_moments_keyed_by_trainable_names_and_linear_avg_lr(tokenizer, examples, tmp_path):
    model = fresh_model(tokenizer)
    events: list[TrainingProgress] = []
    result = train_lora(model, examples, CONFIG, tmp_path, tokenizer.pad_token_id, progress_cb=events.append)
    assert complete_epochs(tmp_path) == [1, 2, 3]
    assert [e.step for e in events] == list(range(1, 10)) and events[-1].total_steps == 9

    names = trainable_parameter_names(model)
    shapes = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    # 10 examples / batch 4 -> 3 steps per epoch, 9 total, ceil(0.1 * 9) = 1 warmup step.
    reference = get_linear_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2), num_warmup_steps=1, num_training_steps=9
    )
    hf_lrs = []
    for _ in range(9):
        hf_lrs.append(reference.get_last_lr()[0])
        reference.optimizer.step()
        reference.step()
    expected_epoch_lrs = [
        1e-2 * sum(factors) / 3 for factors in ([0, 1, 7 / 8], [6 / 8, 5 / 8, 4 / 8], [3 / 8, 2 / 8, 1 / 8])
    ]
    for epoch, checkpoint in enumerate(result.checkpoints, start=1):
        adapter_path, exp_avg, exp_avg_sq, avg_lr = load_checkpoint(checkpoint.path, expected_names=names)
        assert (adapter_path / "adapter_model.safetensors").is_file()
        assert list(exp_avg) == sorted(names) or set(exp_avg) == set(names)
        assert all(exp_avg[n].shape == shapes[n] == exp_avg_sq[n].shape for n in names)
        assert all(bool((exp_avg_sq[n] >= 0).all()) for n in names)
        assert avg_lr == pytest.approx(expected_epoch_lrs[epoch - 1], rel=1e-12)
        assert avg_lr == pytest.approx(sum(hf_lrs[(epoch - 1) * 3 : epoch * 3]) / 3, rel=1e-12)
    # The last checkpoint's moments are exactly the optimizer's final state.
    assert any(float(v.abs().sum()) > 0 for v in exp_avg.values())
    assert result.metrics["warmup_steps"] == 1 and result.resumed_from_epoch == 0


def test_resume_after_killed_epoch_matches_uninterrupted_run(tokenizer, examples, tmp_path):
    reference_model = fresh_model(tokenizer)
    train_lora(reference_model, examples, CONFIG, tmp_path / "full", tokenizer.pad_token_id)

    def kill_in_epoch_3(event: TrainingProgress) -> None:
        if event.epoch == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train_lora(
            fresh_model(tokenizer), examples, CONFIG, tmp_path / "killed", tokenizer.pad_token_id, kill_in_epoch_3
        )
    assert complete_epochs(tmp_path / "killed") == [1, 2]
    (tmp_path / "killed" / ".tmp-epoch_3-deadbeef").mkdir()  # a half-written epoch from the kill

    resumed_model = fresh_model(tokenizer)
    result = train_lora(resumed_model, examples, CONFIG, tmp_path / "killed", tokenizer.pad_token_id)
    assert result.resumed_from_epoch == 2 and complete_epochs(tmp_path / "killed") == [1, 2, 3]
    assert not list((tmp_path / "killed").glob(".tmp-*"))
    for (name, expected), (_, actual) in zip(reference_model.named_parameters(), resumed_model.named_parameters()):
        assert torch.equal(expected, actual), name
    for file in ("exp_avg.safetensors", "exp_avg_sq.safetensors", "adapter/adapter_model.safetensors"):
        expected, actual = load_file(tmp_path / "full/epoch_3" / file), load_file(tmp_path / "killed/epoch_3" / file)
        assert all(torch.equal(expected[k], actual[k]) for k in expected), file
    full_info = json.loads((tmp_path / "full/epoch_3/checkpoint.json").read_text())
    resumed_info = json.loads((tmp_path / "killed/epoch_3/checkpoint.json").read_text())
    assert full_info == resumed_info

    # A finished run is not retrained; a different config refuses the folder.
    finished_model = fresh_model(tokenizer)
    again = train_lora(finished_model, examples, CONFIG, tmp_path / "full", tokenizer.pad_token_id)
    assert again.resumed_from_epoch == 3 and len(again.checkpoints) == 3
    for (name, expected), (_, actual) in zip(reference_model.named_parameters(), finished_model.named_parameters()):
        assert torch.equal(expected, actual), name  # the returned model holds the trained adapter
    with pytest.raises(ValueError, match="different run"):
        other = TrainingConfig(epochs=3, learning_rate=2e-2, batch_size=4)
        train_lora(fresh_model(tokenizer), examples, other, tmp_path / "full", tokenizer.pad_token_id)


def test_micro_batch_size_does_not_change_the_math(tokenizer, examples, tmp_path):
    no_dropout = ModelSpec(name="tiny", source="unused", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    trained = []
    for micro in (1, 4):
        model = fresh_model(tokenizer, no_dropout)
        config = TrainingConfig(epochs=1, learning_rate=1e-2, batch_size=4, micro_batch_size=micro)
        train_lora(model, examples, config, tmp_path / f"micro{micro}", tokenizer.pad_token_id)
        trained.append(dict(model.named_parameters()))
    for name, parameter in trained[0].items():
        torch.testing.assert_close(
            parameter, trained[1][name], rtol=1e-4, atol=1e-4
        )  # Adam amplifies rounding where |g| ~ eps


def test_load_checkpoint_validates_moments(tokenizer, examples, tmp_path):
    model = fresh_model(tokenizer)
    train_lora(model, examples, TrainingConfig(epochs=1, batch_size=8), tmp_path, tokenizer.pad_token_id)
    epoch_dir = tmp_path / "epoch_1"
    with pytest.raises(ValueError, match="expected trainable parameters"):
        load_checkpoint(epoch_dir, expected_names=["base_model.model.lm_head.lora_A.default.weight"])
    (epoch_dir / "exp_avg_sq.safetensors").unlink()
    with pytest.raises(ValueError, match="no Adam moments"):
        load_checkpoint(epoch_dir)
    with pytest.raises(ValueError, match="not a training checkpoint"):
        load_checkpoint(tmp_path)


def test_final_finetune_without_moments_and_input_checks(tokenizer, examples, tmp_path):
    model = fresh_model(tokenizer)
    result = train_lora(
        model, examples, TrainingConfig(epochs=1, batch_size=8), tmp_path, tokenizer.pad_token_id, save_moments=False
    )
    assert (result.checkpoints[0].path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="no Adam moments"):
        load_checkpoint(result.checkpoints[0].path)
    no_target = tokenize_many(tokenizer, [[{"role": "user", "content": "hi"}]], max_length=16)[0]
    with pytest.raises(ValueError, match="no target tokens"):
        train_lora(model, no_target, CONFIG, tmp_path / "x", tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="expects a peft model"):
        train_lora(
            build_tiny_llama(vocab_size=len(tokenizer)), examples, CONFIG, tmp_path / "y", tokenizer.pad_token_id
        )
    with pytest.raises(ValueError, match="no trainable parameters"):
        train_lora(model.requires_grad_(False), examples, CONFIG, tmp_path / "z", tokenizer.pad_token_id)


def test_linear_warmup_lr_shape():
    lrs = [linear_warmup_lr(step, total_steps=10, warmup_steps=2, peak_lr=1.0) for step in range(10)]
    assert lrs == pytest.approx([0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
