"""The worker framing protocol's pure core: round trips, torn and hostile input, the session."""

from __future__ import annotations

import contextlib
import math
import struct
from collections.abc import Callable

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear.errors import FrameTooLargeError, WireError
from spear.worker_protocol import (
    MAX_ID,
    Cancel,
    Completed,
    Discarded,
    Hello,
    HostSession,
    Message,
    MessageDecoder,
    Ready,
    Request,
    Response,
    Sender,
    WorkerProtocolError,
    encode,
)

ids = st.integers(min_value=0, max_value=MAX_ID)
text = st.text(max_size=40)
hellos = st.builds(Hello, max_concurrency=st.integers(min_value=1, max_value=2**31))
requests = st.builds(
    Request,
    id=ids,
    execution_id=text,
    deadline_ms=st.integers(min_value=0, max_value=2**40),
    content_type=text,
    data=st.binary(max_size=300),
)
ok_responses = st.builds(
    Response, id=ids, ok=st.just(True), data=st.binary(max_size=300), content_type=text
)
error_responses = st.builds(
    Response, id=ids, ok=st.just(False), error_code=text, error_message=text
)
cancels = st.builds(Cancel, id=ids)


def frame(doc: object) -> bytes:
    payload = cbor2.dumps(doc)
    return struct.pack(">I", len(payload)) + payload


def decode_in_pieces(sender: Sender, data: bytes, cuts: list[int]) -> list[Message]:
    decoder = MessageDecoder(sender)
    out: list[Message] = []
    start = 0
    for cut in sorted(c % (len(data) + 1) for c in cuts):
        out += decoder.feed(data[start:cut])
        start = max(start, cut)
    out += decoder.feed(data[start:])
    assert decoder.buffered == 0
    return out


@given(st.lists(hellos | ok_responses | error_responses, max_size=5), st.lists(st.integers()))
def test_worker_messages_round_trip_however_torn(messages: list[Message], cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in messages)
    assert decode_in_pieces("worker", data, cuts) == messages


@given(st.lists(requests | cancels, max_size=5), st.lists(st.integers()))
def test_host_messages_round_trip_however_torn(messages: list[Message], cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in messages)
    assert decode_in_pieces("host", data, cuts) == messages


@given(st.binary(max_size=300))
def test_garbage_gives_only_wire_errors(data: bytes) -> None:
    for sender in ("host", "worker"):
        with contextlib.suppress(WireError):
            MessageDecoder(sender, max_frame_bytes=1000).feed(data)
    session = HostSession(max_frame_bytes=1000)
    with contextlib.suppress(WireError):
        session.receive(data)


@given(st.dictionaries(st.sampled_from(["type", "id", "ok", "data", "error"]), st.integers()))
def test_mistyped_fields_give_protocol_errors(doc: dict[str, int]) -> None:
    with contextlib.suppress(WorkerProtocolError):
        MessageDecoder("worker").feed(frame({**doc, "type": "response"}))


def test_a_prefix_completes_nothing_until_the_rest_arrives() -> None:
    data = encode(Response(id=7, ok=True, data=b"x" * 100))
    decoder = MessageDecoder("worker")
    assert decoder.feed(data[:50]) == []
    assert decoder.buffered == 50
    assert decoder.feed(data[50:]) == [Response(id=7, ok=True, data=b"x" * 100)]


def test_an_oversized_length_fails_before_the_body_arrives() -> None:
    with pytest.raises(FrameTooLargeError, match="exceeds the cap of 100"):
        MessageDecoder("worker", max_frame_bytes=100).feed(struct.pack(">I", 101))


@pytest.mark.parametrize(
    ("doc", "rule"),
    [
        ([1, 2], "must be a CBOR map"),
        ({"type": "nope"}, "unknown worker frame type 'nope'"),
        ({"id": 1}, "unknown worker frame type None"),
        ({"type": "hello", "protocol": 2, "max_concurrency": 1}, "speaks protocol 2"),
        ({"type": "hello", "protocol": 1, "max_concurrency": 0}, "'max_concurrency' must be"),
        ({"type": "hello", "protocol": 1}, "'max_concurrency' must be"),
        ({"type": "response", "id": -1, "ok": True, "data": b""}, "'id' must be an unsigned"),
        ({"type": "response", "id": 2**64, "ok": True, "data": b""}, "'id' must be an unsigned"),
        ({"type": "response", "id": True, "ok": True, "data": b""}, "'id' must be an unsigned"),
        ({"type": "response", "id": 1, "ok": 1, "data": b""}, "'ok' must be a boolean"),
        ({"type": "response", "id": 1, "ok": True, "data": "text"}, "'data' must be a byte"),
        ({"type": "response", "id": 1, "ok": True, "data": b"", "content_type": 5}, "'content"),
        ({"type": "response", "id": 1, "ok": False}, "'error' must be a map"),
        ({"type": "response", "id": 1, "ok": False, "error": {"code": "x"}}, "two text strings"),
    ],
)
def test_bad_worker_frames_name_the_rule(doc: object, rule: str) -> None:
    with pytest.raises(WireError, match=rule):
        MessageDecoder("worker").feed(frame(doc))


def test_workers_skip_frame_types_they_do_not_know_but_check_known_ones() -> None:
    decoder = MessageDecoder("host")
    assert decoder.feed(frame({"type": "ping", "id": 1}) + encode(Cancel(id=3))) == [Cancel(id=3)]
    with pytest.raises(WorkerProtocolError, match="'deadline_ms' must be an integer"):
        decoder.feed(frame({"type": "request", "id": 1, "execution_id": "e", "data": b""}))


def test_extra_keys_are_ignored() -> None:
    doc = {"type": "response", "id": 1, "ok": True, "data": b"hi", "trace": [1, 2]}
    assert MessageDecoder("worker").feed(frame(doc)) == [Response(id=1, ok=True, data=b"hi")]


# --- the host session ---------------------------------------------------------------------


def ready_session(max_concurrency: int = 2) -> HostSession:
    session = HostSession()
    assert session.receive(encode(Hello(max_concurrency=max_concurrency))) == [
        Ready(max_concurrency=max_concurrency)
    ]
    return session


def start(session: HostSession, *, now: float = 0.0, deadline: float = 10.0) -> int:
    id_, data = session.start_request(
        execution_id="ex-1", data=b"in", content_type="text/plain", deadline=deadline, now=now
    )
    (request,) = MessageDecoder("host").feed(data)
    assert request == Request(
        id=id_,
        execution_id="ex-1",
        deadline_ms=int((deadline - now) * 1000),
        content_type="text/plain",
        data=b"in",
    )
    return id_


def test_a_session_serves_requests_up_to_the_announced_concurrency() -> None:
    session = ready_session(2)
    first = start(session)
    room = [session.has_room]
    second = start(session)
    assert first != second and session.in_flight == 2
    room.append(session.has_room)
    with pytest.raises(RuntimeError, match="no free slot"):
        start(session)
    answer = Response(id=second, ok=True, data=b"out")
    assert session.receive(encode(answer)) == [Completed(response=answer)]
    assert session.in_flight == 1
    room.append(session.has_room)
    assert room == [True, False, True]
    start(session)


def test_requests_wait_for_the_hello() -> None:
    session = HostSession()
    assert not session.ready and session.max_concurrency == 0 and not session.has_room
    with pytest.raises(RuntimeError, match="wait for the hello"):
        start(session)


@pytest.mark.parametrize(
    ("first", "rule"),
    [
        (Response(id=1, ok=True), "response before its hello"),
        (Hello(max_concurrency=1), "second hello"),
    ],
)
def test_out_of_order_frames_break_the_session_for_good(first: Message, rule: str) -> None:
    session = HostSession()
    if isinstance(first, Hello):
        session.receive(encode(first))
    with pytest.raises(WorkerProtocolError, match=rule):
        session.receive(encode(first))
    with pytest.raises(WorkerProtocolError, match=rule):
        session.receive(b"")
    assert not session.ready and not session.has_room


def test_an_answer_to_an_id_not_in_flight_is_a_violation() -> None:
    session = ready_session()
    id_ = start(session)
    session.receive(encode(Response(id=id_, ok=True)))
    with pytest.raises(WorkerProtocolError, match=f"answered request {id_}, not in flight"):
        session.receive(encode(Response(id=id_, ok=True)))


def test_a_cancelled_request_holds_its_slot_until_answered_then_is_discarded() -> None:
    session = ready_session(1)
    id_ = start(session, deadline=10.0)
    (cancel,) = MessageDecoder("host").feed(session.cancel(id_, now=1.0, grace_s=0.5))
    assert cancel == Cancel(id=id_)
    assert session.cancel(id_, now=1.0, grace_s=0.5) == b""  # once is enough
    assert session.is_abandoned(id_) and session.in_flight == 1
    assert session.next_deadline == 1.5
    assert session.receive(encode(Response(id=id_, ok=False, error_code="cancelled"))) == [
        Discarded(id=id_)
    ]
    assert session.in_flight == 0 and session.cancel(id_, now=2.0, grace_s=0.5) == b""


def test_expired_names_the_requests_past_their_deadline() -> None:
    session = ready_session(3)
    early, late = start(session, deadline=1.0), start(session, deadline=5.0)
    assert session.next_deadline == 1.0
    assert session.expired(0.5) == []
    assert session.expired(1.0) == [early]
    assert sorted(session.expired(5.0)) == [early, late]
    assert sorted(session.close()) == [early, late]
    assert session.in_flight == 0 and session.next_deadline == math.inf


def test_remaining_time_travels_in_milliseconds_and_is_never_negative() -> None:
    session = ready_session()
    _id, data = session.start_request(
        execution_id="e", data=b"", content_type="x", deadline=1.0, now=3.0
    )
    (request,) = MessageDecoder("host").feed(data)
    assert isinstance(request, Request) and request.deadline_ms == 0
    with pytest.raises(ValueError, match="finite deadline"):
        session.start_request(
            execution_id="e", data=b"", content_type="x", deadline=math.inf, now=0.0
        )


def test_an_oversized_answer_breaks_the_session() -> None:
    session = HostSession(max_frame_bytes=64)
    session.receive(encode(Hello()))
    start(session)
    with pytest.raises(FrameTooLargeError):
        session.receive(encode(Response(id=1, ok=True, data=b"x" * 100)))


# --- the host's fast path -------------------------------------------------------------------


def twin_sessions() -> tuple[HostSession, HostSession, int, int]:
    """Two sessions in the same state: two requests in flight, the second one cancelled."""
    sessions = []
    for _ in range(2):
        session = HostSession(max_frame_bytes=256)
        session.receive(encode(Hello(max_concurrency=3)))
        first, second = start(session), start(session)
        session.cancel(second, now=0.0, grace_s=1.0)
        sessions.append(session)
    return sessions[0], sessions[1], first, second


def test_receive_answer_takes_one_ok_answer_awaited() -> None:
    session, _twin, first, _second = twin_sessions()
    answer = Response(id=first, ok=True, data=b"out", content_type="text/plain")
    assert session.receive_answer(encode(answer)) == (first, b"out", "text/plain")
    assert session.in_flight == 1
    doc = {"type": "response", "id": first, "ok": True, "data": b"x", "extra": 1}
    assert session.receive_answer(frame(doc)) is None  # answered already: receive refuses it


def events_or_error(session: HostSession, data: bytes) -> object:
    try:
        return session.receive(data)
    except WireError as exc:
        return (type(exc), str(exc))


@pytest.mark.parametrize(
    "make",
    [
        lambda first, second: encode(Response(id=second, ok=True, data=b"late")),  # cancelled
        lambda first, second: encode(Response(id=first, ok=False, error_code="e")),
        lambda first, second: encode(Response(id=first + 7, ok=True)),  # not in flight
        lambda first, second: encode(Response(id=first, ok=True, data=b"x" * 300)),  # too big
        lambda first, second: encode(Response(id=first, ok=True)) * 2,  # two frames
        lambda first, second: encode(Response(id=first, ok=True))[:-1],  # a part
        lambda first, second: encode(Hello()),
        lambda first, second: frame({"type": "response", "id": True, "ok": True, "data": b""}),
        lambda first, second: frame({"type": "response", "id": first, "ok": 1, "data": b""}),
        lambda first, second: frame([1, 2]),
        lambda first, second: b"\x00\x00\x00\x01\xff",
    ],
)
def test_receive_answer_leaves_anything_else_to_receive(
    make: Callable[[int, int], bytes],
) -> None:
    session, twin, first, second = twin_sessions()
    data = make(first, second)
    assert session.receive_answer(data) is None
    assert session.in_flight == twin.in_flight == 2
    assert events_or_error(session, data) == events_or_error(twin, data)
    assert session.in_flight == twin.in_flight


def test_messages_are_frozen_values() -> None:
    message = Response(id=1, ok=True, data=b"x")
    with pytest.raises(AttributeError, match="frozen"):
        message.id = 2
    assert message == Response(id=1, ok=True, data=b"x") != Response(id=2, ok=True, data=b"x")
    assert hash(message) == hash(Response(id=1, ok=True, data=b"x"))
    assert Cancel(id=1) != Discarded(id=1)
    assert repr(Cancel(id=1)) == "Cancel(id=1)"
