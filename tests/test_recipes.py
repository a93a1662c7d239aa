"""Feature recipes: one field names the four feature settings; single fields win; every "why" is built
from the run's own settings and quotes figures only for the combinations they were measured on."""

from __future__ import annotations

import itertools
import re

import pytest
from pydantic import ValidationError

from assets.gradients import GradientConfig
from assets.influence import InfluenceConfig
from selection.influence import recipes
from selection.influence.gradients import TRAIN_TRANSFORMS

LESS = {"loss_tokens": "response", "train_transform": "adam", "mode": "exact", "dropped_directions": 0}
DEFAULT = {"loss_tokens": "sequence", "train_transform": "sgd", "mode": "fast", "dropped_directions": 8}


def test_recipes_resolve_to_their_settings_and_single_fields_win() -> None:
    assert recipes.resolve().settings() == DEFAULT and recipes.resolve().overrides == {}
    less = recipes.resolve("less-paper")
    assert less.settings() == LESS and less.recipe == "less-paper"
    mixed = recipes.resolve("less-paper", loss_tokens="sequence", mode="exact", dropped_directions=8)
    assert mixed.settings() == {**LESS, "loss_tokens": "sequence", "dropped_directions": 8}
    # A field given with the recipe's own value changes nothing, so it is not an override.
    assert mixed.overrides == {
        "loss_tokens": {"recipe": "response", "ran": "sequence"},
        "dropped_directions": {"recipe": 0, "ran": 8},
    }
    assert mixed.metadata()["recipe"] == "less-paper" and mixed.metadata()["recipe_overrides"] == mixed.overrides


def test_unknown_recipe_or_setting_is_refused_naming_the_field() -> None:
    with pytest.raises(
        ValueError, match=r"`recipe` 'less' is not a feature recipe; give one of 'default', 'less-paper'"
    ):
        recipes.resolve("less")
    with pytest.raises(ValidationError, match="`recipe` 'paper'"):
        GradientConfig(recipe="paper")
    with pytest.raises(ValidationError, match="`recipe` 'paper'"):
        InfluenceConfig(recipe="paper")
    with pytest.raises(ValueError, match="train transform"):
        recipes.resolve("default", train_transform="adamw")
    with pytest.raises(ValueError, match="dropped_directions"):
        recipes.resolve("default", dropped_directions=-1)


def test_configs_resolve_alike_and_old_single_field_configs_keep_working() -> None:
    assert GradientConfig().resolved().settings() == DEFAULT == InfluenceConfig().resolved().settings()
    assert GradientConfig(recipe="less-paper").resolved().settings() == LESS
    assert InfluenceConfig(recipe="less-paper").resolved().settings() == LESS
    # A run config written before recipes: the single fields, as they were.
    old = {"mode": "exact", "train_transform": "adam", "loss_tokens": "response"}
    assert GradientConfig(dims=[32], **old).resolved().settings() == {**old, "dropped_directions": 8}
    influence = InfluenceConfig(dim=32, dropped_directions=0, **old).resolved()
    assert influence.settings() == LESS and influence.recipe == "default" and set(influence.overrides) == set(LESS)
    # The dims are checked against the resolved mode: 'fast' needs multiples of 4, 'exact' does not.
    assert GradientConfig(recipe="less-paper", dims=[30]).resolved().mode == "exact"
    with pytest.raises(ValidationError, match="multiple"):
        GradientConfig(dims=[30])


def test_less_settings_say_so_and_differences_are_named() -> None:
    less = recipes.whys(**LESS)
    assert "all four settings are LESS's own" in less["recipe_why"] and "2.00x / 1.50x" in less["recipe_why"]
    assert [less[k] for k in ("mode_why", "transform_why", "loss_tokens_why", "dropped_directions_why")] == [""] * 4
    default = recipes.whys(**DEFAULT)
    assert (
        "differs from LESS's literal recipe in loss_tokens, train_transform, mode, dropped_directions"
        in (default["recipe_why"])
    )
    # sgd + sequence features are as collapsed as LESS's literal ones before the removal.
    assert "0.851 / 0.725" in default["transform_why"] and "0.847 / 0.718" in default["transform_why"]
    assert "relies on the dropped directions" in default["transform_why"]
    assert "tuning pool (medicine, computing" in default["transform_why"] and "not held-out" in default["recipe_why"]


def test_why_strings_follow_the_run_settings() -> None:
    response = recipes.whys(loss_tokens="response", train_transform="sgd", mode="fast", dropped_directions=0)
    sequence = recipes.whys(loss_tokens="sequence", train_transform="sgd", mode="fast", dropped_directions=8)
    assert response["transform_why"] != sequence["transform_why"]
    # The old fixed text quoted sequence/8-direction figures in every sgd run.
    assert "7.33" not in " ".join(response.values()) and "3.33" not in " ".join(response.values())
    assert "sgd 2.00x / 1.67x, adam 2.00x / 1.50x (no gain in this combination)" in response["transform_why"]
    assert "sgd 7.33x / 6.33x, adam 3.33x / 3.83x" in sequence["transform_why"]
    assert "2.00x" not in " ".join(sequence.values())
    # An unmeasured count of directions gets no figures at all.
    lowered = recipes.whys(loss_tokens="sequence", train_transform="sgd", mode="fast", dropped_directions=4)
    assert "no planted recall was measured" in lowered["recipe_why"] and "x / " not in " ".join(lowered.values())


@pytest.mark.parametrize(
    "loss_tokens, transform, mode, dropped",
    list(itertools.product(("response", "sequence"), TRAIN_TRANSFORMS, ("fast", "exact"), (0, 3, 8))),
)
def test_quoted_recall_is_of_this_combination_or_one_setting_away(loss_tokens, transform, mode, dropped) -> None:
    """Every recall figure quoted is the run's own combination's, or (labelled) of the combination that
    differs from it in the one setting the sentence is about."""
    texts = recipes.whys(loss_tokens, transform, mode, dropped)
    ours = (transform, loss_tokens, dropped)
    allowed = {
        "recipe_why": {ours},
        "transform_why": {ours, ("adam", loss_tokens, dropped)},
        "loss_tokens_why": {ours, (transform, "response", dropped)},
        "dropped_directions_why": {ours, (transform, loss_tokens, 0)},
        "mode_why": set(),
    }
    for name, text in texts.items():
        quoted = set(re.findall(r"(\d\.\d\d)x / (\d\.\d\d)x", text))
        expected = {
            (f"{recipes.RECALL[k][0]:.2f}", f"{recipes.RECALL[k][1]:.2f}") for k in allowed[name] if k in recipes.RECALL
        }
        assert quoted <= expected, (name, text)
        if quoted:
            assert "tuning pool (medicine, computing" in text
