"""Reconnect backoff (pure): doubling, capped, jittered."""

from __future__ import annotations

import random

from spear.mesh.links import TransportSettings
from spear.mesh.outbound import backoff_delay

SETTINGS = TransportSettings(backoff_min_s=0.1, backoff_max_s=5.0)


def test_the_delay_doubles_per_failure_up_to_the_cap_with_jitter() -> None:
    rng = random.Random("backoff")
    for failures, base in [(1, 0.1), (2, 0.2), (3, 0.4), (6, 3.2), (7, 5.0), (500, 5.0)]:
        delays = [backoff_delay(failures, SETTINGS, rng) for _ in range(200)]
        assert all(0.5 * base <= d < base for d in delays)
        assert max(delays) - min(delays) > 0.2 * base  # really jittered


def test_the_jitter_is_reproducible_from_the_seed() -> None:
    first = [backoff_delay(3, SETTINGS, random.Random(7)) for _ in range(3)]
    assert first == [backoff_delay(3, SETTINGS, random.Random(7)) for _ in range(3)]
