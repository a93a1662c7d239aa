"""kMQ's quality signal: IFD against a hand computation, its sampling-weight mapping, the
per-source report, and the kMQ assets (IFD default, reward-model feedback, cache keys)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import dagster as dg
import duckdb
import numpy as np
import pytest
import torch

from assets import ASSET_MODULES
from assets.diversity import KmqConfig
from assets.partitions import DEFAULT_MODEL
from resources import build_resources
from selection.data import pool_store
from selection.data.tokenization import IGNORE_INDEX, tokenize_conversation
from selection.diversity import kmq_run, quality
from selection.diversity.diversity_store import CLUSTERS_DDL
from selection.diversity.quality import (
    IFDScorer,
    LogLikelihoodScorer,
    ifd_quality,
    instruction_following_difficulty,
    relative_sampling_weights,
    sampling_quality,
    summarize_by_group,
)
from tests.fakes import TinyModelStore

PAIRS = [
    ("Name a color.", "Blue."),
    ("Repeat after me: the cat sat on the mat.", "the cat sat on the mat."),
    ("Say something long.", "Here is a fairly long answer with several words in it."),
    ("Hi", "Hello there!"),
]


def _conversation(prompt: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _target_log_probs_by_hand(
    model: torch.nn.Module, tokenizer: Any, messages: list[dict], max_length: int
) -> tuple[list[int], list[float]]:
    """(target token ids, their log-probs), from one unbatched forward pass."""
    example = tokenize_conversation(tokenizer, messages, max_length)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([example.input_ids])).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)
    positions = [t for t in range(1, len(example.labels)) if example.labels[t] != IGNORE_INDEX]
    return [example.labels[t] for t in positions], [log_probs[t - 1, example.labels[t]].item() for t in positions]


def _ifd_by_hand(model, tokenizer, prompt: str, answer: str, max_length: int) -> float:
    ids_with, with_prompt = _target_log_probs_by_hand(model, tokenizer, _conversation(prompt, answer), max_length)
    ids_alone, alone = _target_log_probs_by_hand(model, tokenizer, _conversation("", answer), max_length)
    m = min(len(with_prompt), len(alone))
    assert ids_with[:m] == ids_alone[:m]
    ppl_with = np.exp(-np.mean(with_prompt[:m]))
    ppl_alone = np.exp(-np.mean(alone[:m]))
    return float(ppl_with / ppl_alone)


@pytest.mark.parametrize("template", [False, True])
def test_ifd_matches_hand_computation(
    tiny_llama: torch.nn.Module, tiny_tokenizer: Any, chatml_tokenizer: Any, template: bool
) -> None:
    tokenizer = chatml_tokenizer if template else tiny_tokenizer
    conversations = [_conversation(p, a) for p, a in PAIRS]
    result = instruction_following_difficulty(tiny_llama, tokenizer, conversations, max_length=128, batch_size=3)
    for row, (prompt, answer) in enumerate(PAIRS):
        assert result.ifd[row] == pytest.approx(_ifd_by_hand(tiny_llama, tokenizer, prompt, answer, 128), rel=1e-4)
    np.testing.assert_allclose(result.ifd, np.exp(result.unconditioned - result.conditioned), rtol=1e-10)
    one_by_one = instruction_following_difficulty(tiny_llama, tokenizer, conversations, max_length=128, batch_size=1)
    np.testing.assert_allclose(result.ifd, one_by_one.ifd, rtol=1e-4)
    assert result.n_unscored == 0 and (result.n_tokens > 0).all()


def test_ifd_compares_the_same_tokens_when_truncation_cuts_the_answer(
    tiny_llama: torch.nn.Module, tiny_tokenizer: Any
) -> None:
    prompt, answer = "Explain this at length please: " + "why " * 20, "Because " + "it is so. " * 12
    max_length = 120  # the prompted answer keeps fewer tokens than the answer alone
    result = instruction_following_difficulty(tiny_llama, tiny_tokenizer, [_conversation(prompt, answer)], max_length)
    alone = tokenize_conversation(tiny_tokenizer, _conversation("", answer), max_length)
    assert 0 < result.n_tokens[0] < alone.n_target_tokens
    assert result.ifd[0] == pytest.approx(
        _ifd_by_hand(tiny_llama, tiny_tokenizer, prompt, answer, max_length), rel=1e-4
    )
    with pytest.raises(ValueError, match="no assistant turn"):
        instruction_following_difficulty(tiny_llama, tiny_tokenizer, [[{"role": "user", "content": "Anyone?"}]])


def test_ifd_quality_keeps_below_one_and_drops_the_rest() -> None:
    got = ifd_quality([0.2, 0.99, 1.0, 1.7, np.nan])
    np.testing.assert_array_equal(got[:2], [0.2, 0.99])
    assert np.isnan(got[2:]).all()


def test_relative_sampling_weights_by_hand() -> None:
    q = np.array([0.0, 1.0, np.nan, 0.5])
    raw = np.exp(np.array([0.0, 1.0, 0.5]) / 0.5)
    expected = np.array([raw[0], raw[1], 0.0, raw[2]]) / raw.mean()
    np.testing.assert_allclose(relative_sampling_weights(q, 0.5), expected)
    np.testing.assert_allclose(
        relative_sampling_weights([-800.0, -801.0], 1.0), [2 / (1 + np.e**-1), 2 * np.e**-1 / (1 + np.e**-1)]
    )
    with pytest.raises(ValueError, match="temperature"):
        relative_sampling_weights(q, 0.0)


def test_summarize_by_group_by_hand() -> None:
    rows = summarize_by_group(["b", "a", "b", "b", "a"], {"x": [1.0, 2.0, 3.0, np.nan, 4.0], "w": [1, 1, 1, 1, 1]})
    assert [r["source"] for r in rows] == ["a", "b"]
    a, b = rows
    assert (a["n"], a["n_x"], a["x_mean"], a["x_median"], a["x_p10"], a["x_p90"]) == (2, 2, 3.0, 3.0, 2.2, 3.8)
    assert (b["n"], b["n_x"], b["x_mean"], b["x_p10"]) == (3, 2, 2.0, 1.2)
    assert "n_w" not in a and a["w_mean"] == 1.0
    with pytest.raises(ValueError, match="2 values for 5"):
        summarize_by_group(["b", "a", "b", "b", "a"], {"x": [1.0, 2.0]})


def test_ifd_scorer_is_its_own_cache_key_and_maps_to_quality(tiny_llama: torch.nn.Module, tiny_tokenizer: Any) -> None:
    ifd = IFDScorer(tiny_llama, tiny_tokenizer, "model-a", max_length=128)
    likelihood = LogLikelihoodScorer(tiny_llama, tiny_tokenizer, "model-a", max_length=128)
    assert ifd.fingerprint() != likelihood.fingerprint()
    assert ifd.fingerprint() != IFDScorer(tiny_llama, tiny_tokenizer, "model-b", max_length=128).fingerprint()
    assert ifd.describe()["kind"] == "ifd" and ifd.describe()["model"] == "model-a"
    values = ifd.score([_conversation(p, a) for p, a in PAIRS])
    assert ifd.last_result is not None and np.array_equal(values, ifd.last_result.ifd)
    stored = np.array([0.5, 1.2, np.nan])
    assert np.isnan(sampling_quality(ifd, stored)[1:]).all() and sampling_quality(ifd, stored)[0] == 0.5
    np.testing.assert_array_equal(sampling_quality(likelihood, [-1.0, -3.0]), [-1.0, -3.0])


def _quality_kind(config: KmqConfig) -> str:
    return quality.quality_kind(config.quality, config.reward_model_path)


def test_quality_setting_is_checked() -> None:
    assert _quality_kind(KmqConfig()) == "ifd"
    assert _quality_kind(KmqConfig(reward_model_path="/rm")) == "reward_model"
    assert _quality_kind(KmqConfig(reward_model_path="/rm", quality="ifd")) == "ifd"
    with pytest.raises(ValueError, match="needs `reward_model_path`"):
        _quality_kind(KmqConfig(quality="reward_model"))
    with pytest.raises(ValueError, match="not one of"):
        _quality_kind(KmqConfig(quality="perplexity"))
    # The core settings refuse a bad setting when they are made, before anything is read or loaded.
    with pytest.raises(ValueError, match="not one of"):
        kmq_run.KmqSettings(**KmqConfig(quality="perplexity").settings())


# ------------------------------------------------------------------ the diversity store and the score cache


class CountingScorer:
    """Scores an answer by its length (NaN when empty); records what it scored."""

    def __init__(self, name: str = "count") -> None:
        self.name, self.scored = name, []

    def score(self, conversations):
        self.scored.extend(c[-1]["content"] for c in conversations)
        return np.array([float(len(c[-1]["content"])) or np.nan for c in conversations])

    def fingerprint(self) -> str:
        return self.name

    def describe(self) -> dict[str, Any]:
        return {"kind": "count", "fingerprint": self.name}


def test_quality_scores_are_cached_per_scorer_and_unscorable_stays_nan(tmp_path: Path) -> None:
    db = str(tmp_path / "lineage.duckdb")
    ids, answers = ["a", "b", "c"], ["xx", "", "yyyy"]
    conversations = [_conversation("q", answer) for answer in answers]
    lines: list[str] = []
    scorer = CountingScorer()
    first = quality.cached_quality_scores(lambda: duckdb.connect(db), scorer, ids[:2], conversations[:2], lines.append)
    np.testing.assert_array_equal(first, [2.0, np.nan])
    again = quality.cached_quality_scores(lambda: duckdb.connect(db), scorer, ids, conversations, lines.append)
    np.testing.assert_array_equal(again, [2.0, np.nan, 4.0])
    assert scorer.scored == ["xx", "", "yyyy"]  # the cached ids, the unscorable one included, are not scored again
    assert lines == ["scoring quality of 2 examples with count", "scoring quality of 1 examples with count"]
    other = CountingScorer("other")
    quality.cached_quality_scores(lambda: duckdb.connect(db), other, ids, conversations, lines.append)
    assert other.scored == answers
    with duckdb.connect(db) as con:
        assert con.execute("SELECT score FROM quality_scores WHERE example_id = 'b'").fetchall() == [(None,), (None,)]
        assert json.loads(con.execute("SELECT scorer FROM quality_scores LIMIT 1").fetchone()[0])["kind"] == "count"


def test_diversity_store_reads_the_latest_embeddings_and_replaces_clusters_and_rounds(tmp_path: Path) -> None:
    from selection.diversity import diversity_store as store

    with duckdb.connect(str(tmp_path / "lineage.duckdb")) as con:
        with pytest.raises(ValueError, match="materialize embeddings first"):
            store.latest_embeddings(con)
        store.record_embedding_run(con, "v1", store.EmbeddingRun("/old", "enc", "user_turns", 4), 3)
        con.execute("UPDATE embedding_runs SET created_at = created_at - INTERVAL 1 HOUR")
        store.record_embedding_run(con, "v2", store.EmbeddingRun("/new", "enc", "conversation", 8), 5)
        cache_dir, fingerprint, mode, dim = store.latest_embeddings(con)
        assert (cache_dir, fingerprint, mode, dim) == ("/new", "enc", "conversation", 8)

        assert store.cluster_labels(con, "v1") == {}
        store.replace_clusters(con, "v1", "enc", 2, ["a", "b"], np.array([0, 1]))
        store.replace_clusters(con, "v2", "enc", 2, ["a"], np.array([1]))
        store.replace_clusters(con, "v1", "enc", 3, ["a", "b", "c"], np.array([2, 1, 0]))
        assert store.cluster_labels(con, "v1") == {"a": 2, "b": 1, "c": 0}
        assert store.cluster_labels(con, "v2") == {"a": 1}

        row = store.KmqRoundRow(0, [0.5, 0.5], [1.0, None], [0.7, 0.3], ["a"], {"round": 0})
        store.replace_kmq_rounds(con, "m", 4, [row, store.KmqRoundRow(1, [0.7, 0.3], None, None, ["b"], None)], "r1")
        store.replace_kmq_rounds(con, "m", 6, [row], "r2")
        store.replace_kmq_rounds(con, "m", 4, [row], "r3")
        stored = con.execute(
            "SELECT budget, round, weights, cluster_scores, updated_weights, new_example_ids, "
            "feedback, run_id FROM kmq_rounds ORDER BY budget"
        ).fetchall()
    assert [(budget, run_id) for budget, *_, run_id in stored] == [(4, "r3"), (6, "r2")]
    assert [json.loads(v) for v in stored[0][2:7]] == [[0.5, 0.5], [1.0, None], [0.7, 0.3], ["a"], {"round": 0}]


# ------------------------------------------------------------------ assets


class LengthRewardScorer:
    """A fake reward model: the answer's length in characters. Records what it judged."""

    calls: ClassVar[list[list[list[dict]]]] = []

    def __init__(self, path: str, device: str = "cpu", **_: Any) -> None:
        self.path = str(path)

    def score(self, conversations):
        LengthRewardScorer.calls.append([list(c) for c in conversations])
        return np.array([float(len(c[-1]["content"])) for c in conversations])

    def fingerprint(self) -> str:
        return f"length-{Path(self.path).name}"

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake_length_reward", "path": self.path, "fingerprint": self.fingerprint()}


def _pool_files(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    specs = []
    for source, make in (("short", lambda i: f"Item {i}."), ("long", lambda i: f"A longer answer number {i} " * 3)):
        lines = [
            {"instruction": f"{source} task {i}: describe thing {i * 7}", "input": "", "output": make(i)}
            for i in range(12)
        ]
        path = folder / f"{source}.jsonl"
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        specs.append({"path": str(path), "name": source})
    return specs


@pytest.fixture
def kmq_home(tmp_path: Path):
    """A 24-example pool from two sources, with 2 clusters written directly (no embedder)."""
    resources = {
        **build_resources(home=str(tmp_path / "home"), env="ci"),
        "model_store": TinyModelStore(cache_dir=str(tmp_path / "cache")),
    }
    assets = dg.load_assets_from_modules(ASSET_MODULES)
    with dg.instance_for_test() as instance:
        assert dg.materialize(
            assets,
            selection=dg.AssetSelection.assets("raw_pool"),
            resources=resources,
            run_config={"ops": {"raw_pool": {"config": {"sources": _pool_files(tmp_path / "in")}}}},
            instance=instance,
        ).success
        with duckdb.connect(resources["lineage"].db_path) as con:
            version = pool_store.latest_pool_version(con)[0]
            ids = [r[0] for r in con.execute("SELECT example_id FROM pool ORDER BY example_id").fetchall()]
            con.execute(CLUSTERS_DDL)
            con.executemany(
                "INSERT INTO clusters VALUES (?, 'fake-encoder', 2, ?, ?)",
                [(version, example_id, i % 2) for i, example_id in enumerate(ids)],
            )

        def run(asset: str, config: dict):
            result = dg.materialize(
                assets,
                selection=dg.AssetSelection.assets(asset),
                resources=resources,
                run_config={"ops": {asset: {"config": config}}},
                partition_key=DEFAULT_MODEL,
                instance=instance,
            )
            assert result.success
            return result.asset_materializations_for_node(asset)[0].metadata

        yield run, resources["lineage"].db_path, Path(tmp_path / "home")


def test_kmq_defaults_to_ifd_reports_sources_and_keys_scores_by_scorer(kmq_home) -> None:
    run, db_path, _ = kmq_home
    metadata = run("kmq_selection", {"budget": 4})
    assert metadata["scorer"].value["kind"] == "ifd"
    table = metadata["quality_by_source"].value
    assert "| source | n | n_eligible | score_mean" in table
    assert "| long | 12 |" in table and "| short | 12 |" in table
    run("kmq_selection", {"budget": 4, "quality": "log_likelihood"})
    with duckdb.connect(db_path) as con:
        kinds = dict(
            con.execute(
                "SELECT json_extract_string(scorer, '$.kind'), count(*) FROM quality_scores GROUP BY ALL"
            ).fetchall()
        )
        ifd, loglik = (
            np.array(
                [
                    r[0]
                    for r in con.execute(
                        "SELECT score FROM quality_scores WHERE json_extract_string(scorer, '$.kind') = ? "
                        "ORDER BY example_id",
                        [kind],
                    ).fetchall()
                ],
                dtype=float,
            )
            for kind in ("ifd", "response_log_likelihood")
        )
        lineage = json.loads(
            con.execute(
                "SELECT metrics FROM lineage WHERE asset_key = 'kmq_selection' ORDER BY finished_at LIMIT 1"
            ).fetchone()[0]
        )
    # Each scorer scored the pool once; the log-likelihood run did not reuse the IFD scores (or the reverse).
    assert kinds == {"ifd": 24, "response_log_likelihood": 24}
    assert (ifd > 0).all() and (loglik < 0).all()
    assert lineage["quality_kind"] == "ifd" and {r["source"] for r in lineage["quality_by_source"]} == {"long", "short"}
    assert sum(r["n_eligible"] for r in lineage["quality_by_source"]) == 24 - lineage["n_ineligible"]


def test_iterative_feedback_uses_the_reward_model_and_its_identity_keys_rounds(kmq_home, monkeypatch) -> None:
    run, db_path, home = kmq_home
    monkeypatch.setattr(quality, "RewardModelScorer", LengthRewardScorer)
    LengthRewardScorer.calls = []
    # Quality stays IFD (the base model); only the feedback judge is the reward model.
    config = {
        "budget": 6,
        "n_rounds": 3,
        "max_new_tokens": 4,
        "quality": "ifd",
        "reward_model_path": str(home / "rm-a"),
    }
    metadata = run("kmq_iterative_selection", config)
    assert metadata["scorer"].value["kind"] == "ifd"
    assert len(LengthRewardScorer.calls) == 4  # gold then generated answers, after rounds 0 and 1
    with duckdb.connect(db_path) as con:
        logs = [
            json.loads(r[0])
            for r in con.execute("SELECT feedback FROM kmq_rounds WHERE feedback != 'null' ORDER BY round").fetchall()
        ]
    assert [log["scorer"]["kind"] for log in logs] == ["fake_length_reward"] * 2
    for log, (gold, generated) in zip(logs, zip(LengthRewardScorer.calls[::2], LengthRewardScorer.calls[1::2])):
        stored = json.loads(
            (home / "models" / DEFAULT_MODEL / "kmq_feedback" / log["round_key"] / "feedback.json").read_text()
        )["scores"]
        # S = reward(gold) - reward(generated), as in the paper.
        expected = [len(g[-1]["content"]) - len(x[-1]["content"]) for g, x in zip(gold, generated)]
        assert stored == pytest.approx(expected)
        assert all(g[:-1] == x[:-1] for g, x in zip(gold, generated))

    # The same judge again: its rounds are reused, nothing is judged.
    LengthRewardScorer.calls = []
    run("kmq_iterative_selection", config)
    assert LengthRewardScorer.calls == []
    # Another reward model: the same selections, but the cached rounds do not count.
    run("kmq_iterative_selection", {**config, "reward_model_path": str(home / "rm-b")})
    assert len(LengthRewardScorer.calls) == 4
    with duckdb.connect(db_path) as con:
        logs_b = [
            json.loads(r[0])
            for r in con.execute("SELECT feedback FROM kmq_rounds WHERE feedback != 'null' ORDER BY round").fetchall()
        ]
    assert not any(log.get("reused") for log in logs_b)
    assert {log["round_key"] for log in logs_b}.isdisjoint({log["round_key"] for log in logs})


# ------------------------------------------------------------------ the built-in pool, real model

PER_SOURCE = 30


@pytest.mark.slow
@pytest.mark.timeout(2400)  # 300 forward passes of SmolLM2: minutes alone, far longer on a shared 2-core machine
def test_builtin_pool_sampling_weights_do_not_follow_answer_format(pytestconfig, tmp_path_factory) -> None:
    """On 30 examples per built-in source (the start of each source's default-pool sample),
    no source's mean IFD sampling weight is over 3x another's; the old default, the mean
    response log-likelihood, fails that bar on the same examples (copy-heavy, predictable
    answers such as HumanEval's get several times the weight of open-ended ones)."""
    import dataclasses

    from selection.data.default_data import SOURCE_NAMES, pool_side, sample_items
    from selection.train.models import DEMO_SPEC_OVERRIDES, default_model_spec, load_model_and_tokenizer

    cache = getattr(pytestconfig, "cache", None)
    cache_dir = cache.mkdir("instruct-select-model-cache") if cache else tmp_path_factory.mktemp("model-cache")
    spec = dataclasses.replace(default_model_spec(), **DEMO_SPEC_OVERRIDES)  # the demo's setup, as measured
    model, tokenizer = load_model_and_tokenizer(spec, cache_dir)
    conversations, sources = [], []
    for source in SOURCE_NAMES:
        # The same salt as write_default_pool: these are the first 30 of its sample of the source.
        items = sample_items(pool_side(source), PER_SOURCE, salt=f"default-pool/0/{source}")
        conversations += [item.messages for item in items]
        sources += [source] * len(items)
    scorer = IFDScorer(model, tokenizer, spec.fingerprint(), max_length=spec.max_length)
    ifd = scorer.score(conversations)
    # Single-turn conversations: the prompted half of IFD is exactly the old default score.
    loglik = scorer.last_result.conditioned
    assert np.isfinite(ifd).all()
    by_source = {
        name: summarize_by_group(sources, {"score": values, "weight": relative_sampling_weights(q, 1.0)})
        for name, values, q in (("ifd", ifd, ifd_quality(ifd)), ("log_likelihood", loglik, loglik))
    }
    spread = {
        name: max(r["weight_mean"] for r in rows) / min(r["weight_mean"] for r in rows)
        for name, rows in by_source.items()
    }
    print(json.dumps({"by_source": by_source, "mean_weight_spread": spread}))
    assert spread["ifd"] <= 3.0, by_source["ifd"]
    assert spread["log_likelihood"] > 3.0, by_source["log_likelihood"]
