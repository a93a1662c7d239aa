"""Gradient-feature benchmark: the project's pass against the LESS-style loop and the floor, per recipe.

Default (no arguments): SmolLM2-135M-Instruct, LoRA r=8 on q/k/v/o, 32 default-pool examples
of 128-256 tokens, 8192 dims, CPU. Two feature recipes, each measured on the same examples in
one process, with the same tokens and loss positions for every contender:

- ``default``: the pipeline's defaults (whole-sequence loss, ``sgd`` features, ``fast`` projection);
- ``less-paper``: LESS's literal recipe (response-only loss, ``adam`` features, ``exact`` projection).

For each recipe:

(a) LESS-style loop: batch 1, HF loss over the recipe's loss tokens, autograd, flatten the LoRA
    gradient, the recipe's transform, dense Rademacher projection of every 16 examples with
    LESS's CPU projector procedure (TRAK ``BasicProjector``: the grad_dim x 128 matrix of each
    column block regenerated with ``bernoulli_`` on every call). fp32. The projector's cost
    depends only on shapes, so it is timed once (in the ``less-paper`` loop) and the same
    seconds are added to the ``default`` loop (``less_loop_projection_shared``).
(b) ours: ``selection.influence.datastore.compute_features`` with the recipe (batched per-example
    gradients, transform, projection, L2 normalization, fp16 chunks on disk).
(c) floor: forward + backward of the summed loss over the same batches, loss positions and
    loss code (logits only at loss positions, chunked), without per-example gradients: what
    any gradient pass must pay.

(b) and (c) of both recipes are repeated ``--repeats`` times, interleaved; medians are reported.
``sequence_vs_response`` divides the default pass's time by the same pass with response-only
loss (also interleaved). ``spearman_vs_exact`` compares LESS target scores (mean cosine to the
target examples' plain gradients, same loss tokens) from our stored features against the
``exact`` dense projection of the loop's per-example features: the batched pass, the transform
and the projection together against a per-example reference. The Adam moments come from a
few AdamW warmup steps on other pool examples (a stand-in for a warmup checkpoint).

On a GPU (``--device cuda``), the LESS-style loop's projector is generated on the device
(``bernoulli_`` with a CUDA generator, standing in for TRAK's CUDA projector) and
timings synchronize the device. A GPU machine without the model/data packages takes
``--examples-file`` (written here with ``--export-examples``) and ``--random-weights``
with ``--model-config`` (the cached model folder's config.json: same architecture and
cost, random values; fidelity needs the real weights and is measured on the CPU).

``--fidelity`` instead runs an earlier, smaller check: >= 200 pool examples, fast vs
exact (plus exact with another seed as the noise floor of any JL projection), Spearman
and top-5% overlap against a fixed bar (Spearman >= 0.95, overlap >= 0.9). Which mode is
the default is decided by ``bench/projection_fidelity.py`` instead (1,000 examples, the
seed-noise bar).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from selection.data.default_data import pool_side, target_side
from selection.data.tokenization import (
    LESS_LOSS_TOKENS,
    TokenizedExample,
    collate,
    length_sorted_batches,
    tokenize_conversation,
    with_loss_on,
)
from selection.influence.datastore import FeatureStore, compute_features
from selection.influence.gradients import (
    DEFAULT_LOSS_TOKENS,
    DEFAULT_TRAIN_TRANSFORM,
    LITERAL_LESS_TRANSFORM,
    AdamMoments,
    PerExampleGradients,
    sum_of_example_losses,
)
from selection.influence.projection import DEFAULT_MODE, make_projector
from selection.train.models import DEMO_SPEC_OVERRIDES, add_lora, default_model_spec, load_model_and_tokenizer

POOL_SOURCES = ("alpaca_eval", "arena_hard", "mmlu", "humaneval", "champ")


@dataclasses.dataclass(frozen=True)
class Recipe:
    loss_tokens: str
    transform: str
    mode: str


# The pipeline's defaults, and LESS's literal recipe (the paper's loss tokens, transform and projection).
RECIPES = {
    "default": Recipe(DEFAULT_LOSS_TOKENS, DEFAULT_TRAIN_TRANSFORM, DEFAULT_MODE),
    "less-paper": Recipe(LESS_LOSS_TOKENS, LITERAL_LESS_TRANSFORM, "exact"),
}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    """GPU kernels run asynchronously: wait for them before reading a clock."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on(device: torch.device, batch: dict) -> dict:
    return {key: value.to(device) for key, value in batch.items()}


def log(message: str) -> None:
    print(message, flush=True)


def pool_examples(
    tokenizer, count: int, min_tokens: int, max_tokens: int, skip: int = 0
) -> list[tuple[str, TokenizedExample]]:
    """Round-robin over the default pool sources, keeping untruncated examples in range."""
    iterators = [iter(pool_side(source)) for source in POOL_SOURCES]
    chosen: list[tuple[str, TokenizedExample]] = []
    seen = 0
    while len(chosen) < count and iterators:
        for iterator in list(iterators):
            item = next(iterator, None)
            if item is None:
                iterators.remove(iterator)
                continue
            example = tokenize_conversation(tokenizer, item.messages, max_tokens)
            if example.truncated or len(example) < min_tokens or example.n_target_tokens == 0:
                continue
            seen += 1
            if seen > skip and len(chosen) < count:
                chosen.append((item.example_id, example))
    if len(chosen) < count:
        raise ValueError(f"only {len(chosen)} pool examples of {min_tokens}-{max_tokens} tokens; asked for {count}")
    return chosen


def target_examples(tokenizer, count: int, max_tokens: int) -> list[tuple[str, TokenizedExample]]:
    items = list(target_side("mmlu"))[: count * 4]
    tokenized = [(item.example_id, tokenize_conversation(tokenizer, item.messages, max_tokens)) for item in items]
    return [(i, e) for i, e in tokenized if not e.truncated and e.n_target_tokens > 0][:count]


def warmup_moments(model, examples, pad_id: int, steps: int, lr: float, device: torch.device) -> tuple[dict, dict]:
    """AdamW steps (batch = 4, per-example mean losses averaged) -> moments keyed by name."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=0.0)
    model.eval()
    for step in range(steps):
        batch = [e for _, e in examples[step * 4 : step * 4 + 4]]
        optimizer.zero_grad(set_to_none=True)
        (sum_of_example_losses(model, on(device, collate(batch, pad_id))) / len(batch)).backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = optimizer.state
    return ({n: state[p]["exp_avg"].clone() for n, p in named}, {n: state[p]["exp_avg_sq"].clone() for n, p in named})


class TrakBasicProjector:
    """LESS's CPU projector (TRAK BasicProjector, rademacher): regenerates each column
    block's grad_dim x block_size matrix with bernoulli_ on every project() call."""

    def __init__(
        self,
        grad_dim: int,
        proj_dim: int,
        seed: int = 0,
        block_size: int = 128,
        device: torch.device = torch.device("cpu"),
    ) -> None:
        self.grad_dim, self.proj_dim, self.block_size = grad_dim, proj_dim, min(block_size, proj_dim)
        self.device = device
        self.matrix = torch.empty(grad_dim, self.block_size, device=device)
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.states = []
        for _ in range(math.ceil(proj_dim / self.block_size)):
            self.states.append(self.generator.get_state())
            self.generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=self.generator, device=device)))

    def project(self, grads: torch.Tensor) -> torch.Tensor:
        sketch = torch.zeros(grads.shape[0], self.proj_dim, device=self.device)
        for index, state in enumerate(self.states):
            self.generator.set_state(state)
            self.matrix.bernoulli_(p=0.5, generator=self.generator)
            self.matrix *= 2.0
            self.matrix -= 1.0
            start = index * self.block_size
            end = min(start + self.block_size, self.proj_dim)
            sketch[:, start:end] = grads @ self.matrix[:, : end - start]
        return sketch


def less_loop(
    model,
    examples,
    moments: AdamMoments,
    projector,
    project_every: int,
    device: torch.device,
    transform: str = LITERAL_LESS_TRANSFORM,
) -> tuple[float, float, torch.Tensor]:
    """(seconds total, seconds in projection, the ``transform`` features [n, D] before projection);
    ``projector`` None skips the projection (its seconds are then 0)."""
    model.eval()
    sync(device)
    names = [p for _, p in model.named_parameters() if p.requires_grad]
    features, pending = [], []
    projection_seconds = 0.0
    started = time.perf_counter()
    for position, (_, example) in enumerate(examples):
        model.zero_grad(set_to_none=True)
        output = model(
            input_ids=torch.tensor([example.input_ids], device=device),
            labels=torch.tensor([example.labels], device=device),
        )
        output.loss.backward()
        flat = torch.cat([p.grad.reshape(-1) for p in names])
        pending.append(moments.transform(flat[None], transform)[0])
        if len(pending) == project_every or position == len(examples) - 1:
            stacked = torch.stack(pending)
            if projector is not None:
                sync(device)
                project_started = time.perf_counter()
                projector.project(stacked)
                sync(device)
                projection_seconds += time.perf_counter() - project_started
            features.append(stacked)
            pending = []
    model.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - started, projection_seconds, torch.cat(features)


def floor_pass(model, examples, pad_id: int, batch_size: int, device: torch.device) -> float:
    """Forward + backward of the summed per-example losses (the same loss positions and loss code
    as ours) on the same length-sorted batches: one summed LoRA gradient per batch."""
    model.eval()
    tokenized = [e for _, e in examples]
    sync(device)
    started = time.perf_counter()
    for rows in length_sorted_batches(tokenized, batch_size):
        model.zero_grad(set_to_none=True)
        sum_of_example_losses(model, on(device, collate([tokenized[r] for r in rows], pad_id))).backward()
    model.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - started


def ours_pass(
    model,
    examples,
    projector,
    pad_id: int,
    batch_size: int,
    exp_avg,
    exp_avg_sq,
    root: Path,
    tag: str,
    transform: str = LITERAL_LESS_TRANSFORM,
    loss_tokens: str = LESS_LOSS_TOKENS,
) -> tuple[float, FeatureStore]:
    store = FeatureStore(
        root / tag,
        "bench-smollm2",
        "warmup",
        "train",
        projector,
        chunk_size=max(len(examples), 1),
        transform=transform,
        loss_tokens=loss_tokens,
    )
    started = time.perf_counter()
    compute_features(
        model,
        examples,
        projector,
        store,
        exp_avg=exp_avg,
        exp_avg_sq=exp_avg_sq,
        pad_token_id=pad_id,
        max_batch_size=batch_size,
    )
    return time.perf_counter() - started, store


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=1)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    def rank(x):
        return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)

    return float(np.corrcoef(rank(a), rank(b))[0, 1])


def top_overlap(a: np.ndarray, b: np.ndarray, fraction: float = 0.05) -> float:
    k = max(1, math.ceil(fraction * len(a)))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def less_scores(train: np.ndarray, target: np.ndarray) -> np.ndarray:
    return (train.astype(np.float32) @ target.astype(np.float32).T).mean(axis=1)


def load(args):
    """(peft model on args.device, tokenizer or None with --random-weights)."""
    spec = dataclasses.replace(default_model_spec(), **DEMO_SPEC_OVERRIDES)
    started = time.perf_counter()
    if args.random_weights:
        from transformers import AutoConfig, AutoModelForCausalLM

        if not args.model_config:
            raise SystemExit("--random-weights needs --model-config (a folder holding the model's config.json)")
        torch.manual_seed(args.seed)
        model, tokenizer = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model_config)), None
        weights = "random weights"
    else:
        home = Path(os.environ.get("INSTRUCT_SELECT_HOME", Path(__file__).resolve().parents[1] / "storage"))
        model, tokenizer = load_model_and_tokenizer(spec, cache_dir=home / "models", device="cpu")
        weights = "real weights"
    model = add_lora(model.float(), spec, seed=args.seed).to(args.device)
    log(
        f"model {spec.name} ({weights}, LoRA r={spec.lora_r} on {','.join(spec.lora_target_modules)}) on "
        f"{args.device} in {time.perf_counter() - started:.1f}s"
    )
    return model, tokenizer


def write_examples(path: Path, sections: dict[str, list[tuple[str, TokenizedExample]]], pad_id: int) -> None:
    with open(path, "w") as handle:
        handle.write(json.dumps({"pad_token_id": pad_id}) + "\n")
        for section, examples in sections.items():
            handle.writelines(
                json.dumps(
                    {
                        "section": section,
                        "id": example_id,
                        "input_ids": e.input_ids,
                        "labels": e.labels,
                        "n_target_tokens": e.n_target_tokens,
                    }
                )
                + "\n"
                for example_id, e in examples
            )


def read_examples(path: Path) -> tuple[dict[str, list[tuple[str, TokenizedExample]]], int]:
    with open(path) as handle:
        pad_id = json.loads(handle.readline())["pad_token_id"]
        sections: dict[str, list[tuple[str, TokenizedExample]]] = {}
        for line in handle:
            row = json.loads(line)
            example = TokenizedExample(row["input_ids"], row["labels"], False, row["n_target_tokens"])
            sections.setdefault(row["section"], []).append((row["id"], example))
    return sections, pad_id


def benchmark_examples(args, tokenizer) -> tuple[dict[str, list[tuple[str, TokenizedExample]]], int]:
    """warm / train / target examples: from --examples-file, else tokenized from the default pool."""
    if args.examples_file:
        sections, pad = read_examples(Path(args.examples_file))
        sizes = {"warm": 4 * args.warmup_steps, "train": args.n_examples, "target": args.n_targets}
        short = {
            name: len(sections.get(name, [])) for name, size in sizes.items() if len(sections.get(name, [])) < size
        }
        if short:
            raise SystemExit(f"{args.examples_file} has too few examples for the flags: {short} (need {sizes})")
        return {name: sections[name][:size] for name, size in sizes.items()}, pad
    if tokenizer is None:
        raise SystemExit("--random-weights has no tokenizer: pass --examples-file (see --export-examples)")
    warm = pool_examples(tokenizer, 4 * args.warmup_steps, args.min_tokens, args.max_tokens)
    train = pool_examples(tokenizer, args.n_examples, args.min_tokens, args.max_tokens, skip=4 * args.warmup_steps)
    return {
        "warm": warm,
        "train": train,
        "target": target_examples(tokenizer, args.n_targets, args.max_tokens),
    }, tokenizer.pad_token_id


def fidelity(args) -> dict:
    model, tokenizer = load(args)
    pad = tokenizer.pad_token_id
    warm = pool_examples(tokenizer, 4 * args.warmup_steps, 16, args.max_tokens)
    train = pool_examples(tokenizer, args.fidelity_examples, 16, args.max_tokens, skip=4 * args.warmup_steps)
    targets = target_examples(tokenizer, args.n_targets, args.max_tokens)
    exp_avg, exp_avg_sq = warmup_moments(model, warm, pad, args.warmup_steps, args.warmup_lr, args.device)
    engine = PerExampleGradients(model)
    # Another seed of the same mode shows the noise floor of any 'dim'-dim JL projection.
    other = ("exact", args.seed + 1) if args.exact_noise_baseline else ("fast", args.seed + 1)
    configs = {"fast": ("fast", args.seed), "exact": ("exact", args.seed), "other_seed": other}
    projectors = {
        name: make_projector(mode, engine.dim, args.dim, seed, engine.names_hash)
        for name, (mode, seed) in configs.items()
    }
    features = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, examples, moments in (("train", train, (exp_avg, exp_avg_sq)), ("target", targets, (None, None))):
            stores = [
                FeatureStore(Path(tmp) / kind / name, "bench", "warmup", kind, p, chunk_size=10**6)
                for name, p in projectors.items()
            ]
            started = time.perf_counter()
            compute_features(
                model,
                examples,
                list(projectors.values()),
                stores,
                exp_avg=moments[0],
                exp_avg_sq=moments[1],
                pad_token_id=pad,
                max_batch_size=args.batch_size,
                exact_group_size=10**6,
                progress_cb=lambda p: (
                    p.done % 64 == 0 and log(f"  {kind}: {p.done}/{p.total} {p.examples_per_s:.2f} ex/s")
                ),
            )
            log(
                f"{kind}: {len(examples)} examples, {len(projectors)} projections, {time.perf_counter() - started:.0f}s"
            )
            for name, store in zip(projectors, stores):
                features[(kind, name)] = store.features()
    scores = {name: less_scores(features[("train", name)], features[("target", name)]) for name in projectors}
    result = {
        "fidelity_n_train": len(train),
        "fidelity_n_targets": len(targets),
        "fidelity_spearman_fast_vs_exact": spearman(scores["fast"], scores["exact"]),
        "fidelity_top5pct_overlap_fast_vs_exact": top_overlap(scores["fast"], scores["exact"]),
        "noise_baseline": f"{other[0]} seed {other[1]} vs fast seed {args.seed}",
        "fidelity_spearman_other_seed": spearman(scores["other_seed"], scores["fast"]),
        "fidelity_top5pct_overlap_other_seed": top_overlap(scores["other_seed"], scores["fast"]),
        "score_std_exact": float(scores["exact"].std()),
        "peak_rss_mb": peak_rss_mb(),
    }
    result["fidelity_pass"] = (
        result["fidelity_spearman_fast_vs_exact"] >= 0.95 and result["fidelity_top5pct_overlap_fast_vs_exact"] >= 0.9
    )
    return result


def exact_cost(args) -> dict:
    """LESS's `exact` mode against the floor (and the default `fast`) on the same batches, interleaved.

    Exact projections are applied per group of up to 256 examples and the dense matrix is
    generated once per group (it does not fit in memory here), so its cost per example
    falls as groups fill: run with --n-examples 256 to see a full group.
    """
    model, tokenizer = load(args)
    sections, pad = benchmark_examples(args, tokenizer)
    examples, device = sections["train"], args.device
    exp_avg, exp_avg_sq = warmup_moments(model, sections["warm"], pad, args.warmup_steps, args.warmup_lr, device)
    engine = PerExampleGradients(model)
    projectors = {
        mode: make_projector(mode, engine.dim, args.dim, args.seed, engine.names_hash, device)
        for mode in ("exact", "fast")
    }
    floor_pass(model, examples[:2], pad, 2, device)
    times: dict[str, list[float]] = {"floor": [], "exact": [], "fast": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            times["floor"].append(floor_pass(model, examples, pad, args.batch_size, device))
            for mode, projector in projectors.items():
                times[mode].append(
                    ours_pass(
                        model,
                        examples,
                        projector,
                        pad,
                        args.batch_size,
                        exp_avg,
                        exp_avg_sq,
                        Path(tmp),
                        f"{mode}{repeat}",
                    )[0]
                )
            log(f"repeat {repeat}: " + ", ".join(f"{name} {runs[-1]:.1f}s" for name, runs in times.items()))
    median = {name: statistics.median(runs) for name, runs in times.items()}
    n = len(examples)
    return {
        "n_examples": n,
        "batch_size": args.batch_size,
        "dim": args.dim,
        "repeats": args.repeats,
        "floor_examples_per_s": n / median["floor"],
        "ours_exact_examples_per_s": n / median["exact"],
        "ours_fast_examples_per_s": n / median["fast"],
        "exact_time_vs_floor": median["exact"] / median["floor"],
        "fast_time_vs_floor": median["fast"] / median["floor"],
        "runs_s": times,
        "peak_rss_mb": peak_rss_mb(),
        "device": str(device),
    }


def labelled(examples, loss_tokens: str):
    return [(example_id, with_loss_on(example, loss_tokens)) for example_id, example in examples]


def benchmark(args) -> dict:
    model, tokenizer = load(args)
    sections, pad = benchmark_examples(args, tokenizer)
    if args.export_examples:
        write_examples(Path(args.export_examples), sections, pad)
        log(f"wrote {sum(map(len, sections.values()))} tokenized examples to {args.export_examples}")
        return {"exported": args.export_examples, **{name: len(rows) for name, rows in sections.items()}}
    warm, examples, targets = sections["warm"], sections["train"], sections["target"]
    device = args.device
    n, n_tokens = len(examples), sum(len(e) for _, e in examples)
    by_loss = {loss: labelled(examples, loss) for loss in {r.loss_tokens for r in RECIPES.values()}}
    loss_positions = {loss: sum(e.n_target_tokens for _, e in rows) for loss, rows in by_loss.items()}
    log(
        f"{n} examples, {n_tokens} tokens ({min(len(e) for _, e in examples)}-{max(len(e) for _, e in examples)} "
        f"each; loss positions {loss_positions}), {len(targets)} MMLU targets, dim {args.dim}, batch "
        f"{args.batch_size}, {torch.get_num_threads()} threads, device {device}; recipes "
        + ", ".join(f"{name} {dataclasses.asdict(r)}" for name, r in RECIPES.items())
    )
    exp_avg, exp_avg_sq = warmup_moments(model, warm, pad, args.warmup_steps, args.warmup_lr, device)
    engine = PerExampleGradients(model)
    moments = AdamMoments.from_named(exp_avg, exp_avg_sq, engine.slots)
    projectors = {
        mode: make_projector(
            mode,
            engine.dim,
            args.dim,
            args.seed,
            engine.names_hash,
            device,
            **({"cache_bytes": 0} if mode == "exact" else {}),
        )
        for mode in {r.mode for r in RECIPES.values()} | {DEFAULT_MODE}
    }
    floor_pass(model, examples[:2], pad, 2, device)  # untimed: first-call allocations and thread start-up
    default = RECIPES["default"]
    # Every timed pass, interleaved per repeat: the floors per loss kind, ours per recipe, and the
    # default recipe with response-only loss (for sequence_vs_response).
    passes = {f"floor/{loss}": loss for loss in by_loss}
    passes.update({f"ours/{name}": name for name in RECIPES})
    passes["ours/default-response-loss"] = "default-response-loss"
    variants = {**RECIPES, "default-response-loss": dataclasses.replace(default, loss_tokens=LESS_LOSS_TOKENS)}
    times: dict[str, list[float]] = {name: [] for name in passes}
    stores: dict[str, FeatureStore] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, what in passes.items():
                if name.startswith("floor/"):
                    times[name].append(floor_pass(model, by_loss[what], pad, args.batch_size, device))
                    continue
                recipe = variants[what]
                seconds, stores[what] = ours_pass(
                    model,
                    by_loss[recipe.loss_tokens],
                    projectors[recipe.mode],
                    pad,
                    args.batch_size,
                    exp_avg,
                    exp_avg_sq,
                    Path(tmp),
                    f"{what}-{repeat}",
                    transform=recipe.transform,
                    loss_tokens=recipe.loss_tokens,
                )
                times[name].append(seconds)
            gc.collect()
            log(f"repeat {repeat}: " + ", ".join(f"{name} {runs[-1]:.1f}s" for name, runs in times.items()))
        ours_features = {name: stores[name].features([i for i, _ in examples]) for name in RECIPES}
    rss_after_ours = peak_rss_mb()
    gpu_peak_after_ours = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None
    median = {name: statistics.median(runs) for name, runs in times.items()}

    # The LESS-style loop per recipe; TRAK's projector (timed in the less-paper loop) costs the same for both.
    if args.less_projector == "trak":
        less_projector = TrakBasicProjector(engine.dim, args.dim, args.seed, device=device)
    else:
        less_projector = make_projector(
            "exact", engine.dim, args.dim, args.seed, engine.names_hash, device, cache_bytes=0
        )
    loops = {}
    for name in ("less-paper", "default"):
        recipe = RECIPES[name]
        seconds, projection_seconds, features = less_loop(
            model,
            by_loss[recipe.loss_tokens],
            moments,
            less_projector if name == "less-paper" else None,
            args.project_every,
            device,
            recipe.transform,
        )
        loops[name] = {"seconds": seconds, "projection_s": projection_seconds, "features": features}
        log(
            f"LESS-style loop, {name}: {seconds:.1f}s"
            + (f" (projection {projection_seconds:.1f}s)" if projection_seconds else "")
        )
    shared_projection_s = loops["less-paper"]["projection_s"]
    loops["default"]["seconds"] += shared_projection_s

    # Fidelity: our stored features against the exact projection of the loop's per-example features.
    exact = projectors.get("exact") or make_projector(
        "exact", engine.dim, args.dim, args.seed, engine.names_hash, device
    )
    recipes_out = {}
    for name, recipe in RECIPES.items():
        target_rows = labelled(targets, recipe.loss_tokens)
        target_grads = torch.cat([engine(collate([e], pad)) for _, e in target_rows])
        sync(device)
        started = time.perf_counter()
        exact_all = unit_rows(exact.project(torch.cat([loops[name]["features"], target_grads]))).half().cpu().numpy()
        exact_seconds = time.perf_counter() - started
        with tempfile.TemporaryDirectory() as tmp:
            target_store = FeatureStore(
                Path(tmp) / "target",
                "bench-smollm2",
                "warmup",
                "target",
                projectors[recipe.mode],
                chunk_size=10**6,
                loss_tokens=recipe.loss_tokens,
            )
            compute_features(
                model,
                target_rows,
                projectors[recipe.mode],
                target_store,
                pad_token_id=pad,
                max_batch_size=args.batch_size,
            )
            ours_target = target_store.features([i for i, _ in target_rows])
        ours_scores = less_scores(ours_features[name], ours_target)
        exact_scores = less_scores(exact_all[:n], exact_all[n:])
        ours_s = median[f"ours/{name}"]
        floor_s = median[f"floor/{recipe.loss_tokens}"]
        recipes_out[name] = {
            **dataclasses.asdict(recipe),
            "ours_examples_per_s": n / ours_s,
            "less_loop_examples_per_s": n / loops[name]["seconds"],
            "floor_examples_per_s": n / floor_s,
            "speedup_vs_less_loop": loops[name]["seconds"] / ours_s,
            "time_vs_floor": ours_s / floor_s,
            "spearman_vs_exact": spearman(ours_scores, exact_scores),
            "top5pct_overlap_vs_exact": top_overlap(ours_scores, exact_scores),
            "loss_positions": loss_positions[recipe.loss_tokens],
            "exact_reference_projection_s": exact_seconds,
        }
        del loops[name]["features"]
    top = recipes_out["default"]
    result = {
        **{
            key: top[key]
            for key in (
                "ours_examples_per_s",
                "less_loop_examples_per_s",
                "floor_examples_per_s",
                "speedup_vs_less_loop",
                "time_vs_floor",
                "spearman_vs_exact",
            )
        },
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_mb_after_ours": rss_after_ours,
        "recipes": recipes_out,
        # The default pass with whole-sequence loss over the same pass with response-only loss.
        "sequence_vs_response": median["ours/default"] / median["ours/default-response-loss"],
        "sequence_vs_response_floor": median[f"floor/{DEFAULT_LOSS_TOKENS}"] / median[f"floor/{LESS_LOSS_TOKENS}"],
        "less_loop_projector": args.less_projector,
        "less_loop_projection_shared": True,
        "less_loop_projection_s_per_example": shared_projection_s / n,
        "less_loop_s": {name: loop["seconds"] for name, loop in loops.items()},
        "median_s": median,
        "runs_s": times,
        "n_examples": n,
        "n_tokens": n_tokens,
        "n_targets": len(targets),
        "dim": args.dim,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "weights": "random" if args.random_weights else "real",
    }
    if device.type == "cuda":
        result["gpu_peak_mb_after_ours"] = gpu_peak_after_ours
        result["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    for name, r in recipes_out.items():
        log(
            f"{name}: ours {r['ours_examples_per_s']:.3f} ex/s, {r['speedup_vs_less_loop']:.1f}x the LESS-style loop "
            f"(bar >= 6x), {r['time_vs_floor']:.2f}x the floor's time (bar <= 1.2), spearman vs exact "
            f"{r['spearman_vs_exact']:.3f} (bar >= 0.95)"
        )
    log(
        f"sequence vs response loss, default pass: {result['sequence_vs_response']:.2f}x (bar <= 1.25; the floor "
        f"{result['sequence_vs_response_floor']:.2f}x); peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-examples", type=int, default=32)
    parser.add_argument("--min-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--n-targets", type=int, default=4)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of ours and the floor (median)")
    parser.add_argument("--project-every", type=int, default=16)
    parser.add_argument(
        "--less-projector",
        choices=("trak", "exact"),
        default="trak",
        help="trak: LESS's CPU projector procedure; exact: our dense oracle (faster RNG)",
    )
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--warmup-lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=torch.device, default=torch.device("cpu"), help="cpu or cuda")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="random weights from --model-config (same architecture and cost; no model package needed)",
    )
    parser.add_argument("--model-config", help="folder with the model's config.json (for --random-weights)")
    parser.add_argument("--examples-file", help="tokenized warm/train/target examples written by --export-examples")
    parser.add_argument("--export-examples", help="write the tokenized examples to this JSONL file and stop")
    parser.add_argument(
        "--ours-exact-cache-gb",
        type=float,
        default=0.0,
        help="also time ours in exact mode with the dense matrix cached up to this size (GPU)",
    )
    parser.add_argument("--fidelity", action="store_true", help="run the fast-vs-exact fidelity check instead")
    parser.add_argument(
        "--exact-cost",
        action="store_true",
        help="instead time ours in exact (LESS's) and fast (the default) mode against the floor only",
    )
    parser.add_argument("--fidelity-examples", type=int, default=240)
    parser.add_argument(
        "--exact-noise-baseline",
        action="store_true",
        help="noise baseline from exact with another seed (slow) instead of fast with another seed",
    )
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    if args.fidelity:
        if args.n_targets == 4:
            args.n_targets = 8
        result = fidelity(args)
        log(
            f"fidelity fast vs exact on {result['fidelity_n_train']} examples: spearman "
            f"{result['fidelity_spearman_fast_vs_exact']:.3f} (>= 0.95), top-5% overlap "
            f"{result['fidelity_top5pct_overlap_fast_vs_exact']:.2f} (>= 0.9) -> "
            f"{'PASS' if result['fidelity_pass'] else 'FAIL'}; noise baseline ({result['noise_baseline']}): "
            f"spearman {result['fidelity_spearman_other_seed']:.3f}, overlap "
            f"{result['fidelity_top5pct_overlap_other_seed']:.2f}"
        )
    elif args.exact_cost:
        result = exact_cost(args)
        log(
            f"{result['n_examples']} examples: exact {result['exact_time_vs_floor']:.2f}x the floor's time, "
            f"fast {result['fast_time_vs_floor']:.2f}x"
        )
    else:
        result = benchmark(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
