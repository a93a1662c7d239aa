"""Evaluate finetuned checkpoints on held-out target rows and compare methods.

:func:`evaluate_model` scores every test row (``{task, subtask, example_id, messages}``;
the gold answer is the final assistant turn):

- **Loss** (every row): mean per-token negative log-likelihood (nats) of the gold answer
  given the conversation before it (:func:`selection.quality.score_response_likelihoods`
  with ``final_turn_only``); perplexity of a group = ``exp(mean of the rows' NLL)``. A row
  whose prompt leaves no answer token within ``max_length`` gets NaN: counted per group
  (``n_unscored``), never averaged in as a number nor dropped silently. A row whose answer
  is cut short is scored on the kept prefix and flagged (``truncated``, ``n_truncated``).
- **Multiple-choice accuracy** (MMLU-style rows: the gold answer matches ``^[A-D]\\. ``):
  the four choices are parsed from the last user turn (the layout of
  :func:`selection.default_data.render_mmlu`: ``A. text`` ... ``D. text`` lines), each
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

:func:`comparison_table` lines several :class:`EvalResult` up per (method, task) with
deltas against a baseline and per-task ranks; :func:`markdown_report` renders it.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import torch

from selection.default_data import MMLU_LETTERS
from selection.generation import generate_greedy, split_final_turn
from selection.quality import Conversation, score_response_likelihoods

GOLD_CHOICE = re.compile(r"^([A-D])\. ")
# The closing line of selection.default_data.render_mmlu; text after choice D otherwise ends at a blank line.
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
    choices = [text[start + 4 : next_start] for start, next_start in zip(starts[:3], starts[1:])] + [d_text]
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
        task=task, subtask=subtask, n=len(rows), n_unscored=len(rows) - len(scored),
        n_truncated=sum(row.truncated for row in rows), mean_nll=mean_nll, perplexity=perplexity,
        n_choice=len(choice), n_choice_rejects=len(choice) - len(judged), n_correct=sum(judged),
        accuracy=_mean([float(c) for c in judged]), n_generated=len(generated),
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

    def rows_frame(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(row) for row in self.rows])

    def metrics_frame(self) -> pd.DataFrame:
        """One row per task (``subtask`` empty) followed by one per (task, subtask)."""
        groups = [*self.per_task.values(), *self.per_subtask.values()]
        return pd.DataFrame([{**asdict(group), "subtask": group.subtask or ""} for group in groups])

    def summary(self) -> dict[str, Any]:
        """JSON-friendly per-task metrics (NaN -> None), e.g. for lineage."""
        return {task: {key: _json_float(value) if isinstance(value, float) else value
                       for key, value in asdict(group).items() if key not in ("task", "subtask")}
                for task, group in self.per_task.items()}

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
                    math.nan if v is None else float(v) for v in record["choice_log_likelihoods"])
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
            raise ValueError(f"test row {index} ({row['example_id']!r}) does not end with an assistant turn "
                             "(the gold answer)")
        rows.append(_TestRow(str(row["task"]), str(row["subtask"]), str(row["example_id"]), list(messages)))
    if not rows:
        raise ValueError("no test rows to evaluate")
    return rows


def _first_letter_matches(generation: str, gold_letter: str) -> bool:
    return generation.strip()[:1] == gold_letter


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
) -> EvalResult:
    """Loss, multiple-choice accuracy and optionally greedy exact match (module docstring).

    ``max_length`` caps each scored conversation (prompt + answer) in tokens;
    ``batch_size``/``max_tokens`` shape the length-sorted scoring batches. With
    ``generate`` the rows of the kinds in ``generate_for`` (only ``"mmlu"``: the
    multiple-choice rows that parsed) are answered greedily with up to ``max_new_tokens``
    tokens. Deterministic; the model runs in eval mode.
    """
    unknown = sorted(set(generate_for) - GENERATION_KINDS)
    if unknown:
        raise ValueError(f"cannot generate for {unknown}; supported: {sorted(GENERATION_KINDS)}")
    rows = _check_rows(test_rows)
    plans = [plan_choice_row(row.messages) for row in rows]

    # One scoring pass: the gold answers first, then every non-gold candidate.
    conversations = [row.messages for row in rows]
    alternates: list[tuple[int, int]] = []
    for row_index, plan in enumerate(plans):
        if isinstance(plan, ChoiceRow):
            for choice_index in range(len(MMLU_LETTERS)):
                if choice_index != plan.gold_index:
                    alternates.append((row_index, choice_index))
                    conversations.append(plan.candidate(choice_index))
    scored = score_response_likelihoods(model, tokenizer, conversations, max_length=max_length,
                                        batch_size=batch_size, max_tokens=max_tokens, final_turn_only=True)
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
        answers = generate_greedy(model, tokenizer, [plans[i].prompt for i in to_generate],  # type: ignore[union-attr]
                                  max_new_tokens=max_new_tokens, batch_size=batch_size)
        generations = dict(zip(to_generate, answers))

    results = []
    for index, (row, plan) in enumerate(zip(rows, plans)):
        record: dict[str, Any] = {"example_id": row.example_id, "task": row.task, "subtask": row.subtask,
                                  "nll": float(-gold_log_likelihoods[index]), "truncated": index in truncated}
        if isinstance(plan, str):
            record["reject_reason"] = plan
        elif isinstance(plan, ChoiceRow):
            record.update(_judge_choices(plan, choice_scores[index], choice_cut[index], max_length))
            if index in generations:
                record["generation"] = generations[index]
                record["generation_correct"] = _first_letter_matches(generations[index], record["gold_letter"])
        results.append(RowResult(**record))
    settings = {"max_length": max_length, "generate": generate, "generate_for": sorted(generate_for),
                "max_new_tokens": max_new_tokens, "choice_score": "mean per-token log-likelihood",
                "n_scored_conversations": len(conversations)}
    return EvalResult(tuple(results), settings)


def _judge_choices(plan: ChoiceRow, scores: np.ndarray, cut: np.ndarray, max_length: int) -> dict[str, Any]:
    record: dict[str, Any] = {"gold_letter": MMLU_LETTERS[plan.gold_index],
                              "choice_log_likelihoods": tuple(float(s) for s in scores)}
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


# ------------------------------------------------------------------ comparison

# Per-task GroupMetrics fields carried into the comparison table.
_GROUP_COLUMNS = ("task", "n", "n_unscored", "n_truncated", "mean_nll", "perplexity", "n_choice",
                  "n_choice_rejects", "accuracy", "generation_accuracy")
TABLE_COLUMNS = ("method", *_GROUP_COLUMNS, "delta_nll", "delta_accuracy", "primary_metric", "rank")


def _check_same_rows(results: Mapping[str, EvalResult]) -> None:
    """Methods are only comparable on a task when they were evaluated on the same rows."""
    reference: dict[str, tuple[str, frozenset[str]]] = {}
    for method, result in results.items():
        for task in result.per_task:
            ids = result.example_ids(task)
            first = reference.setdefault(task, (method, ids))
            if first[1] != ids:
                raise ValueError(f"task {task!r}: {method!r} was evaluated on different rows than {first[0]!r} "
                                 f"({len(ids ^ first[1])} ids differ); compare results on the same test rows")


def comparison_table(results: Mapping[str, EvalResult], baseline: str | None = None) -> pd.DataFrame:
    """One row per (method, task), sorted by task then method.

    ``delta_nll`` / ``delta_accuracy`` are the method's value minus the baseline's on the
    same task (lower NLL / higher accuracy is better; NaN without a baseline or where the
    baseline lacks the task). ``rank`` (1 = best, ties averaged) orders methods within a
    task by ``primary_metric``: accuracy when every method has one on that task, else mean
    NLL. ``table.attrs["baseline"]`` keeps the baseline's name.
    """
    if not results:
        raise ValueError("no evaluation results to compare")
    if baseline is not None and baseline not in results:
        raise ValueError(f"baseline {baseline!r} is not among the results {sorted(results)}")
    _check_same_rows(results)
    records = [
        {"method": method, **{column: getattr(group, column) for column in _GROUP_COLUMNS}}
        for method, result in results.items() for group in result.per_task.values()
    ]
    table = pd.DataFrame.from_records(records, columns=list(TABLE_COLUMNS[:11]))
    by_key = table.set_index(["method", "task"])
    for metric in ("nll", "accuracy"):
        column = "mean_nll" if metric == "nll" else "accuracy"
        base = (by_key.loc[baseline, column] if baseline is not None else pd.Series(dtype=float))
        table[f"delta_{metric}"] = table[column] - table["task"].map(base).astype(float)
    has_accuracy = table.groupby("task")["accuracy"].transform(lambda values: bool(values.notna().all()))
    table["primary_metric"] = np.where(has_accuracy, "accuracy", "mean_nll")
    # Rank on a "higher is better" key so one ranking serves both metrics.
    goodness = np.where(has_accuracy, table["accuracy"], -table["mean_nll"])
    table["rank"] = pd.Series(goodness, index=table.index).groupby(table["task"]).rank(ascending=False)
    table = table.sort_values(["task", "method"], kind="stable").reset_index(drop=True)
    table.attrs["baseline"] = baseline
    return table


def average_ranks(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: mean of its per-task ranks and the number of tasks ranked, best first."""
    ranked = table.dropna(subset=["rank"]).groupby("method")["rank"].agg(["mean", "count"])
    ranked = ranked.rename(columns={"mean": "average_rank", "count": "n_tasks"}).reset_index()
    return ranked.sort_values(["average_rank", "method"], kind="stable").reset_index(drop=True)


def _cell(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return lines


def markdown_report(table: pd.DataFrame, title: str = "Evaluation comparison") -> str:
    """Compact markdown: best method per task, average rank, and the full table.

    ``table`` is a :func:`comparison_table`; unscored rows and multiple-choice rejects
    are listed so that no gap in the numbers goes unnoticed.
    """
    baseline = table.attrs.get("baseline")
    lines = [f"# {title}", ""]
    if baseline is not None:
        lines += [f"Baseline: `{baseline}` (deltas are method minus baseline; "
                  "lower NLL, higher accuracy = better).", ""]
    best_rows = []
    for task, group in table.groupby("task", sort=True):
        ranked = group.dropna(subset=["rank"])
        if ranked.empty:
            best_rows.append((task, group["primary_metric"].iloc[0], "n/a", math.nan, math.nan))
            continue
        best = ranked.sort_values(["rank", "method"], kind="stable").iloc[0]
        delta = best["delta_accuracy"] if best["primary_metric"] == "accuracy" else best["delta_nll"]
        best_rows.append((task, best["primary_metric"], best["method"], best[best["primary_metric"]], delta))
    lines += ["## Best method per task", ""]
    lines += _markdown(["task", "metric", "best", "value", "delta vs baseline"], best_rows)
    lines += ["", "## Average rank across tasks (1 = best)", ""]
    lines += _markdown(["method", "average rank", "tasks"], average_ranks(table).itertuples(index=False))
    detail_columns = ["method", "task", "n", "mean_nll", "perplexity", "accuracy", "delta_nll", "delta_accuracy"]
    lines += ["", "## All results", ""]
    lines += _markdown(detail_columns, table[detail_columns].itertuples(index=False))
    gap_columns = ["method", "task", "n_unscored", "n_truncated", "n_choice_rejects"]
    gaps = table[(table[gap_columns[2:]] > 0).any(axis=1)]
    if not gaps.empty:
        lines += ["", "## Gaps", ""]
        lines += _markdown(["method", "task", "unscored (NaN NLL)", "answer truncated", "choice rejects"],
                           gaps[gap_columns].itertuples(index=False))
    return "\n".join(lines) + "\n"
