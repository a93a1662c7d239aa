"""Per-example LoRA gradients in batches, and the train-feature transforms (LESS's Adam step and variants).

Why batched works: examples in a batch do not interact (eval mode, no batch norm,
right padding under a causal mask), so the gradient of ``sum_i loss_i`` with respect
to a LoRA module's *output* at example ``i``'s positions is exactly ``d loss_i / d out``.
A Linear weight gradient is a sum over tokens of outer products, so for example ``i``

    grad W = sum_t  d_out[i, t]^T  x[i, t]          (lora_A: [r, in], lora_B: [out, r])

One forward, one ``torch.autograd.grad`` for the module outputs (LoRA weight gradients
summed over the batch are never formed) and one ``bmm`` per module give all ``B``
per-example gradients. Pad positions get exactly zero output gradient (no loss on them
and nothing attends to them), so padding does not change any example's gradient.

Loss (LESS): per example, the mean token cross-entropy over its own target tokens
(labels != -100, shifted as Hugging Face causal LMs do). Logits are computed only at
target positions (the prompt's logits are never needed), which saves much of the
``lm_head`` cost.

The lm_head and cross-entropy run in chunks of positions (:class:`ChunkedLinearCrossEntropy`):
with whole-sequence loss every position is a target, and ``[tokens, vocab]`` fp32 logits for
a batch (8 x 256 x 49K x 4 B = 400 MB for SmolLM2; ~1 GB per 2,048-token example at a 128K
vocabulary) would cap the batch. Each chunk's logits are turned into the gradient of the loss
with respect to the hidden states during the forward pass and freed, as fused linear
cross-entropy losses (Liger Kernel's, for one) do: peak memory is O(chunk x vocab), the
lm_head matmul runs once forward and once for the gradient (as in plain autograd), nothing is
recomputed, and the result equals the plain computation up to float rounding. It needs the
lm_head frozen (LoRA never trains it here); otherwise the plain path runs.

Parameter order (the flattened feature layout, stable for a given model + LoRA config):
the trainable parameters in ``model.named_parameters()`` order, each flattened
row-major. Every trainable parameter must be the weight of a LoRA ``lora_A``/``lora_B``
Linear; anything else (biases, ``modules_to_save``, DoRA magnitudes) is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from selection.common.memory import loss_chunk_positions
from selection.data.tokenization import IGNORE_INDEX
from selection.train.models import eval_mode

LESS_BETA1 = 0.9
LESS_BETA2 = 0.999
LESS_EPS = 1e-8


@dataclass(frozen=True)
class LoraSlot:
    """One trainable LoRA weight and where its gradient lives in the flat vector."""

    name: str  # as in model.named_parameters()
    module: nn.Linear
    shape: tuple[int, int]  # (out_features, in_features) of that Linear
    offset: int

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


def lora_slots(model: nn.Module) -> list[LoraSlot]:
    """The trainable LoRA weights in ``named_parameters`` order (the flat layout)."""
    owner_of = {}
    for module_name, module in model.named_modules():
        parts = module_name.split(".")
        # peft: <...>.lora_A.<adapter> / <...>.lora_B.<adapter> are plain nn.Linear.
        if isinstance(module, nn.Linear) and len(parts) >= 2 and parts[-2] in ("lora_A", "lora_B"):
            owner_of[f"{module_name}.weight"] = module
    slots: list[LoraSlot] = []
    offset = 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        module = owner_of.get(name)
        if module is None:
            raise ValueError(
                f"trainable parameter {name!r} is not a LoRA lora_A/lora_B Linear weight; per-example "
                "gradients cover LoRA weights only (freeze it, or drop bias/modules_to_save/DoRA)"
            )
        if module.bias is not None and module.bias.requires_grad:
            raise ValueError(f"LoRA module of {name!r} has a trainable bias; not supported")
        slot = LoraSlot(name=name, module=module, shape=tuple(parameter.shape), offset=offset)
        slots.append(slot)
        offset += slot.numel
    if not slots:
        raise ValueError("model has no trainable LoRA weights (is it a peft LoRA model with adapters active?)")
    return slots


def param_names_hash(names: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _split_model(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(decoder body returning hidden states, lm_head, logit soft-cap) of a causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_decoder") or base.get_output_embeddings() is None:
        raise ValueError(f"{type(base).__name__} is not a decoder-only causal LM with an lm_head")
    config = base.config
    for unsupported in ("logit_scale", "output_multiplier_scale"):
        if getattr(config, unsupported, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(base).__name__} scales logits ({unsupported}); not supported")
    return base.get_decoder(), base.get_output_embeddings(), getattr(config, "final_logit_softcapping", None)


def _target_weights(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions predicting a target token, their labels, and 1/n_i loss weights."""
    shifted = labels[:, 1:]
    is_target = shifted != IGNORE_INDEX
    n_targets = is_target.sum(dim=1)
    if bool((n_targets == 0).any()):
        empty = torch.nonzero(n_targets == 0).flatten().tolist()
        raise ValueError(f"batch rows {empty} have no target tokens (all labels -100); drop them first")
    rows, cols = torch.nonzero(is_target, as_tuple=True)
    weights = 1.0 / n_targets[rows].to(torch.float32)
    return torch.stack([rows, cols]), shifted[rows, cols], weights


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``sum_t w_t * CE(softcap(h_t W^T), y_t)`` over positions ``t``, computed ``chunk`` positions
    at a time; the gradient for ``h`` is formed in the forward pass (see the module docstring),
    so no ``[positions, vocab]`` tensor outlives its chunk. ``W`` gets no gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, weights, softcap, chunk):
        needs_grad = ctx.needs_input_grad[0]
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            logits = F.linear(hidden[start:end], weight).float()
            capped = torch.tanh(logits / softcap) if softcap else None
            if capped is not None:
                logits = capped * softcap
            log_norm = torch.logsumexp(logits, dim=1)
            picked = logits.gather(1, targets[start:end, None])[:, 0]
            total += ((log_norm - picked) * weights[start:end]).sum()
            if not needs_grad:
                continue
            # d/dlogits of w * CE = w * (softmax - one_hot), built in place over the logits.
            grad_logits = logits.sub_(log_norm[:, None]).exp_()
            grad_logits[torch.arange(end - start, device=hidden.device), targets[start:end]] -= 1.0
            grad_logits *= weights[start:end, None]
            if capped is not None:
                grad_logits *= 1.0 - capped * capped
            grad_hidden[start:end] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden if needs_grad else total.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None


def sum_of_example_losses(
    model: nn.Module, batch: Mapping[str, torch.Tensor], chunk_positions: int | None = 0
) -> torch.Tensor:
    """sum_i (mean CE over example i's target tokens), logits only at target positions.

    ``chunk_positions``: positions per lm_head + cross-entropy chunk (0: sized by
    ``selection.common.memory.LOSS_CHUNK_BYTES``; None: the plain, unchunked computation)."""
    body, lm_head, softcap = _split_model(model)
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    (rows, cols), targets, weights = _target_weights(batch["labels"])
    chunkable = (
        chunk_positions is not None
        and isinstance(lm_head, nn.Linear)
        and lm_head.bias is None
        and not lm_head.weight.requires_grad
    )
    if chunkable:
        chunk = chunk_positions or loss_chunk_positions(lm_head.out_features)
        return ChunkedLinearCrossEntropy.apply(hidden[rows, cols], lm_head.weight, targets, weights, softcap, chunk)
    logits = lm_head(hidden[rows, cols]).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token_losses = F.cross_entropy(logits, targets, reduction="none")
    return (token_losses * weights).sum()


class PerExampleGradients:
    """Batched per-example gradients of a peft LoRA model, flattened to ``[B, dim]``.

    >>> engine = PerExampleGradients(model)
    >>> grads = engine(collate(examples, pad_id))   # float32 [B, engine.dim]
    """

    def __init__(self, model: nn.Module, loss_chunk_positions: int | None = 0) -> None:
        self.model = model
        self.loss_chunk_positions = loss_chunk_positions  # see sum_of_example_losses
        self.slots = lora_slots(model)
        self.names = [slot.name for slot in self.slots]
        self.dim = sum(slot.numel for slot in self.slots)
        self.names_hash = param_names_hash(self.names)
        _split_model(model)  # validate once, early

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "labels")}
        captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def capture(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if id(module) in captured:
                raise ValueError("a LoRA module ran twice in one forward pass; per-example capture assumes once")
            captured[id(module)] = (inputs[0].detach(), output)

        handles = [slot.module.register_forward_hook(capture) for slot in self.slots]
        # The backward stays in eval mode: under gradient checkpointing it reruns the layers' forward
        # (hooks already removed, so the rerun captures nothing), which must match the first one.
        with eval_mode(self.model), torch.enable_grad():
            try:
                loss = sum_of_example_losses(self.model, batch, self.loss_chunk_positions)
            finally:
                for handle in handles:
                    handle.remove()
            missing = [slot.name for slot in self.slots if id(slot.module) not in captured]
            if missing:
                raise ValueError(f"LoRA modules not reached by the forward pass (disabled adapters?): {missing[:3]}")
            outputs = [captured[id(slot.module)][1] for slot in self.slots]
            output_grads = torch.autograd.grad(loss, outputs)
        batch_size = batch["input_ids"].shape[0]
        flat = torch.empty(batch_size, self.dim, dtype=torch.float32, device=device)
        for slot, output_grad in zip(self.slots, output_grads):
            layer_input = captured[id(slot.module)][0]
            # [B, T, out]^T @ [B, T, in] -> [B, out, in]: sum over tokens of outer products.
            per_example = torch.bmm(output_grad.transpose(1, 2).float(), layer_input.float())
            flat[:, slot.offset : slot.offset + slot.numel] = per_example.reshape(batch_size, -1)
        return flat


def _adapter_free_name(name: str) -> str:
    """peft names carry the adapter (``lora_A.default.weight``); saved states may not."""
    parts = name.split(".")
    for index, part in enumerate(parts[:-2]):
        if part in ("lora_A", "lora_B"):
            return ".".join(parts[: index + 1] + parts[index + 2 :])
    return name


def flatten_named(state: Mapping[str, torch.Tensor], slots: Sequence[LoraSlot], what: str) -> torch.Tensor:
    """Concatenate per-parameter tensors (keyed by parameter name) in the flat layout.

    Keys may be the full ``named_parameters`` names or the same without the adapter name.
    """
    by_short = {_adapter_free_name(key): value for key, value in state.items()}
    pieces: list[torch.Tensor] = []
    missing: list[str] = []
    for slot in slots:
        value = state.get(slot.name)
        if value is None:
            value = by_short.get(_adapter_free_name(slot.name))
        if value is None:
            missing.append(slot.name)
            continue
        if tuple(value.shape) != slot.shape:
            raise ValueError(f"{what}[{slot.name!r}] has shape {tuple(value.shape)}, expected {slot.shape}")
        pieces.append(value.reshape(-1).float())
    if missing:
        raise ValueError(f"{what} lacks {len(missing)} LoRA parameters, e.g. {missing[:3]}")
    return torch.cat(pieces)


def adam_feature(
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    beta1: float = LESS_BETA1,
    beta2: float = LESS_BETA2,
    eps: float = LESS_EPS,
) -> torch.Tensor:
    """LESS's Adam-preconditioned gradient: one hypothetical Adam step from (m, v) with g.

    m' = b1*m + (1-b1)*g,  v' = b2*v + (1-b2)*g^2,  feature = m' / sqrt(v' + eps).
    Deliberately as LESS (``obtain_gradients_with_adam``): no bias correction and eps
    *inside* the square root (torch's Adam adds eps outside). ``g`` is ``[B, D]`` or
    ``[D]``; the moments are ``[D]`` and broadcast over the batch.
    """
    if exp_avg.shape != exp_avg_sq.shape or g.shape[-1] != exp_avg.shape[-1]:
        raise ValueError(
            f"shape mismatch: g {tuple(g.shape)}, exp_avg {tuple(exp_avg.shape)}, exp_avg_sq {tuple(exp_avg_sq.shape)}"
        )
    # In place after the first op: at most three [B, D] tensors (g, v, m) at once, which the memory
    # planner counts (selection.common.memory.GRADIENT_COPIES); the values are the formula's.
    v = g.square().mul_(1 - beta2).add_(exp_avg_sq.to(g) * beta2).add_(eps).sqrt_()
    m = g.mul(1 - beta1).add_(exp_avg.to(g) * beta1)
    return m.div_(v)


def adam_no_momentum_feature(
    g: torch.Tensor, exp_avg_sq: torch.Tensor, beta2: float = LESS_BETA2, eps: float = LESS_EPS
) -> torch.Tensor:
    """Adam's preconditioner without the momentum: ``g / sqrt(v' + eps)``, ``v' = b2*v + (1-b2)*g^2``.

    LESS's feature minus its shared part: ``adam_feature`` is ``(b1*m + (1-b1)*g) / sqrt(v'+eps)``,
    and ``b1*m`` is the same for every example, so after the cosine it mostly measures how small
    an example's own gradient is next to that shared direction. Dropping it keeps the per-example
    step direction as Adam would scale it (eps inside the root as in ``adam_feature``).
    """
    if g.shape[-1] != exp_avg_sq.shape[-1] or exp_avg_sq.dim() != 1:
        raise ValueError(f"shape mismatch: g {tuple(g.shape)}, exp_avg_sq {tuple(exp_avg_sq.shape)}")
    v = exp_avg_sq.to(g) * beta2 + g.square() * (1 - beta2)
    return g / torch.sqrt(v + eps)


def adam_bias_corrected_feature(
    g: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    beta1: float = LESS_BETA1,
    beta2: float = LESS_BETA2,
    eps: float = LESS_EPS,
) -> torch.Tensor:
    """``adam_feature`` with Adam's bias correction: the hypothetical step is optimizer step
    ``step + 1`` (``step`` = steps the moments have seen), ``m'/(1-b1^(step+1))`` over
    ``sqrt(v'/(1-b2^(step+1)) + eps)``."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if exp_avg.shape != exp_avg_sq.shape or g.shape[-1] != exp_avg.shape[-1]:
        raise ValueError(
            f"shape mismatch: g {tuple(g.shape)}, exp_avg {tuple(exp_avg.shape)}, exp_avg_sq {tuple(exp_avg_sq.shape)}"
        )
    m = (exp_avg.to(g) * beta1 + g * (1 - beta1)) / (1 - beta1 ** (step + 1))
    v = (exp_avg_sq.to(g) * beta2 + g.square() * (1 - beta2)) / (1 - beta2 ** (step + 1))
    return m / torch.sqrt(v + eps)


# Train-feature transforms of ``train_gradients`` (target features are always plain gradients).
# "adam" is LESS's own; see DEFAULT_TRAIN_TRANSFORM for the default, and selection.influence.recipes
# for the reasons given per run.
TRAIN_TRANSFORMS = ("adam", "adam_no_momentum", "adam_bias_corrected", "sgd")
LITERAL_LESS_TRANSFORM = "adam"
# The default is "sgd", with gradients of the whole sequence (DEFAULT_LOSS_TOKENS) and the pool's
# top directions removed at scoring (selection.influence.directions). Measured by
# bench/gradient_signal.py on the tuning pool (medicine, computing; 800 planted rows, 1 warmup
# epoch = 5 Adam steps), LESS/BIDS planted recall over the base rate with sequence gradients and
# 8 directions removed: sgd 7.33x/6.33x, adam_no_momentum 4.92x/5.42x, adam 3.33x/3.83x,
# adam_bias_corrected 3.25x/3.17x.
# After a short warmup Adam's shared momentum and tiny second moments dominate every feature.
DEFAULT_TRAIN_TRANSFORM = "sgd"

# Loss tokens of the gradient features (selection.data.tokenization.LOSS_TOKENS).
DEFAULT_LOSS_TOKENS = "sequence"


def train_feature(
    transform: str, g: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int | None = None
) -> torch.Tensor:
    """The train feature of per-example gradients ``g`` (``[B, D]`` or ``[D]``) under ``transform``."""
    if transform == "adam":
        return adam_feature(g, exp_avg, exp_avg_sq)
    if transform == "adam_no_momentum":
        return adam_no_momentum_feature(g, exp_avg_sq)
    if transform == "adam_bias_corrected":
        if step is None:
            raise ValueError("adam_bias_corrected needs the optimizer step count of the checkpoint")
        return adam_bias_corrected_feature(g, exp_avg, exp_avg_sq, step)
    if transform == "sgd":
        return g
    raise ValueError(f"unknown train transform {transform!r}; expected one of {TRAIN_TRANSFORMS}")


def check_train_transform(transform: str) -> str:
    if transform not in TRAIN_TRANSFORMS:
        raise ValueError(f"unknown train transform {transform!r}; expected one of {TRAIN_TRANSFORMS}")
    return transform


@dataclass(frozen=True)
class AdamMoments:
    """Flat Adam moments of one checkpoint, in the engine's parameter order, and the number of
    optimizer steps that produced them (needed only by ``adam_bias_corrected``)."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int | None = None

    @classmethod
    def from_named(
        cls,
        exp_avg: Mapping[str, torch.Tensor],
        exp_avg_sq: Mapping[str, torch.Tensor],
        slots: Sequence[LoraSlot],
        step: int | None = None,
    ) -> AdamMoments:
        return cls(flatten_named(exp_avg, slots, "exp_avg"), flatten_named(exp_avg_sq, slots, "exp_avg_sq"), step)

    def transform(self, grads: torch.Tensor, transform: str = LITERAL_LESS_TRANSFORM) -> torch.Tensor:
        return train_feature(transform, grads, self.exp_avg, self.exp_avg_sq, self.step)
