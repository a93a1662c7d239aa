"""Paper-scale gradient datastore on one GPU: a random-weight Llama-2-7B architecture.

Runs with torch + transformers + peft + numpy and the repository only (no model files, no
tokenizer, no registry): LlamaConfig hidden 4096, 32 layers, 32 heads, intermediate 11008,
built in bfloat16 on the GPU with random weights (same shapes and cost as the real model);
vocab 49152, the default tokenizer's (SmolLM2), because the examples are its token ids.
LoRA r=128 on q/k/v/o (134M fp32 dims), gradient checkpointing, 8192 projection dims.
Examples: ``bench/gpu_scale_examples.npz``, 256 default-pool examples tokenized up to 2048
tokens on a CPU machine (``--write-examples``).

Reports, for one checkpoint's pass over the examples with each projection of ``--modes``
(``device`` then ``fast``, the default mode) and the pipeline's default feature recipe
(whole-sequence loss, ``sgd`` features), then with LESS's loss and transform (response-only
loss, ``adam``) in the first mode: examples/s of the pipeline's own ``compute_features``
(batches planned by ``selection.common.memory`` from the GPU memory free once the projector is
built, out-of-memory halving, chunked loss, fp16 chunks), the projector's build time, the time
of a forward+backward of the summed loss over the same batches and loss positions (the floor,
per loss kind), peak GPU memory, and the fidelity of ``device`` and ``fast`` vs ``exact`` on a
sample.
``exact`` generates its dense matrix on the CPU, dims x 8192 entries (4.4 TB at 7B), so it is
feasible only on a slice: fidelity projects the first ``--slice-dims`` coordinates of the flat
gradient layout (layer 0's LoRA weights) of ``--fidelity-sample`` examples with exact seeds 0
and 1, device and fast, and compares target scores (the last 8 examples of the sample are the
targets). Ends with one JSON line.

``--tiny`` runs the same code on a tiny config on the CPU (a check that the script works).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from gradients import POOL_SOURCES, spearman, sync, top_overlap

from selection.common import memory
from selection.data.tokenization import (
    IGNORE_INDEX,
    LESS_LOSS_TOKENS,
    TokenizedExample,
    collate,
    length_sorted_batches,
    with_loss_on,
)
from selection.influence.datastore import FeatureStore, compute_features
from selection.influence.gradients import (
    DEFAULT_LOSS_TOKENS,
    DEFAULT_TRAIN_TRANSFORM,
    LITERAL_LESS_TRANSFORM,
    PerExampleGradients,
    sum_of_example_losses,
)
from selection.influence.projection import make_projector
from selection.train.models import ModelSpec, add_lora

EXAMPLES_FILE = Path(__file__).with_name("gpu_scale_examples.npz")
# (loss tokens, train transform): the pipeline's default features and LESS's (its exact projection
# does not fit at 7B; the projection is the pass's mode).
RECIPES = {
    "default": (DEFAULT_LOSS_TOKENS, DEFAULT_TRAIN_TRANSFORM),
    "less-paper": (LESS_LOSS_TOKENS, LITERAL_LESS_TRANSFORM),
}
LLAMA_7B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "intermediate_size": 11008,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
}


def write_examples(path: Path, count: int, max_length: int) -> None:
    """Tokenize ``count`` default-pool examples (round robin over sources) with the default tokenizer."""
    from resources.settings import default_home
    from selection.data.default_data import pool_side
    from selection.data.tokenization import tokenize_conversation
    from selection.train.models import default_model_spec, load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer(default_model_spec(), cache_dir=Path(default_home()) / "models")
    iterators = [iter(pool_side(source)) for source in POOL_SOURCES]
    chosen: list[TokenizedExample] = []
    while len(chosen) < count:
        for iterator in iterators:
            item = next(iterator)
            example = tokenize_conversation(tokenizer, item.messages, max_length)
            if example.n_target_tokens > 0 and len(chosen) < count:
                chosen.append(example)
    ids = np.concatenate([np.asarray(e.input_ids, np.int32) for e in chosen])
    target = np.concatenate([np.asarray(e.labels) != IGNORE_INDEX for e in chosen])
    offsets = np.cumsum([0] + [len(e.input_ids) for e in chosen]).astype(np.int64)
    np.savez_compressed(
        path,
        input_ids=ids,
        is_target=target,
        offsets=offsets,
        pad_token_id=np.int64(tokenizer.pad_token_id),
        vocab_size=np.int64(len(tokenizer)),
    )


def read_examples(path: Path, count: int, max_tokens: int) -> tuple[list[TokenizedExample], int, int]:
    data = np.load(path)
    offsets, examples = data["offsets"], []
    for start, stop in itertools.pairwise(offsets):
        stop = min(stop, start + max_tokens)
        ids = data["input_ids"][start:stop].tolist()
        labels = [i if t else IGNORE_INDEX for i, t in zip(ids, data["is_target"][start:stop])]
        n_target = sum(label != IGNORE_INDEX for label in labels[1:])
        if n_target:
            examples.append(TokenizedExample(ids, labels, False, n_target))
    return examples, int(data["pad_token_id"]), int(data["vocab_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU: checks that the script works")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-examples", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--projection-dtype", default="bfloat16", help="device projection compute dtype")
    parser.add_argument(
        "--modes",
        type=lambda text: text.split(","),
        default=["device", "fast"],
        help="projection modes timed over the examples, comma-separated; the first gives the headline figures",
    )
    parser.add_argument("--fidelity-sample", type=int, default=64)
    parser.add_argument("--slice-dims", type=int, default=2**18)
    parser.add_argument("--write-examples", action="store_true", help=f"(CPU machine) write {EXAMPLES_FILE.name}")
    args = parser.parse_args()
    if args.write_examples:
        write_examples(EXAMPLES_FILE, args.n_examples, args.max_tokens)
        print(json.dumps({"wrote": str(EXAMPLES_FILE), "bytes": EXAMPLES_FILE.stat().st_size}))
        return
    if args.tiny:
        args.device, args.n_examples, args.max_tokens, args.dim = "cpu", 16, 128, 256
        args.fidelity_sample, args.projection_dtype = 16, "float32"
    device = torch.device(args.device)
    examples, pad, vocab = read_examples(EXAMPLES_FILE, args.n_examples, args.max_tokens)
    from transformers import LlamaConfig, LlamaForCausalLM

    started = time.perf_counter()
    config = LlamaConfig(**(TINY if args.tiny else LLAMA_7B), vocab_size=vocab, max_position_embeddings=4096)
    torch.manual_seed(0)
    with device:
        base = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    spec = ModelSpec(
        name="llama2-7b-random",
        source="random",
        dtype="bfloat16",
        max_length=args.max_tokens,
        gradient_checkpointing=True,
    )
    model = add_lora(base, spec)
    engine = PerExampleGradients(model)
    sync(device)
    result = {
        "bench": "gpu_scale",
        "tiny": args.tiny,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "config": {**(TINY if args.tiny else LLAMA_7B), "vocab": vocab},
        "lora_r": spec.lora_r,
        "lora_dims": engine.dim,
        "n_examples": len(examples),
        "tokens": sum(len(e.input_ids) for e in examples),
        "max_tokens": max(len(e.input_ids) for e in examples),
        "dim": args.dim,
        "build_seconds": round(time.perf_counter() - started, 1),
    }
    budget = memory.free_bytes(device)
    estimate = memory.gradient_memory(model, engine.dim)
    batches = length_sorted_batches(examples, 256, None, estimate.max_rows(budget // 2))
    result.update(budget_gb=round(budget / 2**30, 1), batch_sizes=[len(b) for b in batches][:12])
    # Random moments stand in for a warmup checkpoint's: the Adam transform's cost is what matters.
    names = engine.names
    moments = {name: torch.rand(slot.shape, device=device) * 1e-3 for name, slot in zip(names, engine.slots)}
    moments_sq = {name: torch.rand(slot.shape, device=device) * 1e-6 for name, slot in zip(names, engine.slots)}
    by_loss = {loss: [with_loss_on(e, loss) for e in examples] for loss, _ in RECIPES.values()}
    passes = [(mode, "default") for mode in args.modes] + [(args.modes[0], "less-paper")]
    by_pass = {}
    for mode, recipe in passes:
        loss, transform = RECIPES[recipe]
        figures = datastore_pass(
            mode, model, engine, by_loss[loss], pad, device, args, moments, moments_sq, transform, loss
        )
        by_pass[f"{mode}/{recipe}"] = {"loss_tokens": loss, "transform": transform, **figures}
    # The floor per loss kind: forward + backward of the summed loss over the same planned batches.
    floors = {}
    for loss, rows_of_loss in by_loss.items():
        sync(device)
        tick = time.perf_counter()
        with torch.enable_grad():
            for rows in batches:
                batch = {k: v.to(device) for k, v in collate([rows_of_loss[r] for r in rows], pad).items()}
                model.zero_grad(set_to_none=True)
                sum_of_example_losses(model, batch).backward()
        model.zero_grad(set_to_none=True)
        sync(device)
        floors[loss] = time.perf_counter() - tick
    for figures in by_pass.values():
        figures["over_floor"] = round(figures["seconds"] / floors[figures["loss_tokens"]], 2)
    first = by_pass[f"{args.modes[0]}/default"]  # the headline figures: the first mode, default recipe
    result.update(
        projection_mode=args.modes[0],
        recipe="default",
        examples_per_s=first["examples_per_s"],
        ours_seconds=first["seconds"],
        floor_seconds=round(floors[DEFAULT_LOSS_TOKENS], 1),
        floor_seconds_by_loss={loss: round(seconds, 1) for loss, seconds in floors.items()},
        ours_over_floor=first["over_floor"],
        oom_retries=first["oom_retries"],
        peak_gpu_gb=first["peak_gpu_gb"],
        by_mode={key.split("/")[0]: figures for key, figures in by_pass.items() if key.endswith("/default")},
        by_pass=by_pass,
    )
    result["fidelity"] = fidelity(engine, examples[: args.fidelity_sample], pad, device, args)
    result["total_seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


def projector_options(mode: str, args: argparse.Namespace) -> dict:
    """Per-mode projector options: no dense-matrix cache for exact (it would not fit at 7B), the compute dtype
    for device."""
    return {"exact": {"cache_bytes": 0}, "device": {"dtype": args.projection_dtype}}.get(mode, {})


def datastore_pass(
    mode: str,
    model: torch.nn.Module,
    engine: PerExampleGradients,
    examples: list[TokenizedExample],
    pad: int,
    device: torch.device,
    args: argparse.Namespace,
    moments: dict[str, torch.Tensor],
    moments_sq: dict[str, torch.Tensor],
    transform: str = DEFAULT_TRAIN_TRANSFORM,
    loss_tokens: str = DEFAULT_LOSS_TOKENS,
) -> dict:
    """One checkpoint's pass of ``compute_features`` with projection ``mode`` and a feature recipe
    (``examples`` already labelled for ``loss_tokens``): its time, memory and retries."""
    sync(device)
    tick = time.perf_counter()
    projector = make_projector(
        mode, engine.dim, args.dim, 0, engine.names_hash, device, **projector_options(mode, args)
    )
    sync(device)
    build = time.perf_counter() - tick
    budget = memory.free_bytes(device)  # after the projector: fast's index takes GPU memory
    logged: list[str] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore(
            Path(tmp) / "store",
            "llama2-7b-random",
            "random",
            "train",
            projector,
            chunk_size=len(examples),
            transform=transform,
            loss_tokens=loss_tokens,
        )
        sync(device)
        tick = time.perf_counter()
        compute_features(
            model,
            [(str(i), e) for i, e in enumerate(examples)],
            projector,
            store,
            exp_avg=moments,
            exp_avg_sq=moments_sq,
            pad_token_id=pad,
            max_batch_size=256,
            memory_budget_bytes=budget,
            oom_log=logged.append,
        )
        sync(device)
        seconds = time.perf_counter() - tick
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    del projector, store  # the store holds the projector too: both go before the next mode's budget
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "examples_per_s": round(len(examples) / seconds, 2),
        "seconds": round(seconds, 1),
        "projector_build_seconds": round(build, 1),
        "oom_retries": logged,
        "peak_gpu_gb": None if peak is None else round(peak / 2**30, 1),
    }


def fidelity(
    engine: PerExampleGradients,
    sample: list[TokenizedExample],
    pad: int,
    device: torch.device,
    args: argparse.Namespace,
) -> dict:
    """device vs exact on the first ``slice_dims`` coordinates of the flat layout (see the docstring)."""
    width = min(args.slice_dims, engine.dim)
    grads = torch.cat(
        [engine(collate([sample[r] for r in rows], pad))[:, :width] for rows in length_sorted_batches(sample, 4)]
    )
    order = [r for rows in length_sorted_batches(sample, 4) for r in rows]
    grads = grads[torch.argsort(torch.tensor(order, device=grads.device))]
    n_targets = min(8, len(sample) // 2)
    scores, seconds = {}, {}
    for mode, seed in (("exact", 0), ("exact", 1), ("device", 0), ("fast", 0)):
        projector = make_projector(mode, width, args.dim, seed, "slice", device, **projector_options(mode, args))
        sync(device)
        tick = time.perf_counter()
        features = torch.nn.functional.normalize(projector.project(grads), dim=1).cpu().numpy()
        sync(device)
        seconds[f"{mode}{seed}"] = round(time.perf_counter() - tick, 1)
        train, targets = features[:-n_targets], features[-n_targets:]
        scores[f"{mode}{seed}"] = (train @ targets.T).mean(axis=1)
    return {
        "slice_dims": width,
        "n_train": len(sample) - n_targets,
        "n_targets": n_targets,
        "device_vs_exact_spearman": spearman(scores["device0"], scores["exact0"]),
        "device_vs_exact_overlap": top_overlap(scores["device0"], scores["exact0"]),
        "fast_vs_exact_spearman": spearman(scores["fast0"], scores["exact0"]),
        "fast_vs_exact_overlap": top_overlap(scores["fast0"], scores["exact0"]),
        "exact_vs_exact_spearman": spearman(scores["exact1"], scores["exact0"]),
        "exact_vs_exact_overlap": top_overlap(scores["exact1"], scores["exact0"]),
        "projection_seconds": seconds,
    }


if __name__ == "__main__":
    main()
