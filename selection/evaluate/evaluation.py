"""Evaluate finetuned checkpoints on held-out target rows and compare methods.

:func:`evaluate_model` scores every test row (``{task, subtask, example_id, messages}``;
the gold answer is the final assistant turn):

- **Loss** (every row): mean per-token negative log-likelihood (nats) of the gold answer
  given the conversation before it (:func:`selection.diversity.quality.score_response_likelihoods`
  with ``final_turn_only``); perplexity of a group = ``exp(mean of the rows' NLL)``. A row
  whose prompt leaves no answer token within ``max_length`` gets NaN: counted per group
  (``n_unscored``), never averaged in as a number nor dropped silently. A row whose answer
  is cut short is scored on the kept prefix and flagged (``truncated``, ``n_truncated``).
- **Multiple-choice accuracy** (MMLU-style rows: the gold answer matches ``^[A-D]\\. ``):
  the four choices are parsed from the last user turn (the layout of
  :func:`selection.data.default_data.render_mmlu`: ``A. text`` ... ``D. text`` lines), each
  candidate answer ``"X. <text>"`` is scored by the same mean per-token log-likelihood
  (length-normalised, so long choices are not penalised), and the row is correct when the
  gold candidate scores strictly highest (ties count as wrong). The gold candidate is the
  gold answer itself, so only three extra conversations per row are scored. Rows whose
  prompt cannot be parsed, whose gold answer is not the parsed choice, or any of whose
  candidates does not fit whole in ``max_length`` get ``correct=None`` and a ``reject_reason``; they are
  counted (``n_choice_rejects``), not scored as wrong.
- **Greedy exact match** (optional, ``generate=True``; slow on CPU): the model answers the
  prompt greedily and the row is correct when the first character of the answer is the
  gold letter.

:func:`stratified_test_rows` picks the test rows: per task, round robin over its subtasks,
so a cap never leaves a subtask out. :func:`comparison_table` lines several
:class:`EvalResult` (one per finetuning seed) up per (method, task) with paired deltas
against a baseline, their intervals, Holm-adjusted p-values and per-task ranks; :func:`worst_tasks`
gives each method's weakest task; :func:`markdown_report` renders them.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import torch

from selection.common import markdown
from selection.data.default_data import MMLU_LETTERS
from selection.diversity.quality import Conversation, score_response_likelihoods
from selection.evaluate import stats
from selection.train.generation import generate_greedy, split_final_turn

GOLD_CHOICE = re.compile(r"^([A-D])\. ")
# The closing line of selection.data.default_data.render_mmlu; text after choice D otherwise ends at a blank line.
MMLU_INSTRUCTION = "Answer with the letter and the text of the correct choice."
GENERATION_KINDS = frozenset({"mmlu"})
ROW_KEYS = ("task", "subtask", "example_id", "messages")


class ChoiceParseError(ValueError):
    """A prompt does not list four choices ``A. `` .. ``D. `` that can be read back."""


def parse_choices(prompt: str) -> tuple[str, str, str, str]:
    """The texts of choices A-D listed in ``prompt`` (stripped).

    Reads the *last* ``A.``/``B.``/``C.``/``D.`` lines (a question may quote lettered
    lines of its own). A choice runs up to the next letter's line; choice D runs to the
    :data:`MMLU_INSTRUCTION` line when present, else to the first blank line or the end.
    """
    body = prompt.rstrip()
    ends_with_instruction = body.endswith(MMLU_INSTRUCTION)
    if ends_with_instruction:
        body = body[: -len(MMLU_INSTRUCTION)].rstrip()
    text = "\n" + body  # a choice line may open the prompt
    starts: list[int] = []
    end = len(text)
    for letter in reversed(MMLU_LETTERS):
        position = text.rfind(f"\n{letter}. ", 0, end)
        if position < 0:
            where = "in the prompt" if letter == "D" else f"before the '{chr(ord(letter) + 1)}. ' line"
            raise ChoiceParseError(f"no line starting with '{letter}. ' {where}")
        starts.append(position)
        end = position
    starts.reverse()
    d_text = text[starts[3] + 4 :]
    if not ends_with_instruction:
        d_text = d_text.split("\n\n", 1)[0]
    choices = [text[start + 4 : next_start] for start, next_start in itertools.pairwise(starts)] + [d_text]
    choices = [choice.strip() for choice in choices]
    empty = [letter for letter, choice in zip(MMLU_LETTERS, choices) if not choice]
    if empty:
        raise ChoiceParseError(f"choice(s) {', '.join(empty)} have no text")
    return choices[0], choices[1], choices[2], choices[3]


@dataclass(frozen=True)
class ChoiceRow:
    """A multiple-choice row ready to score: its prompt, choices and gold index."""

    prompt: Conversation
    choices: tuple[str, str, str, str]
    gold_index: int

    def candidate(self, index: int) -> Conversation:
        answer = f"{MMLU_LETTERS[index]}. {self.choices[index]}"
        return [*self.prompt, {"role": "assistant", "content": answer}]


def plan_choice_row(messages: Conversation) -> ChoiceRow | str | None:
    """``None`` for a row that is not multiple choice, a reject reason, or the plan."""
    prompt, gold = split_final_turn(messages)
    match = GOLD_CHOICE.match(gold)
    if match is None:
        return None
    users = [message for message in prompt if message["role"] == "user"]
    if not users:
        return "no user turn before the gold answer to read the choices from"
    try:
        choices = parse_choices(users[-1]["content"])
    except ChoiceParseError as error:
        return f"choices not parsable from the prompt: {error}"
    gold_index = MMLU_LETTERS.index(match.group(1))
    expected = f"{match.group(1)}. {choices[gold_index]}"
    if gold.strip() != expected:
        return f"gold answer {gold.strip()[:80]!r} is not choice {match.group(1)} as parsed ({expected[:80]!r})"
    return ChoiceRow(prompt, choices, gold_index)


# ------------------------------------------------------------------ results


@dataclass(frozen=True)
class RowResult:
    """One evaluated test row. ``nll`` is NaN when the gold answer could not be scored."""

    example_id: str
    task: str
    subtask: str
    nll: float
    correct: bool | None = None  # None: not multiple choice, or rejected (see reject_reason)
    truncated: bool = False
    gold_letter: str | None = None
    predicted_letter: str | None = None  # highest-likelihood choice
    choice_log_likelihoods: tuple[float, ...] | None = None  # A-D, mean per token
    reject_reason: str | None = None
    generation: str | None = None
    generation_correct: bool | None = None

    @property
    def is_choice_row(self) -> bool:
        return self.gold_letter is not None or self.reject_reason is not None


@dataclass(frozen=True)
class GroupMetrics:
    """Aggregates over one task (``subtask=None``) or one (task, subtask)."""

    task: str
    subtask: str | None
    n: int
    n_unscored: int  # NaN NLL: the gold answer did not fit in max_length
    n_truncated: int
    mean_nll: float  # over scored rows; NaN when none
    perplexity: float  # exp(mean_nll)
    n_choice: int  # multiple-choice rows, including rejects
    n_choice_rejects: int
    n_correct: int
    accuracy: float  # n_correct / (n_choice - n_choice_rejects); NaN when undefined
    n_generated: int
    generation_accuracy: float  # NaN when nothing was generated


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if values else math.nan


def _aggregate(task: str, subtask: str | None, rows: Sequence[RowResult]) -> GroupMetrics:
    scored = [row.nll for row in rows if not math.isnan(row.nll)]
    choice = [row for row in rows if row.is_choice_row]
    judged = [row.correct for row in choice if row.correct is not None]
    generated = [row.generation_correct for row in rows if row.generation_correct is not None]
    mean_nll = _mean(scored)
    with np.errstate(over="ignore"):
        perplexity = float(np.exp(mean_nll))
    return GroupMetrics(
        task=task,
        subtask=subtask,
        n=len(rows),
        n_unscored=len(rows) - len(scored),
        n_truncated=sum(row.truncated for row in rows),
        mean_nll=mean_nll,
        perplexity=perplexity,
        n_choice=len(choice),
        n_choice_rejects=len(choice) - len(judged),
        n_correct=sum(judged),
        accuracy=_mean([float(c) for c in judged]),
        n_generated=len(generated),
        generation_accuracy=_mean([float(c) for c in generated]),
    )


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass(frozen=True)
class EvalResult:
    """Per-row records (input order) with per-task and per-subtask aggregates."""

    rows: tuple[RowResult, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        seen: set[tuple[str, str]] = set()
        for row in self.rows:
            key = (row.task, row.example_id)
            if key in seen:
                raise ValueError(f"example {row.example_id!r} appears twice in task {row.task!r}")
            seen.add(key)

    @cached_property
    def per_task(self) -> dict[str, GroupMetrics]:
        groups: dict[str, list[RowResult]] = defaultdict(list)
        for row in self.rows:
            groups[row.task].append(row)
        return {task: _aggregate(task, None, groups[task]) for task in sorted(groups)}

    @cached_property
    def per_subtask(self) -> dict[tuple[str, str], GroupMetrics]:
        groups: dict[tuple[str, str], list[RowResult]] = defaultdict(list)
        for row in self.rows:
            groups[(row.task, row.subtask)].append(row)
        return {key: _aggregate(key[0], key[1], groups[key]) for key in sorted(groups)}

    def example_ids(self, task: str) -> frozenset[str]:
        return frozenset(row.example_id for row in self.rows if row.task == task)

    def metrics_frame(self) -> pd.DataFrame:
        """One row per task (``subtask`` empty) followed by one per (task, subtask)."""
        groups = [*self.per_task.values(), *self.per_subtask.values()]
        return pd.DataFrame([{**asdict(group), "subtask": group.subtask or ""} for group in groups])

    def summary(self) -> dict[str, Any]:
        """JSON-friendly per-task metrics (NaN -> None), e.g. for lineage."""
        return {
            task: {
                key: _json_float(value) if isinstance(value, float) else value
                for key, value in asdict(group).items()
                if key not in ("task", "subtask")
            }
            for task, group in self.per_task.items()
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (NaN -> None); :meth:`from_dict` reads it back."""
        rows = []
        for row in self.rows:
            record = asdict(row)
            record["nll"] = _json_float(row.nll)
            if row.choice_log_likelihoods is not None:
                record["choice_log_likelihoods"] = [_json_float(v) for v in row.choice_log_likelihoods]
            rows.append(record)
        return {"rows": rows, "settings": dict(self.settings)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EvalResult:
        rows = []
        for record in data["rows"]:
            record = dict(record)
            record["nll"] = math.nan if record["nll"] is None else float(record["nll"])
            if record.get("choice_log_likelihoods") is not None:
                record["choice_log_likelihoods"] = tuple(
                    math.nan if v is None else float(v) for v in record["choice_log_likelihoods"]
                )
            rows.append(RowResult(**record))
        return cls(tuple(rows), dict(data.get("settings", {})))


# ------------------------------------------------------------------ evaluation


@dataclass(frozen=True)
class _TestRow:
    task: str
    subtask: str
    example_id: str
    messages: Conversation


def _check_rows(test_rows: Iterable[Mapping[str, Any]]) -> list[_TestRow]:
    rows = []
    for index, row in enumerate(test_rows):
        missing = [key for key in ROW_KEYS if key not in row]
        if missing:
            raise ValueError(f"test row {index} lacks {missing} (needs {', '.join(ROW_KEYS)})")
        messages = row["messages"]
        if not messages or messages[-1]["role"] != "assistant":
            raise ValueError(
                f"test row {index} ({row['example_id']!r}) does not end with an assistant turn (the gold answer)"
            )
        rows.append(_TestRow(str(row["task"]), str(row["subtask"]), str(row["example_id"]), list(messages)))
    if not rows:
        raise ValueError("no test rows to evaluate")
    return rows


def _first_letter_matches(generation: str, gold_letter: str) -> bool:
    return generation.strip()[:1] == gold_letter


def _scoring_pass(rows: Sequence[_TestRow]) -> tuple[list, list[Conversation], list[tuple[int, int]]]:
    """(plans, conversations, alternates) of one scoring pass: the gold answers first, then every
    non-gold candidate, with the (row, choice) each of those comes from."""
    plans = [plan_choice_row(row.messages) for row in rows]
    conversations = [row.messages for row in rows]
    alternates: list[tuple[int, int]] = []
    for row_index, plan in enumerate(plans):
        if isinstance(plan, ChoiceRow):
            for choice_index in range(len(MMLU_LETTERS)):
                if choice_index != plan.gold_index:
                    alternates.append((row_index, choice_index))
                    conversations.append(plan.candidate(choice_index))
    return plans, conversations, alternates


def n_scored_conversations(test_rows: Iterable[Mapping[str, Any]]) -> int:
    """Conversations ``evaluate_model`` scores for these rows (its unit of progress)."""
    return len(_scoring_pass(_check_rows(test_rows))[1])


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    test_rows: Iterable[Mapping[str, Any]],
    max_length: int = 512,
    batch_size: int = 8,
    generate: bool = False,
    generate_for: Collection[str] = ("mmlu",),
    max_new_tokens: int = 8,
    max_tokens: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> EvalResult:
    """Loss, multiple-choice accuracy and optionally greedy exact match (module docstring).

    ``max_length`` caps each scored conversation (prompt + answer) in tokens;
    ``batch_size``/``max_tokens`` shape the length-sorted scoring batches. With
    ``generate`` the rows of the kinds in ``generate_for`` (only ``"mmlu"``: the
    multiple-choice rows that parsed) are answered greedily with up to ``max_new_tokens``
    tokens. Deterministic; the model runs in eval mode. ``progress`` gets the number of
    conversations each scoring batch finished (``n_scored_conversations`` in all).
    """
    unknown = sorted(set(generate_for) - GENERATION_KINDS)
    if unknown:
        raise ValueError(f"cannot generate for {unknown}; supported: {sorted(GENERATION_KINDS)}")
    rows = _check_rows(test_rows)
    plans, conversations, alternates = _scoring_pass(rows)
    scored = score_response_likelihoods(
        model,
        tokenizer,
        conversations,
        max_length=max_length,
        batch_size=batch_size,
        max_tokens=max_tokens,
        final_turn_only=True,
        progress=progress,
    )
    gold_log_likelihoods = scored.values[: len(rows)]
    truncated = set(scored.stats.truncated_indices)
    choice_scores: dict[int, np.ndarray] = {}
    choice_cut: dict[int, np.ndarray] = {}
    for offset, (row_index, choice_index) in enumerate(alternates):
        if row_index not in choice_scores:
            gold_index = plans[row_index].gold_index  # type: ignore[union-attr]
            choice_scores[row_index] = np.full(len(MMLU_LETTERS), np.nan)
            choice_scores[row_index][gold_index] = gold_log_likelihoods[row_index]
            choice_cut[row_index] = np.zeros(len(MMLU_LETTERS), dtype=bool)
            choice_cut[row_index][gold_index] = row_index in truncated
        choice_scores[row_index][choice_index] = scored.values[len(rows) + offset]
        choice_cut[row_index][choice_index] = len(rows) + offset in truncated

    generations: dict[int, str] = {}
    if generate and "mmlu" in generate_for:
        to_generate = [i for i, plan in enumerate(plans) if isinstance(plan, ChoiceRow)]
        answers = generate_greedy(
            model,
            tokenizer,
            [plans[i].prompt for i in to_generate],  # type: ignore[union-attr]
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
        )
        generations = dict(zip(to_generate, answers))

    results = []
    for index, (row, plan) in enumerate(zip(rows, plans)):
        record: dict[str, Any] = {
            "example_id": row.example_id,
            "task": row.task,
            "subtask": row.subtask,
            "nll": float(-gold_log_likelihoods[index]),
            "truncated": index in truncated,
        }
        if isinstance(plan, str):
            record["reject_reason"] = plan
        elif isinstance(plan, ChoiceRow):
            record.update(_judge_choices(plan, choice_scores[index], choice_cut[index], max_length))
            if index in generations:
                record["generation"] = generations[index]
                record["generation_correct"] = _first_letter_matches(generations[index], record["gold_letter"])
        results.append(RowResult(**record))
    settings = {
        "max_length": max_length,
        "generate": generate,
        "generate_for": sorted(generate_for),
        "max_new_tokens": max_new_tokens,
        "choice_score": "mean per-token log-likelihood",
        "n_scored_conversations": len(conversations),
    }
    return EvalResult(tuple(results), settings)


def _judge_choices(plan: ChoiceRow, scores: np.ndarray, cut: np.ndarray, max_length: int) -> dict[str, Any]:
    record: dict[str, Any] = {
        "gold_letter": MMLU_LETTERS[plan.gold_index],
        "choice_log_likelihoods": tuple(float(s) for s in scores),
    }
    # A truncated candidate is scored on a prefix only: not comparable with the others.
    unscorable = [MMLU_LETTERS[i] for i in np.flatnonzero(np.isnan(scores) | cut)]
    if unscorable:
        record["reject_reason"] = f"candidate(s) {', '.join(unscorable)} do not fit in max_length={max_length}"
        return record
    best = int(np.argmax(scores))  # first of tied maxima
    record["predicted_letter"] = MMLU_LETTERS[best]
    others = np.delete(scores, plan.gold_index)
    record["correct"] = bool(scores[plan.gold_index] > others.max())
    return record


# ------------------------------------------------------------------ test rows


@dataclass(frozen=True)
class TaskCoverage:
    """How :func:`stratified_test_rows` chose one task's test rows."""

    task: str
    n_available: int
    n_subtasks: int
    n_rows: int  # rows kept
    cap: int | None  # the cap applied: the requested one, raised to n_subtasks when below it
    cap_raised: bool


def stratified_test_rows(
    rows: Iterable[Mapping[str, Any]], cap: int | None
) -> tuple[list[dict[str, Any]], list[TaskCoverage]]:
    """Up to ``cap`` test rows per task, round robin over its subtasks.

    Subtasks are visited in name order and each subtask's rows in the order given (the
    targets' split order), so the k-th row of every subtask comes before the (k+1)-th of
    any. A cap below a task's number of subtasks is raised to that number, so that every
    subtask is represented (``cap_raised`` says so); ``None`` keeps every row. Returns the
    rows (tasks in name order) and one :class:`TaskCoverage` per task.
    """
    if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
        raise ValueError(f"the test row cap must be a positive integer or None, got {cap!r}")
    by_task: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        by_task[str(row["task"])][str(row["subtask"])].append(dict(row))
    kept: list[dict[str, Any]] = []
    coverage = []
    for task in sorted(by_task):
        subtasks = [by_task[task][name] for name in sorted(by_task[task])]
        depth = max(len(members) for members in subtasks)
        interleaved = [members[k] for k in range(depth) for members in subtasks if k < len(members)]
        applied = None if cap is None else max(cap, len(subtasks))
        chosen = interleaved if applied is None else interleaved[:applied]
        kept.extend(chosen)
        coverage.append(
            TaskCoverage(
                task, len(interleaved), len(subtasks), len(chosen), applied, cap is not None and applied != cap
            )
        )
    return kept, coverage


# ------------------------------------------------------------------ comparison

_GROUP_COLUMNS = (
    "task",
    "n",
    "n_unscored",
    "n_truncated",
    "mean_nll",
    "perplexity",
    "n_choice",
    "n_choice_rejects",
    "accuracy",
    "generation_accuracy",
)
_INTERVAL_COLUMNS = tuple(
    f"delta_{metric}_{part}"
    for metric in ("nll", "accuracy")
    for part in ("ci_low", "ci_high", "p_value", "p_holm", "significant")
)
TABLE_COLUMNS = (
    "method",
    *_GROUP_COLUMNS,
    "delta_nll",
    "delta_accuracy",
    "primary_metric",
    "rank",
    "n_seeds",
    *_INTERVAL_COLUMNS,
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "significant",
    "significant_holm",
)

Results = Mapping[str, "EvalResult | Sequence[EvalResult]"]


def _seed_results(results: Results) -> dict[str, tuple[EvalResult, ...]]:
    """Each method's results, one per finetuning seed (a bare EvalResult is one seed)."""
    by_method = {}
    for method, value in results.items():
        seeds = (value,) if isinstance(value, EvalResult) else tuple(value)
        if not seeds or not all(isinstance(seed, EvalResult) for seed in seeds):
            raise ValueError(f"{method!r}: expected an EvalResult or a non-empty sequence of them (one per seed)")
        by_method[method] = seeds
    return by_method


def _check_same_rows(results: Mapping[str, Sequence[EvalResult]]) -> None:
    """Methods (and seeds) are only comparable on a task when evaluated on the same rows."""
    reference: dict[str, tuple[str, frozenset[str]]] = {}
    for method, seeds in results.items():
        for result in seeds:
            for task in result.per_task:
                ids = result.example_ids(task)
                first = reference.setdefault(task, (method, ids))
                if first[1] != ids:
                    raise ValueError(
                        f"task {task!r}: {method!r} was evaluated on different rows than {first[0]!r} "
                        f"({len(ids ^ first[1])} ids differ); compare results on the same test rows"
                    )


def _nan_mean(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over finite entries; NaN where there are none (without numpy's empty-slice warning)."""
    finite = np.isfinite(values)
    counts = finite.sum(axis=axis)
    totals = np.where(finite, values, 0.0).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)


def _seed_row_values(seeds: Sequence[EvalResult], task: str, ids: Sequence[str]) -> dict[str, np.ndarray]:
    """``[seed, row]`` (rows in ``ids`` order): NLL and correctness (1/0, NaN when not judged)."""
    nll = np.full((len(seeds), len(ids)), np.nan)
    correct = np.full((len(seeds), len(ids)), np.nan)
    for s, result in enumerate(seeds):
        by_id = {row.example_id: row for row in result.rows if row.task == task}
        for j, example_id in enumerate(ids):
            row = by_id[example_id]
            nll[s, j] = row.nll
            if row.correct is not None:
                correct[s, j] = float(row.correct)
    return {"nll": nll, "accuracy": correct}


def comparison_table(
    results: Results,
    baseline: str | None = None,
    n_resamples: int = stats.DEFAULT_RESAMPLES,
    confidence: float = stats.DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per (method, task), sorted by task then method.

    ``results`` maps a method to its :class:`EvalResult`, or to one result per finetuning
    seed. With several seeds each row's NLL and correctness are first averaged over the
    seeds; ``mean_nll`` / ``accuracy`` are the means of these per-row values over the rows
    that have one (the counting columns come from the first seed: they depend on the rows
    and ``max_length`` only), ``generation_accuracy`` the mean over seeds.

    ``delta_nll`` / ``delta_accuracy``: mean over the rows scored for every seed of both of
    (method minus baseline, each side averaged over its seeds) on that row (lower NLL /
    higher accuracy is better; NaN without a baseline or where the baseline lacks the task).
    :func:`selection.evaluate.stats.paired_delta` gives its ``confidence`` t interval
    (``delta_<metric>_ci_low/_ci_high``) and two-sided p-value (``delta_<metric>_p_value``):
    the standard error comes from the rows and, where a side has several finetuning seeds,
    from a hierarchical bootstrap over seeds then rows (``n_resamples``, ``seed``), so the
    seed-to-seed variance is in it. ``delta_<metric>_p_holm``: Holm's adjustment over every
    (method, task) comparison of that metric (the baseline against itself is no comparison);
    ``delta_<metric>_significant`` when ``p_holm < 1 - confidence``. The interval is not
    adjusted: one can exclude zero without the mark. Neither covers the randomness of the
    selection itself (each method selected once). ``ci_low``/``ci_high``/``p_value``/
    ``p_holm``/``significant`` repeat those of ``primary_metric``; ``significant_holm`` is
    ``significant`` under its explicit name.

    ``rank`` (1 = best, ties averaged) orders methods within a task by ``primary_metric``:
    accuracy when every method has one on that task, else mean NLL.
    ``table.attrs`` keeps ``baseline``, ``bootstrap`` (resamples, confidence, seed) and
    ``comparisons`` (the Holm family size per metric).
    """
    if not results:
        raise ValueError("no evaluation results to compare")
    if baseline is not None and baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not among the results {sorted(results)}")
    by_method = _seed_results(results)
    _check_same_rows(by_method)
    records = []
    for method, seeds in by_method.items():
        for task, group in seeds[0].per_task.items():
            ids = sorted(seeds[0].example_ids(task))
            values = _seed_row_values(seeds, task, ids)
            row_means = {metric: _nan_mean(matrix, axis=0) for metric, matrix in values.items()}
            record: dict[str, Any] = {"method": method, **{column: getattr(group, column) for column in _GROUP_COLUMNS}}
            record["mean_nll"] = _nan_mean(row_means["nll"], axis=0).item()
            with np.errstate(over="ignore"):
                record["perplexity"] = float(np.exp(record["mean_nll"]))
            record["accuracy"] = _nan_mean(row_means["accuracy"], axis=0).item()
            record["generation_accuracy"] = _nan_mean(
                np.array([result.per_task[task].generation_accuracy for result in seeds]), axis=0
            ).item()
            record["n_seeds"] = len(seeds)
            if baseline is not None and task in by_method[baseline][0].per_task:
                base_values = _seed_row_values(by_method[baseline], task, ids)
            else:
                base_values = None
            for metric in ("nll", "accuracy"):
                prefix = f"delta_{metric}"
                if base_values is None:
                    delta = stats.PairedDelta(math.nan, math.nan, math.nan, 0, math.nan, math.nan)
                elif method == baseline:  # the same checkpoints: resampling their seeds apart would invent a spread
                    delta = stats.paired_delta(values[metric][:1], base_values[metric][:1])
                else:
                    delta = stats.paired_delta(values[metric], base_values[metric], n_resamples, confidence, seed)
                record[prefix] = delta.mean
                record[f"{prefix}_ci_low"], record[f"{prefix}_ci_high"] = delta.low, delta.high
                # The baseline against itself is no comparison: it stays out of the Holm family.
                record[f"{prefix}_p_value"] = math.nan if method == baseline else delta.p_value
            records.append(record)
    table = pd.DataFrame.from_records(records)
    family_sizes = {}
    for metric in ("nll", "accuracy"):
        prefix = f"delta_{metric}"
        table[f"{prefix}_p_holm"] = stats.holm(table[f"{prefix}_p_value"].to_numpy(dtype=np.float64))
        table[f"{prefix}_significant"] = (table[f"{prefix}_p_holm"] < 1 - confidence).astype(bool)
        family_sizes[metric] = int(table[f"{prefix}_p_value"].notna().sum())
    has_accuracy = table.groupby("task")["accuracy"].transform(lambda values: bool(values.notna().all()))
    table["primary_metric"] = np.where(has_accuracy, "accuracy", "mean_nll")
    # Rank on a "higher is better" key so one ranking serves both metrics.
    goodness = np.where(has_accuracy, table["accuracy"], -table["mean_nll"])
    table["rank"] = pd.Series(goodness, index=table.index).groupby(table["task"]).rank(ascending=False)
    primary = np.where(has_accuracy, "delta_accuracy", "delta_nll")
    for part in ("ci_low", "ci_high", "p_value", "p_holm", "significant"):
        table[part] = [table.at[index, f"{prefix}_{part}"] for index, prefix in zip(table.index, primary)]
    table["significant"] = table["significant"].astype(bool)
    table["significant_holm"] = table["significant"]
    table = table[list(TABLE_COLUMNS)].sort_values(["task", "method"], kind="stable").reset_index(drop=True)
    table.attrs["baseline"] = baseline
    table.attrs["bootstrap"] = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}
    table.attrs["comparisons"] = family_sizes
    return table


def average_ranks(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean of its per-task ranks and the number of tasks ranked, best first."""
    ranked = table.dropna(subset=["rank"]).groupby("method")["rank"].agg(["mean", "count"])
    ranked = ranked.rename(columns={"mean": "average_rank", "count": "n_tasks"}).reset_index()
    return ranked.sort_values(["average_rank", "method"], kind="stable").reset_index(drop=True)


WORST_COLUMNS = (
    "method",
    "worst_loss_task",
    "worst_delta_nll",
    "worst_delta_nll_ci_low",
    "worst_delta_nll_ci_high",
    "worst_delta_nll_significant",
    "worst_accuracy_task",
    "worst_accuracy",
    "worst_delta_accuracy",
    "worst_delta_accuracy_ci_low",
    "worst_delta_accuracy_ci_high",
    "worst_delta_accuracy_significant",
)


def worst_tasks(table: pd.DataFrame) -> pd.DataFrame:
    """Per method, its weakest task: a balanced method has no task far behind the baseline.

    ``worst_loss_task``: the task with the highest ``delta_nll`` (the largest loss increase,
    or the smallest decrease, against the baseline; deltas make tasks with different loss
    scales comparable). ``worst_accuracy_task``: the task with the lowest accuracy. Each
    comes with its delta and interval; NaN/None where no task has the value. Ties go to
    the task that sorts first.
    """
    records = []
    for method, group in table.sort_values(["method", "task"], kind="stable").groupby("method", sort=True):
        record: dict[str, Any] = {"method": method}
        by_loss = group.dropna(subset=["delta_nll"])
        worst = by_loss.loc[by_loss["delta_nll"].idxmax()] if not by_loss.empty else None
        record["worst_loss_task"] = None if worst is None else worst["task"]
        for part in ("", "_ci_low", "_ci_high", "_significant"):
            record[f"worst_delta_nll{part}"] = (
                (False if part == "_significant" else math.nan) if worst is None else worst[f"delta_nll{part}"]
            )
        by_accuracy = group.dropna(subset=["accuracy"])
        worst = by_accuracy.loc[by_accuracy["accuracy"].idxmin()] if not by_accuracy.empty else None
        record["worst_accuracy_task"] = None if worst is None else worst["task"]
        record["worst_accuracy"] = math.nan if worst is None else worst["accuracy"]
        for part in ("", "_ci_low", "_ci_high", "_significant"):
            record[f"worst_delta_accuracy{part}"] = (
                (False if part == "_significant" else math.nan) if worst is None else worst[f"delta_accuracy{part}"]
            )
        records.append(record)
    return pd.DataFrame.from_records(records, columns=list(WORST_COLUMNS))


def _compared(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of a :func:`comparison_table` that are comparisons (a p-value on some metric)."""
    columns = [f"delta_{metric}_p_value" for metric in ("nll", "accuracy") if f"delta_{metric}_p_value" in table]
    return table[table[columns].notna().any(axis=1)] if columns else table.iloc[:0]


def null_rates(table: pd.DataFrame) -> dict[tuple[int, int], float]:
    """(test rows, seeds) -> the rule's false-positive rate at a true zero difference, per comparison.

    One :func:`selection.evaluate.stats.null_false_positive_rate` per distinct pair among the
    compared rows (seeds: the method's; the baseline is assumed alike), cached.
    """
    compared = _compared(table)
    pairs = sorted({(int(n), int(seeds)) for n, seeds in zip(compared["n"], compared["n_seeds"]) if n >= 2})
    return {pair: _null_rate(*pair) for pair in pairs}


@functools.lru_cache(maxsize=64)
def _null_rate(n_rows: int, n_seeds: int) -> float:
    return stats.null_false_positive_rate(n_rows, n_seeds)


def intervals_note(table: pd.DataFrame) -> str:
    """What the intervals and the `*` of a :func:`comparison_table` mean, and how often `*` is wrong."""
    settings = table.attrs.get("bootstrap") or {}
    confidence = settings.get("confidence", stats.DEFAULT_CONFIDENCE)
    seeds = sorted({int(n) for n in table["n_seeds"]}) if "n_seeds" in table else [1]
    seed_text = (
        "one finetuning seed per method, so the variance between seeds is not in them"
        if seeds == [1]
        else f"{'/'.join(map(str, seeds))} finetuning seeds per method: the standard error adds the seeds' part "
        f"from a hierarchical bootstrap (seeds, then rows; {settings.get('n_resamples', stats.DEFAULT_RESAMPLES)} "
        f"resamples, seed {settings.get('seed', 0)})"
    )
    families = table.attrs.get("comparisons") or {}
    family = max(families.values(), default=0)
    rates = null_rates(table)
    rate_text = "; ".join(
        f"{100 * rate:.1f}% at {n} rows" + ("" if n_seeds == 1 else f" and {n_seeds} seeds")
        for (n, n_seeds), rate in rates.items()
    )
    measured = (
        f" In {stats.NULL_DATASETS} simulated datasets with a true zero difference (Student-t row differences, "
        f"{stats.NULL_DF} df), the unadjusted rule (interval excludes zero) marks {rate_text}."
        if rates
        else ""
    )
    return (
        f"Intervals: {100 * confidence:g}% t intervals of the paired delta over the test rows (every method is "
        f"evaluated on the same rows; mean +- t quantile x standard error, which stays honest at few rows where a "
        f"percentile bootstrap is too narrow), with {seed_text}. `*` marks a delta whose p-value (same t "
        f"statistic) is below {1 - confidence:.2g} after Holm's correction over all {family} method x task "
        "comparisons of the metric: intervals are not adjusted, so one may exclude zero without `*`."
        f"{measured} Not covered: the randomness of the selection itself (each method selected once)."
    )


def scope_warning(table: pd.DataFrame, profile: str | None = None) -> str | None:
    """The report's opening caveat when it cannot show which method wins, else None.

    Said for the quick demo profile, and whenever a compared task has fewer than
    :data:`selection.evaluate.stats.SMALL_ROW_COUNT` test rows: only huge effects are detectable then.
    """
    compared = _compared(table)
    if compared.empty:
        compared = table
    rows = int(compared["n"].min()) if len(compared) else 0
    seeds = int(compared["n_seeds"].max()) if len(compared) else 0  # the base model has one "seed"
    setup = f"{rows} test rows per task, {'one finetuning seed' if seeds == 1 else f'{seeds} finetuning seeds'}"
    if profile == "quick":
        return (
            f"This report comes from the quick demo profile ({setup}): it shows the machinery working, "
            "not which method wins."
        )
    if rows < stats.SMALL_ROW_COUNT:
        return (
            f"This report has only {setup}: only huge differences can be told from zero, so it shows the "
            "machinery working, not which method wins."
        )
    return None


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _delta_cell(delta: float, low: float, high: float, significant: bool) -> str:
    if math.isnan(delta):
        return "n/a"
    interval = "" if math.isnan(low) else f" [{low:.3g}, {high:.3g}]"
    return f"{delta:.3g}{interval}{' *' if significant else ''}"


@dataclass(frozen=True)
class TargetOverlapReport:
    """Pool rows that are target rows, and the evaluated checkpoints that trained on some."""

    counts: Sequence[Mapping[str, Any]]  # {task, split, kind, pool_rows}, distinct pool rows each
    n_pool_rows: int
    # Evaluated name -> {"rows": training examples that are target rows, "test_rows": those that
    # are test rows, "tasks": their tasks}; names that trained on none are absent.
    trained: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def target_overlap_lines(report: TargetOverlapReport) -> list[str]:
    """The report's section on target rows found in the pool and whether training left them out."""
    lines = ["## Target rows in the pool", ""]
    if not report.n_pool_rows:
        return lines + ["No pool row is a target row (same example, or a 13-gram overlap of the prompt).", ""]
    lines += [
        (
            f"{report.n_pool_rows} pool rows are target rows (same example, or a 13-gram overlap of the prompt; "
            "table `target_overlaps`); selections leave them out unless `keep_target_overlaps` is set."
        ),
        "",
        markdown.table(
            ["task", "split", "kind", "pool rows"],
            ((c["task"], c["split"], c["kind"], c["pool_rows"]) for c in report.counts),
        ),
        "",
    ]
    if not report.trained:
        return lines + ["Excluded: no evaluated checkpoint trained on any of them.", ""]
    lines += [
        (
            "**Not excluded** from these checkpoints' training data (selected with `keep_target_overlaps: true` "
            "or before target rows were excluded): their figures on these tasks partly measure memorisation."
        ),
        "",
    ]
    lines += [
        f"- {name}: {t['rows']} target rows ({t['test_rows']} test rows; tasks {', '.join(t['tasks'])})"
        for name, t in sorted(report.trained.items())
    ]
    return lines + [""]


def markdown_report(
    table: pd.DataFrame,
    title: str = "Evaluation comparison",
    shared_training_sets: Sequence[tuple[Sequence[str], int]] = (),
    target_overlaps: TargetOverlapReport | None = None,
    profile: str | None = None,
    preface: Sequence[str] = (),
) -> str:
    """Compact markdown: best method per task, average rank, worst task per method, the full
    table with intervals, and what the intervals cover.

    Under the title: :func:`scope_warning` (``profile`` is the name of the demo profile the
    run used, if any), then the ``preface`` lines.
    ``table`` is a :func:`comparison_table`; unscored rows and multiple-choice rejects
    are listed so that no gap in the numbers goes unnoticed. ``shared_training_sets`` are
    (names, number of examples) of methods that trained on the very same examples: listed
    so that their equal rows read as one selection, not as two methods agreeing.
    ``target_overlaps``: the pool rows that are target rows, and who trained on them.
    """
    baseline = table.attrs.get("baseline")
    lines = [f"# {title}", ""]
    warning = scope_warning(table, profile)
    if warning is not None:
        lines += [f"**{warning}**", ""]
    for line in preface:
        lines += [line, ""]
    if baseline is not None:
        lines += [
            (
                f"Baseline: `{baseline}` (deltas are method minus baseline on the same test rows; "
                "lower NLL, higher accuracy = better)."
            ),
            "",
            intervals_note(table),
            "",
        ]

    if shared_training_sets:
        lines += [
            "## Methods that trained on the same examples",
            "",
            (
                "Each line below is one set of examples picked by several methods: their rows differ only by "
                "finetuning seed (not at all with the same seeds), so a tie between them is one selection, "
                "not independent agreement."
            ),
            "",
        ]
        lines += [f"- {' = '.join(names)} ({n_examples} examples)" for names, n_examples in shared_training_sets]
        lines.append("")
    if target_overlaps is not None:
        lines += target_overlap_lines(target_overlaps)

    def delta(row: Any, metric: str) -> str:
        prefix = f"delta_{metric}"
        return _delta_cell(
            row[prefix], row[f"{prefix}_ci_low"], row[f"{prefix}_ci_high"], bool(row[f"{prefix}_significant"])
        )

    best_rows = []
    for task, group in table.groupby("task", sort=True):
        ranked = group.dropna(subset=["rank"])
        if ranked.empty:
            best_rows.append((task, group["primary_metric"].iloc[0], "n/a", math.nan, "n/a"))
            continue
        best = ranked.sort_values(["rank", "method"], kind="stable").iloc[0]
        metric = best["primary_metric"]
        best_rows.append(
            (task, metric, best["method"], best[metric], delta(best, "accuracy" if metric == "accuracy" else "nll"))
        )
    lines += ["## Best method per task", ""]
    lines.append(markdown.table(["task", "metric", "best", "value", "delta vs baseline [CI]"], best_rows, cell=_cell))
    lines += ["", "## Average rank across tasks (1 = best)", ""]
    lines.append(
        markdown.table(["method", "average rank", "tasks"], average_ranks(table).itertuples(index=False), cell=_cell)
    )
    worst = worst_tasks(table)
    lines += ["", "## Worst task per method", ""]
    worst_rows = [
        (
            row["method"],
            row["worst_loss_task"] or "n/a",
            _delta_cell(
                row["worst_delta_nll"],
                row["worst_delta_nll_ci_low"],
                row["worst_delta_nll_ci_high"],
                bool(row["worst_delta_nll_significant"]),
            ),
            row["worst_accuracy_task"] or "n/a",
            row["worst_accuracy"],
            _delta_cell(
                row["worst_delta_accuracy"],
                row["worst_delta_accuracy_ci_low"],
                row["worst_delta_accuracy_ci_high"],
                bool(row["worst_delta_accuracy_significant"]),
            ),
        )
        for _, row in worst.iterrows()
    ]
    lines.append(
        markdown.table(
            [
                "method",
                "highest loss delta: task",
                "delta NLL [CI]",
                "lowest accuracy: task",
                "accuracy",
                "delta accuracy [CI]",
            ],
            worst_rows,
            cell=_cell,
        )
    )
    lines += ["", "## All results", ""]
    detail_rows = [
        (
            row["method"],
            row["task"],
            row["n_seeds"],
            row["n"],
            row["mean_nll"],
            row["perplexity"],
            row["accuracy"],
            delta(row, "nll"),
            delta(row, "accuracy"),
            row["p_value"],
            row["p_holm"],
        )
        for _, row in table.iterrows()
    ]
    lines.append(
        markdown.table(
            [
                "method",
                "task",
                "seeds",
                "n",
                "mean_nll",
                "perplexity",
                "accuracy",
                "delta_nll [CI]",
                "delta_accuracy [CI]",
                "p (primary)",
                "p Holm",
            ],
            detail_rows,
            cell=_cell,
        )
    )
    gap_columns = ["method", "task", "n_unscored", "n_truncated", "n_choice_rejects"]
    gaps = table[(table[gap_columns[2:]] > 0).any(axis=1)]
    if not gaps.empty:
        lines += ["", "## Gaps", ""]
        lines.append(
            markdown.table(
                ["method", "task", "unscored (NaN NLL)", "answer truncated", "choice rejects"],
                gaps[gap_columns].itertuples(index=False),
                cell=_cell,
            )
        )
    return "\n".join(lines) + "\n"
