"""Fault scenarios: target rows in the pool are never trained on silently.

Target val/test rows planted into the pool, verbatim and with small edits (a changed word,
extra whitespace and punctuation, an added sentence), are found (`target_overlaps`, with the
right kind, task and split) and left out of every selection unless `keep_target_overlaps` is
set; a different question of the same MMLU subject that shares its wrapper is not. Then the
matcher itself: the normalization, the 13-gram rule, short prompts, boilerplate.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from assets.finetune import finetuned_checkpoints
from assets.methods import SELECTION_ASSETS
from assets.partitions import DEFAULT_MODEL
from assets.pool import raw_pool, target_tasks
from resources import build_resources
from selection.data import decontamination, targets
from selection.data.decontamination import EXACT, NGRAM_KIND, TargetPrompt, find_overlaps
from selection.data.default_data import render_mmlu
from selection.diversity.diversity_store import CLUSTERS_DDL
from selection.evaluate import evaluation
from tests.fakes import TinyModelStore, materialize_error, user_error_text

pytestmark = pytest.mark.faults

full_selection, random_selection, kmq_selection, rds_selection = (
    next(a for a in SELECTION_ASSETS if a.key == dg.AssetKey(name))
    for name in ("full_selection", "random_selection", "kmq_selection", "rds_selection")
)

BIOLOGY = "high school biology"
# (question, choices, answer letter): one MMLU subject, as the default targets render it.
MMLU_QUESTIONS = [
    (
        "Which of the following is the primary function of the ribosome in a eukaryotic cell?",
        ("Protein synthesis", "Lipid storage", "DNA replication", "Cell division"),
        "A",
    ),
    (
        (
            "Which of the following is a characteristic shared by all living organisms that distinguishes them "
            "from viruses?"
        ),
        ("Genetic material", "Cellular organization", "Evolution", "Protein coats"),
        "B",
    ),
    (
        (
            "In a population of flowering plants, red flower color is dominant over white. If 16 percent of the "
            "plants in the population have white flowers, what is the frequency of the dominant allele?"
        ),
        ("0.4", "0.6", "0.84", "0.16"),
        "B",
    ),
    (
        (
            "During aerobic respiration in animal cells, the greatest number of ATP molecules is produced in which "
            "of the following stages of the process?"
        ),
        ("Glycolysis", "The Krebs cycle", "Oxidative phosphorylation", "Fermentation"),
        "C",
    ),
    (
        (
            "A scientist observes that a red blood cell placed in distilled water swells and eventually bursts. "
            "Which of the following best explains this observation about the movement of water across the membrane?"
        ),
        ("Active transport", "Osmosis into the cell", "Diffusion of salt out", "Exocytosis"),
        "B",
    ),
    (
        (
            "Which of the following is an example of a homologous structure shared by mammals, birds and reptiles "
            "that points to a common ancestor?"
        ),
        ("The wing of a bat and a bird", "The eye of an octopus and a human", "Shark fins", "Insect wings"),
        "A",
    ),
]
# A different question of the same subject: it shares the wrapper and the opener "Which of the following is the".
NEAR_MISS = (
    "Which of the following is the site of photosynthesis in the cells of green plants?",
    ("Chloroplast", "Mitochondrion", "Nucleus", "Golgi apparatus"),
    "A",
)
MATH_INSTRUCTION = "Solve the following problem. Show your work before giving the final answer."
MATH_PROBLEMS = [
    (
        "Find the number of ordered pairs of positive integers whose product is 360 and whose greatest common "
        "divisor is exactly 6, and explain why no other pair can work."
    ),
    (
        "A bag holds five red marbles and seven blue marbles. Two marbles are drawn without replacement; what is the "
        "probability that both marbles drawn from the bag are blue?"
    ),
    (
        "Prove that for every positive integer n the number n cubed minus n is divisible by six, using the "
        "factorization into three consecutive integers."
    ),
    (
        "Let x and y be real numbers such that x plus y equals ten and x times y equals twenty one; compute the value "
        "of x squared plus y squared and of x cubed plus y cubed."
    ),
]


def _mmlu(question: tuple) -> list[dict[str, str]]:
    user, answer = render_mmlu(question[0], question[1], question[2], BIOLOGY)
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def _math(problem: str, answer: str = "The answer follows from the steps above.") -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{MATH_INSTRUCTION}\n\n{problem}"}, {"role": "assistant", "content": answer}]


def _jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def _filler(n: int) -> list[dict]:
    topics = ["add", "sort", "poem", "capital", "translate", "code"]
    return [
        {
            "instruction": f"Task {i}: {topics[i % len(topics)]} something number {i * 7}",
            "input": "",
            "output": f"Answer {i} about {topics[i % len(topics)]} " + "x" * (i % 9),
        }
        for i in range(n)
    ]


def _edit_word(messages: list[dict], old: str, new: str) -> list[dict]:
    assert old in messages[0]["content"]
    return [{**messages[0], "content": messages[0]["content"].replace(old, new, 1)}, messages[1]]


class Planted:
    """A pool file holding filler rows, target rows planted with edits, and a near miss."""

    def __init__(self, tmp_path: Path, n_filler: int = 24) -> None:
        records = [{"task": "stem", "subtask": "biology", "messages": _mmlu(q)} for q in MMLU_QUESTIONS]
        records += [{"task": "math", "subtask": "algebra", "messages": _math(p)} for p in MATH_PROBLEMS]
        self.targets_file = _jsonl(tmp_path / "targets.jsonl", records)
        # The split the target_tasks asset makes (it depends on the ids only).
        rows = targets.build_targets([targets.TargetFile(str(self.targets_file))], n_val=2).rows
        stem_test, stem_val, math_test = (
            [r for r in rows if (r.task, r.split) == key]
            for key in (("stem", "test"), ("stem", "val"), ("math", "test"))
        )
        changed = _edit_word(math_test[0].messages, f" {math_test[0].messages[0]['content'].split()[20]} ", " some ")
        spaced = [
            {
                "role": "user",
                "content": "  " + stem_val[0].messages[0]["content"].replace(" ", "   ").replace("?", " ?!!") + " ...",
            },
            stem_val[0].messages[1],
        ]
        longer = [
            {"role": "user", "content": stem_test[1].messages[0]["content"] + "\nPlease explain your choice briefly."},
            {"role": "assistant", "content": "My own answer, written differently."},
        ]
        # (label, pool record, (task, split, kind) expected, the target row it copies)
        self.planted = [
            (
                "verbatim copy of a stem test row",
                {"messages": stem_test[0].messages},
                ("stem", "test", EXACT),
                stem_test[0],
            ),
            ("math test row, one word changed", {"messages": changed}, ("math", "test", NGRAM_KIND), math_test[0]),
            (
                "stem val row, extra whitespace and punctuation",
                {"messages": spaced},
                ("stem", "val", NGRAM_KIND),
                stem_val[0],
            ),
            ("stem test row with an added sentence", {"messages": longer}, ("stem", "test", NGRAM_KIND), stem_test[1]),
        ]
        self.near_miss = {"messages": _mmlu(NEAR_MISS)}
        pool = _filler(n_filler) + [record for _, record, _, _ in self.planted] + [self.near_miss]
        self.pool_file = _jsonl(tmp_path / "pool.jsonl", pool)
        self.n_pool = len(pool)

    def run_config(self, **ops: dict) -> dict:
        return {
            "ops": {
                "raw_pool": {"config": {"sources": [{"path": str(self.pool_file)}]}},
                "target_tasks": {"config": {"files": [{"path": str(self.targets_file)}], "n_val": 2}},
                **{name: {"config": config} for name, config in ops.items()},
            }
        }


def _ids(resources: dict, query: str, params: list | None = None) -> list:
    with resources["lineage"].connect() as con:
        return [row[0] if len(row) == 1 else row for row in con.execute(query, params or []).fetchall()]


def _pool_id(resources: dict, record: dict) -> str:
    from selection.data.formats import canonicalize, example_id

    return example_id(canonicalize(record))


@pytest.fixture
def resources(tmp_path: Path) -> dict:
    return {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }


@pytest.fixture
def planted(tmp_path: Path, resources: dict) -> Planted:
    planted = Planted(tmp_path)
    planted.targets_result = dg.materialize(
        [raw_pool, target_tasks], resources=resources, run_config=planted.run_config()
    )
    planted.ids = [_pool_id(resources, record) for _, record, _, _ in planted.planted]
    planted.near_miss_id = _pool_id(resources, planted.near_miss)
    return planted


def _selected(resources: dict, method: str) -> set[str]:
    return set(_ids(resources, "SELECT example_id FROM selections WHERE method = ?", [method]))


def _metrics(resources: dict, asset: str) -> dict:
    (metrics,) = _ids(
        resources, "SELECT metrics FROM lineage WHERE asset_key = ? ORDER BY finished_at DESC LIMIT 1", [asset]
    )
    return json.loads(metrics)


def _materialize(asset, resources: dict, config: dict | None = None, instance=None) -> dg.ExecuteInProcessResult:
    name = asset.key.to_user_string()
    return dg.materialize(
        [asset],
        resources=resources,
        run_config={"ops": {name: {"config": config or {}}}},
        partition_key=DEFAULT_MODEL,
        instance=instance,
    )


def _fake_influence(monkeypatch, resources: dict) -> None:
    """Influence scores of every current pool row (the scores themselves do not matter to random)."""
    ids = _ids(resources, "SELECT example_id FROM pool ORDER BY example_id")
    (version,) = _ids(resources, "SELECT pool_version FROM pool_versions ORDER BY seq DESC LIMIT 1")
    run = {
        "scores_dir": "unused",
        "columns": [{"task": "stem", "subtask": "biology", "val_example_id": "v"}],
        "n_train": len(ids),
        "n_val": 1,
        "pool_version": version,
    }
    monkeypatch.setattr("assets.selections.latest_influence", lambda con, model: run)
    monkeypatch.setattr(
        "assets.selections.influence.load_scores", lambda _: (np.arange(len(ids), dtype=np.float32)[:, None], ids)
    )


# ------------------------------------------------------------------ found


def test_planted_target_rows_are_found_with_kind_task_split(planted: Planted, resources: dict, record_property):
    stored = _ids(resources, "SELECT example_id, task, split, kind, target_example_id FROM target_overlaps")
    found = {(row[0], row[1], row[2], row[3], row[4]) for row in stored}
    expected = {
        (pool_id, *kinds, target.example_id) for pool_id, (_, _, kinds, target) in zip(planted.ids, planted.planted)
    }
    metadata = planted.targets_result.asset_materializations_for_node("target_tasks")[0].metadata
    record_property("scenario", "; ".join(label for label, *_ in planted.planted) + "; plus a same-subject near miss")
    record_property("expected", "each found as (task, split, kind) of its target row; the near miss not found")
    record_property(
        "observed",
        f"{len(found)} overlaps, all expected: {found == expected}; near miss found: "
        f"{planted.near_miss_id in {row[0] for row in found}}; target_tasks metadata "
        f"n_pool_rows_overlapping_targets={metadata['n_pool_rows_overlapping_targets'].value}",
    )
    assert found == expected
    assert planted.near_miss_id not in {row[0] for row in found}
    assert metadata["n_pool_rows_overlapping_targets"].value == 4
    assert "| stem | test | exact | 1 |" in metadata["target_overlaps"].value
    (pool_version, targets_version) = _ids(resources, "SELECT pool_version, targets_version FROM target_overlap_runs")[
        0
    ]
    assert pool_version == _ids(resources, "SELECT pool_version FROM pool_versions")[0]
    assert targets_version == metadata["targets_version"].value


# ------------------------------------------------------------------ excluded


def test_full_selection_leaves_target_rows_out(planted: Planted, resources: dict, record_property):
    result = _materialize(full_selection, resources)
    picked = _selected(resources, "full")
    metadata = result.asset_materializations_for_node("full_selection")[0].metadata
    metrics = _metrics(resources, "full_selection")
    record_property("scenario", "full selection over a pool holding 4 planted target rows")
    record_property("expected", "every pool row but the 4 target rows (near miss kept); excluded count recorded")
    record_property(
        "observed",
        f"picked {len(picked)} of {planted.n_pool}; target rows picked: {len(picked & set(planted.ids))}; "
        f"near miss picked: {planted.near_miss_id in picked}",
    )
    assert not picked & set(planted.ids)
    assert len(picked) == planted.n_pool - 4 and planted.near_miss_id in picked
    assert metadata["n_target_overlaps_excluded"].value == 4 and metadata["budget"].value == planted.n_pool - 4
    assert metadata["keep_target_overlaps"].value is False
    assert metrics["keep_target_overlaps"] is False and metrics["n_target_overlaps_excluded"] == 4


def test_random_selection_leaves_target_rows_out(planted: Planted, resources: dict, monkeypatch, record_property):
    _fake_influence(monkeypatch, resources)
    n_candidates = planted.n_pool - 4
    too_many = materialize_error(
        [random_selection],
        resources,
        {"ops": {"random_selection": {"config": {"budget": n_candidates + 1}}}},
        DEFAULT_MODEL,
    )
    result = _materialize(random_selection, resources, {"budget": n_candidates})
    picked = _selected(resources, "random")
    metadata = result.asset_materializations_for_node("random_selection")[0].metadata
    record_property("scenario", f"random selection, budget {n_candidates} = every row that is not a target row")
    record_property("expected", "no target row picked; one more is refused, naming the exclusion and the setting")
    record_property(
        "observed",
        f"target rows picked: {len(picked & set(planted.ids))}; budget {n_candidates + 1}: "
        f"{user_error_text(too_many, 220)}",
    )
    assert not picked & set(planted.ids) and len(picked) == n_candidates
    assert metadata["n_target_overlaps_excluded"].value == 4
    assert f"only {n_candidates} of the {planted.n_pool} current pool examples" in too_many
    assert "not target rows (4 pool rows overlapping target rows are excluded" in too_many
    assert "`keep_target_overlaps: true` keeps them" in too_many


def test_kmq_selection_leaves_target_rows_out(planted: Planted, resources: dict, record_property):
    with resources["lineage"].connect() as con:
        (version,) = con.execute("SELECT pool_version FROM pool_versions").fetchone()
        ids = [row[0] for row in con.execute("SELECT example_id FROM pool ORDER BY example_id").fetchall()]
        con.execute(CLUSTERS_DDL)
        frame = pd.DataFrame(  # noqa: F841  (DuckDB reads it by name in the SQL)
            {
                "pool_version": version,
                "encoder_fingerprint": "e",
                "k": 2,
                "example_id": ids,
                "cluster": [i % 2 for i in range(len(ids))],
            }
        )
        con.execute("INSERT INTO clusters SELECT * FROM frame")
    n_candidates = planted.n_pool - 4
    # Log-likelihood quality: every row is eligible, so the budget takes every candidate.
    result = _materialize(kmq_selection, resources, {"budget": n_candidates, "quality": "log_likelihood"})
    picked = _selected(resources, "kmq")
    metadata = result.asset_materializations_for_node("kmq_selection")[0].metadata
    metrics = _metrics(resources, "kmq_selection")
    record_property("scenario", f"kMQ selection (2 clusters, log-likelihood quality), budget {n_candidates}")
    record_property("expected", "no target row picked, excluded count in metadata and lineage")
    record_property("observed", f"picked {len(picked)}; target rows picked: {len(picked & set(planted.ids))}")
    assert not picked & set(planted.ids) and len(picked) == n_candidates
    assert metadata["n_target_overlaps_excluded"].value == 4
    assert metrics["n_target_overlaps_excluded"] == 4 and metrics["keep_target_overlaps"] is False


def test_rds_selection_leaves_target_rows_out(planted: Planted, resources: dict, record_property):
    n_candidates = planted.n_pool - 4
    result = _materialize(rds_selection, resources, {"budget": n_candidates})
    by_target = dict(_ids(resources, "SELECT target, list(example_id) FROM selections GROUP BY target"))
    metadata = result.asset_materializations_for_node("rds_selection")[0].metadata
    record_property("scenario", f"RDS selection (tiny model hidden states), budget {n_candidates} per target")
    record_property("expected", "no target row picked for any target, excluded count in metadata")
    record_property(
        "observed", ", ".join(f"{t}: {len(set(ids) & set(planted.ids))} target rows" for t, ids in by_target.items())
    )
    assert set(by_target) == {"all", "math", "stem"}
    assert all(not set(ids) & set(planted.ids) and len(ids) == n_candidates for ids in by_target.values())
    assert metadata["n_target_overlaps_excluded"].value == 4


def test_target_rows_added_by_a_later_ingest_are_left_out(tmp_path: Path, resources: dict, record_property):
    planted = Planted(tmp_path)
    clean = _jsonl(
        tmp_path / "clean.jsonl", [{"prompt": f"Name a color, number {i}", "completion": "Blue"} for i in range(10)]
    )
    config = planted.run_config()
    config["ops"]["raw_pool"]["config"]["sources"] = [{"path": str(clean)}]
    first = dg.materialize([raw_pool, target_tasks], resources=resources, run_config=config)
    n_before = first.asset_materializations_for_node("target_tasks")[0].metadata["n_pool_rows_overlapping_targets"]
    # The pool grows after the targets were written: the selection must see the new target rows.
    sources = [{"path": str(clean)}, {"path": str(planted.pool_file)}]
    dg.materialize([raw_pool], resources=resources, run_config={"ops": {"raw_pool": {"config": {"sources": sources}}}})
    _materialize(full_selection, resources)
    picked = _selected(resources, "full")
    ids = [_pool_id(resources, record) for _, record, _, _ in planted.planted]
    versions = _ids(resources, "SELECT count(DISTINCT pool_version) FROM target_overlap_runs")[0]
    record_property("scenario", "targets written on a clean pool, then a source with 4 target rows ingested")
    record_property("expected", "the full selection of the new pool version leaves the 4 target rows out")
    record_property(
        "observed",
        f"overlaps when targets were written: {n_before.value}; target rows picked after the ingest: "
        f"{len(picked & set(ids))}; pool versions with overlaps computed: {versions}",
    )
    assert n_before.value == 0
    assert not picked & set(ids) and len(picked) == planted.n_pool + 10 - 4
    assert versions == 2


# ------------------------------------------------------------------ kept on purpose, or forgotten


def test_keep_target_overlaps_keeps_them_and_records_it(planted: Planted, resources: dict, record_property):
    result = _materialize(full_selection, resources, {"keep_target_overlaps": True})
    picked = _selected(resources, "full")
    metadata = result.asset_materializations_for_node("full_selection")[0].metadata
    metrics = _metrics(resources, "full_selection")
    record_property("scenario", "full selection with keep_target_overlaps: true")
    record_property("expected", "the target rows are picked; the setting and their count in metadata and lineage")
    record_property(
        "observed",
        f"target rows picked: {len(picked & set(planted.ids))}; metadata keep="
        f"{metadata['keep_target_overlaps'].value}, picked={metadata['n_target_overlaps_picked'].value}",
    )
    assert set(planted.ids) <= picked and len(picked) == planted.n_pool
    assert metadata["keep_target_overlaps"].value is True
    assert metadata["n_target_overlaps_excluded"].value == 0 and metadata["n_target_overlaps_picked"].value == 4
    assert metrics["keep_target_overlaps"] is True and metrics["n_target_overlaps_picked"] == 4


def test_a_skin_that_forgets_the_filter_is_refused(planted: Planted, resources: dict, monkeypatch, record_property):
    monkeypatch.setattr("assets.selections.Decontamination.candidates", lambda self, ids: list(range(len(ids))))
    observed = materialize_error(
        [full_selection], resources, {"ops": {"full_selection": {"config": {}}}}, DEFAULT_MODEL
    )
    record_property("scenario", "a selection skin that does not drop target rows (filter patched out)")
    record_property("expected", "record_picks refuses before writing, naming the rows and the setting")
    record_property("observed", user_error_text(observed, 220))
    assert "full selection picked 4 pool rows that are target rows" in observed
    assert "keep_target_overlaps: true" in observed
    tables = _ids(resources, "SELECT table_name FROM information_schema.tables WHERE table_name = 'selections'")
    assert not tables or not _selected(resources, "full")


def test_finetuning_on_a_selection_with_target_rows_warns(planted: Planted, resources: dict, record_property):
    _materialize(full_selection, resources, {"keep_target_overlaps": True})
    instance = dg.DagsterInstance.ephemeral()
    result = _materialize(
        finetuned_checkpoints, resources, {"methods": ["full"], "epochs": 1, "batch_size": 16, "seeds": 1}, instance
    )
    metadata = result.asset_materializations_for_node("finetuned_checkpoints")[0].metadata
    warnings = [
        entry.user_message
        for entry in instance.all_logs(result.run_id)
        if "pool rows that are target rows" in (entry.user_message or "")
    ]
    record_property("scenario", "finetuning on a full selection made with keep_target_overlaps: true")
    record_property("expected", "trains (not refused), warns in the log, counts the target rows in metadata")
    record_property(
        "observed",
        f"n_target_rows_in_selections={metadata['n_target_rows_in_selections'].value}; warning: "
        f"{(warnings or ['none'])[0][:160]}",
    )
    assert metadata["n_target_rows_in_selections"].value == 4
    assert warnings and "full/all" in warnings[0]


# ------------------------------------------------------------------ the matcher


def _prompt(text: str, answer: str = "an answer") -> list[dict[str, str]]:
    return [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]


def _targets() -> list[TargetPrompt]:
    rows = [TargetPrompt("stem", "test", f"mmlu{i}", _mmlu(q)) for i, q in enumerate(MMLU_QUESTIONS)]
    return rows + [TargetPrompt("math", "val", f"math{i}", _math(p)) for i, p in enumerate(MATH_PROBLEMS)]


def _matches(messages: list[dict], rows: list[TargetPrompt] | None = None) -> set[tuple[str, str]]:
    return {(o.target_example_id, o.kind) for o in find_overlaps([("p", messages)], rows or _targets())}


def test_normalization_ignores_case_whitespace_punctuation(record_property):
    words = decontamination.prompt_words(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "  \uff37hat\u2019s   2+2?\n\nA. Four!"},
            {"role": "assistant", "content": "Four."},
        ]
    )
    record_property("scenario", "normalize a prompt with a system turn, full-width letters, punctuation")
    record_property("expected", "user words only, case-folded, punctuation and whitespace gone")
    record_property("observed", " ".join(words))
    assert words == ["what", "s", "2", "2", "a", "four"]


@pytest.mark.parametrize(
    ("label", "edit", "target"),
    [
        ("verbatim prompt, different answer", lambda t: t, "mmlu2"),
        ("one word changed", lambda t: t.replace("flowering", "garden"), "mmlu2"),
        ("whitespace and punctuation", lambda t: t.replace(" ", "\n  ").replace(",", ";;"), "mmlu2"),
        ("a sentence added", lambda t: "Homework question, please help.\n" + t + "\nThanks!", "mmlu2"),
        ("question alone, no wrapper or choices", lambda t: t.split("\n\n")[1], "mmlu2"),
        ("math problem, different instruction", lambda t: "Answer this: " + t.split("\n\n")[1], "math1"),
    ],
)
def test_near_copies_are_matched(label: str, edit, target: str, record_property) -> None:
    rows = _targets()
    text = edit(next(r for r in rows if r.example_id == target).messages[0]["content"])
    found = _matches(_prompt(text, "a different answer"), rows)
    record_property("scenario", f"pool prompt: target {target}, {label}")
    record_property("expected", f"matched to {target} as ngram")
    record_property("observed", str(sorted(found)))
    assert found == {(target, NGRAM_KIND)}


@pytest.mark.parametrize(
    ("label", "messages"),
    [
        ("same subject, shares wrapper and 'Which of the following is the'", _mmlu(NEAR_MISS)),
        (
            "same subject, same choices as a target, different question",
            _mmlu(("Which of the following is required by all cells to make proteins?", *MMLU_QUESTIONS[0][1:])),
        ),
        (
            "same instruction as the math targets, different problem",
            _math("Find the number of subsets of a ten element set that contain no two consecutive integers."),
        ),
        ("a few shared words", _prompt("What is the frequency of the dominant allele in a small population?")),
    ],
)
def test_real_near_misses_are_not_matched(label: str, messages: list[dict], record_property) -> None:
    found = _matches(messages)
    record_property("scenario", f"pool prompt: {label}")
    record_property("expected", "no match")
    record_property("observed", str(sorted(found)) or "no match")
    assert found == set()


def test_short_prompts_match_only_whole(record_property) -> None:
    rows = [TargetPrompt("qa", "test", "short", _prompt("What is the boiling point of water at sea level?"))]
    contained = _matches(_prompt("Quick one: what is the BOILING point of water, at sea level?? Thanks"), rows)
    partial = _matches(_prompt("What is the boiling point of ethanol at sea level?"), rows)
    record_property("scenario", "a 10-word target prompt; pool prompts containing it whole, or all but one word")
    record_property("expected", "whole containment matched, the other not")
    record_property("observed", f"contained: {sorted(contained)}; one word different: {sorted(partial)}")
    assert contained == {("short", NGRAM_KIND)} and partial == set()


def test_exact_rows_are_exact_once_per_task_and_split(record_property) -> None:
    messages = _mmlu(MMLU_QUESTIONS[0])
    rows = [*_targets(), TargetPrompt("other", "val", "mmlu0", messages)]
    overlaps = find_overlaps([("mmlu0", messages)], rows)
    found = sorted((o.task, o.split, o.kind) for o in overlaps)
    record_property("scenario", "a pool row equal to a target example that two tasks hold")
    record_property("expected", "one exact overlap per (task, split), no extra ngram one")
    record_property("observed", str(found))
    assert found == [("other", "val", EXACT), ("stem", "test", EXACT)]


def test_matcher_scales_to_a_large_pool(record_property) -> None:
    rng = np.random.default_rng(0)
    vocabulary = np.array([f"w{i}" for i in range(5000)])
    target_words, pool_words = (
        vocabulary[rng.integers(0, 5000, (2000, 60))],
        vocabulary[rng.integers(0, 5000, (20000, 120))],
    )
    rows = [TargetPrompt("t", "test", f"t{i}", _prompt(" ".join(words))) for i, words in enumerate(target_words)]
    pool = [(f"p{i}", _prompt(" ".join(words))) for i, words in enumerate(pool_words)]
    pool[123] = ("copy", rows[7].messages)
    started = time.perf_counter()
    found = find_overlaps(pool, rows)
    seconds = time.perf_counter() - started
    record_property("scenario", "20,000 pool rows of 120 words x 2,000 target rows of 60 words, one copy")
    record_property("expected", "the copy found, in well under a minute on one core")
    record_property("observed", f"{[(o.example_id, o.target_example_id) for o in found]} in {seconds:.1f} s")
    assert [(o.example_id, o.target_example_id) for o in found] == [("copy", "t7")]
    assert seconds < 60


def test_report_says_who_trained_on_target_rows(record_property) -> None:
    report = evaluation.TargetOverlapReport(
        [{"task": "stem", "split": "test", "kind": "exact", "pool_rows": 2}],
        2,
        {"full/all": {"rows": 2, "test_rows": 2, "tasks": ["stem"]}},
    )
    lines = "\n".join(evaluation.target_overlap_lines(report))
    clean = "\n".join(evaluation.target_overlap_lines(evaluation.TargetOverlapReport(report.counts, 2, {})))
    record_property("scenario", "comparison report with 2 target rows in the pool, kept by full/all")
    record_property("expected", "counts by task/split/kind, and which checkpoint trained on them")
    record_property("observed", lines.replace("\n", " / ")[:240])
    assert "| stem | test | exact | 2 |" in lines
    assert "**Not excluded**" in lines and "- full/all: 2 target rows (2 test rows; tasks stem)" in lines
    assert "Excluded: no evaluated checkpoint trained on any of them." in clean
