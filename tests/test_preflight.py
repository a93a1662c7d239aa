"""Fail-early checks: each refuses a bad combination with the fix, and lets a good one through."""

from __future__ import annotations

import re

import pytest

from selection.data.tokenization import tokenize_many
from selection.train import preflight, training
from tests.conftest import CHATML_TEMPLATE, make_tiny_tokenizer


def test_schedule_ahead_matches_what_train_lora_records(tmp_path) -> None:
    from selection.train.models import ModelSpec, add_lora, build_tiny_llama

    tokenizer = make_tiny_tokenizer(chat_template=CHATML_TEMPLATE)
    conversations = [
        [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(5)
    ]
    examples, _ = tokenize_many(tokenizer, conversations, max_length=32)
    config = training.TrainingConfig(epochs=3, learning_rate=1e-3, warmup_ratio=0.2, batch_size=2, micro_batch_size=2)
    model = add_lora(
        build_tiny_llama(seed=0, vocab_size=len(tokenizer)),
        ModelSpec(name="t", source="unused", lora_r=2, lora_alpha=4, lora_dropout=0.0),
    )
    result = training.train_lora(model, examples, config, tmp_path, tokenizer.pad_token_id, save_moments=False)
    ahead = training.epoch_average_lrs(
        len(examples), config.batch_size, config.epochs, config.warmup_ratio, config.learning_rate
    )
    assert [c.avg_lr for c in result.checkpoints] == pytest.approx(ahead, rel=1e-12)
    assert result.metrics["warmup_steps"] == training.lr_schedule(5, 2, 3, 0.2).warmup_steps


@pytest.mark.parametrize("n,batch,epochs,ratio", [(8, 8, 4, 0.03), (1, 8, 2, 0.1), (32, 32, 4, 0.03), (5, 8, 1, 0.5)])
def test_warmup_epoch_with_zero_lr_is_refused_with_working_fixes(n, batch, epochs, ratio) -> None:
    with pytest.raises(ValueError) as caught:
        preflight.check_warmup_schedule(n, batch, epochs, ratio, pool_size=1000)
    message = str(caught.value)
    assert "average learning rate of 0" in message and "[1]" in message
    for field in ("fraction", "warmup_ratio") + (("batch_size",) if n > 1 else ()):
        assert f"`{field}`" in message
    # Every fix offered passes the check.
    need = int(re.search(r"at least (\d+) usable examples", message).group(1))
    preflight.check_warmup_schedule(need, batch, epochs, ratio)
    assert preflight._zero_lr_epochs(need - 1, batch, epochs, ratio)
    if n > 1:
        smaller = int(re.search(r"`batch_size` to (\d+)", message).group(1))
        preflight.check_warmup_schedule(n, smaller, epochs, ratio)
    preflight.check_warmup_schedule(n, batch, epochs, 0.0)
    # More epochs never give a one-step epoch 1 a nonzero lr, so that fix is not offered.
    assert "`epochs`" not in message


def test_valid_warmup_schedules_pass() -> None:
    assert preflight.check_warmup_schedule(9, 8, 4, 0.03)[0] > 0
    assert preflight.check_warmup_schedule(160, 32, 4, 0.03) == pytest.approx(
        training.epoch_average_lrs(160, 32, 4, 0.03)
    )
    assert preflight.check_warmup_schedule(3, 8, 4, 0.0) == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="sample is empty; raise `fraction`"):
        preflight.check_warmup_schedule(0, 8, 4, 0.03)


def test_warmup_field_names_follow_the_caller() -> None:
    fields = {**preflight.WARMUP_FIELDS, "batch_size": "per_step_examples"}
    with pytest.raises(ValueError, match="lower `per_step_examples` to"):
        preflight.check_warmup_schedule(4, 8, 4, 0.03, fields=fields)


def test_budget_above_pool_or_usable_is_refused_with_the_fix() -> None:
    with pytest.raises(
        ValueError,
        match=r"`budget` 11 is above the pool of 10 current examples; lower `budget` "
        r"to at most 8 \(or a fraction <= 0.8\)",
    ):
        preflight.resolve_selection_budget(11, 10, 8)
    with pytest.raises(
        ValueError,
        match=r"asks for 9 examples but only 8 of the 10 current pool examples are scored; "
        r"lower `budget` to at most 8",
    ):
        preflight.resolve_selection_budget(9, 10, 8, "scored")
    with pytest.raises(ValueError, match=r"asks for 9 examples"):
        preflight.resolve_selection_budget(0.9, 10, 8)
    with pytest.raises(ValueError, match="no scored to select from"):
        preflight.resolve_selection_budget(1, 10, 0, "scored")
    assert preflight.resolve_selection_budget(8, 10, 8) == 8
    assert preflight.resolve_selection_budget(0.5, 10, 8) == 5
    assert preflight.resolve_selection_budget(10, 10, 10) == 10


def test_budget_rule_is_stated_right_in_every_refusal() -> None:
    # 1 is a count of one example: no hint offers "a fraction <= 1.0".
    with pytest.raises(ValueError, match=r"at most 10 \(or a fraction below 1: 1 means one example\)"):
        preflight.resolve_selection_budget(1e18, 10, 10)
    # A fraction that selects nothing is not offered: the count only.
    with pytest.raises(ValueError, match=r"lower `budget` to at most 1$"):
        preflight.resolve_selection_budget(5, 999, 1)
    for bad in (float("inf"), float("-inf"), float("nan"), 0, -2, 2.5):
        with pytest.raises(ValueError, match=r"`budget` .*: give a whole count >= 1 \(1 means one example\)"):
            preflight.resolve_selection_budget(bad, 10, 10)
    with pytest.raises(ValueError, match=r"`budget` 0.01 is a fraction of the pool of 10 examples and selects none"):
        preflight.resolve_selection_budget(0.01, 10, 10)
    assert preflight.resolve_selection_budget(1, 10, 10) == 1
    assert preflight.resolve_selection_budget(1.0, 10, 10) == 1
    assert preflight.resolve_selection_budget(0.999, 10, 10) == 9


def test_val_set_without_usable_examples_is_refused() -> None:
    rows = [("code", "a"), ("code", "b"), ("math", "c"), ("mmlu", "d")]
    with pytest.raises(ValueError, match=r"tasks \['code', 'mmlu'\] have no usable val example \(too long; 3 val rows"):
        preflight.check_val_usable(rows, {"c"}, "too long")
    with pytest.raises(ValueError, match="no `val` target rows; materialize target_tasks"):
        preflight.check_val_usable([], set(), "x")
    assert preflight.check_val_usable(rows, {"a", "c", "d"}, "x") == {"code": 1, "math": 1, "mmlu": 1}
