"""Serving one authenticated connection: the ordered writer, and a reader that checks every frame.

The reader opens each frame's MAC (spear.mesh.handshake.Session), decodes its envelope with the
application's codec (or the transport's own, for END, ERROR and CANCEL), checks that the sender
is the authenticated peer, and dispatches it: SEND, REQUEST and STREAM go to the application's
inbound channel (with a Responder for requests), answers go to the waiting requests
(spear.mesh.calls), CANCEL marks a request the peer stopped waiting for. A frame that fails any
check closes this connection only, with a logged reason. A well-formed message of a type this
node does not know (a newer node's, during a rolling upgrade) is no such failure: a request is
answered "unsupported", a one-way message dropped, an answer fails its request; all counted.
The reader never blocks on the application: when the inbound channel is full a message is
dropped (counted) and a request is answered "busy" at once, because the same connection also
carries replies.
"""

from __future__ import annotations

import logging
from typing import Any

import trio
import trio_websocket

from spear.errors import WireError
from spear.mesh.calls import Calls
from spear.mesh.codec import MessageCodec, UnknownMessageError
from spear.mesh.frames import CONTROL_CODEC, CONTROL_KINDS, INBOUND_KINDS, Failure, FrameKind
from spear.mesh.inbound import Inbound, Responder
from spear.mesh.links import Connection

log = logging.getLogger(__name__)

#: the error code answering a request of a message type this node does not know
UNSUPPORTED = "unsupported"

_MESSAGE_TOO_BIG = 1009  # WebSocket close codes
_POLICY_VIOLATION = 1008


class Receiver:
    """Serves the connections of one transport; counts what it received and rejected."""

    def __init__(
        self,
        *,
        codec: MessageCodec,
        max_frame_bytes: int,
        calls: Calls,
        inbound: trio.MemorySendChannel[Inbound],
        node_id: str,
    ) -> None:
        self._codec = codec
        self._max_frame_bytes = max_frame_bytes
        self._calls = calls
        self._inbound = inbound
        self._node_id = node_id
        self.received = self.inbound_full = self.rejected = self.unknown = 0
        self._unknown_tags: set[str] = set()  # logged once each

    async def serve(self, conn: Connection, *, outbound: str | None) -> None:
        """Run the writer and the reader until either ends.

        `outbound` is the address this node dialled (answers to our requests come back on
        that connection only), or None for a connection the peer dialled.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_write_then_cancel, conn, nursery.cancel_scope)
            await self._read(conn, outbound)
            nursery.cancel_scope.cancel()
        conn.close_queue()

    async def _read(self, conn: Connection, outbound: str | None) -> None:
        try:
            while True:
                self._on_frame(conn, await conn.ws.get_message(), outbound)
        except trio_websocket.ConnectionClosed as exc:
            # an honest peer never sends over our cap (it learnt it in the handshake)
            if exc.reason is not None and exc.reason.code == _MESSAGE_TOO_BIG:
                self._reject(conn, f"a frame over mesh.max_frame_bytes = {self._max_frame_bytes}")
        except WireError as exc:
            self._reject(conn, str(exc))
            await conn.aclose(_POLICY_VIOLATION, "bad frame")

    def _reject(self, conn: Connection, reason: str) -> None:
        self.rejected += 1
        log.warning("closed the mesh link with %s at %s: %s", conn.peer_id, conn.remote, reason)

    def _on_frame(self, conn: Connection, data: bytes | str, outbound: str | None) -> None:
        if not isinstance(data, bytes):
            raise WireError("text frame on a mesh link; mesh frames are binary")
        kind_byte, payload = conn.session.open(data)
        try:
            kind = FrameKind(kind_byte)
        except ValueError:
            raise WireError(f"unknown frame kind {kind_byte}") from None
        codec = CONTROL_CODEC if kind in CONTROL_KINDS else self._codec
        try:
            decoded = codec.decode(payload, max_bytes=self._max_frame_bytes)
        except UnknownMessageError as exc:
            if exc.sender != conn.peer_id:
                claimed = exc.sender
                raise WireError(f"frame from {conn.peer_id!r} claims sender {claimed!r}") from None
            self._on_unknown(conn, kind, exc, outbound)
            return
        if decoded.sender != conn.peer_id:
            raise WireError(f"frame from {conn.peer_id!r} claims sender {decoded.sender!r}")
        if kind in INBOUND_KINDS:
            self._deliver(conn, kind, decoded.id, decoded.message)
        elif kind is FrameKind.CANCEL:
            if decoded.id in conn.answering:  # so the set stays bounded by live requests
                conn.cancelled.add(decoded.id)
        else:
            self._calls.answer(kind, decoded.id, decoded.message, outbound)

    def _on_unknown(
        self, conn: Connection, kind: FrameKind, exc: UnknownMessageError, outbound: str | None
    ) -> None:
        self.unknown += 1
        if exc.tag not in self._unknown_tags:
            self._unknown_tags.add(exc.tag)
            log.warning(
                "node %s sent a message of a type this node does not know, %r (a newer"
                " version?); ignored, and answered 'unsupported' when it is a request",
                conn.peer_id,
                exc.tag,
            )
        if kind in INBOUND_KINDS and kind is not FrameKind.SEND:
            if exc.id == 0:
                raise WireError("a request frame must carry a non-zero id")
            reply = Responder(conn, exc.id, stream=kind is FrameKind.STREAM)
            reply.fail_nowait(
                UNSUPPORTED, f"node {self._node_id} does not know the message type {exc.tag!r}"
            )
        elif kind in (FrameKind.REPLY, FrameKind.ITEM):  # an answer: its request fails
            failure = Failure(code=UNSUPPORTED, message=f"an answer of unknown type {exc.tag!r}")
            self._calls.answer(FrameKind.ERROR, exc.id, failure, outbound)

    def _deliver(self, conn: Connection, kind: FrameKind, request_id: int, message: Any) -> None:
        reply = None
        if kind is not FrameKind.SEND:
            if request_id == 0:
                raise WireError("a request frame must carry a non-zero id")
            reply = Responder(conn, request_id, stream=kind is FrameKind.STREAM)
        inbound = Inbound(
            peer_id=conn.peer_id,
            peer_address=conn.session.peer_address,
            message=message,
            reply=reply,
        )
        try:
            self._inbound.send_nowait(inbound)
        except trio.WouldBlock:
            self.inbound_full += 1
            if reply is not None:
                reply.fail_nowait("busy", f"node {self._node_id} is overloaded; retry later")
            return
        self.received += 1


async def _write_then_cancel(conn: Connection, scope: trio.CancelScope) -> None:
    try:
        await conn.run_writer()
    finally:
        scope.cancel()  # the connection is done when either direction is
