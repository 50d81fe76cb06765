"""Process workers and per-call runs against their floors, measured in the same run.

    python bench/worker_bench.py [--calls N] [--rounds R] [--cold N] [--c-worker FILE] [--cpu N]

Worker floor ("bare host"): a bare pipe round trip to the same process: the very worker
process a spear instance serves (`python -m spear.worker` with an echo handler, or the C
worker), its pipes borrowed between spear's calls (its hello was read by `start_instance`):
one request frame of the worker protocol, encoded once in advance, written with trio's pipe
stream and the answer frame read back by its length prefix, nothing decoded or checked (its
stderr drained unread, as spear's host reads it). It holds the pipes and the worker's own
work (the SDK's decoding, context, handler call and encoding), none of spear's host side, and
it shares spear's CPU placement. Strict floor beside it: a Python process echoing
length-prefixed frames with os.read/os.write (no worker protocol at all), driven the same
way. spear: the same input through `ProcessInstance.invoke` (the host session, the request's
deadline, log capture, the outcome), alternating with its floor. With --c-worker
(tests/programs/worker.c built for the host), the C worker too, against its own bare host
and the strict floor.

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

--cpu N pins this process, and so every process it starts, to CPU N. On a small VM a worker
round trip is bimodal: when host and worker run on one CPU it costs two context switches;
when the scheduler puts them on two, each direction is a wake-up of another (often idle)
CPU, 30-40 us apiece on the development VM, and which of the two a process gets changes
from process to process and run to run (the bare host shares its instance's placement, the
strict floor's process has its own). Pinned, every line pays the same.
Issue targets: worker <= 2x its floor, per-call <= 1.3x its floor.
"""

from __future__ import annotations

import argparse
import contextlib
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
from spear.worker_protocol import Request, encode

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
    """The strict worker floor: one frame out, the same frame back, over a process's raw
    pipes (the BARE_ECHO loop)."""

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


class BareHost:
    """The worker floor: a bare host of the very process a spear instance serves.

    It borrows the instance's pipes between spear's calls (nothing of spear's is in flight
    then; the hello was read by `start_instance`): one request frame encoded once in advance
    is written with trio's pipe stream and the answer read back by its length prefix,
    nothing decoded or checked; the worker's stderr is drained, unread, as spear's host
    reads it after each answer. The same process, so the same CPU placement as spear's
    calls; the pipes and the worker's own work, none of spear's host side.
    """

    def __init__(self, instance: ProcessInstance) -> None:
        pipes = instance._pipes  # borrowed: a bench may reach inside
        self.stdin = trio.lowlevel.FdStream(os.dup(pipes._stdin))
        self.stdout = trio.lowlevel.FdStream(os.dup(pipes._stdout))
        self.stderr_fd = pipes._stderr
        request = Request(id=1, execution_id="ex-bench", deadline_ms=30_000, data=INPUT)
        self.frame = encode(request)

    async def round_trip(self) -> bytes:
        await self.stdin.send_all(self.frame)
        got = b""
        while len(got) < 4 or len(got) < 4 + int.from_bytes(got[:4], "big"):
            got += await self.stdout.receive_some(65536)
        with contextlib.suppress(BlockingIOError):
            os.read(self.stderr_fd, 65536)
        return got  # one request in flight: nothing follows its answer

    async def aclose(self) -> None:
        await self.stdin.aclose()
        await self.stdout.aclose()


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
    assert isinstance(instance, ProcessInstance)
    host = BareHost(instance)
    bare_proc = await trio.lowlevel.open_process(
        [sys.executable, "-c", BARE_ECHO], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    bare = BarePipe(bare_proc)
    pairs: list[tuple[str, Timed]] = [
        ("floor", host.round_trip),
        ("strict", bare.round_trip),
        ("python", lambda: instance.invoke(INPUT, deadline=math.inf, execution_id="ex-bench")),
    ]
    instances, hosts = [instance], [host]
    if c_worker is not None:
        c_instance = await runtime.start_instance(
            bench_spec("process", mode="worker", command=(str(c_worker),))
        )
        assert isinstance(c_instance, ProcessInstance)
        instances.append(c_instance)
        c_host = BareHost(c_instance)
        hosts.append(c_host)
        pairs.append(("c floor", c_host.round_trip))
        pairs.append(
            ("c", lambda: c_instance.invoke(INPUT, deadline=math.inf, execution_id="ex-bench"))
        )
    try:
        outcome = await instance.invoke(INPUT, deadline=math.inf, execution_id="ex-check")
        assert outcome.output == INPUT and await bare.round_trip() == bare.frame
        for each_host, echoed in zip(hosts, [INPUT, INPUT.upper()], strict=False):
            assert echoed in await each_host.round_trip()  # the C worker upper-cases
        times = await alternate(pairs, calls, rounds)
    finally:
        for each_host in hosts:
            await each_host.aclose()
        for each in instances:
            await each.aclose()
        bare_proc.kill()
        await bare_proc.wait()
    floor, strict = times["floor"], times["strict"]
    print(f"process worker round trip, {len(INPUT)} bytes in and out:")
    report("floor: bare host of that python -m spear.worker", floor, None)
    report("strict floor: bare pipe round trip (python echo loop)", strict, floor)
    report("spear ProcessInstance.invoke, python -m spear.worker", times["python"], floor)
    report("  the same against the strict floor (python)", times["python"], strict)
    if "c" in times:
        report("floor: bare host of that tests/programs/worker.c", times["c floor"], None)
        c_label = "spear ProcessInstance.invoke, tests/programs/worker.c"
        report(c_label, times["c"], times["c floor"])
        report("  the same against the strict floor (C)", times["c"], strict)


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
    parser.add_argument("--cpu", type=int, default=None, help="pin everything to this CPU")
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        await bench_workers(args.calls, args.rounds, work, args.c_worker)
        await bench_cold(args.cold, work, args.c_worker)
        await bench_per_call(max(args.calls // 10, 100), args.rounds, work)


if __name__ == "__main__":
    trio.run(main)
