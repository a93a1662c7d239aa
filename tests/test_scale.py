"""Paper-scale path on the CPU: a scaled-down random Llama (hidden 1024, 8 layers, vocab 32000)
with bf16 weights (fp32 on a CPU without bf16 instructions, where bf16 matmuls are ~100x
slower), fp32 LoRA r=128 on q/k/v/o (8.4M dims), gradient checkpointing, batches planned
by the memory estimate, a simulated out-of-memory retry, and the `device` projection of 8.4M dims.
The measurement runs in a subprocess (tests/scale_probe.py) so its peak RSS is its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import torch

from resources.model_store import DEVICE_TAG, DeviceSettings
from selection.train.models import SLOW_CPU_DTYPE_RATIO, cpu_matmul_slowdown

PROBE = Path(__file__).with_name("scale_probe.py")


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["response", "sequence"])
def test_scaled_down_llama_peak_memory_matches_the_estimate(loss: str) -> None:
    budget_mb = 1200
    # bf16 base weights where the CPU computes them natively; fp32 otherwise (same estimate, 2x the bytes).
    dtype = "bfloat16" if cpu_matmul_slowdown(torch.bfloat16) <= SLOW_CPU_DTYPE_RATIO else "float32"
    done = subprocess.run(
        [sys.executable, str(PROBE), str(budget_mb), dtype, loss], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(json.dumps(result))  # the measured figures, with -s
    assert result["lora_dims"] == 8 * 4 * 2 * 128 * 1024
    assert result["base_dtypes"] == [f"torch.{dtype}"] and result["lora_dtypes"] == ["torch.float32"]
    assert result["checkpointing"] and result["feature_dtype"] == "torch.float32" and result["finite"]
    assert result["loss"] == loss
    # The planner filled the budget with the longest rows first; the measured peak is the estimate's +-25%.
    assert result["batch_rows"] >= 2 and result["estimate_mb"] <= budget_mb
    assert abs(result["peak_mb"] / result["estimate_mb"] - 1) <= 0.25, result
    # O(block x dim) memory, never the dense matrix.
    assert result["projection_peak_mb"] < 3 * result["projection_block_mb"] < result["dense_matrix_mb"] / 10
    assert all(abs(ratio - 1) < 0.3 for ratio in result["projected_norm_ratio"])
    assert result["oom_batches"] == [[0, 1], [2, 3]] and "retrying in batches of at most 2" in result["oom_logged"][0]
    assert result["oom_relative_diff"] < 0.05


def test_bf16_base_fp32_lora_and_checkpointing_keep_per_example_gradients() -> None:
    import torch

    from selection.data.tokenization import collate
    from selection.influence.gradients import PerExampleGradients
    from selection.train.models import ModelSpec, add_lora, build_tiny_llama
    from tests.test_gradients import random_examples

    batch = collate(random_examples([9, 14, 6]), pad_token_id=2)
    spec = ModelSpec(name="tiny", source="random", dtype="bfloat16", lora_r=4, lora_alpha=8)
    plain = add_lora(build_tiny_llama().to(torch.bfloat16), spec)
    checkpointed = add_lora(
        build_tiny_llama().to(torch.bfloat16), ModelSpec(**{**spec.to_dict(), "gradient_checkpointing": True})
    )
    checkpointed.train()  # e.g. right after warmup: the engine must still run without dropout
    assert checkpointed.get_base_model().is_gradient_checkpointing
    assert {p.dtype for p in checkpointed.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in checkpointed.parameters() if not p.requires_grad} == {torch.bfloat16}
    expected = PerExampleGradients(plain)(batch)
    assert expected.dtype == torch.float32 and float(expected.abs().max()) > 0
    assert torch.equal(PerExampleGradients(checkpointed)(batch), expected)
    # Checkpointing changes memory, not results: it is recorded but not fingerprinted.
    assert spec.fingerprint() == ModelSpec(**{**spec.to_dict(), "gradient_checkpointing": True}).fingerprint()


def test_run_tag_picks_the_device_of_one_run() -> None:
    @dg.asset
    def chosen(device: DeviceSettings) -> str:
        return device.resolve()

    tagged = dg.materialize([chosen], resources={"device": DeviceSettings(device="cuda:7")}, tags={DEVICE_TAG: "cpu"})
    assert tagged.output_for_node("chosen") == "cpu"
    bad = dg.materialize(
        [chosen], resources={"device": DeviceSettings(device="cpu")}, tags={DEVICE_TAG: "gpu9"}, raise_on_error=False
    )
    assert not bad.success
