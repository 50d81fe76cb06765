"""The worker framing protocol: a pure encoder, decoder and host-side session (DESIGN.md §5).

A worker is a long-running process serving many invocations over its stdin and stdout. Both
directions carry frames: a 4-byte big-endian unsigned length, then that many bytes holding one
CBOR map (RFC 8949) with a text key "type". stderr is free-form logs. docs/workers.md is the
guide for writing a worker in any language; this docstring is the reference.

    worker -> host
      hello     {"type": "hello", "protocol": 1, "max_concurrency": N}
                the first frame, once the worker is ready; N >= 1 requests may be in flight
      response  {"type": "response", "id": ID, "ok": true, "data": bytes,
                 "content_type": text (optional)}
                {"type": "response", "id": ID, "ok": false,
                 "error": {"code": text, "message": text}}
                exactly one per request, in any order, also for a cancelled request
    host -> worker
      request   {"type": "request", "id": ID, "execution_id": text, "deadline_ms": int,
                 "content_type": text, "data": bytes}
                ID: unsigned integer unique among the requests in flight; deadline_ms: the
                milliseconds left when it was sent (past them the host kills the worker)
      cancel    {"type": "cancel", "id": ID}
                the host abandoned request ID: stop it if you can and answer it anyway

Extra keys in a map are ignored (room to grow). The host is strict about the rest, and any
violation breaks the session (the host then kills the worker): a frame longer than the cap,
bytes that are not a CBOR map, a missing or mistyped field, a first frame that is not a hello
or a second hello, another protocol version, a frame type the host does not know, a response
to an id that is not in flight. A worker must ignore frame types it does not know.

API: `encode(message)` makes a frame; `MessageDecoder(sender)` turns received bytes into
messages; `HostSession` keeps the host's side (ids, requests in flight with their deadlines,
cancellations) and turns received bytes into `Ready`, `Completed` and `Discarded` events
(`receive_answer` takes the usual read, one `ok` answer, without making any).
Nothing here does I/O or reads a clock: callers pass `now` (any monotonic clock in seconds).
This module imports only the standard library, cbor2 and spear.errors (no dataclasses, no
typing at run time), so the worker SDK starts fast.
"""

from __future__ import annotations

import math
import struct

import cbor2

from spear.errors import FrameTooLargeError, WireError

TYPE_CHECKING = False  # typing is not imported at run time: workers start faster without it
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any, Final, Literal

    Sender = Literal["host", "worker"]
else:
    Sender = str

PROTOCOL_VERSION: Final = 1
DEFAULT_CONTENT_TYPE: Final = "application/octet-stream"
#: default cap of one frame, in bytes of its CBOR map (hosts derive theirs from output limits)
DEFAULT_MAX_FRAME_BYTES: Final = 64 * 1024 * 1024
#: largest request id (ids are CBOR unsigned integers that fit 64 bits)
MAX_ID: Final = 2**64 - 1

_LENGTH: Final = struct.Struct(">I")
_pack_length: Final = _LENGTH.pack
_unpack_length: Final = _LENGTH.unpack_from


class WorkerProtocolError(WireError):
    """The peer broke the worker protocol (the host kills a worker that does)."""

    code = "worker_protocol"


# --- messages -----------------------------------------------------------------------------

_set = object.__setattr__


class _Record:
    """Immutable, slotted, compared and shown field by field: what a frozen dataclass gives,
    without importing dataclasses (a worker's start would pay about 10 ms for it)."""

    __slots__: tuple[str, ...] = ()

    def _fields(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Record)
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((type(self), self._fields()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r}: {type(self).__name__} is frozen")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r}: {type(self).__name__} is frozen")


class Hello(_Record):
    """Worker -> host, once, first: the worker is ready to serve."""

    __slots__ = ("max_concurrency", "protocol")
    max_concurrency: int
    protocol: int

    def __init__(self, *, max_concurrency: int = 1, protocol: int = PROTOCOL_VERSION) -> None:
        _set(self, "max_concurrency", max_concurrency)
        _set(self, "protocol", protocol)


class Request(_Record):
    """Host -> worker: one invocation."""

    __slots__ = ("content_type", "data", "deadline_ms", "execution_id", "id")
    id: int
    execution_id: str
    deadline_ms: int
    data: bytes
    content_type: str

    def __init__(
        self,
        *,
        id: int,
        execution_id: str,
        deadline_ms: int,
        data: bytes,
        content_type: str = DEFAULT_CONTENT_TYPE,
    ) -> None:
        _set(self, "id", id)
        _set(self, "execution_id", execution_id)
        _set(self, "deadline_ms", deadline_ms)
        _set(self, "data", data)
        _set(self, "content_type", content_type)


class Response(_Record):
    """Worker -> host: the answer to request `id` (`ok` with data, or an error)."""

    __slots__ = ("content_type", "data", "error_code", "error_message", "id", "ok")
    id: int
    ok: bool
    data: bytes
    content_type: str
    error_code: str
    error_message: str

    def __init__(
        self,
        *,
        id: int,
        ok: bool,
        data: bytes = b"",
        content_type: str = DEFAULT_CONTENT_TYPE,
        error_code: str = "",
        error_message: str = "",
    ) -> None:
        _set(self, "id", id)
        _set(self, "ok", ok)
        _set(self, "data", data)
        _set(self, "content_type", content_type)
        _set(self, "error_code", error_code)
        _set(self, "error_message", error_message)


class Cancel(_Record):
    """Host -> worker: request `id` was abandoned."""

    __slots__ = ("id",)
    id: int

    def __init__(self, *, id: int) -> None:
        _set(self, "id", id)


Message = Hello | Request | Response | Cancel

_new = object.__new__
_set_request_id = Request.__dict__["id"].__set__
_set_request_execution_id = Request.__dict__["execution_id"].__set__
_set_request_deadline_ms = Request.__dict__["deadline_ms"].__set__
_set_request_content_type = Request.__dict__["content_type"].__set__
_set_request_data = Request.__dict__["data"].__set__


def _dumps(doc: dict[str, Any]) -> bytes:
    """One frame (length prefix + CBOR map) carrying `doc`; WireError if CBOR cannot carry it."""
    try:
        payload = cbor2.dumps(doc)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise WireError(f"cannot encode value as CBOR: {exc}") from exc
    return _LENGTH.pack(len(payload)) + payload


def _loads(payload: bytes) -> Any:
    """One CBOR value (its size checked by the caller); WireError if it is malformed."""
    try:
        return cbor2.loads(payload)
    except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
        raise WireError(f"malformed CBOR: {exc}") from exc


def encode(message: Message) -> bytes:
    """One frame (length prefix + CBOR map) carrying `message`.

    Raises:
        WireError: a field holds a value CBOR cannot carry.
    """
    return _dumps(_TO_DOC[type(message)](message))


def encode_answer(id_: int, data: bytes, content_type: str) -> bytes:
    """The frame of `Response(id=id_, ok=True, data=data, content_type=content_type)`, built
    without the message object (a worker's hot path).

    Raises:
        WireError: a field holds a value CBOR cannot carry.
    """
    doc = {"type": "response", "id": id_, "ok": True, "data": data, "content_type": content_type}
    try:  # _dumps inlined
        payload = cbor2.dumps(doc)
    except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
        raise WireError(f"cannot encode value as CBOR: {exc}") from exc
    return _pack_length(len(payload)) + payload


def _hello_doc(m: Any) -> dict[str, Any]:
    return {"type": "hello", "protocol": m.protocol, "max_concurrency": m.max_concurrency}


def _request_doc(m: Any) -> dict[str, Any]:
    return {
        "type": "request",
        "id": m.id,
        "execution_id": m.execution_id,
        "deadline_ms": m.deadline_ms,
        "content_type": m.content_type,
        "data": m.data,
    }


def _response_doc(m: Any) -> dict[str, Any]:
    if m.ok:
        return {
            "type": "response",
            "id": m.id,
            "ok": True,
            "data": m.data,
            "content_type": m.content_type,
        }
    error = {"code": m.error_code, "message": m.error_message}
    return {"type": "response", "id": m.id, "ok": False, "error": error}


def _cancel_doc(m: Any) -> dict[str, Any]:
    return {"type": "cancel", "id": m.id}


_TO_DOC: Final[dict[type, Callable[[Any], dict[str, Any]]]] = {
    Hello: _hello_doc,
    Request: _request_doc,
    Response: _response_doc,
    Cancel: _cancel_doc,
}


# --- decoding -----------------------------------------------------------------------------


def _field(doc: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = doc.get(key)
    # bool is an int subclass: an int field must refuse True, a bool field accepts only bools
    wrong_bool = isinstance(value, bool) and kind is not bool
    if not isinstance(value, kind) or wrong_bool:
        raise WorkerProtocolError(f"{doc.get('type')} frame field {key!r} must be {what}")
    return value


def _id(doc: Mapping[str, Any]) -> int:
    value: int = _field(doc, "id", int, "an unsigned 64-bit integer")
    if not 0 <= value <= MAX_ID:
        raise WorkerProtocolError(
            f"{doc['type']} frame field 'id' must be an unsigned 64-bit integer"
        )
    return value


def _parse_hello(doc: Mapping[str, Any]) -> Hello:
    protocol = _field(doc, "protocol", int, "an integer")
    if protocol != PROTOCOL_VERSION:
        raise WorkerProtocolError(
            f"the worker speaks protocol {protocol}, this host speaks {PROTOCOL_VERSION}"
        )
    max_concurrency = _field(doc, "max_concurrency", int, "an integer >= 1")
    if max_concurrency < 1:
        raise WorkerProtocolError("hello frame field 'max_concurrency' must be an integer >= 1")
    return Hello(max_concurrency=max_concurrency, protocol=protocol)


def _parse_response(doc: Mapping[str, Any]) -> Response:
    # The common frame first, checked by exact type (cbor2 makes no subclasses; bool is not
    # an int here); anything else goes through the field-by-field checks and their messages.
    id_, data = doc.get("id"), doc.get("data")
    content_type = doc.get("content_type", DEFAULT_CONTENT_TYPE)  # optional
    if (
        doc.get("ok") is True
        and type(id_) is int
        and 0 <= id_ <= MAX_ID
        and type(data) is bytes
        and type(content_type) is str
    ):
        return Response(id=id_, ok=True, data=data, content_type=content_type)
    return _checked_response(doc)


def _checked_response(doc: Mapping[str, Any]) -> Response:
    id_ = _id(doc)
    if _field(doc, "ok", bool, "a boolean"):
        data = _field(doc, "data", bytes, "a byte string")
        content_type = doc.get("content_type", DEFAULT_CONTENT_TYPE)
        if not isinstance(content_type, str):
            raise WorkerProtocolError("response frame field 'content_type' must be a text string")
        return Response(id=id_, ok=True, data=data, content_type=content_type)
    error = _field(doc, "error", dict, "a map {code, message}")
    code, message = error.get("code"), error.get("message")
    if not isinstance(code, str) or not isinstance(message, str):
        raise WorkerProtocolError("response frame field 'error' must be a map of two text strings")
    return Response(id=id_, ok=False, error_code=code, error_message=message)


def _parse_request(doc: Mapping[str, Any]) -> Request:
    id_, execution_id, deadline_ms = doc.get("id"), doc.get("execution_id"), doc.get("deadline_ms")
    content_type, data = doc.get("content_type"), doc.get("data")
    if (  # the fast check of _parse_response
        type(id_) is int
        and 0 <= id_ <= MAX_ID
        and type(execution_id) is str
        and type(deadline_ms) is int
        and type(content_type) is str
        and type(data) is bytes
    ):
        # Request(...) without binding keywords, each slot set by its own descriptor: the
        # worker's hot path (0.3 us instead of 0.65)
        request = _new(Request)
        _set_request_id(request, id_)
        _set_request_execution_id(request, execution_id)
        _set_request_deadline_ms(request, deadline_ms)
        _set_request_content_type(request, content_type)
        _set_request_data(request, data)
        return request
    return Request(
        id=_id(doc),
        execution_id=_field(doc, "execution_id", str, "a text string"),
        deadline_ms=_field(doc, "deadline_ms", int, "an integer"),
        content_type=_field(doc, "content_type", str, "a text string"),
        data=_field(doc, "data", bytes, "a byte string"),
    )


def _parse_cancel(doc: Mapping[str, Any]) -> Cancel:
    return Cancel(id=_id(doc))


_PARSERS: Final[dict[Sender, dict[str, Callable[[Mapping[str, Any]], Message]]]] = {
    "worker": {"hello": _parse_hello, "response": _parse_response},
    "host": {"request": _parse_request, "cancel": _parse_cancel},
}


class MessageDecoder:
    """Turns the bytes one side sends into messages; strict about everything but extra keys.

    A decoder of host frames (what a worker reads) skips frame types it does not know; a
    decoder of worker frames (what a host reads) refuses them.
    """

    def __init__(self, sender: Sender, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._max = max_frame_bytes
        self._parsers = _PARSERS[sender]
        self._strict = sender == "worker"
        self._pending = bytearray()  # the start of a frame not yet whole
        self._need = 0  # bytes the pending frame has in all (0: its length is not in yet)

    def feed(self, data: bytes) -> list[Message]:
        """Add received bytes; return the messages they completed, in order.

        Raises:
            WireError: the bytes break the protocol (FrameTooLargeError for an oversized
                frame, as soon as its length arrives; WorkerProtocolError for a bad shape);
                the decoder is unusable after.
        """
        if self._pending:
            self._pending += data
            if len(self._pending) < max(self._need, _LENGTH.size):
                return []
            data, self._pending = bytes(self._pending), bytearray()
        elif len(data) > 4 and _unpack_length(data)[0] == len(data) - 4:
            # One whole frame, the usual read on a round trip: no loop, no leftovers.
            if len(data) - 4 > self._max:
                raise FrameTooLargeError(
                    f"frame of {len(data) - 4} bytes exceeds the cap of {self._max}"
                )
            try:  # _loads inlined
                doc = cbor2.loads(data[4:])
            except (cbor2.CBORDecodeError, ValueError, TypeError, RecursionError) as exc:
                raise WireError(f"malformed CBOR: {exc}") from exc
            kind = doc.get("type") if type(doc) is dict else None
            parse = self._parsers.get(kind) if type(kind) is str else None
            if parse is not None:
                return [parse(doc)]
            one: list[Message] = []
            self._parse(doc, one)  # the error, or nothing for a type a worker skips
            return one
        out: list[Message] = []
        pos, size = 0, len(data)
        while size - pos >= _LENGTH.size:
            end = pos + _LENGTH.size + self._length(data, pos)
            if end > size:
                break
            self._parse(_loads(data[pos + _LENGTH.size : end]), out)
            pos = end
        if pos < size:
            self._pending += data[pos:]
            self._need = 0
            if len(self._pending) >= _LENGTH.size:
                self._need = _LENGTH.size + self._length(self._pending, 0)
        return out

    @property
    def buffered(self) -> int:
        """Bytes received that do not yet make a whole frame."""
        return len(self._pending)

    def _length(self, data: bytes | bytearray, pos: int) -> int:
        (length,) = _LENGTH.unpack_from(data, pos)
        if length > self._max:
            raise FrameTooLargeError(f"frame of {length} bytes exceeds the cap of {self._max}")
        return int(length)

    def _parse(self, doc: object, out: list[Message]) -> None:
        if not isinstance(doc, dict):
            raise WorkerProtocolError(f"frame must be a CBOR map, got {type(doc).__name__}")
        kind = doc.get("type")
        parse = self._parsers.get(kind) if isinstance(kind, str) else None
        if parse is not None:
            out.append(parse(doc))
        elif self._strict:
            raise WorkerProtocolError(f"unknown worker frame type {kind!r}")


# --- the host's side ------------------------------------------------------------------------


class Ready(_Record):
    """The worker said hello: it serves up to `max_concurrency` requests at once."""

    __slots__ = ("max_concurrency",)
    max_concurrency: int

    def __init__(self, *, max_concurrency: int) -> None:
        _set(self, "max_concurrency", max_concurrency)


class Completed(_Record):
    """The worker answered a request still awaited."""

    __slots__ = ("response",)
    response: Response

    def __init__(self, *, response: Response) -> None:
        _set(self, "response", response)


class Discarded(_Record):
    """The worker answered a request the host had cancelled; its slot is free again."""

    __slots__ = ("id",)
    id: int

    def __init__(self, *, id: int) -> None:
        _set(self, "id", id)


Event = Ready | Completed | Discarded


class HostSession:
    """The host's side of one worker's protocol: fed bytes, returns events; no I/O.

    A request is in flight from `start_request` until the worker answers it (a cancelled
    request too: it holds its slot until answered). Each has a deadline; `expired(now)` names
    the requests past theirs, and the caller then kills the worker (a request cannot be
    taken back from a process). After any violation the session is broken for good.
    """

    def __init__(self, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._decoder = MessageDecoder("worker", max_frame_bytes=max_frame_bytes)
        self._max_frame_bytes = max_frame_bytes
        self._max_concurrency = 0  # 0 until the hello
        self._next_id = 1
        self._deadlines: dict[int, float] = {}
        self._abandoned: set[int] = set()
        self._error: WireError | None = None

    @property
    def ready(self) -> bool:
        """Whether the worker said hello (and the session is not broken)."""
        return self._max_concurrency > 0 and self._error is None

    @property
    def max_concurrency(self) -> int:
        """Requests the worker serves at once (0 before its hello)."""
        return self._max_concurrency

    @property
    def has_room(self) -> bool:
        """Whether `start_request` may be called now (ready, with a free slot)."""
        return len(self._deadlines) < self._max_concurrency and self._error is None

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered, cancelled ones included."""
        return len(self._deadlines)

    @property
    def next_deadline(self) -> float:
        """The earliest deadline of a request in flight (`math.inf` if none)."""
        return min(self._deadlines.values(), default=math.inf)

    def receive(self, data: bytes) -> list[Event]:
        """Feed bytes read from the worker's stdout; return what they mean.

        Raises:
            WireError: the worker broke the protocol (the message says how).
        """
        if self._error is not None:
            raise self._error
        try:
            messages = self._decoder.feed(data)
            if len(messages) == 1:  # the usual read: one answer
                message = messages[0]
                return [self._HANDLERS[type(message)](self, message)]
            return [self._HANDLERS[type(m)](self, m) for m in messages]
        except WireError as exc:
            self._error = exc
            raise

    def receive_answer(self, data: bytes) -> tuple[int, bytes, str] | None:
        """The usual read on a round trip, with no events made: if `data` is exactly one
        frame holding an `ok` response to a request awaited (in flight, not cancelled), that
        request is answered and `(id, data, content_type)` returned. Anything else returns
        None and leaves the session as it was: pass the same bytes to `receive`.
        """
        size = len(data) - 4
        if (
            size <= 0
            or size > self._max_frame_bytes
            or _unpack_length(data)[0] != size
            or self._error is not None
            or self._decoder.buffered
        ):
            return None
        try:
            doc = cbor2.loads(data[4:])
        except Exception:  # `receive` says what is wrong with it
            return None
        if type(doc) is not dict or doc.get("type") != "response" or doc.get("ok") is not True:
            return None
        id_, output = doc.get("id"), doc.get("data")
        content_type = doc.get("content_type", DEFAULT_CONTENT_TYPE)
        if (
            type(id_) is not int
            or type(output) is not bytes
            or type(content_type) is not str
            or id_ in self._abandoned
            or self._deadlines.pop(id_, None) is None  # not in flight: `receive` refuses it
        ):
            return None
        return id_, output, content_type

    def start_request(
        self, *, execution_id: str, data: bytes, content_type: str, deadline: float, now: float
    ) -> tuple[int, bytes]:
        """Register a request due by `deadline`; return its id and the frame to send.

        Raises:
            RuntimeError: the session is not ready or has no free slot (a caller's bug).
            WireError: a field cannot be encoded.
        """
        if len(self._deadlines) >= self._max_concurrency or self._error is not None:
            raise RuntimeError("no free slot: wait for the hello and for a response first")
        if not math.isfinite(deadline):
            raise ValueError("a request needs a finite deadline")
        id_ = self._next_id
        remaining_ms = max(0, int((deadline - now) * 1000))
        # the map of a Request, built directly, and _dumps inlined: the host's hot path
        doc = {
            "type": "request",
            "id": id_,
            "execution_id": execution_id,
            "deadline_ms": remaining_ms,
            "content_type": content_type,
            "data": data,
        }
        try:
            payload = cbor2.dumps(doc)
        except (cbor2.CBOREncodeError, TypeError, ValueError) as exc:
            raise WireError(f"cannot encode value as CBOR: {exc}") from exc
        self._next_id = 1 if id_ == MAX_ID else id_ + 1
        self._deadlines[id_] = deadline
        return id_, _pack_length(len(payload)) + payload

    def cancel(self, id_: int, *, now: float, grace_s: float) -> bytes:
        """Abandon request `id_`: it must be answered within `grace_s` (or by its deadline).

        Returns the cancel frame to send, or b"" if `id_` is answered or already abandoned.
        """
        if id_ not in self._deadlines or id_ in self._abandoned:
            return b""
        self._abandoned.add(id_)
        self._deadlines[id_] = min(self._deadlines[id_], now + grace_s)
        return encode(Cancel(id=id_))

    def expired(self, now: float) -> list[int]:
        """Ids of the requests in flight whose deadline is at or before `now`."""
        return [id_ for id_, deadline in self._deadlines.items() if deadline <= now]

    def is_abandoned(self, id_: int) -> bool:
        """Whether request `id_` (in flight) was cancelled."""
        return id_ in self._abandoned

    def close(self) -> list[int]:
        """The worker is gone: forget every request in flight and return their ids."""
        ids = list(self._deadlines)
        self._deadlines.clear()
        self._abandoned.clear()
        return ids

    def _handle_hello(self, hello: Message) -> Event:
        assert isinstance(hello, Hello)
        if self._max_concurrency:
            raise WorkerProtocolError("the worker sent a second hello frame")
        self._max_concurrency = hello.max_concurrency
        return Ready(max_concurrency=hello.max_concurrency)

    def _handle_response(self, response: Message) -> Event:
        assert isinstance(response, Response)
        if not self._max_concurrency:
            raise WorkerProtocolError("the worker sent a response before its hello frame")
        if self._deadlines.pop(response.id, None) is None:
            raise WorkerProtocolError(f"the worker answered request {response.id}, not in flight")
        if response.id in self._abandoned:
            self._abandoned.discard(response.id)
            return Discarded(id=response.id)
        return Completed(response=response)

    _HANDLERS: Final[dict[type, Callable[[HostSession, Message], Event]]] = {
        Hello: _handle_hello,
        Response: _handle_response,
    }
