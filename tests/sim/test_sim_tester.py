"""Test the tester: deliberately broken Raft variants must be caught by the simulator.

Each broken variant runs the scenario most likely to expose it over a range of seeds; the
test passes when an invariant violation is raised for at least one seed (and reports which).
The correct core and driver run the same scenarios in test_sim_raft.py without a violation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from spear.mesh.raft_types import RaftTimings
from tests.sim.broken import CountingCommitCore
from tests.sim.cluster import RaftSim, open_raft_sim
from tests.sim.invariants import InvariantViolation, LivenessViolation
from tests.sim.raft_adapter import sim_timings
from tests.sim.raft_node import ForgetVoteDriver, LazyFsyncDriver, StaleReadDriver
from tests.sim.scenarios import crash_storm, figure_8, vote_storm
from tests.sim.test_sim_raft_chaos import check_client_histories

Scenario = Callable[[RaftSim], Awaitable[None]]


async def first_caught(
    scenario: Scenario, seeds: range, **sim_args: Any
) -> tuple[int, InvariantViolation] | None:
    """Run `scenario` per seed until an invariant breaks; return that seed and violation."""
    for seed in seeds:
        try:
            async with open_raft_sim(seed, **sim_args) as sim:
                await scenario(sim)
        except BaseExceptionGroup as group:
            violation = leaf_violation(group)
            if violation is not None:
                return seed, violation
            if group.subgroup(LivenessViolation) is None:
                raise
            # A broken variant may also wedge the cluster; only a safety catch counts.
    return None


def leaf_violation(error: BaseException) -> InvariantViolation | None:
    """The first safety violation inside nested exception groups, if any (a liveness
    failure alone does not count: a broken variant must be caught breaking safety)."""
    if isinstance(error, InvariantViolation) and not isinstance(error, LivenessViolation):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = leaf_violation(inner)
            if found is not None:
                return found
    return None


async def test_sending_before_fsync_is_caught(autojump_clock: trio.abc.Clock) -> None:
    caught = await first_caught(crash_storm, range(30), driver=LazyFsyncDriver)
    assert caught is not None, "a driver that sends before fsync went unnoticed"


async def test_not_persisting_the_vote_is_caught(autojump_clock: trio.abc.Clock) -> None:
    caught = await first_caught(vote_storm, range(60), driver=ForgetVoteDriver)
    assert caught is not None, "a driver that forgets voted_for went unnoticed"


async def test_committing_a_previous_term_entry_by_counting_is_caught(
    autojump_clock: trio.abc.Clock,
) -> None:
    # One entry per AppendEntries, so a follower can hold an old-term entry without the
    # new leader's no-op: the window Figure 8 needs.
    base = sim_timings()
    timings = RaftTimings(
        heartbeat_interval_s=base.heartbeat_interval_s,
        election_timeout_min_s=base.election_timeout_min_s,
        election_timeout_max_s=base.election_timeout_max_s,
        append_timeout_s=base.append_timeout_s,
        max_entries_per_append=1,
        snapshot_threshold_entries=base.snapshot_threshold_entries,
    )
    caught = await first_caught(
        figure_8, range(100), voters=5, core_class=CountingCommitCore, timings=timings
    )
    assert caught is not None, "committing previous-term entries by counting went unnoticed"


async def test_serving_reads_without_read_index_is_caught(autojump_clock: trio.abc.Clock) -> None:
    for seed in range(20):
        async with open_raft_sim(seed, voters=5, driver=StaleReadDriver) as sim:
            sim.start_clients(3, writes=8)
            sim.start_readers(3, reads=15)
            await sim.settle()
        try:
            check_client_histories(sim)
        except InvariantViolation:
            return
    raise AssertionError("reads served from local state without read-index went unnoticed")
