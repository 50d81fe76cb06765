"""FrameReader: the docker attach stream's multiplexed frames, split however they arrive."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from spear.runtimes.docker_stream import FRAME_HEADER, FrameReader


def frame(stream_id: int, payload: bytes) -> bytes:
    return FRAME_HEADER.pack(stream_id, len(payload)) + payload


def test_whole_frames_in_one_chunk() -> None:
    reader = FrameReader()
    chunk = frame(1, b"out") + frame(2, b"err") + frame(1, b"")
    assert list(reader.feed(chunk)) == [(1, b"out"), (2, b"err"), (1, b"")]


def test_a_frame_split_inside_its_header_and_payload() -> None:
    reader = FrameReader()
    data = frame(2, b"hello") + frame(1, b"x" * 70000)
    assert list(reader.feed(data[:3])) == []
    assert list(reader.feed(data[3:10])) == []
    assert list(reader.feed(data[10:20])) == [(2, b"hello")]
    assert list(reader.feed(data[20:])) == [(1, b"x" * 70000)]


@given(
    frames=st.lists(st.tuples(st.sampled_from([1, 2]), st.binary(max_size=64)), max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_any_split_yields_the_same_frames(frames: list[tuple[int, bytes]], cuts: list[int]) -> None:
    data = b"".join(frame(stream_id, payload) for stream_id, payload in frames)
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    reader = FrameReader()
    seen = [item for a, b in itertools.pairwise(bounds) for item in reader.feed(data[a:b])]
    assert seen == frames
