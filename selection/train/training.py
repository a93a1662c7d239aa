"""LoRA training with per-epoch checkpoints that carry Adam moments (LESS warmup).

LESS (Xia et al. 2024) trains LoRA on a small random slice of the pool for 4 epochs and
keeps, after every epoch, the adapter, Adam's first/second moments and the epoch's
average learning rate: influence features are Adam-preconditioned gradients at each
checkpoint, weighted by that learning rate. LESS only saves moments under FSDP; here
every run saves them.

Math (matches LESS's Hugging Face Trainer setup, per-device batch 1 with accumulation):
- step loss = mean over the step's examples of each example's mean token loss (so the
  micro-batch size never changes the result, up to float rounding);
- AdamW (betas 0.9/0.999, eps 1e-8, weight decay 0), grad-norm clipping at 1.0;
- linear schedule with warmup: warmup steps = ceil(warmup_ratio * total steps), as HF.
- ``avg_lr`` of an epoch = mean of the learning rates used by that epoch's optimizer steps.

Layout of ``out_dir/epoch_{k}/`` (k = 1..epochs, state after k epochs), each written
to a temporary folder and renamed, so an existing ``epoch_k`` is always complete:
- ``adapter/``: peft ``save_pretrained`` (adapter_config.json, adapter_model.safetensors)
- ``exp_avg.safetensors``, ``exp_avg_sq.safetensors``: Adam moments keyed by the peft
  model's trainable parameter names (``model.named_parameters()``)
- ``checkpoint.json``: epoch, global step, avg_lr, per-step lrs, mean loss, config,
  run fingerprint, parameter names, and ``files``: sha256 and size of every other file of
  the folder (its commit record, checked by ``verify_checkpoint`` before any use)
- ``training_state.pt``: optimizer skeleton (step counts, param groups; the moment
  tensors come from the safetensors files), scheduler and RNG states, for resume.

Resume: ``train_lora`` on an ``out_dir`` that already holds epochs continues after the
last complete one and ends bit-identical to an uninterrupted run (same device). An epoch
that no longer matches its recorded sha256 is deleted with every later epoch and retrained.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from selection.common import files, integrity
from selection.common.files import atomic_directory, remove_stale_temp_dirs
from selection.data.tokenization import IGNORE_INDEX, TokenizedExample, collate, length_sorted_batches

EPOCH_DIR_PATTERN = re.compile(r"^epoch_(\d+)$")
ADAPTER_DIR = "adapter"
EXP_AVG_FILE = "exp_avg.safetensors"
EXP_AVG_SQ_FILE = "exp_avg_sq.safetensors"
CHECKPOINT_FILE = "checkpoint.json"
STATE_FILE = "training_state.pt"
WARMUP_ASSET = "warmup_checkpoints"


@dataclass(frozen=True)
class TrainingConfig:
    """Optimizer and schedule. Defaults are LESS's warmup (see ``DEMO_TRAINING_CONFIG``).

    ``batch_size`` is examples per optimizer step (LESS: 1 per device x 32 accumulation);
    ``micro_batch_size`` / ``max_tokens_per_micro_batch`` only bound memory.
    """

    epochs: int = 4
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    batch_size: int = 32
    micro_batch_size: int = 8
    max_tokens_per_micro_batch: int | None = None
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    seed: int = 0
    # Forward/backward under this autocast on CUDA (LESS trains in bf16); ignored on the CPU.
    # LoRA weights, their gradients and Adam moments stay fp32 (``selection.train.models.add_lora``).
    cuda_autocast_dtype: str | None = "bfloat16"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.micro_batch_size < 1:
            raise ValueError("epochs, batch_size and micro_batch_size must be >= 1")
        if self.learning_rate <= 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError("learning_rate must be > 0 and warmup_ratio in [0, 1)")
        if self.cuda_autocast_dtype not in (None, "bfloat16", "float16"):
            raise ValueError(f"cuda_autocast_dtype must be bfloat16, float16 or None, got {self.cuda_autocast_dtype!r}")
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data


LESS_TRAINING_CONFIG = TrainingConfig()
# `make demo`'s settings (orchestration/profiles.py) on a 2-core CPU: a warmup slice of 5-15
# examples gives only a few steps per epoch, so a larger step size makes the adapter actually move.
DEMO_TRAINING_CONFIG = TrainingConfig(epochs=4, learning_rate=1e-4, batch_size=8, micro_batch_size=8)


@dataclass(frozen=True)
class TrainingProgress:
    epoch: int  # 1-based
    step: int  # global optimizer step, 1-based
    total_steps: int
    loss: float  # this step's loss
    learning_rate: float
    examples_per_s: float


@dataclass(frozen=True)
class EpochCheckpoint:
    epoch: int
    path: Path
    avg_lr: float
    mean_loss: float
    global_step: int


@dataclass(frozen=True)
class TrainingResult:
    checkpoints: list[EpochCheckpoint]
    resumed_from_epoch: int  # 0 for a fresh run
    total_steps: int
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


def examples_fingerprint(examples: Sequence[TokenizedExample]) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(np.asarray(example.input_ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(example.labels, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def linear_warmup_lr(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate used by optimizer step ``step`` (0-based), as HF's linear schedule."""
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


@dataclass(frozen=True)
class LrSchedule:
    """Optimizer steps of a run, as ``train_lora`` lays them out (known before training)."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int


def lr_schedule(n_examples: int, batch_size: int, epochs: int, warmup_ratio: float) -> LrSchedule:
    """Steps per epoch, total and warmup steps for ``n_examples`` at ``batch_size`` examples per optimizer step."""
    steps_per_epoch = math.ceil(n_examples / batch_size)
    total_steps = steps_per_epoch * epochs
    return LrSchedule(steps_per_epoch, total_steps, math.ceil(warmup_ratio * total_steps))


def epoch_average_lrs(
    n_examples: int, batch_size: int, epochs: int, warmup_ratio: float, peak_lr: float = 1.0
) -> list[float]:
    """Each epoch's ``avg_lr`` (mean lr of its optimizer steps) that ``train_lora`` will record."""
    schedule = lr_schedule(n_examples, batch_size, epochs, warmup_ratio)
    per_epoch = schedule.steps_per_epoch
    return [
        float(
            np.mean(
                [
                    linear_warmup_lr(step, schedule.total_steps, schedule.warmup_steps, peak_lr)
                    for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)
                ]
            )
        )
        for epoch in range(epochs)
    ]


def _schedule_lambda(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    return lambda step: linear_warmup_lr(step, total_steps, warmup_steps, 1.0)


def _rng_state() -> dict[str, Any]:
    # Libraries (HF, peft) draw from the global RNGs, so their state is what a resumed run restores.
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}  # noqa: NPY002
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002  (libraries draw from the global RNG)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002  (libraries draw from the global RNG)
    torch.manual_seed(seed)


def token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of every predicted token ([rows, T-1], 0 off target) and target counts per row.

    Labels are shifted by one here, as inside Hugging Face causal LMs.
    """
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted_logits = logits[:, :-1, :].float()
    shifted_labels = batch["labels"][:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.size(-1)),
        shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shifted_labels.shape)
    return token_loss, (shifted_labels != IGNORE_INDEX).sum(dim=1)


def _per_example_mean_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean token loss of each row over its own target tokens -> shape [rows]."""
    token_loss, n_tokens = token_losses(model, batch)
    return token_loss.sum(dim=1) / n_tokens


def _named_trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    if not hasattr(model, "peft_config"):
        raise ValueError("train_lora expects a peft model; wrap it with selection.train.models.add_lora first")
    named = [(name, parameter) for name, parameter in model.named_parameters() if parameter.requires_grad]
    if not named:
        raise ValueError("model has no trainable parameters; wrap it with selection.train.models.add_lora first")
    return named


def _validate_examples(examples: Sequence[TokenizedExample]) -> None:
    if not examples:
        raise ValueError("no training examples")
    # The first label is never predicted (labels shift by one), so it must not be the only target.
    unusable = [i for i, e in enumerate(examples) if sum(label != IGNORE_INDEX for label in e.labels[1:]) == 0]
    if unusable:
        raise ValueError(
            f"{len(unusable)} examples have no target tokens (first: index {unusable[0]}); drop them first "
            "(tokenize_many reports them in TruncationStats.no_target_indices)"
        )


def complete_epochs(out_dir: Path) -> list[int]:
    """Epoch numbers with a complete checkpoint folder under ``out_dir``, ascending."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = (EPOCH_DIR_PATTERN.match(path.name) for path in out_dir.iterdir() if path.is_dir())
    return sorted(int(match.group(1)) for match in found if match)


def _save_epoch(
    out_dir: Path,
    epoch: int,
    model: Any,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    info: dict[str, Any],
) -> Path:
    final = out_dir / f"epoch_{epoch}"
    optimizer_state = optimizer.state_dict()
    moments = {key: {} for key in ("exp_avg", "exp_avg_sq")}
    skeleton_state: dict[int, dict[str, Any]] = {}
    for index, (name, parameter) in enumerate(named):
        state = optimizer.state[parameter]
        for key in moments:
            moments[key][name] = state[key].detach().to("cpu").contiguous().clone()
        skeleton_state[index] = {"step": optimizer_state["state"][index]["step"]}
    with atomic_directory(final) as temp:
        model.save_pretrained(temp / ADAPTER_DIR)
        save_file(moments["exp_avg"], str(temp / EXP_AVG_FILE))
        save_file(moments["exp_avg_sq"], str(temp / EXP_AVG_SQ_FILE))
        torch.save(
            {
                "optimizer": {"state": skeleton_state, "param_groups": optimizer_state["param_groups"]},
                "scheduler": scheduler.state_dict(),
                "rng": _rng_state(),
            },
            temp / STATE_FILE,
        )
        _write_info(temp, info)
    return final


def _write_info(folder: Path, info: dict[str, Any]) -> None:
    """Write ``checkpoint.json`` last, with the sha256 and size of every other file: the commit record."""
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != CHECKPOINT_FILE)
    info = {**info, "files": integrity.directory_record(folder, files)}
    (folder / CHECKPOINT_FILE).write_text(json.dumps(info, indent=2))


def verify_checkpoint(checkpoint_dir: str | Path, asset: str = WARMUP_ASSET) -> None:
    """Check an ``epoch_k`` folder against the file records in its ``checkpoint.json``.

    Raises ``ArtifactIntegrityError`` naming the first file that is missing, truncated or changed,
    and ``asset``, the one to rematerialize. A ``checkpoint.json`` without file records (edited, or
    written before records existed) is refused too: its files cannot be checked.
    """
    path = Path(checkpoint_dir)
    info_path = path / CHECKPOINT_FILE
    try:
        info = integrity.read_json(info_path, asset=asset)
    except FileNotFoundError:
        raise integrity.ArtifactIntegrityError(
            info_path, "is missing; not a checkpoint written by train_lora", asset
        ) from None
    record = info.get("files")
    if not isinstance(record, dict) or not record:
        raise integrity.ArtifactIntegrityError(
            info_path, "has no sha256 records of the checkpoint's files, so they cannot be checked", asset
        )
    integrity.verify_record(path, record, asset=asset)


def _discard_damaged_epochs(out_dir: Path, done: list[int]) -> list[str]:
    """Delete the first epoch that fails ``verify_checkpoint`` and every later one (last first, so a
    kill midway still leaves consecutive epochs); they are retrained from the epoch before."""
    for position, epoch in enumerate(done):
        problem = integrity.first_problem(lambda epoch=epoch: verify_checkpoint(out_dir / f"epoch_{epoch}"))
        if problem is not None:
            for later in reversed(done[position:]):
                files.remove_tree(out_dir / f"epoch_{later}")
            return [problem]
    return []


def _load_adapter_weights(path: Path, model: Any) -> None:
    from peft.utils import set_peft_model_state_dict

    weights = load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if result.unexpected_keys:
        raise ValueError(f"adapter in {path} has keys the model lacks: {result.unexpected_keys[:3]}")


def _restore_training_state(
    path: Path,
    named: list[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    _, exp_avg, exp_avg_sq, _ = load_checkpoint(path, expected_names=[name for name, _ in named])
    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    device = named[0][1].device
    optimizer_state = saved["optimizer"]
    for index, (name, _) in enumerate(named):
        optimizer_state["state"][index]["exp_avg"] = exp_avg[name].to(device)
        optimizer_state["state"][index]["exp_avg_sq"] = exp_avg_sq[name].to(device)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(saved["scheduler"])
    _set_rng_state(saved["rng"])


def train_lora(
    model: Any,
    examples: Sequence[TokenizedExample],
    config: TrainingConfig,
    out_dir: str | Path,
    pad_token_id: int,
    progress_cb: Callable[[TrainingProgress], None] | None = None,
    save_moments: bool = True,
) -> TrainingResult:
    """Train the model's trainable (LoRA) parameters in place; checkpoint every epoch.

    Resumes from the last complete ``epoch_k`` in ``out_dir`` when the run fingerprint
    (config + examples + trainable names) matches, and refuses a mismatching folder.
    With ``save_moments=False`` (final finetuning) only adapter and metadata are kept
    and the run cannot resume mid-way.
    """
    _validate_examples(examples)
    out_dir = files.make_dirs(out_dir)
    remove_stale_temp_dirs(out_dir)
    named = _named_trainable(model)
    names = [name for name, _ in named]
    run_fingerprint = hashlib.sha256(
        json.dumps([config.to_dict(), examples_fingerprint(examples), names], sort_keys=True).encode()
    ).hexdigest()[:16]

    schedule = lr_schedule(len(examples), config.batch_size, config.epochs, config.warmup_ratio)
    steps_per_epoch, total_steps, warmup_steps = schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps
    device = named[0][1].device
    optimizer = torch.optim.AdamW(
        [parameter for _, parameter in named],
        lr=config.learning_rate,
        betas=config.adam_betas,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_lambda(total_steps, warmup_steps))

    done = complete_epochs(out_dir)
    if done and done == list(range(1, len(done) + 1)):
        discarded = _discard_damaged_epochs(out_dir, done)
        done = complete_epochs(out_dir)
    else:
        discarded = []
    checkpoints = [_read_epoch_info(out_dir, epoch, run_fingerprint) for epoch in done]
    if done and done != list(range(1, len(done) + 1)):
        raise ValueError(f"{out_dir} holds non-consecutive epochs {done}; remove it to start over")
    if len(done) > config.epochs:
        raise ValueError(f"{out_dir} holds {len(done)} epochs but the config asks for {config.epochs}")
    start_epoch = len(done)
    if start_epoch == 0:
        _seed_everything(config.seed)
    else:
        # Continue from (or, when finished, return) the last complete epoch's weights.
        _load_adapter_weights(out_dir / f"epoch_{start_epoch}", model)
    if 0 < start_epoch < config.epochs:
        if not save_moments:
            raise ValueError(f"{out_dir} holds a partial run saved without moments; it cannot be resumed")
        _restore_training_state(out_dir / f"epoch_{start_epoch}", named, optimizer, scheduler)

    use_autocast = device.type == "cuda" and config.cuda_autocast_dtype is not None
    autocast = torch.autocast(
        "cuda", dtype=getattr(torch, config.cuda_autocast_dtype or "bfloat16"), enabled=use_autocast
    )
    started = time.perf_counter()
    global_step = start_epoch * steps_per_epoch
    model.train()
    for epoch in range(start_epoch + 1, config.epochs + 1):
        # The order depends only on (seed, epoch), so a resumed epoch sees the same batches.
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch))
        step_lrs: list[float] = []
        step_losses: list[float] = []
        for step_in_epoch in range(steps_per_epoch):
            step_started = time.perf_counter()
            step_indices = order[step_in_epoch * config.batch_size : (step_in_epoch + 1) * config.batch_size].tolist()
            step_examples = [examples[i] for i in step_indices]
            learning_rate = scheduler.get_last_lr()[0]
            optimizer.zero_grad(set_to_none=True)
            step_loss = 0.0
            for micro in length_sorted_batches(
                step_examples, config.micro_batch_size, config.max_tokens_per_micro_batch
            ):
                batch = {k: v.to(device) for k, v in collate([step_examples[i] for i in micro], pad_token_id).items()}
                with autocast:
                    loss = _per_example_mean_loss(model, batch).sum() / len(step_examples)
                loss.backward()
                step_loss += loss.item()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            global_step += 1
            step_lrs.append(learning_rate)
            step_losses.append(step_loss)
            if progress_cb is not None:
                rate = len(step_examples) / max(time.perf_counter() - step_started, 1e-9)
                progress_cb(TrainingProgress(epoch, global_step, total_steps, step_loss, learning_rate, rate))
        info = {
            "epoch": epoch,
            "global_step": global_step,
            "avg_lr": float(np.mean(step_lrs)),
            "step_lrs": step_lrs,
            "mean_loss": float(np.mean(step_losses)),
            "n_examples": len(examples),
            "config": config.to_dict(),
            "run_fingerprint": run_fingerprint,
            "parameter_names": names,
            "has_moments": save_moments,
        }
        if save_moments:
            path = _save_epoch(out_dir, epoch, model, named, optimizer, scheduler, info)
        else:
            with atomic_directory(out_dir / f"epoch_{epoch}") as temp:
                model.save_pretrained(temp / ADAPTER_DIR)
                _write_info(temp, info)
            path = out_dir / f"epoch_{epoch}"
        checkpoints.append(EpochCheckpoint(epoch, path, info["avg_lr"], info["mean_loss"], global_step))
    model.eval()
    seconds = time.perf_counter() - started
    return TrainingResult(
        checkpoints=checkpoints,
        resumed_from_epoch=start_epoch,
        total_steps=total_steps,
        seconds=seconds,
        metrics={
            "n_examples": len(examples),
            "n_trainable_params": sum(p.numel() for _, p in named),
            "steps_per_epoch": steps_per_epoch,
            "warmup_steps": warmup_steps,
            "final_mean_loss": checkpoints[-1].mean_loss,
            "seconds": seconds,
            "discarded_damaged_epochs": discarded,
        },
    )


def _read_epoch_info(out_dir: Path, epoch: int, run_fingerprint: str) -> EpochCheckpoint:
    path = out_dir / f"epoch_{epoch}"
    info_path = path / CHECKPOINT_FILE
    if not info_path.is_file():
        raise ValueError(f"{path} has no {CHECKPOINT_FILE}; not a checkpoint written by train_lora")
    info = integrity.read_json(info_path, asset=None, fix=f"remove {out_dir} to start the run over")
    if info.get("run_fingerprint") != run_fingerprint:
        raise ValueError(
            f"{path} was written by a different run (config, examples or trainable parameters differ); "
            "use a fresh out_dir or remove the old one"
        )
    return EpochCheckpoint(epoch, path, info["avg_lr"], info["mean_loss"], info["global_step"])


def load_checkpoint(
    checkpoint_dir: str | Path, expected_names: Sequence[str] | None = None
) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor], float]:
    """Return ``(adapter_path, exp_avg, exp_avg_sq, avg_lr)`` of one ``epoch_k`` folder.

    First checks every file of the folder against its commit record (``verify_checkpoint``).
    Validates that both moment files exist, hold the same parameter names with equal
    shapes, match the names recorded at training time, and (when ``expected_names`` is
    given, e.g. the trainable names of the peft model about to use them) match those.
    """
    path = Path(checkpoint_dir)
    info_path = path / CHECKPOINT_FILE
    if not info_path.is_file():
        raise ValueError(f"{path} is not a training checkpoint: {CHECKPOINT_FILE} is missing")
    info = integrity.read_json(info_path, asset=WARMUP_ASSET)
    adapter_path = path / ADAPTER_DIR
    if not (adapter_path / "adapter_config.json").is_file():
        raise ValueError(f"{path} has no saved adapter ({ADAPTER_DIR}/adapter_config.json missing)")
    missing = [name for name in (EXP_AVG_FILE, EXP_AVG_SQ_FILE) if not (path / name).is_file()]
    if missing:
        raise ValueError(
            f"{path} has no Adam moments ({', '.join(missing)} missing); it was saved without them "
            "(e.g. a final finetuning run) and cannot be used for LESS gradient features"
        )
    verify_checkpoint(path)
    exp_avg = load_file(str(path / EXP_AVG_FILE))
    exp_avg_sq = load_file(str(path / EXP_AVG_SQ_FILE))
    recorded = list(info["parameter_names"])
    for label, moments in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        _check_names(path, label, set(moments), set(recorded), "the names recorded at training time")
        if expected_names is not None:
            _check_names(path, label, set(moments), set(expected_names), "the expected trainable parameters")
    mismatched = [name for name in exp_avg if exp_avg[name].shape != exp_avg_sq[name].shape]
    if mismatched:
        raise ValueError(f"{path}: exp_avg and exp_avg_sq shapes differ for {mismatched[:3]}")
    return adapter_path, exp_avg, exp_avg_sq, float(info["avg_lr"])


def _check_names(path: Path, label: str, found: set[str], wanted: set[str], what: str) -> None:
    if found == wanted:
        return
    missing, extra = sorted(wanted - found), sorted(found - wanted)
    raise ValueError(
        f"{path}: {label} parameter names do not match {what}: "
        f"{len(missing)} missing (e.g. {missing[:2]}), {len(extra)} unexpected (e.g. {extra[:2]})"
    )
