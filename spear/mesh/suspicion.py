"""Lifeguard suspicion: a timeout that starts long and shrinks with independent confirmations.

Formulas (hashicorp/memberlist `suspicion.go`, `state.go`; research/mesh.md §1.2, rule 5):

- minimum = mult * max(1, log10(max(1, n))) * probe_interval, maximum = max_mult * minimum;
- confirmations wanted k = mult - 2, and k = 0 when n - 2 < k (the timer then starts at the
  minimum: in a tiny cluster nobody else could confirm);
- after C distinct confirmations the timeout is
  max(minimum, maximum - (maximum - minimum) * ln(C + 1) / ln(k + 1)), measured from the start.

A confirmation counts once per distinct accuser and never from the original accuser.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from spear.mesh.swim_timings import SwimTimings


@dataclass(frozen=True, slots=True)
class SuspicionBounds:
    """The timer parameters for one suspicion: wanted confirmations and min/max timeouts."""

    confirmations_wanted: int
    min_timeout_s: float
    max_timeout_s: float


def suspicion_bounds(timings: SwimTimings, n: int) -> SuspicionBounds:
    """The suspicion timer parameters when `n` members (self included) are alive or suspect."""
    scale = max(1.0, math.log10(max(1, n)))
    min_s = timings.suspicion_mult * scale * timings.probe_interval_s
    wanted = timings.suspicion_mult - 2
    if n - 2 < wanted:
        wanted = 0
    return SuspicionBounds(
        confirmations_wanted=max(0, wanted),
        min_timeout_s=min_s,
        max_timeout_s=timings.suspicion_max_mult * min_s,
    )


def suspicion_timeout(bounds: SuspicionBounds, confirmations: int) -> float:
    """The timeout (from the suspicion's start) after `confirmations` distinct confirmations."""
    if bounds.confirmations_wanted <= 0:
        return bounds.min_timeout_s
    fraction = math.log(confirmations + 1) / math.log(bounds.confirmations_wanted + 1)
    timeout = bounds.max_timeout_s - fraction * (bounds.max_timeout_s - bounds.min_timeout_s)
    return max(bounds.min_timeout_s, timeout)


class Suspicion:
    """One member's suspicion: who accused it, who confirmed, and when it turns into dead."""

    __slots__ = ("_accuser", "_bounds", "_confirmers", "_deadline", "_started")

    def __init__(self, *, accuser: str, bounds: SuspicionBounds, now: float) -> None:
        self._accuser = accuser
        self._bounds = bounds
        self._started = now
        self._confirmers: set[str] = set()
        self._deadline = now + suspicion_timeout(bounds, 0)

    @property
    def accuser(self) -> str:
        """The node whose accusation started this suspicion."""
        return self._accuser

    @property
    def confirmations(self) -> int:
        """Distinct independent confirmations counted so far."""
        return len(self._confirmers)

    @property
    def deadline(self) -> float:
        """When the suspect is declared dead unless it refutes first."""
        return self._deadline

    def confirm(self, accuser: str) -> bool:
        """Count `accuser`'s accusation; True when it was new and independent.

        Accusations from the original accuser, repeats from one accuser, and any beyond the
        wanted number do not count (they would let one noisy node shorten the timer).
        """
        if accuser == self._accuser or accuser in self._confirmers:
            return False
        if len(self._confirmers) >= self._bounds.confirmations_wanted:
            return False
        self._confirmers.add(accuser)
        timeout = suspicion_timeout(self._bounds, len(self._confirmers))
        self._deadline = self._started + timeout
        return True
