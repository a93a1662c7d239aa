"""Largest-remainder rounding: split an integer total in proportion to weights."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from numbers import Real
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)


def largest_remainder(total: int, weights: Mapping[Key, Real]) -> dict[Key, int]:
    """Split `total` in proportion to `weights` into integers summing exactly to `total`.

    Each key gets the floor of its share `total * weight / sum(weights)`; the units left go
    one each to the largest fractional remainders, equal remainders to the smaller key. The
    shares are exact when the weights are `Fraction`s, float arithmetic otherwise.
    """
    weight_sum = sum(weights.values())
    if total < 0 or weight_sum <= 0:
        raise ValueError(f"cannot split {total} over weights {dict(weights)}")
    shares = {key: total * weight / weight_sum for key, weight in weights.items()}
    counts = {key: math.floor(share) for key, share in shares.items()}
    by_remainder = sorted(shares, key=lambda key: (-(shares[key] - counts[key]), key))
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts
