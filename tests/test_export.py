"""Exports in the source's own format read back to the same example id."""

from __future__ import annotations

import pytest

from selection.data.export import to_source_format
from selection.data.formats import canonicalize, example_id

SINGLE = [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7"}]
MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye!"},
]


@pytest.mark.parametrize("fmt", ["messages", "sharegpt", "alpaca", "prompt_completion"])
def test_round_trip_keeps_the_example_id(fmt: str) -> None:
    record = to_source_format(SINGLE, fmt)
    assert example_id(canonicalize(record, fmt)) == example_id(SINGLE)


@pytest.mark.parametrize("fmt", ["messages", "sharegpt"])
def test_multi_turn_formats_round_trip(fmt: str) -> None:
    assert example_id(canonicalize(to_source_format(MULTI, fmt), fmt)) == example_id(MULTI)


def test_single_turn_formats_refuse_multi_turn_and_unknown_formats() -> None:
    with pytest.raises(ValueError, match="exactly one user"):
        to_source_format(MULTI, "alpaca")
    with pytest.raises(ValueError, match="unknown source format"):
        to_source_format(SINGLE, "csv")
