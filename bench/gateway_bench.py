"""Warm sync invocations of a trivial WASM function through spear's gateway, against floors.

    .venv/bin/python bench/gateway_bench.py [--seconds 2] [--rounds 5] [--concurrency 16]

Measured in one run, on loopback, in alternating rounds (medians reported), with the same
keep-alive HTTP/1.1 client (a lean trio socket client that costs the same for every server):
  - spear: `spear node` (a real process) invoking the demo upper-caser (WASM, per-call), and
    its worker-mode twin (a reactor module, tests/programs/reactor_upper.wat, kept warm);
  - floor "echo": a trivial hypercorn-trio endpoint that upper-cases its body;
  - floor "wasm": that endpoint running a bare wasmtime instantiate + WASI `_start` of the same
    module per request (the floor spear's figures are judged against);
  - "bare wasmtime": that run alone, in-process, no HTTP.
Prints requests/s, p50 and p99 for sequential and concurrent load, and spear's ratios against
the "wasm" floor (target: throughput >= 0.8x, p50 <= 1.25x).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import trio
import wasmtime

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.floors import BareWasm  # noqa: E402

BODY = b"hello from the spear benchmark"
#: the WASM worker-mode twin of the demo: a reactor exporting spear_alloc / spear_handle
REACTOR = REPO / "tests" / "programs" / "reactor_upper.wat"


@dataclass
class Figures:
    rps: float
    p50_ms: float
    p99_ms: float

    def row(self, name: str) -> str:
        return f"{name:<34} {self.rps:>9.0f} {self.p50_ms:>9.3f} {self.p99_ms:>9.3f}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Connection:
    """A minimal keep-alive HTTP/1.1 client: POST a body, read a Content-Length response."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = b""

    async def aclose(self) -> None:
        await self._stream.aclose()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = f"POST {path} HTTP/1.1\r\nhost: bench\r\ncontent-length: {len(body)}\r\n\r\n"
        await self._stream.send_all(head.encode() + body)
        while b"\r\n\r\n" not in self._buf:
            await self._fill()
        header, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = header.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        length = next(
            int(v)
            for k, _, v in (ln.partition(":") for ln in lines[1:])
            if k.strip().lower() == "content-length"
        )
        while len(self._buf) < length:
            await self._fill()
        payload, self._buf = self._buf[:length], self._buf[length:]
        return status, payload

    async def _fill(self) -> None:
        chunk = await self._stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self._buf += chunk


async def load(
    port: int, path: str, *, clients: int, seconds: float, expect: bytes, body: bytes = BODY
) -> Figures:
    """`clients` keep-alive clients posting `body` for `seconds`; each answer must be 200
    with `expect`."""
    latencies: list[float] = []
    conns = [Connection(await trio.open_tcp_stream("127.0.0.1", port)) for _ in range(clients)]

    async def warm(conn: Connection) -> None:  # not counted: connected and warm before the clock
        for _ in range(20):
            await conn.post(path, body)

    async def client(conn: Connection, end: float) -> None:
        while trio.current_time() < end:
            t0 = time.perf_counter()
            status, payload = await conn.post(path, body)
            latencies.append(time.perf_counter() - t0)
            if status != 200 or payload != expect:
                raise RuntimeError(f"bad answer {status}: {payload[:200]!r}")

    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(warm, conn)
    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(client, conn, trio.current_time() + seconds)
    elapsed = time.perf_counter() - t0
    for conn in conns:
        await conn.aclose()
    return summarize(latencies, elapsed)


def summarize(latencies: list[float], elapsed: float) -> Figures:
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return Figures(len(latencies) / elapsed, statistics.median(latencies) * 1000, p99 * 1000)


@contextmanager
def process(argv: list[str], ready: str, env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if ready in line:
                break
        else:
            raise RuntimeError(f"{argv[:4]} exited before it was ready")
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def bare_wasmtime(module: bytes, seconds: float) -> Figures:
    bare = BareWasm(module)
    expect = BODY.upper()
    latencies: list[float] = []
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s = time.perf_counter()
        assert bare.run(BODY) == expect
        latencies.append(time.perf_counter() - s)
    return summarize(latencies, time.perf_counter() - t0)


def median_figures(runs: list[Figures]) -> Figures:
    return Figures(
        statistics.median(f.rps for f in runs),
        statistics.median(f.p50_ms for f in runs),
        statistics.median(f.p99_ms for f in runs),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (medians)")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="spear-bench-"))
    module = bytes(wasmtime.wat2wasm((REPO / "spear" / "demo" / "upper.wat").read_text()))
    module_path = work / "upper.wasm"
    module_path.write_bytes(module)
    py = sys.executable
    ports = {name: free_port() for name in ("echo", "wasm", "spear")}
    floor = [py, str(REPO / "bench" / "floors.py")]
    spear_argv = [
        py,
        "-m",
        "spear",
        "node",
        "--data-dir",
        str(work / "data"),
        "--http",
        f"127.0.0.1:{ports['spear']}",
        "--listen",
        f"127.0.0.1:{free_port()}",
    ]
    env = {**os.environ, "SPEAR_NODE__LOG_LEVEL": "warning"}
    targets = {
        "floor: hypercorn-trio echo": (ports["echo"], "/"),
        "floor: hypercorn-trio + wasmtime": (ports["wasm"], "/"),
        "spear: wasm per-call via gateway": (ports["spear"], "/api/v1/tasks/upper/invoke"),
        "spear: wasm worker via gateway": (ports["spear"], "/api/v1/tasks/upper-w/invoke"),
    }
    runs: dict[tuple[str, int], list[Figures]] = {
        (name, c): [] for name in targets for c in (1, args.concurrency)
    }
    # All servers run at once and are measured in alternation, round after round, so that
    # the machine's drift (other tenants, CPU frequency) falls on all of them alike.
    with (
        process([*floor, "echo", str(ports["echo"])], "ready"),
        process([*floor, "wasm", str(ports["wasm"]), str(module_path)], "ready"),
        process(spear_argv, "is serving", env=env),
    ):
        base = f"http://127.0.0.1:{ports['spear']}"
        file_id = httpx.post(f"{base}/api/v1/files", content=module).json()["file_id"]
        resp = httpx.post(
            f"{base}/api/v1/tasks", json={"name": "upper", "runtime": "wasm", "artifact": file_id}
        )
        resp.raise_for_status()
        reactor = bytes(wasmtime.wat2wasm(REACTOR.read_text()))
        reactor_id = httpx.post(f"{base}/api/v1/files", content=reactor).json()["file_id"]
        worker = {"name": "upper-w", "runtime": "wasm", "mode": "worker", "artifact": reactor_id}
        httpx.post(f"{base}/api/v1/tasks", json=worker).raise_for_status()
        expect = BODY.upper()
        for _ in range(args.rounds):
            for (name, clients), figures in runs.items():
                port, path = targets[name]
                figures.append(
                    trio.run(
                        partial(
                            load, port, path, clients=clients, seconds=args.seconds, expect=expect
                        )
                    )
                )
    results = {
        name: (median_figures(runs[(name, 1)]), median_figures(runs[(name, args.concurrency)]))
        for name in targets
    }

    bare = bare_wasmtime(module, args.seconds)
    header = f"{'':<34} {'req/s':>9} {'p50 ms':>9} {'p99 ms':>9}"
    for label, index in (("sequential (1 client)", 0), (f"{args.concurrency} clients", 1)):
        print(f"\n== {label}\n{header}")
        for name, pair in results.items():
            print(pair[index].row(name))
        if index == 0:
            print(bare.row("bare wasmtime run (no HTTP)"))
    floor_seq, floor_conc = results["floor: hypercorn-trio + wasmtime"]
    print("\n== spear / floor (hypercorn-trio + wasmtime); targets: rps >= 0.8x, p50 <= 1.25x")
    for mode in ("per-call", "worker"):
        spear_seq, spear_conc = results[f"spear: wasm {mode} via gateway"]
        for label, s, f in (
            ("sequential", spear_seq, floor_seq),
            ("concurrent", spear_conc, floor_conc),
        ):
            print(
                f"{mode:<8} {label:<11} throughput {s.rps / f.rps:.2f}x"
                f"   p50 {s.p50_ms / f.p50_ms:.2f}x   p99 {s.p99_ms / f.p99_ms:.2f}x"
            )


if __name__ == "__main__":
    main()
