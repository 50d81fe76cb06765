"""One authenticated mesh connection: dialled or accepted, its ordered writer, link errors.

A Connection owns a bounded queue of outgoing (kind, payload) pairs and one writer task that
seals them with the link's Session in queue order (the MAC sequence number must follow wire
order, so nothing else writes to the socket). Enqueueing never blocks the caller: a full queue
drops the frame and says so. The transport (spear.mesh.transport) runs the reader.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio
import trio_websocket

from spear.config import parse_hostport
from spear.errors import SpearError, UnavailableError, WireError
from spear.mesh.codec import MessageCodec
from spear.mesh.frames import FrameKind
from spear.mesh.handshake import (
    MAC_BYTES,
    NONCE_BYTES,
    AuthenticationError,
    InitiatorHandshake,
    ResponderHandshake,
    Session,
)

log = logging.getLogger(__name__)

#: bytes asked of the socket per read. trio-websocket's default, 4 KiB, costs a pass through
#: wsproto per 4 KiB: a 256 KiB input took 3.1 ms to go there and back on loopback, 1.5 ms
#: with 64 KiB. Larger reads gain a little more for large messages, but each read allocates
#: its whole size first, and past 128 KiB that is an mmap and munmap for every small one.
RECEIVE_BYTES = 64 * 1024


class PeerUnreachableError(UnavailableError):
    """No link to the peer could be made (refused, timed out, failed the handshake)."""

    code = "peer_unreachable"


class LinkClosedError(UnavailableError):
    """The link broke while a request was waiting for its answer."""

    code = "link_closed"


class RequestTimeoutError(UnavailableError):
    """A request got no answer (or a stream no next item) within its timeout."""

    code = "request_timeout"


class RemoteError(SpearError):
    """The peer answered a request with an error."""

    def __init__(self, message: str, *, code: str, peer_id: str) -> None:
        super().__init__(message)
        self.code = code
        self.peer_id = peer_id


class RequestCancelledError(LinkClosedError):
    """The requester stopped waiting for this answer (it timed out or left the stream)."""

    code = "request_cancelled"


class TransportClosedError(SpearError):
    """The transport was used after aclose() (a bug in the caller)."""

    code = "transport_closed"


@dataclass(frozen=True, slots=True, kw_only=True)
class TransportSettings:
    """Transport knobs; durations in seconds. Defaults suit a LAN (see research/mesh.md §B).

    Attributes:
        connect_timeout_s: TCP connect + WebSocket upgrade + handshake, per attempt.
        send_queue_frames: frames queued per link before further sends are dropped.
        inbound_queue_messages: messages waiting for the application before new ones are dropped
            (a dropped request is answered with a "busy" error at once).
        stream_buffer_items: stream items buffered for a slow consumer before the stream fails.
        backoff_min_s / backoff_max_s: reconnect delay after failed attempts (doubling, jittered).
    """

    connect_timeout_s: float = 10.0
    send_queue_frames: int = 1024
    inbound_queue_messages: int = 1024
    stream_buffer_items: int = 64
    backoff_min_s: float = 0.05
    backoff_max_s: float = 5.0
    path: str = "/spear-mesh"


class Connection:
    """An authenticated WebSocket and its ordered, bounded outgoing queue."""

    def __init__(
        self,
        *,
        stream: trio.SocketStream,
        ws: trio_websocket.WebSocketConnection,
        session: Session,
        codec: MessageCodec,
        node_id: str,
        queue_frames: int,
    ) -> None:
        self.stream = stream
        #: "HOST:PORT" of the other end of the TCP connection, for logs
        self.remote = peer_name(stream)
        self.ws = ws
        self.session = session
        self.codec = codec
        self.node_id = node_id
        self._send, self._receive = trio.open_memory_channel[tuple[int, bytes]](queue_frames)
        self.dropped = 0
        #: requests from the peer not answered yet, and those of them the peer cancelled
        self.answering: set[int] = set()
        self.cancelled: set[int] = set()

    @property
    def peer_id(self) -> str:
        return self.session.peer_id

    def enqueue(self, kind: FrameKind, payload: bytes) -> bool:
        """Queue a frame; False (and counted) if the queue is full or the connection closed."""
        try:
            self._send.send_nowait((kind, payload))
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped += 1
            return False
        return True

    async def enqueue_wait(self, kind: FrameKind, payload: bytes) -> None:
        """Queue a frame, waiting for room; LinkClosedError if the connection is gone."""
        try:
            await self._send.send((kind, payload))
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise LinkClosedError(f"the link to {self.peer_id} closed") from exc

    async def aclose(self, code: int, reason: str) -> None:
        """Close the WebSocket politely but within a second, then the TCP stream, even if
        cancelled (trio-websocket leaves the stream open after some closes, so it is ours)."""
        self._send.close()
        with trio.move_on_after(1.0) as scope:
            scope.shield = True
            with contextlib.suppress(trio_websocket.ConnectionClosed):
                await self.ws.aclose(code, reason)
        await trio.aclose_forcefully(self.stream)

    def close_queue(self) -> None:
        """Refuse further frames (the writer stops once the queue is drained or cancelled)."""
        self._send.close()

    async def run_writer(self) -> None:
        """Seal and send queued frames in order until the queue or the WebSocket closes."""
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await self._write_all()

    async def _write_all(self) -> None:
        async with self._receive:
            async for kind, payload in self._receive:
                if len(payload) > self.session.peer_max_frame_bytes:
                    # queued before the link was up, when the peer's cap was not yet known
                    self.dropped += 1
                    log.warning(
                        "dropped a %d-byte frame over %s's frame cap", len(payload), self.peer_id
                    )
                    continue
                await self.ws.send_message(self.session.seal(kind, payload))


async def _binary(ws: trio_websocket.WebSocketConnection) -> bytes:
    data = await ws.get_message()
    if not isinstance(data, bytes):
        raise WireError("text frame on a mesh link; mesh frames are binary")
    return data


@dataclass(frozen=True, slots=True, kw_only=True)
class LinkParams:
    """What this node brings to every link it dials or accepts."""

    key: bytes
    node_id: str
    address: str  # the mesh address this node listens on, told to the peers it dials
    codec: MessageCodec
    settings: TransportSettings
    max_frame_bytes: int  # the largest frame payload this node accepts

    @property
    def max_message_bytes(self) -> int:
        """The WebSocket message cap: the frame cap plus the MAC and kind header."""
        return self.max_frame_bytes + MAC_BYTES + 1


#: what a failed dial or accept raises (translated into spear errors by the transport)
LINK_ERRORS = (
    OSError,
    trio.TooSlowError,
    WireError,
    trio_websocket.HandshakeError,
    trio_websocket.ConnectionClosed,
)


def peer_name(stream: trio.SocketStream) -> str:
    """ "HOST:PORT" of the other end of a TCP stream, for logs ("?" once it is gone)."""
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"


def describe_link_error(exc: BaseException) -> str:
    """One phrase for a LINK_ERRORS exception, for logs and error messages."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out (mesh connect timeout)"
    if isinstance(exc, trio_websocket.ConnectionClosed) and exc.reason is not None:
        reason = exc.reason
        return f"the peer closed the connection ({reason.code} {reason.reason or reason.name})"
    return str(exc) or type(exc).__name__


@asynccontextmanager
async def dial(address: str, params: LinkParams) -> AsyncIterator[Connection]:
    """Connect to `address`, run the initiator handshake, yield the authenticated Connection.

    Raises one of LINK_ERRORS (unwrapped) if the link cannot be made within
    settings.connect_timeout_s. The connection is closed when the block exits.
    """
    host, port = parse_hostport(address)

    async def initiate(nursery: trio.Nursery) -> Connection:
        stream = await trio.open_tcp_stream(host, port)
        try:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                host,
                params.settings.path,
                max_message_size=params.max_message_bytes,
                receive_buffer_size=RECEIVE_BYTES,
            )
            nonce = secrets.token_bytes(NONCE_BYTES)
            hs = InitiatorHandshake(
                key=params.key,
                node_id=params.node_id,
                address=params.address,
                nonce=nonce,
                max_frame_bytes=params.max_frame_bytes,
            )
            await ws.send_message(hs.hello())
            try:
                proof = hs.on_challenge(await _binary(ws))
            except WireError as exc:  # tell the responder why, so both sides log a reason
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    await ws.send_message(ResponderHandshake.refusal(str(exc)))
                raise
            await ws.send_message(proof)
            session = hs.on_welcome(await _binary(ws), peer_address=address)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return _connection(stream, ws, session, params)

    async with _open(initiate, params) as conn:
        yield conn


@asynccontextmanager
async def accept(stream: trio.SocketStream, params: LinkParams) -> AsyncIterator[Connection]:
    """Run the WebSocket upgrade and the responder handshake on an accepted TCP stream.

    A refused peer is told why. Raises one of LINK_ERRORS (unwrapped) if the peer is refused or
    the handshake does not complete within settings.connect_timeout_s. The connection (and the
    stream) is closed when the block exits.
    """

    async def respond(nursery: trio.Nursery) -> Connection:
        try:
            request = await trio_websocket.wrap_server_stream(
                nursery,
                stream,
                max_message_size=params.max_message_bytes,
                receive_buffer_size=RECEIVE_BYTES,
            )
            if request.path != params.settings.path:
                await request.reject(404, body=b"not a spear mesh endpoint")
                raise AuthenticationError(f"upgrade request for the wrong path {request.path!r}")
            ws = await request.accept()
            session = await _respond(ws, params)
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return _connection(stream, ws, session, params)

    async with _open(respond, params) as conn:
        yield conn


async def _respond(ws: trio_websocket.WebSocketConnection, params: LinkParams) -> Session:
    nonce = secrets.token_bytes(NONCE_BYTES)
    hs = ResponderHandshake(
        key=params.key, node_id=params.node_id, nonce=nonce, max_frame_bytes=params.max_frame_bytes
    )
    try:
        await ws.send_message(hs.on_hello(await _binary(ws)))
        welcome, session = hs.on_proof(await _binary(ws))
    except WireError as exc:
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            await ws.send_message(hs.refusal(str(exc)))
        raise
    await ws.send_message(welcome)
    return session


@asynccontextmanager
async def _open(
    make: Callable[[trio.Nursery], Awaitable[Connection]], params: LinkParams
) -> AsyncIterator[Connection]:
    """Make a connection whose WebSocket reader runs in a nursery owned here.

    Expected failures are raised outside the nursery so that callers see them unwrapped
    (trio wraps what escapes a nursery in an ExceptionGroup).
    """
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            with trio.fail_after(params.settings.connect_timeout_s):
                conn = await make(nursery)
        except LINK_ERRORS as exc:
            failure = exc
            nursery.cancel_scope.cancel()
        else:
            try:
                yield conn
            except BaseException:
                # cancelled or failing: the peer may be gone too, so no close handshake
                await trio.aclose_forcefully(conn.stream)
                raise
            else:
                await conn.aclose(1000, "")
            finally:
                nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure


def _connection(
    stream: trio.SocketStream,
    ws: trio_websocket.WebSocketConnection,
    session: Session,
    params: LinkParams,
) -> Connection:
    return Connection(
        stream=stream,
        ws=ws,
        session=session,
        codec=params.codec,
        node_id=params.node_id,
        queue_frames=params.settings.send_queue_frames,
    )
