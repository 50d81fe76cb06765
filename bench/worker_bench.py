"""Process workers and per-call runs against their floors, measured in the same run.

    python bench/worker_bench.py [--calls N] [--rounds R] [--cold N] [--c-worker FILE]

Worker floor: a bare pipe round trip to the same kind of process: a Python process echoing
length-prefixed frames with os.read/os.write, driven by trio over its pipes. spear: the same
input through `ProcessInstance.invoke` to `python -m spear.worker` serving an echo handler
(CBOR framing both ways, the host session, deadlines, log capture, the outcome). With
--c-worker (tests/programs/worker.c built for the host), the C worker too, against the same
floor.

Worker cold start (--cold times each, alternating): `start_instance` (spawn, the hello) +
the first invoke + `aclose`, against the floor's process spawned, one round trip, killed and
reaped (the Python interpreter's start is most of both).

Per-call floor: a bare spawn of `cat` by trio (`trio.lowlevel.open_process`: pipes, feed,
read, wait), the "bare spawn" of the issue's target; a strict floor beside it: a blocking
`subprocess.Popen` of `cat` on the event loop's thread (no thread hop, blocking pipes: the
least a spawn can cost from Python). spear: `ProcessRuntime.run` of `cat` (launcher with the
rlimits, clean env, group kill, captures), the same through the `/bin/sh` wrapper
(`launcher=False`), and with a cgroup per call when this node can make them (root, a
writable hierarchy).

Floor and spear alternate in rounds (the machine is shared: drift hits both alike); medians
and 99th percentiles in ms over all rounds; ratios are medians against the floor's. "host
cpu" is this process's CPU time per call (what spear's side costs, whatever the scheduler
does to the wall time on a busy machine).
Issue targets: worker <= 2x its floor, per-call <= 1.3x its floor.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from spear.config import ProcessConfig
from spear.model import FunctionSpec
from spear.runtimes import ProcessRuntime
from spear.runtimes.cgroups import Cgroups, CgroupSettings
from spear.runtimes.process_worker import ProcessInstance

INPUT = b"hello, spear! " * 8
WARMUP = 50
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.timing import bench_spec  # noqa: E402

ECHO_HANDLER = "def echo(data, ctx):\n    return data\n"
#: the floor's process: a length-prefixed echo loop on raw file descriptors
BARE_ECHO = """
import os
def read(n):
    buf = b""
    while len(buf) < n:
        chunk = os.read(0, n - len(buf))
        if not chunk:
            raise SystemExit(0)
        buf += chunk
    return buf
while True:
    head = read(4)
    body = read(int.from_bytes(head, "big"))
    os.write(1, head + body)
"""

Timed = Callable[[], Awaitable[object]]


class BarePipe:
    """The worker floor: one frame out, the same frame back, over a process's raw pipes."""

    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        self.stdin, self.stdout = proc.stdin, proc.stdout
        self.frame = len(INPUT).to_bytes(4, "big") + INPUT

    async def round_trip(self) -> bytes:
        await self.stdin.send_all(self.frame)
        got = b""
        while len(got) < len(self.frame):
            got += await self.stdout.receive_some(65536)
        return got


#: per name: wall-clock seconds of each call, and this process's CPU seconds per call
Timings = dict[str, tuple[list[float], float]]


async def alternate(
    pairs: list[tuple[str, Timed]], calls: int, rounds: int, *, warmup: int = WARMUP
) -> Timings:
    """Time each callable `calls` times in all, in turn, over `rounds` rounds."""
    times: dict[str, list[float]] = {name: [] for name, _ in pairs}
    cpu = dict.fromkeys(times, 0.0)
    for _name, fn in pairs:
        for _ in range(warmup):
            await fn()
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for name, fn in pairs:
            cpu_started = time.process_time()
            for _ in range(per_round):
                started = time.perf_counter()
                await fn()
                times[name].append(time.perf_counter() - started)
            cpu[name] += time.process_time() - cpu_started
    return {name: (times[name], cpu[name] / len(times[name])) for name in times}


def report(
    label: str, timed: tuple[list[float], float], floor: tuple[list[float], float] | None
) -> None:
    """Median and p99 wall time, this process's CPU time per call, ratios to the floor."""
    times, cpu = timed
    median = statistics.median(times) * 1000
    p99 = statistics.quantiles(times, n=100)[98] * 1000
    ratio = f"  x{median / (statistics.median(floor[0]) * 1000):.2f}" if floor else ""
    cpu_ratio = f" x{cpu / floor[1]:.2f}" if floor else ""
    print(f"  {label:52s} median {median:7.3f} ms  p99 {p99:7.3f} ms{ratio}")
    print(f"  {'':52s} host cpu {cpu * 1000:6.3f} ms per call{cpu_ratio}")


async def bench_workers(calls: int, rounds: int, work: Path, c_worker: Path | None) -> None:
    (work / "bench_echo.py").write_text(ECHO_HANDLER)
    runtime = ProcessRuntime(ProcessConfig(), work_dir=work / "work")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(work)])}
    command = (sys.executable, "-m", "spear.worker", "bench_echo:echo")
    instance = await runtime.start_instance(
        bench_spec("process", mode="worker", command=command, env=env)
    )
    bare_proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", BARE_ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    bare = BarePipe(bare_proc)
    pairs: list[tuple[str, Timed]] = [
        ("floor", bare.round_trip),
        ("python", lambda: instance.invoke(INPUT, deadline=math.inf, execution_id="ex-bench")),
    ]
    instances = [instance]
    if c_worker is not None:
        c_instance = await runtime.start_instance(
            bench_spec("process", mode="worker", command=(str(c_worker),))
        )
        instances.append(c_instance)
        pairs.append(
            ("c", lambda: c_instance.invoke(INPUT, deadline=math.inf, execution_id="ex-bench"))
        )
    try:
        outcome = await instance.invoke(INPUT, deadline=math.inf, execution_id="ex-check")
        assert outcome.output == INPUT and await bare.round_trip() == bare.frame
        times = await alternate(pairs, calls, rounds)
    finally:
        for each in instances:
            assert isinstance(each, ProcessInstance)
            await each.aclose()
        bare_proc.kill()
        await bare_proc.wait()
    print(f"process worker round trip, {len(INPUT)} bytes in and out:")
    report("floor: bare pipe round trip (python echo loop)", times["floor"], None)
    report("spear ProcessInstance.invoke, python -m spear.worker", times["python"], times["floor"])
    if "c" in times:
        report("spear ProcessInstance.invoke, tests/programs/worker.c", times["c"], times["floor"])


async def bench_cold(runs: int, work: Path, c_worker: Path | None) -> None:
    runtime = ProcessRuntime(ProcessConfig(), work_dir=work / "cold")
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(work)])}
    python = bench_spec(
        "process",
        mode="worker",
        command=(sys.executable, "-m", "spear.worker", "bench_echo:echo"),
        env=env,
    )

    async def bare() -> object:
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", BARE_ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        try:
            return await BarePipe(proc).round_trip()
        finally:
            proc.kill()
            await proc.wait()

    def cold(spec: FunctionSpec) -> Timed:
        async def start_call_close() -> object:
            instance = await runtime.start_instance(spec)
            assert isinstance(instance, ProcessInstance)
            try:
                return await instance.invoke(INPUT, deadline=math.inf, execution_id="ex-cold")
            finally:
                await instance.aclose()

        return start_call_close

    pairs: list[tuple[str, Timed]] = [("floor", bare), ("python", cold(python))]
    if c_worker is not None:
        pairs.append(("c", cold(bench_spec("process", mode="worker", command=(str(c_worker),)))))
    try:
        times = await alternate(pairs, runs, runs, warmup=2)  # one call of each per round
    finally:
        await runtime.aclose()
    print(f"process worker cold start (first call included), {runs} each:")
    report("floor: spawn python, one round trip, kill", times["floor"], None)
    report("spear start_instance + invoke + aclose, python", times["python"], times["floor"])
    if "c" in times:
        report("the same, tests/programs/worker.c", times["c"], times["floor"])


async def bench_per_call(calls: int, rounds: int, work: Path) -> None:
    runtime = ProcessRuntime(ProcessConfig(), work_dir=work / "work")
    fn = bench_spec("process", command=("cat",))

    async def bare() -> object:
        proc = await trio.lowlevel.open_process(
            ["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdin is not None and proc.stdout is not None
        async with proc.stdin:
            await proc.stdin.send_all(INPUT)
        out = b""
        while chunk := await proc.stdout.receive_some(65536):
            out += chunk
        await proc.wait()
        return out

    async def strict() -> object:
        # blocking on purpose: the least a spawn costs, with nothing else to serve meanwhile
        proc = subprocess.Popen(  # noqa: ASYNC220
            ["cat"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(INPUT)
        proc.stdin.close()
        out = proc.stdout.read()
        proc.stderr.read()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        return out

    async def whole() -> object:
        return await runtime.run(fn, INPUT, deadline=math.inf)

    wrapped = ProcessRuntime(ProcessConfig(), work_dir=work / "sh", launcher=False)

    async def shell() -> object:
        return await wrapped.run(fn, INPUT, deadline=math.inf)

    pairs: list[tuple[str, Timed]] = [
        ("floor", bare),
        ("strict", strict),
        ("spear", whole),
        ("sh", shell),
    ]
    cgroups = Cgroups(CgroupSettings())
    if cgroups.active:
        limited = ProcessRuntime(ProcessConfig(), work_dir=work / "cg", cgroups=CgroupSettings())

        async def in_cgroup() -> object:
            return await limited.run(fn, INPUT, deadline=math.inf)

        pairs.append(("cgroup", in_cgroup))
    try:
        times = await alternate(pairs, calls, rounds)
    finally:
        await runtime.aclose()
        await wrapped.aclose()
        if cgroups.active:
            await limited.aclose()  # removes its spare cgroups
    print(f"process per-call, cat ({runtime.describe()['launcher']}):")
    report("floor: bare spawn of cat (pipes, feed, read, wait)", times["floor"], None)
    report("strict floor: blocking Popen, no thread hop", times["strict"], times["floor"])
    report("spear await ProcessRuntime.run()", times["spear"], times["floor"])
    report("  the same against the strict floor", times["spear"], times["strict"])
    report("spear run() through the /bin/sh wrapper", times["sh"], times["floor"])
    if "cgroup" in times:
        report("spear run() with a cgroup per call", times["cgroup"], times["floor"])
    else:
        print(f"  (no cgroup line: {cgroups.describe()})")


async def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000, help="worker calls (per-call: /10)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--cold", type=int, default=20, help="worker cold starts of each kind")
    parser.add_argument("--c-worker", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        await bench_workers(args.calls, args.rounds, work, args.c_worker)
        await bench_cold(args.cold, work, args.c_worker)
        await bench_per_call(max(args.calls // 10, 100), args.rounds, work)


if __name__ == "__main__":
    trio.run(main)
