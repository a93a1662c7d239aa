"""Decontamination: which pool rows are target rows, exactly or nearly (pure; stored by `overlap_store`).

A pool row overlaps a target row (either split, `val` or `test`) when:

- ``exact``: it has the target row's ``example_id`` (the same canonical conversation);
- ``ngram``: their *prompts* (the user turns) match under the word rule below, whatever the answers.

Words: the prompt's user turns joined by newlines, NFKC-normalized and case-folded; every run of
characters that are not letters or digits separates words. Whitespace, punctuation, markup and
case edits therefore change nothing.

Rule, for a target prompt of ``NGRAM`` (13) words or more: standard benchmark decontamination
(GPT-3, Llama) flags a training row that shares any 13-gram with a benchmark row. Taken alone that
is wrong for benchmark-formatted pools: benchmarks wrap each question in fixed text (the MMLU
rendering "The following is a multiple choice question about <subject>." plus "Answer with the
letter and the text of the correct choice.", CHAMP's "Solve the following problem...", the
moral-scenarios question stem and its choices), and that text plus an opener like "Which of the
following is" already makes a shared 13-gram. On the built-in data (every pool-side item against
the default 555 target rows; the two sides are disjoint by construction), "any shared 13-gram"
flags 2,294 of the 8,802 pool-side items. So the shared 13-grams must cover the question's own
words:

- *template* words of a target prompt are those inside a word ``TEMPLATE_NGRAM``-gram (5) that at
  least ``TEMPLATE_MIN_PROMPTS`` (2) distinct target prompts contain: the text a benchmark repeats
  around its questions. The other words are its *content*;
- the pool row matches when the target positions covered by 13-grams both prompts contain include
  at least ``min(13, n_content)`` content words: one 13-gram's worth of the question, or all of a
  shorter question. A target with no content word (all of it repeats in other targets) must be
  covered whole.

So a copy with extra whitespace or punctuation, an added sentence, or a changed word matches as
long as 13 content words (all of a shorter question's) still lie in unchanged 13-word stretches,
and so does the same question in a different wrapper; two different questions that share the
wrapper, an opener, the choices or a few words do not. On the built-in data this rule flags 65
pool-side items, each sharing at least 13 words of question text with a target row: variants of
one question, or a subject's own instruction longer than 13 words that a single target row carries.

A target prompt of 1-12 words has no 13-gram: the pool prompt must contain all of it as a
contiguous word sequence (equality included); MMLU-style short questions are long enough once
their choices are part of the prompt.

Not caught: paraphrases, translations, and edits that leave fewer than 13 contiguous words of the
question intact (a changed word in a short question). Template words are learned from the target
set alone, so with a single target row of a benchmark its wrapper counts as content.

Speed: the target side is indexed once (13-gram -> target positions); each pool row is scanned
once with a dict lookup per word, so the cost is linear in the pool's prompt words.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

NGRAM = 13
TEMPLATE_NGRAM = 5
TEMPLATE_MIN_PROMPTS = 2
EXACT = "exact"
NGRAM_KIND = "ngram"
KINDS = (EXACT, NGRAM_KIND)
# Stored with every result: a change of the rule recomputes the overlaps.
RULE = f"exact+{NGRAM}gram-content/template{TEMPLATE_NGRAM}gram-in-{TEMPLATE_MIN_PROMPTS}-targets/v1"
EVIDENCE_CHARS = 300

_WORD = re.compile(r"[^\W_]+")


def normalize_words(text: str) -> list[str]:
    """Lower-case words of ``text``: NFKC, case-folded, split on every non-letter, non-digit run."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def prompt_words(messages: Sequence[Mapping[str, str]]) -> list[str]:
    """The normalized words of a conversation's user turns (system and assistant turns left out)."""
    return normalize_words("\n".join(turn["content"] for turn in messages if turn["role"] == "user"))


@dataclass(frozen=True)
class TargetPrompt:
    """One row of the `targets` table (a target example may sit in several tasks)."""

    task: str
    split: str
    example_id: str
    messages: Sequence[Mapping[str, str]]


@dataclass(frozen=True)
class Overlap:
    """A pool row (``example_id``) that is the target row ``target_example_id`` of ``task``/``split``."""

    example_id: str
    task: str
    split: str
    kind: str  # EXACT or NGRAM_KIND
    target_example_id: str
    evidence: str


@dataclass
class _Target:
    example_id: str
    words: list[str]
    content: bytearray  # 1 where the word is content, 0 where it is template
    n_content: int
    rows: list[tuple[str, str]]  # (task, split) of every targets row with this example


def _ngrams(words: Sequence[str], n: int) -> Iterable[tuple[str, ...]]:
    return (tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def _content_mask(words: Sequence[str], template: set[tuple[str, ...]]) -> bytearray:
    mask = bytearray(b"\x01" * len(words))
    for start, gram in enumerate(_ngrams(words, TEMPLATE_NGRAM)):
        if gram in template:
            mask[start : start + TEMPLATE_NGRAM] = bytes(TEMPLATE_NGRAM)
    return mask


def _evidence(text: str) -> str:
    return text if len(text) <= EVIDENCE_CHARS else text[: EVIDENCE_CHARS - 3] + "..."


class OverlapIndex:
    """The target rows, indexed for :meth:`match` (one pool row at a time)."""

    def __init__(self, targets: Iterable[TargetPrompt]) -> None:
        by_id: dict[str, _Target] = {}
        for row in targets:
            if row.example_id not in by_id:
                by_id[row.example_id] = _Target(row.example_id, prompt_words(row.messages), bytearray(), 0, [])
            if (row.task, row.split) not in by_id[row.example_id].rows:
                by_id[row.example_id].rows.append((row.task, row.split))
        self._targets = list(by_id.values())
        self._by_id = by_id
        # Template n-grams, counted once per distinct prompt: rows of one question in several tasks,
        # or differing only in their answers, do not make each other template.
        distinct = {tuple(t.words) for t in self._targets}
        counts = Counter(gram for words in distinct for gram in set(_ngrams(words, TEMPLATE_NGRAM)))
        template = {gram for gram, count in counts.items() if count >= TEMPLATE_MIN_PROMPTS}
        self._grams: dict[tuple[str, ...], list[tuple[int, int]]] = defaultdict(list)
        self._short: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self._short_lengths: dict[str, set[int]] = defaultdict(set)  # first word -> lengths of short prompts
        for index, target in enumerate(self._targets):
            target.content = _content_mask(target.words, template)
            target.n_content = sum(target.content)
            if len(target.words) >= NGRAM:
                for start, gram in enumerate(_ngrams(target.words, NGRAM)):
                    # An all-template 13-gram covers no content word: indexed only where content is none.
                    if target.n_content == 0 or any(target.content[start : start + NGRAM]):
                        self._grams[gram].append((index, start))
            elif target.words:
                self._short[tuple(target.words)].append(index)
                self._short_lengths[target.words[0]].add(len(target.words))
        self._grams = dict(self._grams)

    def __len__(self) -> int:
        return len(self._targets)

    def _overlaps(self, example_id: str, target: _Target, kind: str, evidence: str) -> list[Overlap]:
        return [
            Overlap(example_id, task, split, kind, target.example_id, _evidence(evidence))
            for task, split in target.rows
        ]

    def _ngram_evidence(self, target: _Target, starts: list[int]) -> str | None:
        """Evidence when the shared 13-grams (at ``starts`` in the target) cover enough content, else None."""
        covered = bytearray(len(target.words))
        for start in starts:
            covered[start : start + NGRAM] = b"\x01" * NGRAM
        if target.n_content == 0:
            if sum(covered) < len(target.words):
                return None
            n_shared, needed = len(target.words), len(target.words)
        else:
            n_shared = sum(c & m for c, m in zip(covered, target.content))
            needed = min(NGRAM, target.n_content)
            if n_shared < needed:
                return None
        best = max(starts, key=lambda s: (sum(target.content[s : s + NGRAM]), -s))
        gram = " ".join(target.words[best : best + NGRAM])
        return f"{n_shared} of {target.n_content} content words in shared {NGRAM}-grams, e.g. '{gram}'"

    def match(self, example_id: str, messages: Sequence[Mapping[str, str]]) -> list[Overlap]:
        """Every target row the pool row ``example_id`` (conversation ``messages``) overlaps."""
        found: list[Overlap] = []
        exact = self._by_id.get(example_id)
        if exact is not None:
            found += self._overlaps(example_id, exact, EXACT, "same example_id")
        words = prompt_words(messages)
        if not words:
            return found
        shared: dict[int, list[int]] = defaultdict(list)
        grams = self._grams
        for start in range(len(words) - NGRAM + 1):
            hits = grams.get(tuple(words[start : start + NGRAM]))
            if hits:
                for index, target_start in hits:
                    shared[index].append(target_start)
        for index, starts in shared.items():
            target = self._targets[index]
            if target is exact:
                continue
            evidence = self._ngram_evidence(target, starts)
            if evidence is not None:
                found += self._overlaps(example_id, target, NGRAM_KIND, evidence)
        if self._short:
            contained: set[int] = set()
            for start, word in enumerate(words):
                for length in self._short_lengths.get(word, ()):
                    contained.update(self._short.get(tuple(words[start : start + length]), ()))
            for index in sorted(contained):
                target = self._targets[index]
                if target is not exact:
                    evidence = f"contains the whole {len(target.words)}-word prompt '{' '.join(target.words)}'"
                    found += self._overlaps(example_id, target, NGRAM_KIND, evidence)
        return found


def find_overlaps(
    pool: Iterable[tuple[str, Sequence[Mapping[str, str]]]], targets: Iterable[TargetPrompt]
) -> list[Overlap]:
    """Every (pool row, target row) overlap, in pool order; ``pool`` is (example_id, messages) pairs."""
    index = OverlapIndex(targets)
    if not len(index):
        return []
    return [overlap for example_id, messages in pool for overlap in index.match(example_id, messages)]


def overlap_counts(overlaps: Iterable[Overlap]) -> list[dict[str, object]]:
    """Distinct pool rows per (task, split, kind), sorted; a row exact for one target and near for
    another counts under both kinds."""
    rows: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for overlap in overlaps:
        rows[(overlap.task, overlap.split, overlap.kind)].add(overlap.example_id)
    return [
        {"task": task, "split": split, "kind": kind, "pool_rows": len(ids)}
        for (task, split, kind), ids in sorted(rows.items())
    ]
