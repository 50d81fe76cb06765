"""Ray's local task round trip beside spear's gateway, measured in the same run.

    .venv/bin/python bench/ray_bench.py [--rounds 3] [--calls 2000] [--in-flight 5000]
                                        [--seconds 3] [--clients 1 16]

The issue's reference: Ray 2.60 on this kind of machine, `ray.get(f.remote(x))` of a trivial
task: p50 about 1.8 ms, p99 about 3.9 ms, about 1.8k calls/s with 5,000 in flight. This
script measures it here rather than quoting it:

- Ray: a local instance (`ray.init(num_cpus=<CPUs>)`, no dashboard), a task returning its
  argument. Sequential: `ray.get(f.remote(i))` one after the other, p50 and p99. In flight:
  `--in-flight` tasks submitted at once, then `ray.get` of all of them; calls/s = tasks /
  elapsed (median of 3 batches).
- spear: a real `spear node` process, the worker-mode twin of the demo (a WASM reactor,
  `tests/programs/reactor_upper.wat`: spear's fastest mode) invoked through the gateway with
  the lean keep-alive HTTP/1.1 client of bench/gateway_bench.py, by 1 and more concurrent
  clients (each keeps one request in flight), p50, p99 and requests/s.

Ray lives in a venv of its own, `.cache/ray-venv`, made on first use with `python -m venv`
and `pip install ray==2.60.0` (a few minutes; pass --ray-python to use another
interpreter). Rounds alternate Ray (started, measured and shut down each round, so its
daemons do not load the machine while spear is measured) and spear; medians over rounds.
This is a benchmark, never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import httpx
import trio
import wasmtime

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.gateway_bench import (  # noqa: E402
    BODY,
    Figures,
    free_port,
    load,
    median_figures,
    process,
)

RAY_VERSION = "2.60.0"
RAY_VENV = REPO / ".cache" / "ray-venv"
REACTOR = REPO / "tests" / "programs" / "reactor_upper.wat"

#: run by the Ray venv's interpreter; prints one JSON document
RAY_SCRIPT = """
import json, os, statistics, sys, time
import ray

calls, in_flight = int(sys.argv[1]), int(sys.argv[2])
ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
         logging_level="ERROR")

@ray.remote
def f(x):
    return x

ray.get([f.remote(i) for i in range(500)])  # start the worker processes
times = []
for i in range(calls):
    started = time.perf_counter()
    assert ray.get(f.remote(i)) == i
    times.append(time.perf_counter() - started)
times.sort()
rates = []
for _ in range(3):
    started = time.perf_counter()
    refs = [f.remote(i) for i in range(in_flight)]
    assert ray.get(refs)[-1] == in_flight - 1
    rates.append(in_flight / (time.perf_counter() - started))
ray.shutdown()
print(json.dumps({
    "p50_ms": statistics.median(times) * 1000,
    "p99_ms": times[min(len(times) - 1, int(len(times) * 0.99))] * 1000,
    "seq_rps": len(times) / sum(times),
    "in_flight_rps": statistics.median(rates),
}))
"""


def ray_python(given: Path | None) -> Path:
    """The interpreter that has Ray: `given`, or the cached venv (made if missing)."""
    if given is not None:
        return given
    python = RAY_VENV / "bin" / "python"
    probe = [str(python), "-c", f"import ray; assert ray.__version__ == {RAY_VERSION!r}"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"installing ray=={RAY_VERSION} into {RAY_VENV} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(RAY_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", f"ray=={RAY_VERSION}"]
    result = subprocess.run(pip, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"cannot install ray=={RAY_VERSION}:\n{result.stderr[-3000:]}")
    return python


def measure_ray(python: Path, calls: int, in_flight: int) -> dict[str, float]:
    result = subprocess.run(
        [str(python), "-c", RAY_SCRIPT, str(calls), str(in_flight)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise SystemExit(f"the Ray measurement failed:\n{result.stderr[-3000:]}")
    figures: dict[str, float] = json.loads(result.stdout.strip().splitlines()[-1])
    return figures


def start_task(base: str) -> str:
    """Register the worker-mode demo on the node; its invoke path."""
    reactor = bytes(wasmtime.wat2wasm(REACTOR.read_text()))
    file_id = httpx.post(f"{base}/api/v1/files", content=reactor).json()["file_id"]
    task = {"name": "upper-w", "runtime": "wasm", "mode": "worker", "artifact": file_id}
    httpx.post(f"{base}/api/v1/tasks", json=task).raise_for_status()
    return "/api/v1/tasks/upper-w/invoke"


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per round")
    parser.add_argument("--in-flight", type=int, default=5000, help="Ray tasks submitted at once")
    parser.add_argument("--seconds", type=float, default=3.0, help="per spear measurement")
    # 16 = this 2-CPU node's slots (node.max_running: 8 per CPU); more clients than slots get
    # 429 `saturated` at once when a burst meets a pool still starting instances
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--ray-python", type=Path, default=None)
    args = parser.parse_args()

    python = ray_python(args.ray_python)
    work = Path(tempfile.mkdtemp(prefix="spear-ray-bench-"))
    port = free_port()
    node = [
        sys.executable,
        "-m",
        "spear",
        "node",
        "--data-dir",
        str(work / "data"),
        "--http",
        f"127.0.0.1:{port}",
        "--listen",
        f"127.0.0.1:{free_port()}",
    ]
    env = {**os.environ, "SPEAR_NODE__LOG_LEVEL": "warning"}
    ray_runs: list[dict[str, float]] = []
    spear_runs: dict[int, list[Figures]] = {c: [] for c in args.clients}
    with process(node, "is serving", env=env):
        path = start_task(f"http://127.0.0.1:{port}")
        for round_ in range(args.rounds):
            ray_runs.append(measure_ray(python, args.calls, args.in_flight))
            for clients in args.clients:
                run = partial(
                    load, port, path, clients=clients, seconds=args.seconds, expect=BODY.upper()
                )
                spear_runs[clients].append(trio.run(run))
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    ray = {key: median([run[key] for run in ray_runs]) for key in ray_runs[0]}
    spear = {clients: median_figures(runs) for clients, runs in spear_runs.items()}
    print(f"\nmedians of {args.rounds} rounds ({os.cpu_count()} CPUs)")
    print(f"{'':<52} {'calls/s':>9} {'p50 ms':>9} {'p99 ms':>9}")
    print(
        f"{'ray: ray.get(f.remote(x)), one at a time':<52} {ray['seq_rps']:>9.0f}"
        f" {ray['p50_ms']:>9.3f} {ray['p99_ms']:>9.3f}"
    )
    print(f"{f'ray: {args.in_flight} tasks in flight':<52} {ray['in_flight_rps']:>9.0f}")
    for clients, figures in spear.items():
        label = f"spear: gateway, wasm worker, {clients} client(s)"
        print(f"{label:<52} {figures.rps:>9.0f} {figures.p50_ms:>9.3f} {figures.p99_ms:>9.3f}")
    one = spear[min(spear)]
    best = max(spear, key=lambda clients: spear[clients].rps)
    print("\nspear / ray (p50, p99: lower is better; throughput: higher is better)")
    print(f"  p50  {one.p50_ms / ray['p50_ms']:.2f}x   p99  {one.p99_ms / ray['p99_ms']:.2f}x")
    print(
        f"  throughput, spear's best ({best} clients) vs {args.in_flight} Ray tasks in flight:"
        f" {spear[best].rps / ray['in_flight_rps']:.2f}x"
    )


if __name__ == "__main__":
    main()
