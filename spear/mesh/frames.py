"""The link frame format after the handshake: frame kinds and the transport's own messages.

A WebSocket binary message on an authenticated link is `mac[16] | kind[1] | payload` (see
spear.mesh.handshake for the MAC). The payload is one spear.wire envelope whose `id` is the
request id (0 for a one-way message) and whose `from` is the sender's node id. Application
messages (SEND, REQUEST, STREAM, REPLY, ITEM) are decoded with the application's codec; END,
ERROR and CANCEL carry the transport's own messages below. Kind numbers are append-only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from spear.mesh.codec import MessageCodec


class FrameKind(IntEnum):
    """What a frame is; the byte after the MAC."""

    SEND = 0  # one-way message, id 0
    REQUEST = 1  # a unary request: exactly one REPLY or ERROR comes back with its id
    STREAM = 2  # a stream request: ITEMs, then END or ERROR
    REPLY = 3
    ITEM = 4
    END = 5
    ERROR = 6
    CANCEL = 7  # the requester stopped waiting (timeout, or left a stream early)


#: kinds that open a conversation (delivered to the application)
INBOUND_KINDS = frozenset({FrameKind.SEND, FrameKind.REQUEST, FrameKind.STREAM})
#: kinds whose payload is one of the transport's own messages
CONTROL_KINDS = frozenset({FrameKind.END, FrameKind.ERROR, FrameKind.CANCEL})


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnd:
    """A stream finished normally."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """The responder failed a request: a machine-readable code and one sentence."""

    code: str
    message: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel:
    """The requester no longer waits for the answers to this request."""


CONTROL_MESSAGES: dict[str, type[object]] = {
    "mesh.end": StreamEnd,
    "mesh.failure": Failure,
    "mesh.cancel": Cancel,
}
CONTROL_CODEC = MessageCodec(CONTROL_MESSAGES)
