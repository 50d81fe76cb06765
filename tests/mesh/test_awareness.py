"""Lifeguard local health: a clamped score that stretches probing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear.errors import ConfigError
from spear.mesh.awareness import Awareness


@given(
    max_multiplier=st.integers(min_value=1, max_value=16),
    deltas=st.lists(st.integers(min_value=-5, max_value=5), max_size=50),
)
def test_score_stays_within_zero_and_max_minus_one(max_multiplier: int, deltas: list[int]) -> None:
    awareness = Awareness(max_multiplier)
    for delta in deltas:
        awareness.apply(delta)
        assert 0 <= awareness.score <= max_multiplier - 1
        assert awareness.scale(1.0) == awareness.score + 1


def test_failures_raise_and_successes_lower_the_score() -> None:
    awareness = Awareness(8)
    awareness.apply(3)
    assert awareness.scale(0.5) == 2.0
    awareness.apply(-1)
    assert awareness.score == 2
    awareness.apply(100)
    assert awareness.scale(1.0) == 8.0  # capped at the max multiplier


def test_a_multiplier_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="awareness_max_multiplier"):
        Awareness(0)
