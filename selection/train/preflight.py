"""Checks that refuse an invalid combination of settings and data before the expensive step.

Each check raises ``ValueError`` with a message that names the config field to change and
how; assets call them before training, computing gradients, scoring or writing anything.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from fractions import Fraction

from selection import selectors
from selection.train import training

# Config fields of the warmup asset, named in the refusal message.
WARMUP_FIELDS = {"fraction": "fraction", "epochs": "epochs", "batch_size": "batch_size", "warmup_ratio": "warmup_ratio"}
# How far above the current value the epoch search looks for a fix.
_EPOCH_SEARCH = 8


def _zero_lr_epochs(n_examples: int, batch_size: int, epochs: int, warmup_ratio: float) -> list[int]:
    averages = training.epoch_average_lrs(n_examples, batch_size, epochs, warmup_ratio)
    return [epoch for epoch, average in enumerate(averages, start=1) if average <= 0.0]


def check_warmup_schedule(
    n_examples: int,
    batch_size: int,
    epochs: int,
    warmup_ratio: float,
    *,
    pool_size: int | None = None,
    fields: Mapping[str, str] = WARMUP_FIELDS,
) -> list[float]:
    """Refuse a warmup whose linear schedule gives some epoch an average learning rate of 0.

    LESS weights each checkpoint's gradients by its epoch's average lr, so such an epoch's
    gradients would be computed and then count for nothing (influence refuses them). With
    ``n_examples <= batch_size`` every epoch is one optimizer step and epoch 1's single step
    is the warmup step at lr 0. Returns the epochs' average lrs relative to the peak lr.
    ``pool_size`` (the pool the sample is drawn from) lets the message give a ``fraction``.
    Every fix the message offers is checked to pass.
    """
    if n_examples < 1:
        raise ValueError(
            f"the warmup sample is empty; raise `{fields['fraction']}` so it holds at least one "
            "example with target tokens"
        )
    zero = _zero_lr_epochs(n_examples, batch_size, epochs, warmup_ratio)
    if not zero:
        return training.epoch_average_lrs(n_examples, batch_size, epochs, warmup_ratio)
    schedule = training.lr_schedule(n_examples, batch_size, epochs, warmup_ratio)
    fixes = []
    upper = pool_size if pool_size is not None else n_examples + batch_size * epochs
    need = next(
        (n for n in range(n_examples + 1, upper + 1) if not _zero_lr_epochs(n, batch_size, epochs, warmup_ratio)), None
    )
    if need is not None:
        hint = f" (>= {math.ceil(need / pool_size * 1000) / 1000} of the {pool_size}-example pool)" if pool_size else ""
        fixes.append(f"raise `{fields['fraction']}` so the sample holds at least {need} usable examples{hint}")
    more_epochs = next(
        (
            e
            for e in range(epochs + 1, epochs + _EPOCH_SEARCH + 1)
            if not _zero_lr_epochs(n_examples, batch_size, e, warmup_ratio)
        ),
        None,
    )
    if more_epochs is not None:
        fixes.append(f"raise `{fields['epochs']}` to {more_epochs}")
    smaller = next(
        (b for b in range(batch_size - 1, 0, -1) if not _zero_lr_epochs(n_examples, b, epochs, warmup_ratio)), None
    )
    if smaller is not None:
        fixes.append(f"lower `{fields['batch_size']}` to {smaller} or less")
    if not _zero_lr_epochs(n_examples, batch_size, epochs, 0.0):
        fixes.append(f"set `{fields['warmup_ratio']}` to 0")
    raise ValueError(
        f"warmup epochs {zero} would train with an average learning rate of 0: {n_examples} examples at "
        f"{batch_size} per optimizer step make {schedule.steps_per_epoch} step(s) per epoch, and the first "
        f"{schedule.warmup_steps} of {schedule.total_steps} steps are warmup steps starting at lr 0, so those "
        f"checkpoints would get weight 0 in LESS's influence; " + "; or ".join(fixes)
    )


def resolve_selection_budget(budget: float, n_pool: int, n_usable: int, usable: str = "usable examples") -> int:
    """The config ``budget`` as a count, refused when it is above the pool or above the usable examples.

    A fraction is a share of ``n_pool`` (the current pool); the count must then fit within
    ``n_usable`` (what the method can actually pick from, e.g. examples with scores). A value that
    fits no pool (not finite, not positive, a non-whole count) is refused first.
    """
    selectors.check_budget_setting(budget)
    if n_usable < 1:
        raise ValueError(
            f"there are no {usable} to select from (pool of {n_pool}); materialize the upstream "
            "assets first or add sources to raw_pool"
        )
    if budget >= 1 and int(budget) > n_pool:
        raise ValueError(
            f"`budget` {int(budget)} is above the pool of {n_pool} current examples; lower `budget` "
            f"{_largest_budget(n_usable, n_pool)}, or add sources to raw_pool"
        )
    count = selectors.resolve_budget_setting(budget, n_pool)
    if count > n_usable:
        raise ValueError(
            f"`budget` {budget} asks for {count} examples but only {n_usable} of the {n_pool} current pool "
            f"examples are {usable}; lower `budget` {_largest_budget(n_usable, n_pool)}"
        )
    return count


def _largest_budget(n_usable: int, n_pool: int) -> str:
    """The end of "lower `budget` ...": the largest count, and a fraction of the pool that selects at
    most that many; a fraction is below 1 (1 is a count of one example)."""
    if n_usable >= n_pool:
        return f"to at most {n_usable} (or a fraction below 1: 1 means one example)"
    fraction = math.floor(n_usable / n_pool * 1000) / 1000
    if math.floor(Fraction(repr(fraction)) * n_pool) == 0:  # no 3-decimal fraction fits: the count only
        return f"to at most {n_usable}"
    return f"to at most {n_usable} (or a fraction <= {fraction})"


def check_val_usable(val_rows: Iterable[tuple[str, str]], usable_ids: Collection[str], what: str) -> dict[str, int]:
    """Refuse a target set where some task has no usable val example; returns usable val examples per task.

    ``val_rows`` are (task, val example id); ``usable_ids`` the val ids that can give a
    gradient (target tokens within max_length, or features stored). A task without one
    would silently drop out of every per-task selection.
    """
    total: dict[str, int] = {}
    usable: dict[str, int] = {}
    for task, example_id in val_rows:
        total[task] = total.get(task, 0) + 1
        usable[task] = usable.get(task, 0) + (example_id in usable_ids)
    if not total:
        raise ValueError(
            "there are no `val` target rows; materialize target_tasks with target files "
            "(`files`) that hold examples, and `n_val` >= 1"
        )
    empty = sorted(task for task, count in usable.items() if count == 0)
    if empty:
        raise ValueError(
            f"tasks {empty} have no usable val example ({what}; {sum(total[t] for t in empty)} val rows in all): "
            "give them val examples with an assistant answer that fits the model's `max_length` (short prompts, "
            "or raise `max_length` in the model spec), or drop those tasks from target_tasks' `files`"
        )
    return usable
