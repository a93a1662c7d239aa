"""Feature recipes: one name for the four settings that make the gradient features, and the reason
each setting differs from LESS, built from the settings a run actually used.

A recipe fixes ``loss_tokens``, ``train_transform``, projection ``mode`` and ``dropped_directions``;
a single setting given explicitly wins over its recipe's value. ``train_gradients``,
``target_gradients`` and ``influence_scores`` all resolve through :func:`resolve`, so the stores an
influence run reads are the ones the same recipe wrote.

The "why" texts quote measured figures only for the combination of settings they were measured
on (:data:`RECALL`, :data:`COLLAPSE`), with where they were measured (:data:`MEASURED_ON`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from selection.data.tokenization import LESS_LOSS_TOKENS, check_loss_tokens
from selection.influence import diagnostics, directions, projection
from selection.influence.gradients import (
    DEFAULT_LOSS_TOKENS,
    DEFAULT_TRAIN_TRANSFORM,
    LITERAL_LESS_TRANSFORM,
    check_train_transform,
)

FIELDS = ("loss_tokens", "train_transform", "mode", "dropped_directions")
DEFAULT_RECIPE = "default"
LESS_RECIPE = "less-paper"
RECIPES: dict[str, dict[str, Any]] = {
    DEFAULT_RECIPE: {
        "loss_tokens": DEFAULT_LOSS_TOKENS,
        "train_transform": DEFAULT_TRAIN_TRANSFORM,
        "mode": projection.DEFAULT_MODE,
        "dropped_directions": directions.DEFAULT_DROPPED_DIRECTIONS,
    },
    LESS_RECIPE: {
        "loss_tokens": LESS_LOSS_TOKENS,
        "train_transform": LITERAL_LESS_TRANSFORM,
        "mode": "exact",
        "dropped_directions": 0,
    },
}
# Both generate LESS's dense Rademacher projection (``device`` on the compute device).
LESS_MODES = ("exact", "device")

MEASURED_ON = (
    "on the tuning pool (medicine, computing; 800 rows, SmolLM2-135M, 5 warmup Adam steps, 'fast' projection "
    "at 8192 dims; not held-out)"
)
# Planted recall of LESS / BIDS over the base rate at a 10% budget, per (train transform, loss tokens,
# directions removed), on the tuning pool (bench/gradient_signal.py, logs in bench/results/).
RECALL: dict[tuple[str, str, int], tuple[float, float]] = {
    ("adam", "response", 0): (2.00, 1.50),
    ("adam", "response", 8): (1.92, 1.92),
    ("adam", "sequence", 0): (1.92, 2.50),
    ("adam", "sequence", 8): (3.33, 3.83),
    ("adam_bias_corrected", "response", 0): (1.92, 1.33),
    ("adam_bias_corrected", "response", 8): (1.17, 2.58),
    ("adam_bias_corrected", "sequence", 0): (2.08, 2.67),
    ("adam_bias_corrected", "sequence", 8): (3.25, 3.17),
    ("adam_no_momentum", "response", 0): (1.92, 1.50),
    ("adam_no_momentum", "response", 8): (2.08, 2.58),
    ("adam_no_momentum", "sequence", 0): (2.17, 3.42),
    ("adam_no_momentum", "sequence", 8): (4.92, 5.42),
    ("sgd", "response", 0): (2.00, 1.67),
    ("sgd", "response", 8): (2.83, 3.00),
    ("sgd", "sequence", 0): (3.00, 3.58),
    ("sgd", "sequence", 8): (7.33, 6.33),
}
# Mean unit-feature norm and mean pairwise cosine of the train features as stored (before any
# direction removal), per (train transform, loss tokens), same pool (bench/feature_transforms.py).
COLLAPSE: dict[tuple[str, str], tuple[float, float]] = {
    ("adam", "response"): (0.847, 0.718),
    ("adam", "sequence"): (0.939, 0.882),
    ("adam_bias_corrected", "response"): (0.845, 0.714),
    ("adam_bias_corrected", "sequence"): (0.927, 0.860),
    ("adam_no_momentum", "response"): (0.218, 0.046),
    ("adam_no_momentum", "sequence"): (0.802, 0.643),
    ("sgd", "response"): (0.263, 0.068),
    ("sgd", "sequence"): (0.851, 0.725),
}


def check_recipe(name: str, field: str = "recipe") -> str:
    if name not in RECIPES:
        raise ValueError(f"`{field}` {name!r} is not a feature recipe; give one of {', '.join(map(repr, RECIPES))}")
    return name


@dataclass(frozen=True)
class FeatureRecipe:
    """The settings a run uses: its recipe's, with the explicitly given fields in place."""

    recipe: str
    loss_tokens: str
    train_transform: str
    mode: str
    dropped_directions: int
    # field -> {"recipe": the recipe's value, "ran": the given one}, for given values that differ.
    overrides: dict[str, dict[str, Any]]

    def settings(self) -> dict[str, Any]:
        return {field: getattr(self, field) for field in FIELDS}

    def metadata(self) -> dict[str, Any]:
        """Recipe name, the resolved settings and what overrode the recipe (lineage metrics and metadata)."""
        return {"recipe": self.recipe, **self.settings(), "recipe_overrides": self.overrides}


def resolve(
    recipe: str = DEFAULT_RECIPE,
    *,
    loss_tokens: str | None = None,
    train_transform: str | None = None,
    mode: str | None = None,
    dropped_directions: int | None = None,
    field: str = "recipe",
) -> FeatureRecipe:
    """The settings of ``recipe`` with every given (not None) single setting in its place; each is
    checked, and an unknown recipe is refused naming the config ``field``."""
    base = RECIPES[check_recipe(recipe, field)]
    given = {
        "loss_tokens": loss_tokens,
        "train_transform": train_transform,
        "mode": mode,
        "dropped_directions": dropped_directions,
    }
    values = {name: base[name] if value is None else value for name, value in given.items()}
    check_loss_tokens(values["loss_tokens"])
    check_train_transform(values["train_transform"])
    projection.check_mode(values["mode"])
    if int(values["dropped_directions"]) < 0:
        raise ValueError(f"`dropped_directions` must be >= 0, got {values['dropped_directions']}")
    overrides = {
        name: {"recipe": base[name], "ran": value}
        for name, value in given.items()
        if value is not None and value != base[name]
    }
    return FeatureRecipe(recipe=recipe, overrides=overrides, **values)


def is_less(loss_tokens: str, train_transform: str, mode: str, dropped_directions: int) -> bool:
    return (
        loss_tokens == LESS_LOSS_TOKENS
        and train_transform == LITERAL_LESS_TRANSFORM
        and mode in LESS_MODES
        and not dropped_directions
    )


def _recall(transform: str, loss_tokens: str, dropped: int) -> str | None:
    figures = RECALL.get((transform, loss_tokens, dropped))
    return None if figures is None else f"{figures[0]:.2f}x / {figures[1]:.2f}x"


def _compare(context: str, ours: tuple[str, str, int], theirs: tuple[str, str, int], labels: tuple[str, str]) -> str:
    """Planted recall of this run's combination against the one differing in one setting, when both were
    measured ("" otherwise: no figure stands in for an unmeasured combination)."""
    mine, alternative = _recall(*ours), _recall(*theirs)
    if mine is None or alternative is None:
        return ""
    verdict = "" if RECALL[ours][0] > RECALL[theirs][0] else " (no gain in this combination)"
    return (
        f"; planted recall LESS / BIDS over the base rate {context} {MEASURED_ON}: "
        f"{labels[0]} {mine}, {labels[1]} {alternative}{verdict}"
    )


def transform_why(transform: str, loss_tokens: str, dropped_directions: int) -> str:
    """How ``transform`` differs from LESS's ``adam`` and why, for this run's loss tokens and removed
    directions ("" for LESS's own transform)."""
    check_train_transform(transform)
    if transform == LITERAL_LESS_TRANSFORM:
        return ""
    base = {
        "sgd": "differs from LESS (adam): the raw per-example gradient, the LESS paper's SGD ablation, since "
        "after a warmup of a few optimizer steps Adam's shared momentum and tiny second moments dominate "
        "every adam feature",
        "adam_no_momentum": "differs from LESS (adam): Adam's per-coordinate scaling without the momentum "
        "b1*m, which every example shares and which dominates each feature after a short warmup",
        "adam_bias_corrected": "differs from LESS (adam): Adam's bias correction at the checkpoint's step count",
    }[transform]
    text = base
    mine, literal = COLLAPSE[(transform, loss_tokens)], COLLAPSE[(LITERAL_LESS_TRANSFORM, LESS_LOSS_TOKENS)]
    text += (
        f". Train features as stored (before direction removal), mean unit-feature norm / pairwise cosine "
        f"{MEASURED_ON}: {transform} with {loss_tokens} loss {mine[0]:.3f} / {mine[1]:.3f}, LESS's adam with "
        f"response loss {literal[0]:.3f} / {literal[1]:.3f}"
    )
    if mine[0] > diagnostics.COLLAPSE_MEAN_NORM:
        text += (
            f": {transform} features of the {loss_tokens} loss are as collapsed as LESS's literal ones, so "
            "any benefit relies on the dropped directions"
        )
        if not dropped_directions:
            text += ", and this run removes none"
    return text + _compare(
        f"with {loss_tokens} loss and {dropped_directions} directions removed",
        (transform, loss_tokens, dropped_directions),
        (LITERAL_LESS_TRANSFORM, loss_tokens, dropped_directions),
        (transform, "adam"),
    )


def loss_tokens_why(loss_tokens: str, transform: str, dropped_directions: int) -> str:
    """How ``loss_tokens`` differs from LESS's response tokens and why ("" for LESS's own)."""
    if check_loss_tokens(loss_tokens) == LESS_LOSS_TOKENS:
        return ""
    return (
        "differs from LESS (response tokens): the loss of every token, prompt included. On a multiple-choice "
        "answer the one token the model cannot copy is the answer letter, so response-only gradients match "
        "examples by their letter instead of their subject: of a target's 20 nearest pool rows 85-90% share "
        f"its letter with response loss, 25-28% with sequence loss (base rate 19%) {MEASURED_ON}"
        + _compare(
            f"with {transform} train features and {dropped_directions} directions removed",
            (transform, loss_tokens, dropped_directions),
            (transform, LESS_LOSS_TOKENS, dropped_directions),
            (f"{loss_tokens} loss", "response loss"),
        )
    )


def dropped_why(count: int, transform: str, loss_tokens: str) -> str:
    """How removing ``count`` directions differs from LESS's plain cosine and why ("" when none are removed)."""
    if not count:
        return ""
    return (
        f"differs from LESS (plain cosine): the pool's mean and top {count} principal directions, fitted on the "
        "train features, are removed from train and val features before the cosine, since every feature shares "
        "them and they would rank the pool by its common part. Fitted on train rows only, the removal does not "
        "make collapsed target features informative: their collapse is measured as scored, on its own"
        + _compare(
            f"with {transform} train features and {loss_tokens} loss",
            (transform, loss_tokens, count),
            (transform, loss_tokens, 0),
            (f"{count} removed", "none removed"),
        )
    )


def mode_why(mode: str) -> str:
    return projection.mode_why(mode)


def recipe_why(loss_tokens: str, train_transform: str, mode: str, dropped_directions: int) -> str:
    """One line on the whole combination: LESS's own, or which settings differ, with its measured recall."""
    figures = _recall(train_transform, loss_tokens, dropped_directions)
    measured = (
        f"; planted recall LESS / BIDS over the base rate of this combination {MEASURED_ON}: {figures}"
        if figures
        else "; no planted recall was measured for this combination"
    )
    if is_less(loss_tokens, train_transform, mode, dropped_directions):
        return (
            "all four settings are LESS's own (response-token loss, adam train features, dense Rademacher "
            f"projection, plain cosine): the paper's recipe{measured}"
        )
    differ = [
        name
        for name, ours, less_value in (
            ("loss_tokens", loss_tokens, LESS_LOSS_TOKENS),
            ("train_transform", train_transform, LITERAL_LESS_TRANSFORM),
            ("dropped_directions", dropped_directions, 0),
        )
        if ours != less_value
    ]
    if mode not in LESS_MODES:
        differ.insert(2, "mode")
    return f"differs from LESS's literal recipe in {', '.join(differ)}{measured}"


def whys(loss_tokens: str, train_transform: str, mode: str, dropped_directions: int) -> dict[str, str]:
    """Every "why" of one run's settings ("" for a setting that is LESS's own)."""
    return {
        "recipe_why": recipe_why(loss_tokens, train_transform, mode, dropped_directions),
        "mode_why": mode_why(mode),
        "transform_why": transform_why(train_transform, loss_tokens, dropped_directions),
        "loss_tokens_why": loss_tokens_why(loss_tokens, train_transform, dropped_directions),
        "dropped_directions_why": dropped_why(dropped_directions, train_transform, loss_tokens),
    }
