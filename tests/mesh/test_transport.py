"""The mesh transport over real sockets on 127.0.0.1: messages, RPCs, streams, failures."""

from __future__ import annotations

import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio
import trio.testing
import trio_websocket

from spear.errors import FrameTooLargeError
from spear.mesh import links
from spear.mesh.codec import MessageCodec
from spear.mesh.frames import FrameKind
from spear.mesh.handshake import AuthenticationError, Session
from spear.mesh.links import (
    Connection,
    LinkParams,
    PeerUnreachableError,
    RemoteError,
    RequestCancelledError,
    RequestTimeoutError,
    TransportClosedError,
    TransportSettings,
)
from spear.mesh.transport import Transport, serve_transport

KEY = bytes(range(32))
OTHER_KEY = bytes(range(100, 132))
SETTINGS = TransportSettings(connect_timeout_s=5.0, backoff_min_s=0.05, backoff_max_s=0.5)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    n: int
    blob: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class Count:
    upto: int
    fail_at: int = -1


CODEC = MessageCodec({"test.ping": Ping, "test.count": Count})

Start = Callable[..., Awaitable[Transport]]


@pytest.fixture
def start(nursery: trio.Nursery) -> Start:
    """Start a transport on 127.0.0.1:0 in the test's nursery: `await start("a", key=...)`."""

    async def start_one(
        node_id: str,
        *,
        cluster_key: bytes = KEY,
        max_frame_bytes: int = 1024 * 1024,
        settings: TransportSettings = SETTINGS,
        advertise: str | None = None,
        codec: MessageCodec = CODEC,
    ) -> Transport:
        serve = functools.partial(
            serve_transport,
            node_id=node_id,
            listen="127.0.0.1:0",
            cluster_key=cluster_key,
            codec=codec,
            max_frame_bytes=max_frame_bytes,
            settings=settings,
            advertise=advertise,
        )
        transport: Transport = await nursery.start(serve)
        return transport

    return start_one


async def answer(transport: Transport) -> None:
    """Serve requests: Ping(n) -> Ping(n + 1); Count(upto) -> a stream of Ping(0..upto-1)."""
    async for inbound in transport.inbound:
        reply, message = inbound.reply, inbound.message
        if reply is None:
            continue
        if isinstance(message, Ping):
            await reply.send(Ping(n=message.n + 1))
        elif isinstance(message, Count):
            for i in range(message.upto):
                if i == message.fail_at:
                    await reply.fail("broken", f"failed at item {i}")
                    break
                await reply.item(Ping(n=i))
            await reply.end()


async def test_two_transports_exchange_messages_and_rpcs_both_ways(
    start: Start, nursery: trio.Nursery
) -> None:
    a, b = await start("a"), await start("b")
    assert a.send(b.address, Ping(n=1))
    got = await b.inbound.receive()
    assert (got.peer_id, got.peer_address, got.message, got.reply) == (
        "a",
        a.address,
        Ping(n=1),
        None,
    )
    nursery.start_soon(answer, a)
    nursery.start_soon(answer, b)
    assert await a.request(b.address, Ping(n=41), timeout_s=5) == Ping(n=42)
    assert await b.request(a.address, Ping(n=7), timeout_s=5) == Ping(n=8)
    stats = a.statistics()
    assert (stats.links_up, stats.inbound_connections, stats.dials) == (1, 1, 1)


async def test_three_transports_all_talk_to_each_other_concurrently(
    start: Start, nursery: trio.Nursery
) -> None:
    nodes = [await start(name) for name in ("a", "b", "c")]
    for node in nodes:
        nursery.start_soon(answer, node)
    results: list[int] = []

    async def call(src: Transport, dst: Transport, n: int) -> None:
        results.append((await src.request(dst.address, Ping(n=n), timeout_s=5)).n)

    async with trio.open_nursery() as calls:
        for i, src in enumerate(nodes):
            for j, dst in enumerate(nodes):
                if src is not dst:
                    for k in range(20):
                        calls.start_soon(call, src, dst, 100 * i + 10 * j + k)
    assert sorted(results) == sorted(
        100 * i + 10 * j + k + 1 for i in range(3) for j in range(3) if i != j for k in range(20)
    )


async def test_streams_deliver_items_in_order_then_end_or_fail(
    start: Start, nursery: trio.Nursery
) -> None:
    a, b = await start("a"), await start("b")
    nursery.start_soon(answer, b)
    async with a.open_stream(b.address, Count(upto=200), timeout_s=5) as items:
        assert [item.n async for item in items] == list(range(200))
    seen: list[int] = []
    with pytest.raises(RemoteError, match="failed at item 3") as info:
        async with a.open_stream(b.address, Count(upto=10, fail_at=3), timeout_s=5) as items:
            async for item in items:
                seen.append(item.n)
    assert seen == [0, 1, 2] and info.value.code == "broken"


async def test_leaving_a_stream_early_stops_the_producer(
    start: Start, nursery: trio.Nursery
) -> None:
    a, b = await start("a"), await start("b")
    stopped = trio.Event()

    async def produce_forever() -> None:
        inbound = await b.inbound.receive()
        assert inbound.reply is not None and inbound.reply.stream
        with pytest.raises(RequestCancelledError, match="a cancelled request"):
            for i in itertools.count():
                await inbound.reply.item(Ping(n=i))
        stopped.set()

    nursery.start_soon(produce_forever)
    async with a.open_stream(b.address, Count(upto=0), timeout_s=5) as items:
        async for item in items:
            if item.n == 3:
                break
    with trio.fail_after(5):
        await stopped.wait()


async def test_a_silent_stream_times_out_per_item(start: Start) -> None:
    a, b = await start("a"), await start("b")
    with pytest.raises(RequestTimeoutError, match=r"within 0\.2 s"):
        async with a.open_stream(b.address, Count(upto=5), timeout_s=0.2) as items:
            async for _ in items:
                pass
    assert (await b.inbound.receive()).message == Count(upto=5)


async def test_peers_learn_the_advertised_address(start: Start) -> None:
    a = await start("a", advertise="node-a.example:7946")
    b = await start("b")
    assert a.address == "node-a.example:7946"
    a.send(b.address, Ping(n=1))
    assert (await b.inbound.receive()).peer_address == "node-a.example:7946"


async def test_a_responder_error_reaches_the_requester(start: Start, nursery: trio.Nursery) -> None:
    a, b = await start("a"), await start("b")

    async def refuse() -> None:
        inbound = await b.inbound.receive()
        assert inbound.reply is not None
        await inbound.reply.fail("not_leader", "node b is not the leader")
        await inbound.reply.send(Ping(n=0))  # ignored: the answer was given

    nursery.start_soon(refuse)
    with pytest.raises(RemoteError, match="node b is not the leader") as info:
        await a.request(b.address, Ping(n=1), timeout_s=5)
    assert info.value.code == "not_leader"


async def test_a_peer_with_the_wrong_key_is_refused_and_nothing_it_sends_is_delivered(
    start: Start,
) -> None:
    good, evil = await start("good"), await start("evil", cluster_key=OTHER_KEY)
    evil.send(good.address, Ping(n=666))
    with pytest.raises(PeerUnreachableError, match="does not prove the cluster key"):
        await evil.request(good.address, Ping(n=667), timeout_s=5)
    assert not evil.send(good.address, Ping(n=668))  # in backoff now: dropped at once
    await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(trio.WouldBlock):
        good.inbound.receive_nowait()
    stats = good.statistics()
    assert stats.handshakes_refused >= 1 and stats.messages_received == 0


async def test_frames_over_the_peers_cap_fail_locally_before_and_after_the_link_is_up(
    start: Start, nursery: trio.Nursery
) -> None:
    small, big = await start("small", max_frame_bytes=2048), await start("big")
    nursery.start_soon(answer, small)
    oversized = Ping(n=1, blob=b"x" * 10_000)
    with pytest.raises(FrameTooLargeError, match=r"over the mesh\.max_frame_bytes of small"):
        await big.request(small.address, oversized, timeout_s=5)  # queued, then refused
    assert await big.request(small.address, Ping(n=2), timeout_s=5) == Ping(n=3)
    with pytest.raises(FrameTooLargeError, match=r"\(2048\)"):
        big.send(small.address, oversized)  # the link is up: refused at once
    with pytest.raises(FrameTooLargeError, match=r"mesh\.max_frame_bytes = 2048"):
        small.send(big.address, oversized)  # over our own cap
    assert small.statistics().frames_rejected == 0
    assert big.statistics().dials == 1


@asynccontextmanager
async def raw_link(target: Transport, *, key: bytes = KEY) -> AsyncIterator[Connection]:
    """An authenticated connection to `target` that we drive by hand (to misbehave)."""
    params = LinkParams(
        key=key, node_id="raw", address="", codec=CODEC, settings=SETTINGS, max_frame_bytes=1 << 20
    )
    async with links.dial(target.address, params) as conn:
        yield conn


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (lambda s: s.seal(FrameKind.SEND, b"x" * 5000), 1009),  # over the 2048-byte cap
        (lambda s: s.seal(FrameKind.SEND, b"\xa1\x01"), 1008),  # CBOR, not an envelope
        (lambda s: s.seal(FrameKind.SEND, b"\xff\xff"), 1008),  # not CBOR
        (lambda s: s.seal(99, CODEC.encode(Ping(n=1), sender="raw")), 1008),  # unknown kind
        (lambda s: s.seal(FrameKind.SEND, CODEC.encode(Ping(n=1), sender="a")), 1008),  # spoofed
        (lambda s: s.seal(FrameKind.REQUEST, CODEC.encode(Ping(n=1), sender="raw")), 1008),
        (lambda s: b"\0" * 16 + bytes([0]) + CODEC.encode(Ping(n=1), sender="raw"), 1008),  # MAC
    ],
)
async def test_a_bad_frame_closes_only_that_link_and_is_not_delivered(
    start: Start,
    nursery: trio.Nursery,
    frame: Callable[[Session], bytes],
    code: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, other = await start("server", max_frame_bytes=2048), await start("other")
    async with raw_link(server) as conn:
        await conn.ws.send_message(frame(conn.session))
        with pytest.raises(trio_websocket.ConnectionClosed) as info:
            await conn.ws.get_message()
    assert info.value.reason is not None and info.value.reason.code == code
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().frames_rejected == 1
    assert "closed the mesh link with raw" in caplog.text
    with pytest.raises(trio.WouldBlock):
        server.inbound.receive_nowait()
    nursery.start_soon(answer, server)
    assert await other.request(server.address, Ping(n=1), timeout_s=5) == Ping(n=2)


@dataclass(frozen=True, slots=True, kw_only=True)
class Novel:
    """A message type only the newer node knows."""

    x: int


NEWER = CODEC.extended({"test.novel": Novel})


async def test_a_message_of_an_unknown_type_is_refused_but_the_link_is_kept(
    start: Start, nursery: trio.Nursery
) -> None:
    older, newer = await start("older"), await start("newer", codec=NEWER)
    nursery.start_soon(answer, older)
    assert await newer.request(older.address, Ping(n=1), timeout_s=5) == Ping(n=2)
    with pytest.raises(RemoteError, match=r"does not know the message type 'test\.novel'") as info:
        await newer.request(older.address, Novel(x=1), timeout_s=5)
    assert info.value.code == "unsupported"
    with pytest.raises(RemoteError, match="does not know"):
        async with newer.open_stream(older.address, Novel(x=2), timeout_s=5) as items:
            async for _ in items:
                pass
    assert newer.send(older.address, Novel(x=3))  # dropped there
    assert await newer.request(older.address, Ping(n=5), timeout_s=5) == Ping(n=6)
    seen = older.statistics()
    assert (seen.messages_unknown, seen.frames_rejected) == (3, 0)
    assert newer.statistics().dials == 1  # the same link all along

    # an answer of a type the asker does not know fails that request only
    async def answer_novel() -> None:
        async for inbound in newer.inbound:
            assert inbound.reply is not None
            await inbound.reply.send(Novel(x=0))

    nursery.start_soon(answer_novel)
    with pytest.raises(RemoteError, match=r"an answer of unknown type 'test\.novel'"):
        await older.request(newer.address, Ping(n=1), timeout_s=5)
    assert older.statistics().messages_unknown == 4
    assert await newer.request(older.address, Ping(n=7), timeout_s=5) == Ping(n=8)
    assert older.statistics().frames_rejected == newer.statistics().frames_rejected == 0


async def test_a_raw_client_without_the_key_is_refused_with_a_reason(start: Start) -> None:
    server = await start("server")
    with pytest.raises(AuthenticationError, match="does not prove the cluster key"):
        async with raw_link(server, key=OTHER_KEY):
            pass
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().handshakes_refused == 1


async def test_garbage_instead_of_a_hello_is_refused(start: Start) -> None:
    server = await start("server")
    host, port = server.address.rsplit(":", 1)
    async with trio_websocket.open_websocket(host, int(port), SETTINGS.path, use_ssl=False) as ws:
        await ws.send_message(b"\xff\x00garbage")
        refusal = await ws.get_message()
        assert isinstance(refusal, bytes) and b"mesh.refused" in refusal
    await trio.testing.wait_all_tasks_blocked()
    assert server.statistics().handshakes_refused == 1


async def test_an_unanswered_request_times_out_and_its_late_reply_is_ignored(start: Start) -> None:
    a, b = await start("a"), await start("b")
    with pytest.raises(RequestTimeoutError, match=r"no answer from .* within 0\.2 s"):
        await a.request(b.address, Ping(n=1), timeout_s=0.2)
    assert a.statistics().rpc.pending == 0
    late = await b.inbound.receive()
    assert late.reply is not None
    await trio.testing.wait_all_tasks_blocked()
    assert late.reply.cancelled  # the requester said it stopped waiting
    await late.reply.send(Ping(n=2))
    await trio.testing.wait_all_tasks_blocked()
    assert a.statistics().rpc.ignored_replies == 1


async def test_a_restarted_peer_is_redialled(start: Start, nursery: trio.Nursery) -> None:
    a = await start("a")
    b_scope = trio.CancelScope()

    async def run_b(listen: str, task_status: trio.TaskStatus[Transport]) -> None:
        with b_scope:
            await serve_transport(
                node_id="b",
                listen=listen,
                cluster_key=KEY,
                codec=CODEC,
                settings=SETTINGS,
                task_status=task_status,
            )

    b: Transport = await nursery.start(run_b, "127.0.0.1:0")
    nursery.start_soon(answer, b)
    assert await a.request(b.address, Ping(n=1), timeout_s=5) == Ping(n=2)
    await b.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert a.statistics().links_up == 0
    b_scope = trio.CancelScope()
    b2: Transport = await nursery.start(run_b, b.address)
    nursery.start_soon(answer, b2)
    assert await a.request(b.address, Ping(n=5), timeout_s=5) == Ping(n=6)
    assert a.statistics().dials == 2


async def test_an_unreachable_peer_fails_fast_and_does_not_block_others(
    start: Start, nursery: trio.Nursery
) -> None:
    a, b = await start("a", settings=TransportSettings(backoff_min_s=60)), await start("b")
    nursery.start_soon(answer, b)
    dead = await closed_port_address()
    with trio.fail_after(5):  # far below the request timeout: the refusal is immediate
        with pytest.raises(PeerUnreachableError, match=f"cannot reach mesh peer {dead}"):
            await a.request(dead, Ping(n=1), timeout_s=60)
        # in backoff: no new dial, sends dropped and requests refused at once
        assert not a.send(dead, Ping(n=2))
        with pytest.raises(PeerUnreachableError, match="is unreachable"):
            await a.request(dead, Ping(n=3), timeout_s=60)
        assert await a.request(b.address, Ping(n=4), timeout_s=5) == Ping(n=5)
    stats = a.statistics()
    # dropped: the failed request's queued frame, then the send during the backoff
    assert (stats.dials, stats.dial_failures, stats.dropped_unreachable) == (2, 1, 2)


async def test_a_peer_that_dials_in_ends_the_backoff_towards_it(
    start: Start, nursery: trio.Nursery
) -> None:
    """A restarted node's peers back off towards it while it starts; its first authenticated
    connection to one of them proves it is up, so that peer reaches it at once rather than
    after up to backoff_max_s (a lost election round, in a failover right after a restart)."""
    a = await start("a", settings=TransportSettings(backoff_min_s=60, backoff_max_s=60))
    nursery.start_soon(answer, a)
    address = await closed_port_address()
    with pytest.raises(PeerUnreachableError):
        await a.request(address, Ping(n=1), timeout_s=5)
    assert not a.send(address, Ping(n=2))  # in backoff for 30-60 s
    serve = functools.partial(
        serve_transport, node_id="b", listen=address, cluster_key=KEY, codec=CODEC
    )
    b: Transport = await nursery.start(serve)
    nursery.start_soon(answer, b)
    assert await b.request(a.address, Ping(n=3), timeout_s=5) == Ping(n=4)
    with trio.fail_after(5):
        assert await a.request(address, Ping(n=5), timeout_s=5) == Ping(n=6)
    assert a.statistics().dials == 2


async def test_a_silent_listener_times_out_the_dial_while_sends_stay_bounded(
    start: Start,
) -> None:
    settings = TransportSettings(connect_timeout_s=0.3, send_queue_frames=4, backoff_min_s=60)
    a = await start("a", settings=settings)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    silent = f"127.0.0.1:{listener.socket.getsockname()[1]}"
    try:  # the kernel accepts TCP into the backlog, but nobody answers the upgrade
        async with trio.open_nursery() as waiting:

            async def request() -> None:
                with pytest.raises(PeerUnreachableError, match="timed out"):
                    await a.request(silent, Ping(n=9), timeout_s=60)

            waiting.start_soon(request)
            await trio.testing.wait_all_tasks_blocked()  # the request is queued
            assert [a.send(silent, Ping(n=i)) for i in range(5)] == [True] * 3 + [False] * 2
    finally:
        await listener.aclose()
    stats = a.statistics()
    assert (stats.dropped_queue_full, stats.dropped_unreachable) == (2, 4)


async def test_a_full_inbound_queue_answers_requests_busy(start: Start) -> None:
    a = await start("a")
    b = await start("b", settings=TransportSettings(inbound_queue_messages=1))
    a.send(b.address, Ping(n=0))  # fills b's inbound queue (nobody reads it)
    with pytest.raises(RemoteError, match="node b is overloaded") as info:
        await a.request(b.address, Ping(n=1), timeout_s=5)
    assert info.value.code == "busy" and b.statistics().dropped_inbound_full == 1


async def test_aclose_fails_waiting_requests_and_refuses_new_ones(
    start: Start, nursery: trio.Nursery
) -> None:
    a, b = await start("a"), await start("b")
    failed = trio.Event()

    async def wait_forever() -> None:
        with pytest.raises(TransportClosedError):
            await a.request(b.address, Ping(n=1), timeout_s=60)
        failed.set()

    nursery.start_soon(wait_forever)
    await b.inbound.receive()  # the request arrived; nobody answers it
    await a.aclose()
    await failed.wait()
    with pytest.raises(TransportClosedError):
        a.send(b.address, Ping(n=2))
    assert [m async for m in a.inbound] == []


async def closed_port_address() -> str:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    await listener.aclose()
    return f"127.0.0.1:{port}"
