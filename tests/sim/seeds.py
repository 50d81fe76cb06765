"""Seeds for simulator tests: how many, which one to replay, and a deterministic scheduler.

A scenario test is parametrized over `sim_seeds(n)`: seeds 0..n-1 in the normal run, or just
the one named by the environment variable `SPEAR_SEED` (to replay a failure). The conftest
beside this file seeds trio's task scheduler from the same seed, so a seed replays the same
interleaving, and prints the replay command when a seeded test fails.
"""

from __future__ import annotations

import os

import pytest
import trio

#: the environment variable naming one seed to replay
SEED_ENV = "SPEAR_SEED"


def sim_seeds(count: int, *, start: int = 0, slow_count: int = 0) -> list[object]:
    """Seeds for one scenario: `count` normal ones, plus `slow_count` marked `slow`.

    With SPEAR_SEED set, only that seed (so a printed failure replays with one command).
    """
    chosen = os.environ.get(SEED_ENV)
    if chosen is not None:
        return [int(chosen)]
    seeds: list[object] = list(range(start, start + count))
    slow = pytest.mark.slow
    seeds += [pytest.param(s, marks=slow) for s in range(start + count, start + count + slow_count)]
    return seeds


def seed_trio_scheduler(seed: int) -> None:
    """Make trio's choice among tasks runnable at the same instant follow `seed`.

    trio shuffles each batch of runnable tasks with a private module-level Random, already in
    deterministic mode under pytest-trio (hypothesis is installed); seeding it is the only way
    to replay one interleaving. Private API: if trio moves it, replays only lose exactness
    among same-instant events (every simulator RNG is seeded on its own).
    """
    run_module = getattr(trio._core, "_run", None)
    rng = getattr(run_module, "_r", None)
    if rng is not None:
        rng.seed(f"{seed}:trio-scheduler")


def replay_command(nodeid: str, seed: int) -> str:
    """The shell command that reruns one seed of one test."""
    test = nodeid.split("[", 1)[0]
    return f"{SEED_ENV}={seed} pytest {test} -p no:cacheprovider"
