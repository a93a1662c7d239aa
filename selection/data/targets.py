"""Target tasks: parse target files, split them into `val` / `test`, build the defaults.

Target file: any file a pool source can be (`selection.data.ingest`: JSON lines, a JSON
array, optionally gzipped, Parquet, Arrow, a `save_to_disk` folder), read by the same
readers, one example per record with `task` (optional when the file's config entry names
one, which then overrides it), optional `subtask` (default: the task), and a conversation in
any record format of `selection.data.formats` (messages, alpaca, sharegpt,
prompt_completion). Conversations go through the same canonical form as the pool, so ids
are comparable with pool ids. Unknown extra keys (`id`, metadata) are ignored.

Bad records become rejects `{file, line_no, reason, raw}` whose `line_no` is the record
number as the pool counts it (blank lines are not counted) and whose `reason` is
`"<code>: <detail>"`; the codes are those of `selection.data.formats` plus `missing_task`,
`bad_name` and `duplicate` (the same conversation twice in one task). Problems with a
whole file (missing, unreadable, no records, no usable record) raise `ValueError`.

Split: within each (task, subtask) the examples are ordered by a salted hash of their
example id; the first `n_val` (default 5, like LESS's few-shot sets) are `val`, the rest
`test`. The order depends only on the ids, not on file order, so adding examples never
moves an existing example from val to test except when a new one sorts before it,
and never moves a test example into val. A subtask with <= `n_val` examples is all val
(its test split is empty) and is reported in the warnings. An optional per-task test cap
keeps the test examples stratified over subtasks: first every subtask's first test
example (in hash order), then every subtask's second, and so on.

Default targets (`write_default_targets`): MMLU subject groups as tasks (`stem`,
`humanities`, `social_sciences`, `other`; subtask = subject), `code` (HumanEval) and
`math` (CHAMP; subtask = CHAMP category), all drawn from the items that
`selection.data.default_data` holds out of the default pool.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selection.common import files, names
from selection.data import default_data, ingest
from selection.data.formats import WRONG_TYPE, reason_code

Messages = list[dict[str, str]]

DEFAULT_N_VAL = 5
DEFAULT_TEST_PER_TASK = 40
SPLITS = ("val", "test")
MISSING_TASK = "missing_task"
BAD_NAME = "bad_name"
DUPLICATE = "duplicate"
_SPLIT_SALT = "instruct-select/target-split/v1/"

# MMLU subject -> group (the four categories of the MMLU paper's categories.py).
_MMLU_GROUP_SUBJECTS: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    "humanities": (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    "social_sciences": (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    "other": (
        "anatomy",
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}
MMLU_SUBJECT_GROUP: dict[str, str] = {
    subject: group for group, subjects in _MMLU_GROUP_SUBJECTS.items() for subject in subjects
}
MMLU_GROUPS: tuple[str, ...] = tuple(_MMLU_GROUP_SUBJECTS)
DEFAULT_TASKS: tuple[str, ...] = (*MMLU_GROUPS, "code", "math")


@dataclass(frozen=True)
class TargetFile:
    path: str
    task: str | None = None  # overrides every record's task

    def __post_init__(self) -> None:
        # However it is built (run config, code), a task override is checked before any read or write.
        if self.task is not None:
            object.__setattr__(self, "task", check_task_name(self.task, f"target file {self.path}"))


@dataclass(frozen=True)
class TargetExample:
    task: str
    subtask: str
    example_id: str
    messages: Messages
    file: str
    line_no: int


@dataclass(frozen=True)
class TargetReject:
    file: str
    line_no: int
    reason: str
    raw: str


@dataclass(frozen=True)
class TargetRow:
    task: str
    subtask: str
    split: str
    example_id: str
    messages: Messages
    split_rank: int  # position within (task, subtask) in split order; val ranks come first
    file: str
    line_no: int


@dataclass
class TargetSet:
    rows: list[TargetRow]
    rejects: list[TargetReject] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class _LineRejected(ValueError):
    """A bad target record; `reason` is `"<code>: <detail>"` like `selection.data.formats.RecordRejected`."""

    def __init__(self, code: str, detail: str) -> None:
        self.reason = f"{code}: {detail}"
        super().__init__(self.reason)


def check_task_name(task: Any, where: str) -> str:
    """A valid task name, or ValueError naming `where` it came from."""
    return names.check_name(task, "task", where)


def parse_targets_config(config: Mapping[str, Any]) -> list[TargetFile]:
    """Validate `{"files": [{"path": str, "task": str (optional)}]}`; an empty list is allowed."""
    if not isinstance(config, Mapping) or set(config) - {"files"}:
        raise ValueError(f"target config must be {{'files': [...]}}, got {config!r}")
    entries = config.get("files") or []
    if not isinstance(entries, list):
        raise ValueError(f"target config 'files' must be a list, got {type(entries).__name__}")
    files = []
    for index, entry in enumerate(entries):
        where = f"files[{index}]"
        if not isinstance(entry, Mapping) or "path" not in entry or set(entry) - {"path", "task"}:
            raise ValueError(f"{where} must be an object with 'path' and optional 'task', got {entry!r}")
        if not isinstance(entry["path"], str) or not entry["path"].strip():
            raise ValueError(f"{where}.path must be a non-empty string, got {entry['path']!r}")
        task = entry.get("task")
        files.append(TargetFile(path=entry["path"], task=None if task is None else check_task_name(task, where)))
    return files


def _record_task(record: Mapping[str, Any], override: str | None) -> tuple[str, str]:
    """(task, subtask) of a record, the override winning over the record's own task."""
    if override is not None:
        task = override
    else:
        raw_task = record.get("task")
        if raw_task is None:
            raise _LineRejected(MISSING_TASK, "no 'task' field and the file's config entry names no task")
        if not isinstance(raw_task, str):
            raise _LineRejected(WRONG_TYPE, f"field 'task' is {type(raw_task).__name__}, expected a string")
        try:
            task = check_task_name(raw_task, "field 'task'")
        except ValueError as error:
            raise _LineRejected(BAD_NAME, str(error)) from error
    subtask = record.get("subtask")
    if subtask is None:
        return task, task
    if not isinstance(subtask, str):
        raise _LineRejected(WRONG_TYPE, f"field 'subtask' is {type(subtask).__name__}, expected a string")
    try:
        return task, names.check_name(subtask, "subtask", "field 'subtask'")
    except ValueError as error:
        raise _LineRejected(BAD_NAME, str(error)) from error


def _read_file(
    target_file: TargetFile, first_seen: dict[tuple[str, str], str], examples: list[TargetExample]
) -> list[TargetReject]:
    """Append the accepted examples of one file to `examples`; its rejects. `first_seen` maps
    (task, example id) to where that conversation was first accepted, across files."""
    path = Path(target_file.path)
    if not path.exists():
        raise ValueError(f"target file {path} does not exist")
    n_records = n_accepted = 0
    rejects: list[TargetReject] = []
    for record in ingest.read_file(path):
        n_records += 1
        read = ingest.outcome(record, str(path))
        if isinstance(read, ingest.Rejected):
            rejects.append(TargetReject(read.source, read.line_no, read.reason, read.raw))
            continue
        try:
            task, subtask = _record_task(record.value, target_file.task)
            where = first_seen.get((task, read.example_id))
            if where is not None:
                raise _LineRejected(DUPLICATE, f"same conversation as {where} in task {task!r}")
        except _LineRejected as error:
            rejects.append(TargetReject(str(path), record.line_no, error.reason, record.raw_text()))
            continue
        first_seen[(task, read.example_id)] = f"{path}:{record.line_no}"
        examples.append(TargetExample(task, subtask, read.example_id, read.messages, str(path), record.line_no))
        n_accepted += 1
    if n_records == 0:
        raise ValueError(f"target file {path} has no records")
    if n_accepted == 0:
        reasons = Counter(reason_code(reject.reason) for reject in rejects)
        raise ValueError(
            f"target file {path}: none of its {n_records} records is usable "
            f"(rejects by reason: {dict(reasons)}; first: {rejects[0].reason})"
        )
    return rejects


def read_target_files(files: Sequence[TargetFile]) -> tuple[list[TargetExample], list[TargetReject]]:
    """Accepted examples and rejects of all files; the same conversation twice in a task is a duplicate."""
    examples: list[TargetExample] = []
    rejects: list[TargetReject] = []
    first_seen: dict[tuple[str, str], str] = {}
    for target_file in files:
        rejects.extend(_read_file(target_file, first_seen, examples))
    return examples, rejects


def split_order_key(identity: str) -> str:
    """Split order of an example: a salted hash of its id (independent of file order)."""
    return hashlib.sha256(f"{_SPLIT_SALT}{identity}".encode()).hexdigest()


def split_targets(
    examples: Iterable[TargetExample], n_val: int = DEFAULT_N_VAL, max_test_per_task: int | None = None
) -> tuple[list[TargetRow], list[str]]:
    """Assign val/test per (task, subtask); returns rows (sorted) and warnings."""
    if not isinstance(n_val, int) or n_val < 1:
        raise ValueError(f"n_val must be a positive integer, got {n_val!r}")
    if max_test_per_task is not None and (not isinstance(max_test_per_task, int) or max_test_per_task < 0):
        raise ValueError(f"max_test_per_task must be a non-negative integer or None, got {max_test_per_task!r}")
    by_subtask: dict[tuple[str, str], list[TargetExample]] = defaultdict(list)
    for example in examples:
        by_subtask[(example.task, example.subtask)].append(example)

    rows: list[TargetRow] = []
    test_by_task: dict[str, list[tuple[int, str, TargetRow]]] = defaultdict(list)
    warnings: list[str] = []
    for (task, subtask), members in sorted(by_subtask.items()):
        members.sort(key=lambda example: split_order_key(example.example_id))
        if len(members) <= n_val:
            warnings.append(
                f"task {task!r} subtask {subtask!r}: {len(members)} example(s) <= n_val={n_val}, "
                "all go to val and its test split is empty"
            )
        for rank, example in enumerate(members):
            row = TargetRow(
                task,
                subtask,
                "val" if rank < n_val else "test",
                example.example_id,
                example.messages,
                rank,
                example.file,
                example.line_no,
            )
            if row.split == "val":
                rows.append(row)
            else:
                test_by_task[task].append((rank, split_order_key(example.example_id), row))

    for task, candidates in sorted(test_by_task.items()):
        candidates.sort(key=lambda candidate: candidate[:2])  # stratified: round-robin over subtasks
        kept = candidates if max_test_per_task is None else candidates[:max_test_per_task]
        if len(kept) < len(candidates):
            warnings.append(f"task {task!r}: test split capped at {len(kept)} of {len(candidates)} examples")
        rows.extend(candidate[2] for candidate in kept)
    rows.sort(key=lambda row: (row.task, row.subtask, row.split_rank))
    return rows, warnings


def build_targets(
    files: Sequence[TargetFile | Mapping[str, Any]],
    n_val: int = DEFAULT_N_VAL,
    max_test_per_task: int | None = None,
) -> TargetSet:
    """Read, validate and split target files (entries as in the `target_tasks` config)."""
    specs = [
        entry if isinstance(entry, TargetFile) else parse_targets_config({"files": [dict(entry)]})[0] for entry in files
    ]
    if not specs:
        raise ValueError("no target files given")
    examples, rejects = read_target_files(specs)
    rows, warnings = split_targets(examples, n_val=n_val, max_test_per_task=max_test_per_task)
    return TargetSet(rows=rows, rejects=rejects, warnings=warnings)


# ---------------------------------------------------------------- default targets


def default_target_examples() -> list[TargetExample]:
    """All held-out default items as target examples (before any split or cap)."""
    examples = []
    for item in default_data.target_side("mmlu"):
        subject = item.meta["subject"]
        if subject not in MMLU_SUBJECT_GROUP:
            raise ValueError(f"MMLU subject {subject!r} has no group in MMLU_SUBJECT_GROUP")
        examples.append(_default_example(MMLU_SUBJECT_GROUP[subject], subject, item))
    examples += [_default_example("code", "code", item) for item in default_data.target_side("humaneval")]
    examples += [
        _default_example("math", _champ_subtask(item.meta["category"]), item)
        for item in default_data.target_side("champ")
    ]
    return examples


def _champ_subtask(category: str) -> str:
    return category.lower().replace("-", "_")  # Number-Theory -> number_theory


def _default_example(task: str, subtask: str, item: default_data.SourceItem) -> TargetExample:
    return TargetExample(task, subtask, item.example_id, item.messages, f"{item.source}/{item.ref}", 0)


def write_default_targets(
    out_dir: str | os.PathLike[str], n_val: int = DEFAULT_N_VAL, test_per_task: int | None = DEFAULT_TEST_PER_TASK
) -> list[dict[str, str]]:
    """Write the default targets, one JSONL per task; return `{"path", "task"}` file specs.

    Only the examples that the split keeps are written (`n_val` per subtask, at most
    `test_per_task` test examples per task), so `build_targets(specs, n_val=n_val)`
    reproduces the same val/test assignment. Same arguments -> byte-identical files.
    """
    rows, _ = split_targets(default_target_examples(), n_val=n_val, max_test_per_task=test_per_task)
    by_task: dict[str, list[TargetRow]] = defaultdict(list)
    for row in rows:
        by_task[row.task].append(row)
    out = files.make_dirs(out_dir)
    specs = []
    for task in DEFAULT_TASKS:
        path = out / f"{task}.jsonl"
        records = (
            {"task": row.task, "subtask": row.subtask, "id": row.file, "messages": row.messages}
            for row in by_task[task]
        )
        default_data.write_if_changed(path, default_data.to_jsonl(records))
        specs.append({"path": str(path), "task": task})
    return specs
