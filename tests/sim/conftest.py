"""Simulator test plumbing: seed trio's scheduler per seed; print the replay command."""

from __future__ import annotations

from collections.abc import Generator

import pytest

from tests.sim.seeds import replay_command, seed_trio_scheduler


@pytest.fixture(autouse=True)
def _deterministic_scheduler(request: pytest.FixtureRequest) -> None:
    params = getattr(request.node, "callspec", None)
    seed = params.params.get("seed") if params is not None else None
    seed_trio_scheduler(seed if isinstance(seed, int) else 0)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    params = getattr(item, "callspec", None)
    seed = params.params.get("seed") if params is not None else None
    if report.failed and isinstance(seed, int):
        report.sections.append(("replay this seed", replay_command(item.nodeid, seed)))
    return report
