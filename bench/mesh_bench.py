"""Mesh transport cost against a bare trio-websocket + cbor2 echo, measured in the same run.

    python bench/mesh_bench.py [--seconds S]

Floor: trio-websocket's serve_websocket / open_websocket on 127.0.0.1 with a CBOR map per
message (what stack-facts.md §3 measured): a ping-pong round trip, and one-way messages
pipelined through one connection. spear: two transports (serve_transport) doing the same with
`request` (handshake done beforehand, every frame MAC'd, correlated through the RPC table) and
`send`. Both ends of each pair run in this one process and trio loop, so absolute figures are
lower than two processes would give; the ratios are the point. Round trips alternate floor and
spear in rounds, so load changes on the machine hit both alike.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
from dataclasses import dataclass

import cbor2
import trio
import trio.lowlevel
import trio_websocket

from spear.mesh.codec import MessageCodec
from spear.mesh.handshake import new_cluster_key
from spear.mesh.transport import Transport, serve_transport

PAYLOAD = bytes(48)
ROUNDS = 5


@dataclass(frozen=True, slots=True, kw_only=True)
class Call:
    id: int
    fn: str
    args: tuple[int, ...]
    payload: bytes


CODEC = MessageCodec({"bench.call": Call})


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


async def binary(ws: trio_websocket.WebSocketConnection) -> bytes:
    data = await ws.get_message()
    assert isinstance(data, bytes)
    return data


async def floor_echo(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            doc = cbor2.loads(await binary(ws))
            if doc.get("ack") is not None:
                doc["ack"] = True
                await ws.send_message(cbor2.dumps(doc))
    except trio_websocket.ConnectionClosed:
        pass


async def floor_rtts(ws: trio_websocket.WebSocketConnection, seconds: float) -> list[float]:
    samples: list[float] = []
    doc = {"id": 0, "fn": "f", "args": [1, 2, 3], "payload": PAYLOAD, "ack": False}
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        start = trio.current_time()
        await ws.send_message(cbor2.dumps(doc))
        cbor2.loads(await binary(ws))
        samples.append(trio.current_time() - start)
    return samples


async def spear_rtts(a: Transport, b: Transport, seconds: float) -> list[float]:
    samples: list[float] = []
    call = Call(id=0, fn="f", args=(1, 2, 3), payload=PAYLOAD)
    end = trio.current_time() + seconds
    while trio.current_time() < end:
        start = trio.current_time()
        await a.request(b.address, call, timeout_s=5)
        samples.append(trio.current_time() - start)
    return samples


async def spear_echo(transport: Transport) -> None:
    async for inbound in transport.inbound:
        if inbound.reply is not None:
            await inbound.reply.send(inbound.message)


async def floor_throughput(host: str, port: int, count: int) -> float:
    done = trio.Event()
    seen = 0

    async def count_messages(request: trio_websocket.WebSocketRequest) -> None:
        nonlocal seen
        ws = await request.accept()
        while seen < count:
            cbor2.loads(await binary(ws))
            seen += 1
        done.set()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(trio_websocket.serve_websocket, count_messages, host, 0, None)
        )
        async with trio_websocket.open_websocket(host, server.port, "/", use_ssl=False) as ws:
            start = trio.current_time()
            doc = {"id": 0, "fn": "f", "args": [1, 2, 3], "payload": PAYLOAD}
            for i in range(count):
                doc["id"] = i
                await ws.send_message(cbor2.dumps(doc))
            await done.wait()
            elapsed = trio.current_time() - start
        nursery.cancel_scope.cancel()
    return count / elapsed


async def spear_throughput(a: Transport, b: Transport, count: int) -> tuple[float, int]:
    """Messages/s one way; the sender yields whenever the bounded link queue is full."""
    done = trio.Event()
    retries = 0

    async def receive() -> None:
        for _ in range(count):
            await b.inbound.receive()
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(receive)
        start = trio.current_time()
        for i in range(count):
            while not a.send(b.address, Call(id=i, fn="f", args=(1, 2, 3), payload=PAYLOAD)):
                retries += 1
                await trio.lowlevel.checkpoint()
            if i % 64 == 0:
                await trio.lowlevel.checkpoint()
        await done.wait()
    return count / (trio.current_time() - start), retries


async def main(seconds: float) -> None:
    key = new_cluster_key()
    async with trio.open_nursery() as nursery:
        serve = functools.partial(
            serve_transport, listen="127.0.0.1:0", cluster_key=key, codec=CODEC
        )
        a = await nursery.start(functools.partial(serve, node_id="a"))
        b = await nursery.start(functools.partial(serve, node_id="b"))
        nursery.start_soon(spear_echo, b)
        floor_server = await nursery.start(
            functools.partial(trio_websocket.serve_websocket, floor_echo, "127.0.0.1", 0, None)
        )
        await a.request(b.address, Call(id=0, fn="", args=(), payload=b""), timeout_s=5)
        floor: list[float] = []
        spear: list[float] = []
        async with trio_websocket.open_websocket(
            "127.0.0.1", floor_server.port, "/", use_ssl=False
        ) as ws:
            for _ in range(ROUNDS):
                floor += await floor_rtts(ws, seconds / ROUNDS)
                spear += await spear_rtts(a, b, seconds / ROUNDS)
        report_rtt("floor: trio-websocket echo", floor, None)
        report_rtt("spear: transport.request", spear, statistics.median(floor))
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        a = await nursery.start(functools.partial(serve, node_id="a2"))
        b = await nursery.start(functools.partial(serve, node_id="b2"))
        count = 20_000
        floor_rate = await floor_throughput("127.0.0.1", 0, count)
        spear_rate, retries = await spear_throughput(a, b, count)
        print(f"{'floor: trio-websocket one-way':<34} {floor_rate:9.0f} msg/s")
        print(
            f"{'spear: transport.send':<34} {spear_rate:9.0f} msg/s"
            f"   {spear_rate / floor_rate:.2f}x the floor ({retries} full-queue yields)"
        )
        nursery.cancel_scope.cancel()


def report_rtt(name: str, samples: list[float], floor_p50_s: float | None) -> None:
    p50 = statistics.median(samples) * 1e3
    p99 = percentile(samples, 0.99) * 1e3
    ratio = f"   {p50 / (floor_p50_s * 1e3):.2f}x the floor" if floor_p50_s else ""
    print(f"{name:<34} p50 {p50:6.3f} ms   p99 {p99:6.3f} ms   n={len(samples)}{ratio}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="round-trip time per side")
    args = parser.parse_args()
    trio.run(main, args.seconds)
    sys.exit(0)
