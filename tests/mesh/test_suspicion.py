"""The Lifeguard suspicion timer: memberlist's formulas, and who may confirm."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear.mesh.suspicion import Suspicion, SuspicionBounds, suspicion_bounds, suspicion_timeout
from spear.mesh.swim_timings import LAN, LAN_FAST, SwimTimings


@pytest.mark.parametrize(
    ("n", "wanted", "min_s"),
    [
        (1, 0, 4.0),  # alone: nobody could confirm
        (3, 0, 4.0),  # n - 2 = 1 < k = 2
        (4, 2, 4.0),
        (5, 2, 4.0),  # log10(5) < 1: the max(1, ...) floor
        (10, 2, 4.0),
        (100, 2, 8.0),  # log10, not ln: 4 * 2 * 1 s
        (1000, 2, 12.0),
    ],
)
def test_bounds_follow_memberlist_with_log10(n: int, wanted: int, min_s: float) -> None:
    bounds = suspicion_bounds(LAN, n)
    assert bounds.confirmations_wanted == wanted
    assert bounds.min_timeout_s == pytest.approx(min_s)
    assert bounds.max_timeout_s == pytest.approx(6 * min_s)


def test_fast_profile_caps_the_maximum_at_four_times_the_minimum() -> None:
    bounds = suspicion_bounds(LAN_FAST, 5)
    assert (bounds.min_timeout_s, bounds.max_timeout_s) == (2.0, 8.0)


def test_timeout_shrinks_logarithmically_with_confirmations() -> None:
    bounds = suspicion_bounds(LAN, 5)  # min 4 s, max 24 s, k = 2
    assert suspicion_timeout(bounds, 0) == pytest.approx(24.0)
    assert suspicion_timeout(bounds, 1) == pytest.approx(24.0 - 20.0 * math.log(2) / math.log(3))
    assert suspicion_timeout(bounds, 2) == pytest.approx(4.0)
    assert suspicion_timeout(bounds, 5) == pytest.approx(4.0)


def test_no_confirmations_wanted_means_the_minimum_at_once() -> None:
    bounds = suspicion_bounds(LAN, 3)
    assert suspicion_timeout(bounds, 0) == bounds.min_timeout_s


@given(
    mult=st.integers(min_value=2, max_value=8),
    max_mult=st.integers(min_value=1, max_value=8),
    n=st.integers(min_value=1, max_value=10_000),
    confirmations=st.integers(min_value=0, max_value=20),
)
def test_timeout_stays_within_bounds_and_never_grows(
    mult: int, max_mult: int, n: int, confirmations: int
) -> None:
    timings = SwimTimings(suspicion_mult=mult, suspicion_max_mult=max_mult)
    bounds = suspicion_bounds(timings, n)
    now = suspicion_timeout(bounds, confirmations)
    later = suspicion_timeout(bounds, confirmations + 1)
    assert bounds.min_timeout_s <= later <= now <= bounds.max_timeout_s


def _suspicion(now: float = 100.0) -> Suspicion:
    bounds = SuspicionBounds(confirmations_wanted=2, min_timeout_s=4.0, max_timeout_s=24.0)
    return Suspicion(accuser="a", bounds=bounds, now=now)


def test_deadline_starts_at_the_maximum() -> None:
    assert _suspicion().deadline == pytest.approx(124.0)


def test_the_original_accuser_never_confirms() -> None:
    suspicion = _suspicion()
    assert not suspicion.confirm("a")
    assert suspicion.confirmations == 0
    assert suspicion.deadline == pytest.approx(124.0)


def test_one_accuser_confirms_once() -> None:
    suspicion = _suspicion()
    assert suspicion.confirm("b")
    first = suspicion.deadline
    assert not suspicion.confirm("b")
    assert suspicion.deadline == first
    assert 104.0 < first < 124.0


def test_independent_confirmations_bring_the_deadline_to_the_minimum_from_the_start() -> None:
    suspicion = _suspicion()
    assert suspicion.confirm("b")
    assert suspicion.confirm("c")
    assert suspicion.deadline == pytest.approx(104.0)
    assert not suspicion.confirm("d")  # beyond k: nothing left to shorten
    assert suspicion.confirmations == 2
