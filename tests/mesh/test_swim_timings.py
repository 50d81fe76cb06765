"""Timing profiles: the §B table, validation, push-pull scaling."""

from __future__ import annotations

import pytest

from spear.errors import ConfigError
from spear.mesh.swim_timings import LAN, LAN_FAST, LOOPBACK, PROFILES, SIM, SwimTimings


def test_lan_profile_matches_memberlist_defaults() -> None:
    assert (LAN.probe_interval_s, LAN.probe_timeout_s, LAN.indirect_checks) == (1.0, 0.5, 3)
    assert (LAN.suspicion_mult, LAN.suspicion_max_mult, LAN.retransmit_mult) == (4, 6, 4)
    assert (LAN.gossip_interval_s, LAN.gossip_fanout, LAN.push_pull_interval_s) == (0.2, 3, 30)
    assert LAN.awareness_max_multiplier == 8


def test_profiles_are_named_and_ordered_by_speed() -> None:
    assert PROFILES == {"lan": LAN, "lan-fast": LAN_FAST, "loopback": LOOPBACK, "sim": SIM}
    assert LOOPBACK.probe_interval_s < LAN_FAST.probe_interval_s < LAN.probe_interval_s
    assert LAN_FAST.suspicion_max_mult == 4


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"probe_interval_s": 0.0}, "mesh.probe_interval_s must be > 0, got 0.0"),
        ({"probe_timeout_s": 2.0}, "mesh.probe_timeout_s must be < mesh.probe_interval_s"),
        ({"gossip_fanout": -1}, "mesh.gossip_fanout must be > 0, got -1"),
    ],
)
def test_bad_values_are_config_errors_naming_the_key(changes: dict[str, float], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        SwimTimings(**changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "factor"), [(5, 1), (32, 1), (33, 2), (64, 2), (65, 3), (1000, 6)])
def test_push_pull_slows_down_past_32_members(n: int, factor: int) -> None:
    assert LAN.push_pull_period_s(n) == 30.0 * factor
