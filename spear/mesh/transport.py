"""The mesh transport: authenticated WebSocket links between nodes, messages, RPCs and streams.

    async with trio.open_nursery() as nursery:
        transport = await nursery.start(functools.partial(
            serve_transport, node_id="n1", listen="127.0.0.1:0", cluster_key=key,
            codec=MessageCodec({**RAFT_MESSAGES, **SWIM_MESSAGES})))
        transport.send("127.0.0.1:7947", ping)                      # best effort, never blocks
        reply = await transport.request(addr, read_req, timeout_s=0.5)   # RPC
        async with transport.open_stream(addr, tail_req, timeout_s=5) as items:
            async for item in items: ...
        async for inbound in transport.inbound: ...                 # Inbound(peer_id, ..., reply)
        await transport.aclose()

Links. Each node dials the peers it sends to and keeps that connection (its outbound link,
keyed by the peer's address); the peer answers requests on the same connection. A pair of
nodes that both send therefore holds two connections, one dialled by each: each side then owns
the lifetime, queue and backoff of the link it sends on, and no tie-break between two
simultaneous dials is needed. Every connection is authenticated (spear.mesh.handshake) before
any frame is delivered; every frame after that carries a sequence-bound MAC.

Failures. A link dials on demand. A failed attempt fails that link's waiting requests at once
(PeerUnreachableError), drops its queued frames, and starts a backoff (doubling from
backoff_min_s to backoff_max_s, with jitter) during which sends to it are dropped and
requests fail fast; after the backoff the next send dials again. An authenticated inbound
connection from that peer ends the backoff at once (the peer is up). A link that breaks after it
was up fails its waiting requests (LinkClosedError) and redials with the next frame. Frames
over this node's or (learnt in the handshake) the peer's cap are refused locally with
FrameTooLargeError. An oversized, malformed or unauthenticated frame received closes only
that connection, with a logged reason; the node keeps serving. The transport tells nobody
that a connection closed: that is no verdict about the peer (membership probes for that).

Timeouts. `request` and stream consumers wait in trio cancel scopes with the given timeout
(callers own timeouts); the RPC table (spear.mesh.rpc) correlates replies and ignores late ones.

Parts: spear.mesh.links (dialling and accepting one authenticated connection; errors),
spear.mesh.outbound (the dialled link per peer), spear.mesh.receiver (serving a connection),
spear.mesh.inbound (what the application gets), spear.mesh.calls (waiting requests),
spear.mesh.frames (frame kinds), spear.mesh.handshake, spear.mesh.codec, spear.mesh.rpc.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from spear import wire
from spear.config import parse_hostport
from spear.errors import FrameTooLargeError, UnavailableError
from spear.mesh import links
from spear.mesh.calls import Calls, Waiter
from spear.mesh.codec import MessageCodec
from spear.mesh.frames import CONTROL_CODEC, Cancel, FrameKind
from spear.mesh.inbound import Inbound
from spear.mesh.links import (
    LINK_ERRORS,
    Connection,
    LinkParams,
    PeerUnreachableError,
    RemoteError,
    TransportClosedError,
    TransportSettings,
    describe_link_error,
)
from spear.mesh.outbound import LinkState, OutboundLink
from spear.mesh.receiver import Receiver
from spear.mesh.rpc import RpcStatistics

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportStatistics:
    """Counters since start; `links_up` and `inbound_connections` are current values."""

    links: int
    links_up: int
    inbound_connections: int
    frames_sent: int
    messages_received: int
    dropped_queue_full: int
    dropped_unreachable: int
    dropped_inbound_full: int
    frames_rejected: int
    #: well-formed messages of types this node does not know (a newer node's), not delivered
    messages_unknown: int
    handshakes_refused: int
    dials: int
    dial_failures: int
    rpc: RpcStatistics


class Transport:
    """A running transport, made by serve_transport; see the module docstring."""

    def __init__(
        self,
        *,
        node_id: str,
        key: bytes,
        codec: MessageCodec,
        max_frame_bytes: int,
        settings: TransportSettings,
        nursery: trio.Nursery,
        rng: random.Random,
    ) -> None:
        self.node_id = node_id
        #: "HOST:PORT" peers reach this node at: the bound address unless `advertise` was given
        self.address = ""
        self._key = key
        self._codec = codec
        self._max_frame_bytes = max_frame_bytes
        self._settings = settings
        self._nursery = nursery
        self._rng = rng
        self._links: dict[str, OutboundLink] = {}
        self._inbound_conns: set[Connection] = set()
        self._calls = Calls(stream_buffer_items=settings.stream_buffer_items)
        self._inbound_send, self.inbound = trio.open_memory_channel[Inbound](
            settings.inbound_queue_messages
        )
        self._closed = False
        self._receiver = Receiver(
            codec=codec,
            max_frame_bytes=max_frame_bytes,
            calls=self._calls,
            inbound=self._inbound_send,
            node_id=node_id,
        )
        self._refused = 0

    # -- public API -----------------------------------------------------------------------

    def send(self, address: str, message: object) -> bool:
        """Send a one-way message to the node at `address`; never blocks.

        Returns:
            True if queued; False if dropped (link queue full, or the peer is in backoff after
            failed connection attempts). Delivery is never guaranteed.

        Raises:
            WireError: the message is not registered, or over this node's or (once the link is
                up) the peer's frame cap (FrameTooLargeError): a bug in the caller.
            TransportClosedError: after aclose().
        """
        payload = self._encode(message, 0)
        return self._link(address).enqueue(FrameKind.SEND, payload, 0)

    async def request(self, address: str, message: object, *, timeout_s: float) -> Any:
        """Send a request and return the peer's reply message.

        Raises:
            RequestTimeoutError: no reply within timeout_s.
            PeerUnreachableError: no link could be made (fails fast, not at the timeout).
            LinkClosedError: the link broke before the reply came.
            RemoteError: the peer answered with an error.
            UnavailableError: the link's queue is full.
            WireError, TransportClosedError: as for send.
        """
        waiter, request_id = self._open(address, message, timeout_s, FrameKind.REQUEST)
        try:
            reply = (await waiter.next(timeout_s))[1]
        except BaseException:
            self._cancel(address, request_id)
            raise
        self._calls.forget(request_id)
        return reply

    @asynccontextmanager
    async def open_stream(
        self, address: str, message: object, *, timeout_s: float
    ) -> AsyncIterator[AsyncIterator[Any]]:
        """Open a stream request; yield an iterator of its items until the peer ends it.

        `timeout_s` bounds the wait for each item (an idle timeout). Iterating raises what
        `request` raises; leaving the block early abandons the stream (later items are ignored).
        """
        waiter, request_id = self._open(address, message, timeout_s, FrameKind.STREAM)

        finished = False

        async def items() -> AsyncGenerator[Any, None]:
            nonlocal finished
            while True:
                try:
                    kind, item = await waiter.next(timeout_s)
                except RemoteError:
                    finished = True
                    raise
                if kind is FrameKind.END:
                    finished = True
                    return
                yield item

        iterator = items()
        try:
            yield iterator
        finally:
            await iterator.aclose()
            if finished:
                self._calls.forget(request_id)
            else:
                self._cancel(address, request_id)

    def statistics(self) -> TransportStatistics:
        """Current counters (see TransportStatistics)."""
        every = self._links.values()
        return TransportStatistics(
            links=len(self._links),
            links_up=sum(link.state is LinkState.UP for link in every),
            inbound_connections=len(self._inbound_conns),
            frames_sent=sum(link.sent for link in every),
            messages_received=self._receiver.received,
            dropped_queue_full=sum(link.dropped_full for link in every),
            dropped_unreachable=sum(link.dropped_unreachable for link in every),
            dropped_inbound_full=self._receiver.inbound_full,
            frames_rejected=self._receiver.rejected,
            messages_unknown=self._receiver.unknown,
            handshakes_refused=self._refused,
            dials=sum(link.dials for link in every),
            dial_failures=sum(link.dial_failures for link in every),
            rpc=self._calls.statistics(),
        )

    async def aclose(self) -> None:
        """Stop serving and close every link; waiting requests fail with TransportClosedError."""
        self._closed = True
        self._nursery.cancel_scope.cancel()

    # -- LinkOwner (for spear.mesh.outbound) ---------------------------------------------

    def link_params(self) -> LinkParams:
        return LinkParams(
            key=self._key,
            node_id=self.node_id,
            address=self.address,
            codec=self._codec,
            settings=self._settings,
            max_frame_bytes=self._max_frame_bytes,
        )

    async def serve_outbound(self, address: str, conn: Connection) -> None:
        await self._receiver.serve(conn, outbound=address)

    def fail_requests(self, address: str, error: Exception) -> None:
        if self._closed:  # the links close because we do: say so
            error = TransportClosedError("the mesh transport closed")
        self._calls.fail_address(address, error)

    def fail_request(self, request_id: int, error: Exception) -> None:
        self._calls.fail(request_id, error)

    # -- sending --------------------------------------------------------------------------

    def _cancel(self, address: str, request_id: int) -> None:
        """Stop waiting for a request and tell the peer, so that it can stop working on it."""
        self._calls.forget(request_id)
        link = self._links.get(address)
        if link is not None and link.conn is not None:
            cancel = CONTROL_CODEC.encode(Cancel(), id=request_id, sender=self.node_id)
            link.enqueue(FrameKind.CANCEL, cancel, 0)

    def _encode(self, message: object, request_id: int) -> bytes:
        if self._closed:
            raise TransportClosedError("the mesh transport is closed")
        payload = self._codec.encode(message, id=request_id, sender=self.node_id)
        if len(payload) > self._max_frame_bytes:
            raise FrameTooLargeError(
                f"{type(message).__name__} encodes to {len(payload)} bytes, over"
                f" mesh.max_frame_bytes = {self._max_frame_bytes}"
            )
        return payload

    def _link(self, address: str) -> OutboundLink:
        if self._closed:
            raise TransportClosedError("the mesh transport is closed")
        link = self._links.get(address)
        if link is None:
            parse_hostport(address)  # a malformed address is the caller's bug: ValueError now
            link = OutboundLink(address, settings=self._settings, rng=self._rng)
            self._links[address] = link
            self._nursery.start_soon(link.run, self)
        return link

    def _open(
        self, address: str, message: object, timeout_s: float, kind: FrameKind
    ) -> tuple[Waiter, int]:
        link = self._link(address)
        if link.state is LinkState.BACKOFF:
            raise PeerUnreachableError(f"mesh peer {address} is unreachable: {link.last_error}")
        stream = kind is FrameKind.STREAM
        waiter, request_id = self._calls.open(address, timeout_s=timeout_s, stream=stream)
        try:
            queued = link.enqueue(kind, self._encode(message, request_id), request_id)
        except BaseException:
            self._calls.forget(request_id)
            raise
        if not queued:
            self._calls.forget(request_id)
            raise UnavailableError(
                f"the send queue to {address} is full; mesh send_queue_frames ="
                f" {self._settings.send_queue_frames}"
            )
        return waiter, request_id

    # -- inbound connections --------------------------------------------------------------

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        """The listener's handler: authenticate an inbound connection, then serve it."""
        remote = links.peer_name(stream)
        try:
            async with links.accept(stream, self.link_params()) as conn:
                link = self._links.get(conn.session.peer_address)
                if link is not None:
                    link.peer_seen()
                self._inbound_conns.add(conn)
                try:
                    await self._receiver.serve(conn, outbound=None)
                finally:
                    self._inbound_conns.discard(conn)
        except LINK_ERRORS as exc:
            self._refused += 1
            log.info("refused a mesh link from %s: %s", remote, describe_link_error(exc))

    def _shut_down(self) -> None:
        self._closed = True
        self._inbound_send.close()
        for address in self._links:
            self.fail_requests(address, TransportClosedError("the mesh transport closed"))


def _bound_address(host: str, listener: trio.SocketListener) -> str:
    port = listener.socket.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def serve_transport(
    *,
    node_id: str,
    listen: str,
    cluster_key: bytes,
    codec: MessageCodec,
    max_frame_bytes: int = wire.DEFAULT_MAX_FRAME_BYTES,
    settings: TransportSettings | None = None,
    rng: random.Random | None = None,
    advertise: str | None = None,
    task_status: trio.TaskStatus[Transport] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on `listen` ("HOST:PORT"; port 0 = any free port) and serve the mesh.

    Calls `task_status.started(transport)` once the socket is bound (`transport.address` is the
    bound address). Returns after `transport.aclose()` or when cancelled; `transport.inbound`
    then ends and waiting requests fail with TransportClosedError.

    Args:
        node_id: this node's permanent id (bound into every handshake).
        listen: the address to listen on.
        cluster_key: the shared secret (see spear.mesh.handshake.parse_join_token).
        codec: the application's messages; the transport adds nothing to it.
        max_frame_bytes: the largest frame payload accepted (and sent); mesh.max_frame_bytes.
        settings: queue sizes, timeouts and backoff.
        rng: for backoff jitter (seed it in tests).
        advertise: the "HOST:PORT" peers should dial to reach this node, told to every peer
            this node dials (default: the bound address; set it when listening on 0.0.0.0).
    """
    host, port = parse_hostport(listen)
    settings = settings or TransportSettings()
    rng = rng or random.Random()
    transport: Transport | None = None
    try:
        async with trio.open_nursery() as nursery:
            transport = Transport(
                node_id=node_id,
                key=cluster_key,
                codec=codec,
                max_frame_bytes=max_frame_bytes,
                settings=settings,
                nursery=nursery,
                rng=rng,
            )
            listeners = await trio.open_tcp_listeners(port, host=host)
            if port == 0:  # a name with several addresses got a different port on each
                for extra in listeners[1:]:
                    await extra.aclose()
                listeners = listeners[:1]
            transport.address = advertise or _bound_address(host, listeners[0])
            await nursery.start(trio.serve_listeners, transport._handle_stream, listeners)
            task_status.started(transport)
    finally:
        if transport is not None:
            transport._shut_down()
