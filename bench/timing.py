"""What the runtime benchmarks share: timing loops, the report line, a FunctionSpec to run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable

from spear.model import FunctionSpec, TaskId


def measure(fn: Callable[[], object], calls: int, *, warmup: int) -> list[float]:
    """Seconds per call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


async def measure_async(
    fn: Callable[[], Awaitable[object]], calls: int, *, warmup: int
) -> list[float]:
    """Seconds per awaited call of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        await fn()
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - started)
    return times


def report(
    label: str, times: list[float], floor: list[float] | None, *, width: int = 44, digits: int = 3
) -> None:
    """One line: median and p99 in ms, and the median's ratio to the floor's if given."""
    median = statistics.median(times) * 1000
    p99 = statistics.quantiles(times, n=100)[98] * 1000
    ratio = f"  x{median / (statistics.median(floor) * 1000):.2f}" if floor else ""
    print(f"  {label:{width}s} median {median:7.{digits}f} ms   p99 {p99:7.{digits}f} ms{ratio}")


def bench_spec(runtime: str, **fields: object) -> FunctionSpec:
    """A FunctionSpec for benchmarks: generous limits, the given fields on top."""
    base: dict[str, object] = {
        "task_id": TaskId("tk-0000000000000000"),
        "name": "bench",
        "runtime": runtime,
        "mode": "per-call",
        "artifact_path": None,
        "artifact_sha256": None,
        "command": (),
        "image": None,
        "env": {},
        "timeout_s": 30.0,
        "memory_limit_bytes": 256 << 20,
        "max_output_bytes": 1 << 20,
        "max_log_bytes": 1 << 16,
    }
    base.update(fields)
    return FunctionSpec(**base)  # type: ignore[arg-type]
