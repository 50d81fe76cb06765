"""Which WASM calls run on the event loop's thread, and the run that enforces it there.

A short guest costs less than handing it to a worker thread and back (measured: the hand-off
doubles a 0.5 ms run), so per-call runs, reactor calls and reactor starts try the loop's
thread first, within `runtimes.wasm.inline_budget_ms` of CPU time; one past it is stopped
and its caller redoes it in a worker thread.
"""

from __future__ import annotations

import time
from typing import Final

from spear.model import ErrorCode, FunctionSpec
from spear.runtimes.guest import GuestRun

#: a module that outruns the inline budget this often in a row runs in worker threads from then on
INLINE_STRIKES: Final = 3
#: an inline run may hold the loop this many times its CPU budget in wall time (a safety net:
#: a sleeping guest falls back at once, and a loaded machine stalls threads for tens of ms)
INLINE_WALL_FACTOR: Final = 100


class InlinePolicy:
    """Which modules run on the event loop's thread first, within `inline_budget_ms`.

    A short guest costs less than handing it to a worker thread and back (measured: the
    hand-off doubles a 0.5 ms run). The budget is CPU time of the loop's thread, so a run
    the OS preempts is not taken for a long one; a guest that sleeps (`poll_oneoff`) is
    stopped at once, and wall time is capped at INLINE_WALL_FACTOR times the budget as a
    safety net. A stopped guest traps at its next epoch tick and its caller runs it again
    in a worker thread; after INLINE_STRIKES such fallbacks in a row its module always
    runs in worker threads. Used by one trio thread (no lock).
    """

    __slots__ = ("_budget_s", "_strikes", "fallbacks", "runs")

    def __init__(self, budget_s: float) -> None:
        self._budget_s = budget_s
        #: how often in a row each module outran the budget
        self._strikes: dict[str | None, int] = {}
        self.runs = 0
        self.fallbacks = 0

    def budget_s(self, module: str | None, timeout_s: float) -> float:
        """The inline budget for one call of `module` (0 = go straight to a thread)."""
        if self._budget_s <= 0 or self._strikes.get(module, 0) >= INLINE_STRIKES:
            return 0.0
        return min(timeout_s, self._budget_s)

    def record(self, module: str | None, *, overran: bool) -> None:
        if overran:
            self._strikes[module] = self._strikes.get(module, 0) + 1
            self.fallbacks += 1
        else:
            self._strikes.pop(module, None)
            self.runs += 1


class InlineRun(GuestRun):
    """A run on the event loop's thread, stopped past its CPU budget or its wall cap."""

    __slots__ = ("_cpu_deadline", "budget_s", "full_timeout_s", "inline_limit")

    def __init__(
        self, spec: FunctionSpec, run_id: int, budget_s: float, timeout_s: float, started: float
    ) -> None:
        """
        Args:
            spec, run_id, started: as for GuestRun.
            budget_s: CPU seconds this thread may spend in the guest (from InlinePolicy).
            timeout_s: the call's whole effective timeout.
        """
        super().__init__(spec, run_id, min(timeout_s, budget_s * INLINE_WALL_FACTOR), started)
        self.budget_s = budget_s
        self.full_timeout_s = timeout_s
        #: stopped for the CPU budget or a sleep (rather than for a deadline)
        self.inline_limit = False
        self._cpu_deadline = time.thread_time() + budget_s

    def should_stop(self) -> bool:
        # wasmtime asks from the guest's own thread, so thread_time() is the guest's CPU time
        if self.stop_reason is None and time.thread_time() >= self._cpu_deadline:
            self._stop_inline()
        return super().should_stop()

    def sleep(self, seconds: float) -> bool:
        if seconds > 0:  # a sleeping guest would hold the event loop: to a thread with it
            self._stop_inline()
        return super().sleep(seconds)

    def _stop_inline(self) -> None:
        if self.stop_reason is None:
            self.stop_reason = ErrorCode.TIMEOUT
            self.inline_limit = True

    @property
    def overran(self) -> bool:
        """Stopped by the inline limits rather than by the call's own timeout."""
        if self.stop_reason is not ErrorCode.TIMEOUT:
            return False
        if self.inline_limit:
            return self.budget_s < self.full_timeout_s
        return self.timeout_s < self.full_timeout_s
