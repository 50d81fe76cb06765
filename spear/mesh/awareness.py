"""Lifeguard local health (memberlist's "awareness"): how much this node distrusts itself.

The score lives in [0, max_multiplier - 1]. It rises by one per missed nack and per failed
probe with no helper able to nack, and by one per refutation this node had to send about
itself; it falls by one per successful probe. Probe interval and timeout are multiplied by
(score + 1): a node that is itself slow or losing packets probes less eagerly, so its own
trouble does not turn into suspicions of healthy peers (research/mesh.md rule 4).
"""

from __future__ import annotations

from spear.errors import ConfigError


class Awareness:
    """A saturating local-health counter; 0 is healthy."""

    __slots__ = ("_max", "_score")

    def __init__(self, max_multiplier: int) -> None:
        if max_multiplier < 1:
            raise ConfigError(f"mesh.awareness_max_multiplier must be >= 1, got {max_multiplier}")
        self._max = max_multiplier
        self._score = 0

    @property
    def score(self) -> int:
        """The health score: 0 is healthy, max_multiplier - 1 is the worst."""
        return self._score

    def apply(self, delta: int) -> None:
        """Move the score by `delta`, clamped to [0, max_multiplier - 1]."""
        self._score = min(self._max - 1, max(0, self._score + delta))

    def scale(self, duration_s: float) -> float:
        """`duration_s` stretched by the current score: duration * (score + 1)."""
        return duration_s * (self._score + 1)
