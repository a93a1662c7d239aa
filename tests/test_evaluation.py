"""Evaluation core: choice parsing, likelihood-ranked accuracy, NLL, NaN rows, comparison table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from selection.data.default_data import render_mmlu
from selection.data.tokenization import TruncationStats
from selection.diversity.quality import LikelihoodResult, response_log_likelihood
from selection.evaluate import evaluation, stats
from selection.evaluate.evaluation import (
    ChoiceParseError,
    ChoiceRow,
    EvalResult,
    RowResult,
    comparison_table,
    evaluate_model,
    markdown_report,
    parse_choices,
    plan_choice_row,
    stratified_test_rows,
    worst_tasks,
)

CHOICES = ("one", "two", "three", "four")


def mmlu_row(
    example_id: str,
    letter: str,
    choices: tuple[str, str, str, str] = CHOICES,
    question: str = "2+2?",
    task: str = "stem",
    subtask: str = "math",
) -> dict[str, Any]:
    user, answer = render_mmlu(question, choices, letter, "math")
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return {"task": task, "subtask": subtask, "example_id": example_id, "messages": messages}


def plain_row(example_id: str, answer: str = "def f(): pass", task: str = "code") -> dict[str, Any]:
    messages = [{"role": "user", "content": "Write f."}, {"role": "assistant", "content": answer}]
    return {"task": task, "subtask": task, "example_id": example_id, "messages": messages}


# ------------------------------------------------------------------ parsing


def test_parse_choices_reads_render_mmlu_back_even_with_lettered_lines_in_question() -> None:
    question = "Which is right?\nA. a decoy line\nB. another decoy"
    choices = ("first\nspanning two lines", "second", "third", "fourth")
    user, answer = render_mmlu(question, choices, "C", "logic")
    assert parse_choices(user) == choices
    plan = plan_choice_row([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
    assert isinstance(plan, ChoiceRow) and plan.gold_index == 2 and plan.choices == choices
    # Without the closing instruction, choice D ends at the first blank line.
    assert parse_choices("Q?\nA. w\nB. x\nC. y\nD. z\n\nAnswer:") == ("w", "x", "y", "z")


@pytest.mark.parametrize(
    ("prompt", "gold", "reason"),
    [
        ("Q?\nA. w\nB. x\nD. z", "A. w", "no line starting with 'C. '"),
        ("Q?\nA. w\nB. \nC. y\nD. z", "A. w", "choice(s) B have no text"),
        ("Q?\nA. w\nB. x\nC. y\nD. z", "B. not x", "is not choice B as parsed"),
    ],
)
def test_malformed_choice_rows_get_a_reject_reason(prompt: str, gold: str, reason: str) -> None:
    plan = plan_choice_row([{"role": "user", "content": prompt}, {"role": "assistant", "content": gold}])
    assert isinstance(plan, str) and reason in plan
    assert plan_choice_row([{"role": "user", "content": prompt}, {"role": "assistant", "content": "42"}]) is None
    with pytest.raises(ChoiceParseError):
        parse_choices("no choices here")


@pytest.mark.slow
def test_real_default_mmlu_targets_parse_without_rejects() -> None:
    from selection.data.targets import MMLU_GROUPS, default_target_examples

    mmlu = [example for example in default_target_examples() if example.task in MMLU_GROUPS][:50]
    assert len(mmlu) == 50
    plans = [plan_choice_row(example.messages) for example in mmlu]
    assert [p for p in plans if not isinstance(p, ChoiceRow)] == []


# ------------------------------------------------------------------ accuracy with a controlled scorer


def fake_scorer(preferred: dict[str, float]) -> Any:
    """Scores a conversation by its final answer: ``preferred`` values, else -2.0."""

    def score(model: Any, tokenizer: Any, conversations: Sequence[Any], **_: Any) -> LikelihoodResult:
        values = np.array([preferred.get(c[-1]["content"], -2.0) for c in conversations], dtype=np.float64)
        return LikelihoodResult(values, TruncationStats(n_examples=len(values)), ())

    return score


def test_accuracy_counts_gold_with_strictly_highest_likelihood(monkeypatch: pytest.MonkeyPatch) -> None:
    # "B. two" is always the most likely answer; "C. three" ties with it in the last row's variant.
    tie_choices = ("one", "two", "deuce", "four")
    monkeypatch.setattr(
        evaluation, "score_response_likelihoods", fake_scorer({"B. two": -0.5, "C. deuce": -0.5, "D. four": -1.0})
    )
    rows = [
        mmlu_row("r1", "B"),
        mmlu_row("r2", "D", subtask="algebra"),
        mmlu_row("r3", "C", tie_choices),
        plain_row("c1"),
    ]
    result = evaluate_model(torch.nn.Linear(1, 1), None, rows)
    by_id = {row.example_id: row for row in result.rows}
    assert [by_id[i].correct for i in ("r1", "r2", "r3", "c1")] == [True, False, False, None]
    assert by_id["r2"].predicted_letter == "B" and by_id["r2"].nll == pytest.approx(1.0)
    assert by_id["r3"].predicted_letter == "B"  # a tie is not a win for the gold letter
    assert by_id["r1"].choice_log_likelihoods == (-2.0, -0.5, -2.0, -1.0)
    stem = result.per_task["stem"]
    assert (stem.n, stem.n_choice, stem.n_correct, stem.n_choice_rejects) == (3, 3, 1, 0)
    assert stem.accuracy == pytest.approx(1 / 3)
    assert result.per_subtask[("stem", "algebra")].accuracy == 0.0
    assert math.isnan(result.per_task["code"].accuracy) and result.per_task["code"].n_choice == 0
    assert result.settings["n_scored_conversations"] == 4 + 3 * 3  # golds + 3 alternates per choice row


def test_generation_is_off_by_default_and_matches_first_letter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation, "score_response_likelihoods", fake_scorer({}))
    calls: list[int] = []

    def fake_generate(model: Any, tokenizer: Any, prompts: Sequence[Any], **_: Any) -> list[str]:
        calls.append(len(prompts))
        return [" B. two", "b"][: len(prompts)]

    monkeypatch.setattr(evaluation, "generate_greedy", fake_generate)
    rows = [mmlu_row("r1", "B"), mmlu_row("r2", "B"), plain_row("c1")]
    assert all(row.generation is None for row in evaluate_model(torch.nn.Linear(1, 1), None, rows).rows)
    result = evaluate_model(torch.nn.Linear(1, 1), None, rows, generate=True)
    assert calls == [2]  # choice rows only
    assert [row.generation_correct for row in result.rows] == [True, False, None]
    assert result.per_task["stem"].generation_accuracy == 0.5
    with pytest.raises(ValueError, match="cannot generate for"):
        evaluate_model(torch.nn.Linear(1, 1), None, rows, generate=True, generate_for=("code",))


# ------------------------------------------------------------------ tiny Llama


def test_nll_and_choice_scores_agree_with_quality(tiny_llama: torch.nn.Module, tiny_tokenizer: Any) -> None:
    rows = [mmlu_row("r1", "A"), mmlu_row("r2", "C", ("red", "green", "blue", "cyan")), plain_row("c1")]
    result = evaluate_model(tiny_llama, tiny_tokenizer, rows, max_length=256, batch_size=4)
    expected = -response_log_likelihood(
        tiny_llama, tiny_tokenizer, [r["messages"] for r in rows], max_length=256, final_turn_only=True
    )
    np.testing.assert_allclose([row.nll for row in result.rows], expected, rtol=1e-5)
    for row, source in zip(result.rows[:2], rows[:2]):
        plan = plan_choice_row(source["messages"])
        assert isinstance(plan, ChoiceRow)
        direct = response_log_likelihood(
            tiny_llama, tiny_tokenizer, [plan.candidate(i) for i in range(4)], max_length=256, final_turn_only=True
        )
        np.testing.assert_allclose(row.choice_log_likelihoods, direct, rtol=1e-5)
        assert row.choice_log_likelihoods[plan.gold_index] == pytest.approx(-row.nll, rel=1e-6)
        assert row.correct == (int(np.argmax(direct)) == plan.gold_index)
        assert row.predicted_letter == "ABCD"[int(np.argmax(direct))]
    one_by_one = evaluate_model(tiny_llama, tiny_tokenizer, rows, max_length=256, batch_size=1)
    assert [r.correct for r in one_by_one.rows] == [r.correct for r in result.rows]
    np.testing.assert_allclose([r.nll for r in one_by_one.rows], [r.nll for r in result.rows], rtol=1e-5)
    assert result.per_task["stem"].perplexity == pytest.approx(math.exp(np.mean(expected[:2])))
    generated = evaluate_model(tiny_llama, tiny_tokenizer, rows, max_length=256, generate=True, max_new_tokens=2)
    assert [isinstance(r.generation, str) for r in generated.rows] == [True, True, False]
    assert [r.generation_correct for r in generated.rows][2] is None
    assert generated.per_task["stem"].n_generated == 2
    frame = result.metrics_frame()
    assert list(frame["subtask"]) == ["", "", "code", "math"] and list(frame["task"]) == ["code", "stem"] * 2


def test_unscorable_rows_are_nan_counted_and_rejected(tiny_llama: torch.nn.Module, tiny_tokenizer: Any) -> None:
    long_prompt = dict(
        plain_row("c-long"), messages=[{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "ok"}]
    )
    cut_answer = plain_row("c-cut", answer="z" * 300)
    # Every candidate of "r-cut" fits except the long choice D (scored on a prefix only).
    cut_choice = mmlu_row("r-cut", "A", ("a", "b", "c", "d" * 20), question="y" * 8)
    rows = [plain_row("c1"), long_prompt, cut_answer, mmlu_row("r1", "A"), cut_choice]
    result = evaluate_model(tiny_llama, tiny_tokenizer, rows, max_length=200, batch_size=4)
    by_id = {row.example_id: row for row in result.rows}
    # A long prompt is cut before its answer, which is still scored (and flagged).
    assert math.isfinite(by_id["c1"].nll) and math.isfinite(by_id["c-long"].nll) and by_id["c-long"].truncated
    assert math.isfinite(by_id["c-cut"].nll) and by_id["c-cut"].truncated
    code = result.per_task["code"]
    assert (code.n, code.n_unscored, code.n_truncated) == (3, 0, 2)
    assert code.mean_nll == pytest.approx(np.mean([by_id["c1"].nll, by_id["c-long"].nll, by_id["c-cut"].nll]))
    assert by_id["r-cut"].correct is None and "candidate(s) D do not fit" in by_id["r-cut"].reject_reason
    assert math.isfinite(by_id["r-cut"].nll) and not by_id["r-cut"].truncated  # the gold answer A fits
    stem = result.per_task["stem"]
    assert (stem.n_choice, stem.n_choice_rejects, stem.n_unscored) == (2, 1, 0)
    assert stem.accuracy == float(by_id["r1"].correct)
    malformed = dict(plain_row("bad", answer="B. x"), task="stem")
    rejected = evaluate_model(tiny_llama, tiny_tokenizer, [malformed], max_length=64).rows[0]
    assert rejected.correct is None and "choices not parsable" in rejected.reject_reason
    assert math.isfinite(rejected.nll)  # the loss is still measured


def test_bad_test_rows_raise() -> None:
    model = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="lacks"):
        evaluate_model(model, None, [{"task": "t", "messages": []}])
    no_answer = dict(plain_row("c1"), messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="does not end with an assistant turn"):
        evaluate_model(model, None, [no_answer])
    with pytest.raises(ValueError, match="no test rows"):
        evaluate_model(model, None, [])


# ------------------------------------------------------------------ comparison


def synthetic(nll: float, correct: Sequence[bool], code_nll: float) -> EvalResult:
    rows = [RowResult(f"m{i}", "stem", "math", nll, correct=c, gold_letter="A") for i, c in enumerate(correct)]
    rows += [RowResult("c0", "code", "code", code_nll), RowResult("c1", "code", "code", math.nan)]
    return EvalResult(tuple(rows))


def test_comparison_table_deltas_ranks_and_report() -> None:
    results = {
        "base": synthetic(2.0, [True, False, False, False], 3.0),
        "random": synthetic(1.5, [True, True, False, False], 2.0),
        "less": synthetic(1.0, [True, True, True, False], 2.5),
    }
    table = comparison_table(results, baseline="base")
    row = table.set_index(["method", "task"])
    assert row.loc[("less", "stem"), "delta_accuracy"] == pytest.approx(0.5)
    assert row.loc[("less", "stem"), "delta_nll"] == pytest.approx(-1.0)
    assert row.loc[("base", "code"), "delta_nll"] == 0.0
    assert row.loc[("random", "code"), "n_unscored"] == 1 and row.loc[("random", "code"), "mean_nll"] == 2.0
    assert set(table.loc[table["task"] == "stem", "primary_metric"]) == {"accuracy"}
    assert set(table.loc[table["task"] == "code", "primary_metric"]) == {"mean_nll"}
    ranks = {(m, t): r for m, t, r in zip(table["method"], table["task"], table["rank"])}
    assert ranks == {
        ("less", "stem"): 1,
        ("random", "stem"): 2,
        ("base", "stem"): 3,
        ("random", "code"): 1,
        ("less", "code"): 2,
        ("base", "code"): 3,
    }
    report = markdown_report(table)
    assert "Baseline: `base`" in report
    # Paired accuracy differences 0, 1, 1, 0: mean 0.5 +- t_3 (3.182) x 0.2887, not significant.
    assert "| stem | accuracy | less | 0.75 | 0.5 [-0.419, 1.42] |" in report
    assert report.startswith("# Evaluation comparison\n\n**This report has only 4 test rows per task")
    assert "| code | mean_nll | random | 2 | -1 |" in report  # one scored row: no interval
    assert "| less | 1.5 | 2 |" in report and "| random | 1.5 | 2 |" in report and "| base | 3 | 2 |" in report
    assert "## Gaps" in report
    no_baseline = comparison_table(results, baseline=None)
    assert no_baseline["delta_nll"].isna().all() and no_baseline.attrs["baseline"] is None


def test_comparison_table_refuses_unknown_baseline_and_different_rows() -> None:
    results = {"a": synthetic(1.0, [True], 1.0)}
    with pytest.raises(ValueError, match="baseline 'base' is not among"):
        comparison_table(results, baseline="base")
    results["b"] = synthetic(1.0, [True, False], 1.0)
    with pytest.raises(ValueError, match="different rows"):
        comparison_table(results)


def test_eval_result_round_trips_through_dict() -> None:
    result = EvalResult(
        (
            RowResult(
                "m0",
                "stem",
                "s",
                math.nan,
                gold_letter="A",
                reject_reason="cut",
                choice_log_likelihoods=(math.nan, -1.0, -2.0, -3.0),
            ),
            RowResult("c0", "code", "code", 1.25),
        ),
        {"max_length": 8},
    )
    back = EvalResult.from_dict(result.to_dict())
    assert back.to_dict() == result.to_dict() and back.to_dict()["rows"][0]["nll"] is None
    assert back.summary()["stem"]["n_choice_rejects"] == 1 and back.summary()["stem"]["mean_nll"] is None
    with pytest.raises(ValueError, match="appears twice"):
        EvalResult((RowResult("c0", "code", "code", 1.0), RowResult("c0", "code", "code", 2.0)))


# ------------------------------------------------------------------ test rows, intervals, seeds


def stored_rows(sizes: dict[str, int], task: str = "stem") -> list[dict[str, Any]]:
    """Test rows as `read_targets` returns them: by subtask, each subtask in split order."""
    return [
        {"task": task, "subtask": subtask, "example_id": f"{subtask}-{k}", "messages": []}
        for subtask in sorted(sizes)
        for k in range(sizes[subtask])
    ]


def test_stratified_rows_go_round_robin_over_subtasks() -> None:
    rows = stored_rows({"b": 3, "a": 1, "c": 2}) + stored_rows({"x": 2}, task="code")
    kept, coverage = stratified_test_rows(rows, cap=4)
    assert [r["example_id"] for r in kept if r["task"] == "stem"] == ["a-0", "b-0", "c-0", "b-1"]
    assert [r["example_id"] for r in kept if r["task"] == "code"] == ["x-0", "x-1"]
    assert [(c.task, c.n_available, c.n_subtasks, c.n_rows, c.cap, c.cap_raised) for c in coverage] == [
        ("code", 2, 1, 2, 4, False),
        ("stem", 6, 3, 4, 4, False),
    ]
    everything, _ = stratified_test_rows(rows, cap=None)
    assert len(everything) == 8 and [r["example_id"] for r in everything][-1] == "b-2"
    with pytest.raises(ValueError, match="positive integer"):
        stratified_test_rows(rows, cap=0)


def test_a_cap_below_the_subtask_count_is_raised_to_cover_every_subtask() -> None:
    # MMLU STEM: 18 subjects of 22 test rows each; the first 10 rows in (task, subtask) order cover one subject.
    subjects = {f"subject_{i:02d}": 22 for i in range(18)}
    rows = stored_rows(subjects)
    assert len({r["subtask"] for r in rows[:10]}) == 1
    kept, (coverage,) = stratified_test_rows(rows, cap=10)
    assert {r["subtask"] for r in kept} == set(subjects) and len(kept) == 18
    assert (coverage.cap, coverage.cap_raised, coverage.n_rows) == (18, True, 18)
    kept, (coverage,) = stratified_test_rows(rows, cap=20)
    assert {r["subtask"] for r in kept} == set(subjects) and len(kept) == 20 and not coverage.cap_raised


def nll_result(task_values: dict[str, Sequence[float]], correct: Sequence[bool] | None = None) -> EvalResult:
    rows = []
    for task, values in task_values.items():
        for i, nll in enumerate(values):
            judged = None if correct is None or task != "stem" else correct[i]
            rows.append(
                RowResult(
                    f"{task}{i}", task, task, nll, correct=judged, gold_letter="A" if judged is not None else None
                )
            )
    return EvalResult(tuple(rows))


def test_seed_averaged_paired_deltas_and_intervals_match_an_independent_computation() -> None:
    rng = np.random.default_rng(4)
    base_nll = rng.uniform(1.0, 3.0, size=(2, 30))  # [seed, row]
    better_nll = base_nll - rng.uniform(0.2, 0.6, size=(2, 30))  # lower on every row of every seed
    mixed_nll = base_nll + rng.normal(0.0, 0.5, size=(2, 30))
    results = {
        name: [nll_result({"code": values[s]}) for s in range(2)]
        for name, values in (("random/all", base_nll), ("bids/all", better_nll), ("kmq/all", mixed_nll))
    }
    results["base"] = nll_result({"code": base_nll[0] + 1.0})  # one seed only, paired with two-seed methods
    table = comparison_table(results, baseline="random/all", n_resamples=1000, seed=9).set_index("method")
    for name, values in (("bids/all", better_nll), ("kmq/all", mixed_nll)):
        # Row order inside the table is by example id; the ids "code0".."code29" sort as strings.
        order = np.argsort([f"code{i}" for i in range(30)])
        differences = (values.mean(axis=0) - base_nll.mean(axis=0))[order]
        # Hierarchical bootstrap by hand: rows, then each side's two seeds, with the table's seed.
        rng = np.random.default_rng(9)
        rows = rng.integers(0, 30, size=(1000, 30))
        sides = []
        for side in (values[:, order], base_nll[:, order]):
            seeds = rng.integers(0, 2, size=(1000, 2))
            sides.append(np.stack([side[seeds[:, k][:, None], rows] for k in range(2)]).mean(axis=0))
        total = (sides[0] - sides[1]).mean(axis=1).var()
        row_part = differences.var(ddof=1) / 30
        # Two seeds: resampling halves their spread; the seed x row residual belongs to the rows.
        residual = sum(
            ((side - side.mean(axis=1, keepdims=True) - side.mean(axis=0) + side.mean()) ** 2).sum() / 29 / 60
            for side in (values, base_nll)
        )
        seed_part = max((total - row_part * 29 / 30) * 2 - residual, 0.0)
        se = np.sqrt(row_part + seed_part)
        df = (row_part + seed_part) ** 2 / (row_part**2 / 29 + seed_part**2 / 2)
        low, high = differences.mean() + np.array([-1, 1]) * scipy_stats.t.ppf(0.975, df) * se
        row = table.loc[name]
        assert row["delta_nll"] == pytest.approx(differences.mean())
        assert (row["delta_nll_ci_low"], row["delta_nll_ci_high"]) == pytest.approx((low, high))
        assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))  # mean NLL is the primary metric
        assert row["mean_nll"] == pytest.approx(values.mean())
        assert row["n_seeds"] == 2
    # Better on every row of every seed, but the two seeds of each side differ a lot (independent draws):
    # the unadjusted interval excludes zero, Holm over the 3 comparisons (bids, kmq, base) does not mark it.
    bids = table.loc["bids/all"]
    assert bids["delta_nll_ci_high"] < 0 and bids["delta_nll_p_value"] < 0.05
    compared = table.loc[["bids/all", "kmq/all", "base"], "delta_nll_p_value"].to_numpy()
    assert list(table.loc[["bids/all", "kmq/all", "base"], "delta_nll_p_holm"]) == pytest.approx(
        list(stats.holm(compared))
    )
    assert bids["delta_nll_p_holm"] > 0.05 and not bids["delta_nll_significant"] and not bids["significant_holm"]
    assert math.isnan(table.loc["random/all", "delta_nll_p_value"])  # the baseline is no comparison
    assert table.loc["base", "n_seeds"] == 1
    assert table.loc["base", "delta_nll"] == pytest.approx(np.mean(base_nll[0] + 1.0 - base_nll.mean(axis=0)))
    baseline = table.loc["random/all"]
    assert (baseline["delta_nll"], baseline["ci_low"], baseline["ci_high"]) == (0.0, 0.0, 0.0)
    assert not baseline["significant"]
    assert table.attrs["bootstrap"] == {"n_resamples": 1000, "confidence": 0.95, "seed": 9}
    report = markdown_report(comparison_table(results, baseline="random/all", n_resamples=1000, seed=9))
    assert f"{bids['delta_nll']:.3g} [{bids['delta_nll_ci_low']:.3g}, {bids['delta_nll_ci_high']:.3g}] |" in report
    assert "1/2 finetuning seeds per method" in report and "hierarchical bootstrap (seeds, then rows" in report
    assert "Not covered: the randomness of the selection itself" in report
    assert "after Holm's correction over all 3 method x task comparisons" in report


def test_accuracy_delta_is_paired_on_rows_both_sides_judged() -> None:
    base = nll_result({"stem": [1.0] * 6}, correct=[False] * 6)
    method = nll_result({"stem": [1.0] * 6}, correct=[True] * 6)
    # A row rejected for one side (correct=None) leaves the paired accuracy difference.
    rows = list(method.rows)
    rows[0] = RowResult("stem0", "stem", "stem", 1.0, gold_letter="A", reject_reason="cut")
    table = comparison_table({"base": base, "less": EvalResult(tuple(rows))}, baseline="base")
    less = table.set_index("method").loc["less"]
    assert less["primary_metric"] == "accuracy" and less["delta_accuracy"] == 1.0
    assert (less["ci_low"], less["ci_high"], less["significant"]) == (1.0, 1.0, True)
    assert (less["p_value"], less["p_holm"], less["significant_holm"]) == (0.0, 0.0, True)
    assert less["delta_nll"] == 0.0 and not less["delta_nll_significant"] and less["delta_nll_p_value"] == 1.0


def test_worst_task_per_method() -> None:
    base = nll_result({"code": [2.0, 2.0], "math": [2.0, 2.0], "stem": [2.0, 2.0]}, correct=[True, False])
    bids = nll_result({"code": [1.9, 1.9], "math": [1.8, 1.6], "stem": [1.0, 1.2]}, correct=[True, True])
    less = nll_result({"code": [1.0, 1.2], "math": [2.5, 2.3], "stem": [1.5, 1.5]}, correct=[False, False])
    worst = worst_tasks(comparison_table({"base": base, "bids": bids, "less": less}, baseline="base"))
    worst = worst.set_index("method")
    assert worst.loc["bids", "worst_loss_task"] == "code"
    assert worst.loc["bids", "worst_delta_nll"] == pytest.approx(-0.1)
    assert worst.loc["less", "worst_loss_task"] == "math" and worst.loc["less", "worst_delta_nll"] == pytest.approx(0.4)
    # +0.5 and +0.3: mean 0.4, se 0.1 on one degree of freedom (t quantile 12.7): no mark.
    assert not worst.loc["less", "worst_delta_nll_significant"]
    assert worst.loc["less", "worst_delta_nll_ci_low"] == pytest.approx(0.4 - 1.27062047)
    assert worst.loc["less", "worst_accuracy_task"] == "stem" and worst.loc["less", "worst_accuracy"] == 0.0
    assert worst.loc["less", "worst_delta_accuracy"] == -0.5
    assert worst.loc["base", "worst_loss_task"] == "code"  # all deltas 0: the first task
    report = markdown_report(comparison_table({"base": base, "bids": bids, "less": less}, baseline="base"))
    assert "## Worst task per method" in report and "| less | math | 0.4 [-0.871, 1.67] | stem | 0 |" in report


def test_seeds_must_share_the_rows() -> None:
    one = nll_result({"code": [1.0, 2.0]})
    other = EvalResult((RowResult("code0", "code", "code", 1.0), RowResult("codeX", "code", "code", 1.0)))
    with pytest.raises(ValueError, match="different rows"):
        comparison_table({"a": [one, other]})
    with pytest.raises(ValueError, match="non-empty sequence"):
        comparison_table({"a": []})
    assert stats.DEFAULT_RESAMPLES == 2000


def test_report_opens_with_the_quick_profile_caveat_and_states_the_false_positive_rate() -> None:
    rng = np.random.default_rng(2)
    results = {name: nll_result({"code": rng.normal(2.0, 0.3, size=5)}) for name in ("random/all", "less/all")}
    table = comparison_table(results, baseline="random/all")
    report = markdown_report(table, title="T", profile="quick", preface=["quick profile: evaluation=5"])
    assert report.startswith(
        "# T\n\n**This report comes from the quick demo profile (5 test rows per task, one finetuning seed): "
        "it shows the machinery working, not which method wins.**\n\nquick profile: evaluation=5\n"
    )
    rate = stats.null_false_positive_rate(5)
    assert f"marks {100 * rate:.1f}% at 5 rows." in report and rate <= 0.07
    assert "Holm's correction over all 1 method x task comparisons" in report
    # Outside the demo: said only when the rows are too few to show anything but huge effects.
    many = {name: nll_result({"code": rng.normal(2.0, 0.3, size=20)}) for name in ("random/all", "less/all")}
    assert evaluation.scope_warning(comparison_table(many, baseline="random/all")) is None
    assert evaluation.scope_warning(table).startswith("This report has only 5 test rows per task, one finetuning seed")
