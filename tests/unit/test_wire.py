"""The CBOR wire codec: round trips, size caps, and hostile input giving only WireError."""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear.errors import FrameTooLargeError, WireError
from spear.wire import (
    Envelope,
    FrameDecoder,
    decode_envelope,
    dumps,
    encode_envelope,
    encode_frame,
)

scalars = st.none() | st.booleans() | st.integers() | st.text() | st.binary()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(
    type_=st.text(min_size=1), id_=st.integers(min_value=0), body=st.dictionaries(st.text(), values)
)
def test_envelope_round_trip(type_: str, id_: int, body: dict[str, object]) -> None:
    env = Envelope(type=type_, id=id_, sender="nd-1", body=body)
    assert decode_envelope(encode_envelope(env)) == env


@given(st.binary(max_size=200))
def test_garbage_never_raises_anything_but_wire_error(data: bytes) -> None:
    with contextlib.suppress(WireError):
        decode_envelope(data)


@pytest.mark.parametrize(
    ("doc", "rule"),
    [
        ([1, 2], "must be a CBOR map"),
        ({"v": 2, "type": "x", "id": 1, "from": "a"}, "unsupported envelope version 2"),
        ({"v": 1, "type": "", "id": 1, "from": "a"}, "'type' must be a non-empty string"),
        ({"v": 1, "type": "x", "id": -1, "from": "a"}, "'id' must be a non-negative integer"),
        ({"v": 1, "type": "x", "id": True, "from": "a"}, "'id' must be a non-negative integer"),
        ({"v": 1, "type": "x", "id": 1, "from": 5}, "'from' must be a string"),
        ({"v": 1, "type": "x", "id": 1, "from": "a", "body": [1]}, "'body' must be a map"),
    ],
)
def test_bad_envelopes_name_the_rule(doc: object, rule: str) -> None:
    with pytest.raises(WireError, match=rule):
        decode_envelope(cbor2.dumps(doc))


def test_size_cap_is_checked_before_parsing() -> None:
    frame = encode_envelope(Envelope(type="x", id=1, sender="a", body={"p": b"x" * 2000}))
    with pytest.raises(FrameTooLargeError, match="exceeds the cap of 1024"):
        decode_envelope(frame, max_bytes=1024)


def test_unencodable_value_is_a_wire_error() -> None:
    with pytest.raises(WireError, match="cannot encode"):
        dumps({"x": object()})


@given(st.lists(st.dictionaries(st.text(), values, max_size=3), max_size=5), st.integers(1, 7))
def test_frame_decoder_reassembles_any_split(docs: list[dict[str, object]], step: int) -> None:
    stream = b"".join(encode_frame(d) for d in docs)
    decoder = FrameDecoder()
    got: list[dict[str, object]] = []
    for i in range(0, len(stream), step):
        got += decoder.feed(stream[i : i + step])
    assert got == docs
    assert decoder.buffered == 0


def test_frame_decoder_refuses_oversized_and_non_map_frames() -> None:
    with pytest.raises(FrameTooLargeError):
        FrameDecoder(max_bytes=10).feed((1000).to_bytes(4, "big"))
    payload = cbor2.dumps([1])
    with pytest.raises(WireError, match="must be a CBOR map"):
        FrameDecoder().feed(len(payload).to_bytes(4, "big") + payload)
