"""Docker per-call cost through DockerRuntime against a bare `docker run`, in the same run.

    python bench/docker_bench.py [--calls N] [--image IMAGE] [--worker-calls N]

Needs a daemon (DOCKER_HOST; `scripts/dockerd start && scripts/dockerd images`) and the image
(default: the test image spear/busybox:1). Floor: the SDK's `containers.run(image, ["echo",
"hi"], network_mode="none", remove=True)`, what any Python embedder writes (create, start,
wait, logs, remove). spear: `await DockerRuntime.run()` of the same command (create + attach +
start in one thread hop, the attach stream read on the trio loop, wait, forced remove). The two
alternate call by call, so a change of load on the machine hits both alike. Medians and 99th
percentiles in ms; the ratio is spear's median over the floor's (issue 4 target: <= 1.2).
Then a warm worker (`--worker-image`, default the test image spear/busybox-worker:1):
`DockerInstance.invoke` of a 112-byte input, one request at a time (target: p50 <= 5 ms).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from dataclasses import replace

import docker
import trio

from spear.config import DockerConfig
from spear.model import FunctionSpec, TaskId
from spear.runtimes.docker import DockerRuntime

COMMAND = ("echo", "hi")
INPUT = b"hello, spear! " * 8
WARMUP = 3


def function_spec(image: str) -> FunctionSpec:
    return FunctionSpec(
        task_id=TaskId("tk-0000000000000000"),
        name="bench",
        runtime="docker",
        mode="per-call",
        artifact_path=None,
        artifact_sha256=None,
        command=COMMAND,
        image=image,
        env={},
        timeout_s=60.0,
        memory_limit_bytes=64 << 20,
        max_output_bytes=1 << 20,
        max_log_bytes=1 << 16,
    )


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def report(name: str, samples: list[float], floor: float | None) -> None:
    p50 = statistics.median(samples)
    ratio = f"  {p50 / floor:.2f}x the floor" if floor else ""
    print(f"{name:<34} p50 {p50:8.1f} ms   p99 {percentile(samples, 0.99):8.1f} ms{ratio}")


async def measure(calls: int, image: str) -> tuple[list[float], list[float]]:
    client = docker.from_env()
    runtime = await trio.to_thread.run_sync(
        lambda: DockerRuntime.connect(DockerConfig(), node_label="bench")
    )
    spec = function_spec(image)
    await runtime.prepare(spec)

    def bare() -> None:
        client.containers.run(image, list(COMMAND), network_mode="none", remove=True)

    floor: list[float] = []
    spear: list[float] = []
    try:
        for i in range(WARMUP + calls):
            started = time.perf_counter()
            await trio.to_thread.run_sync(bare)
            middle = time.perf_counter()
            outcome = await runtime.run(spec, b"", deadline=math.inf)
            done = time.perf_counter()
            if outcome.output != b"hi\n":
                sys.exit(f"docker_bench: unexpected outcome {outcome}")
            if i >= WARMUP:
                floor.append((middle - started) * 1000)
                spear.append((done - middle) * 1000)
    finally:
        await runtime.aclose()
        client.close()
    return floor, spear


async def measure_worker(calls: int, image: str) -> list[float]:
    """Per-invocation latency of a warm worker container (issue 4 target: p50 <= 5 ms)."""
    runtime = await trio.to_thread.run_sync(
        lambda: DockerRuntime.connect(DockerConfig(), node_label="bench")
    )
    spec = replace(function_spec(image), mode="worker", command=())
    samples: list[float] = []
    try:
        await runtime.prepare(spec)
        instance = await runtime.start_instance(spec)
        try:
            for i in range(WARMUP * 10 + calls):
                started = time.perf_counter()
                outcome = await instance.invoke(INPUT, deadline=math.inf, execution_id="ex-b")
                if outcome.output != INPUT.upper():
                    sys.exit(f"docker_bench: unexpected outcome {outcome}")
                if i >= WARMUP * 10:
                    samples.append((time.perf_counter() - started) * 1000)
        finally:
            await instance.aclose()
    finally:
        await runtime.aclose()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--image", default="spear/busybox:1")
    parser.add_argument("--worker-calls", type=int, default=1000)
    parser.add_argument("--worker-image", default="spear/busybox-worker:1")
    args = parser.parse_args()
    floor, spear = trio.run(measure, args.calls, args.image)
    print(f"docker per-call, {args.calls} calls each, alternating ({args.image})")
    report("floor: SDK containers.run", floor, None)
    report("spear: DockerRuntime.run", spear, statistics.median(floor))
    if args.worker_calls:
        warm = trio.run(measure_worker, args.worker_calls, args.worker_image)
        print(f"docker warm worker, {args.worker_calls} calls ({args.worker_image})")
        report("spear: DockerInstance.invoke", warm, None)


if __name__ == "__main__":
    main()
