"""CUDA checks of the gradient datastore; skipped where no GPU is present (CI has none).

Run on a GPU machine with ``python -m pytest -m gpu tests/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selection.data.tokenization import collate
from selection.influence.datastore import FeatureStore, compute_features
from selection.influence.gradients import PerExampleGradients
from selection.influence.projection import make_projector
from tests.test_gradients import random_examples, tiny_lora_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def full_fp32_matmuls():
    """TF32 would change fp32 results at the 1e-3 level; the reference bar is 1e-4."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_cuda_batched_gradients_match_naive_reference_on_cuda() -> None:
    model = tiny_lora_model().cuda().eval()  # no LoRA dropout in the reference either
    examples = random_examples([9, 23, 5, 17, 23, 12])
    batched = PerExampleGradients(model)(collate(examples, pad_token_id=2))
    assert batched.device.type == "cuda"
    for row, example in enumerate(examples):
        model.zero_grad(set_to_none=True)
        output = model(
            input_ids=torch.tensor([example.input_ids], device="cuda"),
            labels=torch.tensor([example.labels], device="cuda"),
        )
        output.loss.backward()
        reference = torch.cat([p.grad.reshape(-1) for _, p in model.named_parameters() if p.requires_grad])
        relative = (batched[row] - reference).norm() / reference.norm()
        assert relative < 1e-4, (row, relative.item())


def test_cuda_gradients_match_cpu_gradients() -> None:
    examples = random_examples([31, 7, 19, 31])
    cpu = PerExampleGradients(tiny_lora_model())(collate(examples, pad_token_id=2))
    cuda = PerExampleGradients(tiny_lora_model().cuda())(collate(examples, pad_token_id=2)).cpu()
    relative = (cuda - cpu).norm(dim=1) / cpu.norm(dim=1)
    assert float(relative.max()) < 1e-4


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_cuda_projection_is_the_cpu_matrix(mode: str) -> None:
    """Matrices are generated from the seed on the CPU, so both devices project identically."""
    grads = torch.randn(5, 3000, generator=torch.Generator().manual_seed(0))
    cpu = make_projector(mode, 3000, 256, seed=3, names_hash="h").project(grads)
    cuda = make_projector(mode, 3000, 256, seed=3, names_hash="h", device="cuda").project(grads.cuda()).cpu()
    assert torch.allclose(cpu, cuda, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_cuda_features_are_reproducible_bytes_and_close_to_cpu(tmp_path, mode: str) -> None:
    examples = list(zip([f"e{i}" for i in range(10)], random_examples([12, 30, 8, 21, 30, 16, 9, 27, 14, 5], seed=4)))

    def fill(device: str, tag: str) -> np.ndarray:
        model = tiny_lora_model().to(device)
        engine = PerExampleGradients(model)
        projector = make_projector(mode, engine.dim, 64, seed=1, names_hash=engine.names_hash, device=device)
        store = FeatureStore(tmp_path / tag, "tiny", "ckpt", "target", projector, chunk_size=4)
        compute_features(model, examples, projector, store, pad_token_id=2, max_batch_size=3)
        return store.features()

    first, second, cpu = fill("cuda", "a"), fill("cuda", "b"), fill("cpu", "c")
    assert first.tobytes() == second.tobytes(), "same device type must give the same bytes"
    assert np.abs(first.astype(np.float32) - cpu.astype(np.float32)).max() < 2e-3  # fp16 rounding
