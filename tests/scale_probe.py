"""Subprocess of tests/test_scale.py: a scaled-down random Llama at paper settings, with peak RSS.

Run as ``python tests/scale_probe.py BUDGET_MB [DTYPE] [LOSS]`` (base weights' dtype, default
bfloat16; LOSS ``response``, the default, or ``sequence``: every token a target); prints one
JSON line. It runs in its own process so that the peak RSS (VmHWM, reset through /proc/self/clear_refs) belongs to the
measured step alone.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selection.common import memory
from selection.data.tokenization import TokenizedExample, collate, length_sorted_batches
from selection.influence.gradients import AdamMoments, PerExampleGradients
from selection.influence.projection import make_projector
from selection.train.models import ModelSpec, add_lora


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak() -> float:
    """Collect garbage, reset the RSS high-water mark, return the current RSS (MB)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return status_mb("VmRSS")


def examples(lengths: list[int], vocab: int, loss: str = "response") -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(0)
    out = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        # response: the first third is prompt (no loss), the rest the response; sequence: every token.
        prompt = length // 3 if loss == "response" else 0
        out.append(TokenizedExample(ids, [-100] * prompt + ids[prompt:], False, length - max(prompt, 1)))
    return out


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    budget = int(float(sys.argv[1]) * 2**20)
    dtype = sys.argv[2] if len(sys.argv) > 2 else "bfloat16"
    loss = sys.argv[3] if len(sys.argv) > 3 else "response"
    torch.set_num_threads(2)
    config = LlamaConfig(
        hidden_size=1024,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=2816,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    base = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
    spec = ModelSpec(
        name="scale-probe", source="random", dtype=dtype, lora_r=128, lora_alpha=512, gradient_checkpointing=True
    )
    model = add_lora(base, spec)
    engine = PerExampleGradients(model)
    result = {
        "lora_dims": engine.dim,
        "base_dtypes": sorted({str(p.dtype) for p in model.parameters() if not p.requires_grad}),
        "lora_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "checkpointing": bool(model.get_base_model().is_gradient_checkpointing),
        "loss": loss,
    }
    # Moments of a one-step warmup stand-in: the Adam transform's working copies are part of the peak.
    moments = AdamMoments(torch.rand(engine.dim) * 1e-3, torch.rand(engine.dim) * 1e-6)
    pool = examples([384, 360, 320, 300, 256, 200, 128, 64], config.vocab_size, loss)
    estimate = memory.gradient_memory(model, engine.dim)
    batches = length_sorted_batches(pool, max_batch_size=64, max_rows=estimate.max_rows(budget))
    engine(collate(pool[-1:], 2))  # one small batch first: lazy initialization is not the step's memory

    # 1. The first (largest) memory-planned batch: measured peak vs the estimate.
    rows = batches[0]
    baseline = reset_peak()
    started = time.perf_counter()
    features = moments.transform(engine(collate([pool[r] for r in rows], 2)))
    result["batch_seconds"] = time.perf_counter() - started
    peak = status_mb("VmHWM") - baseline
    longest = max(len(pool[r].input_ids) for r in rows)
    result.update(
        batches=[len(b) for b in batches],
        budget_mb=budget / 2**20,
        batch_rows=len(rows),
        batch_tokens=longest,
        peak_mb=peak,
        estimate_mb=estimate.batch_bytes(len(rows), longest) / 2**20,
        finite=bool(torch.isfinite(features).all()),
        feature_dtype=str(features.dtype),
    )

    # 2. The projection at millions of input dims keeps O(block x dim) memory.
    projector = make_projector("device", engine.dim, 256, seed=0)
    baseline = reset_peak()
    started = time.perf_counter()
    projected = projector.project(features)
    result["projection_seconds"] = time.perf_counter() - started
    result["projection_peak_mb"] = status_mb("VmHWM") - baseline
    result["projection_block_mb"] = projector.block_rows * projector.dim * 4 / 2**20
    result["dense_matrix_mb"] = engine.dim * projector.dim * 4 / 2**20
    # JL: norms are kept within a few sqrt(2/dim) (9% at 256 dims).
    result["projected_norm_ratio"] = (projected.norm(dim=1) / features.norm(dim=1)).tolist()
    del features

    # 3. A simulated out-of-memory above 2 rows: the batch is halved and the result is unchanged.
    small = pool[-4:]
    direct = engine(collate(small, 2))

    def step(rows: list[int]) -> torch.Tensor:
        if len(rows) > 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return engine(collate([small[r] for r in rows], 2))

    logged: list[str] = []
    retried = list(memory.run_halving_on_oom([list(range(len(small)))], step, logged.append))
    result["oom_batches"] = [rows for rows, _ in retried]
    result["oom_logged"] = logged
    # bf16 base weights: another batch size rounds differently, so compare relative to the gradient's scale.
    result["oom_relative_diff"] = float((torch.cat([g for _, g in retried]) - direct).abs().max() / direct.abs().max())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
