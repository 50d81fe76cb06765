"""The worker SDK: its command line, and its serving loops driven over real pipes in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from spear.worker import Context, serve
from spear.worker.channel import Channel
from spear.worker.launch import load_handler, main, parse_args
from spear.worker.serve import is_async
from spear.worker_protocol import (
    Cancel,
    Hello,
    Message,
    MessageDecoder,
    Request,
    Response,
    encode,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RUN_TIMEOUT_S = 60


def run_worker(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE)])}
    return subprocess.run(
        [sys.executable, "-m", "spear.worker", *args],
        input=stdin,
        capture_output=True,
        env=env,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        ((), "usage: python -m spear.worker MODULE:FUNCTION [--concurrency N]"),
        (("a:b", "c:d"), "usage: python -m spear.worker MODULE:FUNCTION [--concurrency N]"),
        (("--help",), "usage: python -m spear.worker MODULE:FUNCTION [--concurrency N]"),
        (("handle",), "expected MODULE:FUNCTION (e.g. mypkg.handlers:handle), got 'handle'"),
        (("worker_handlers:",), "expected MODULE:FUNCTION (e.g. mypkg.handlers:handle)"),
        (("nope_mod:handle",), "cannot import module 'nope_mod': No module named 'nope_mod'"),
        (("worker_handlers:nope",), "'worker_handlers' has no attribute 'nope'"),
        (("worker_handlers:upper.x",), "'worker_handlers' has no attribute 'upper.x'"),
        (("worker_handlers:NOT_CALLABLE",), "is a int, not a function: def handle(data, ctx)"),
        (("worker_handlers:upper", "--concurrency", "0"), "--concurrency must be an integer >= 1"),
    ],
)
def test_a_bad_command_line_is_one_clear_line_and_status_2(
    args: tuple[str, ...],
    line: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(HERE))
    assert main(list(args)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("spear.worker: ")
    assert line in err


def test_a_real_worker_process_refuses_a_bad_target_the_same_way() -> None:
    result = run_worker("worker_handlers:nope")
    assert result.returncode == 2
    assert result.stdout == b""
    assert result.stderr == b"spear.worker: 'worker_handlers' has no attribute 'nope'\n"


def test_a_module_that_fails_to_import_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken_mod.py").write_text("raise RuntimeError('no config')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(Exception, match="importing module 'broken_mod' failed: RuntimeError"):
            load_handler("broken_mod:handle")
    finally:
        sys.path.remove(str(tmp_path))


def test_the_worker_says_hello_and_exits_0_when_the_host_closes_the_pipe() -> None:
    result = run_worker("worker_handlers:upper", "--concurrency", "3")
    assert result.returncode == 0
    assert MessageDecoder("worker").feed(result.stdout) == [Hello(max_concurrency=3)]


def test_garbage_from_the_host_stops_the_worker_with_status_3() -> None:
    result = run_worker("worker_handlers:upper", stdin=b"\x00\x00\x00\x01\xff")
    assert result.returncode == 3
    assert b"spear.worker: the host broke the worker protocol: malformed CBOR" in result.stderr


def test_the_sdk_loads_no_heavy_module() -> None:
    # dataclasses (with inspect) cost a worker's start about 10 ms, threading about 0.6 ms
    probe = (
        "import sys, spear.worker.launch, spear.worker.serve;"
        "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('spear', 'trio', 'pydantic', 'asyncio', 'logging', 'concurrent', 'dataclasses',"
        " 'inspect', 'threading'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        env=env,
        timeout=RUN_TIMEOUT_S,
        check=True,
    )
    loaded = set(result.stdout.decode().split())
    assert loaded == {
        "spear",
        "spear.errors",
        "spear.worker",
        "spear.worker.channel",
        "spear.worker.context",
        "spear.worker.launch",
        "spear.worker.serve",
        "spear.worker_protocol",
    }


def test_arguments_parse() -> None:
    assert parse_args(["m:f"]) == ("m:f", None)
    assert parse_args(["m:f", "--concurrency", "8"]) == ("m:f", 8)


def test_async_handlers_are_recognised() -> None:
    async def coroutine(data: bytes, ctx: Context) -> bytes:
        return data

    class Service:
        async def handle(self, data: bytes, ctx: Context) -> bytes:
            return data

    assert is_async(coroutine) and is_async(Service().handle)
    assert not is_async(lambda data, ctx: data)


# --- the serving loops, in-process over real pipes --------------------------------------------


def serve_over_pipes(
    handler: Callable[[bytes, Context], Any], messages: list[Message], concurrency: int | None
) -> list[Message]:
    """Serve `messages` (written at once, then the pipe closed) and return the frames sent."""
    host_to_worker, worker_to_host = os.pipe(), os.pipe()
    channel = Channel(host_to_worker[0], worker_to_host[1])
    with os.fdopen(host_to_worker[1], "wb") as pipe:
        pipe.write(b"".join(encode(m) for m in messages))
    received: list[Message] = []
    decoder = MessageDecoder("worker")

    def read_all() -> None:
        while chunk := os.read(worker_to_host[0], 65536):
            received.extend(decoder.feed(chunk))

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        serve(handler, channel, concurrency=concurrency)
    finally:
        os.close(worker_to_host[1])
        reader.join(RUN_TIMEOUT_S)
        os.close(host_to_worker[0])
        os.close(worker_to_host[0])
    return received


def request(id_: int, data: bytes) -> Request:
    return Request(id=id_, execution_id=f"ex-{id_}", deadline_ms=60_000, data=data)


def answers(frames: list[Message]) -> Iterator[tuple[int, bool, bytes, str]]:
    for frame in frames[1:]:
        assert isinstance(frame, Response)
        yield frame.id, frame.ok, frame.data or frame.error_message.encode(), frame.error_code


def handler(data: bytes, ctx: Context) -> Any:
    if data == b"raise":
        raise KeyError("missing")
    if data == b"oom":
        raise MemoryError
    if data == b"text":
        return "héllo"
    if data == b"none":
        return None
    return data.upper()


def test_the_inline_loop_answers_every_request_in_order() -> None:
    inputs = [b"a", b"raise", b"oom", b"text", b"none"]
    frames = serve_over_pipes(handler, [request(i, d) for i, d in enumerate(inputs, 1)], None)
    assert frames[0] == Hello(max_concurrency=1)
    assert list(answers(frames)) == [
        (1, True, b"A", ""),
        (2, False, b"KeyError: 'missing'", "handler_error"),
        (3, False, b"MemoryError", "memory_limit"),
        (4, True, "héllo".encode(), ""),
        (5, False, b"the handler returned NoneType; it must return bytes or str", "bad_result"),
    ]
    text = frames[4]
    assert isinstance(text, Response) and text.content_type == "text/plain; charset=utf-8"


def test_a_cancel_read_with_its_request_answers_it_without_running_it() -> None:
    ran: list[bytes] = []

    def record(data: bytes, ctx: Context) -> bytes:
        ran.append(data)
        return data

    frames = serve_over_pipes(
        record, [request(1, b"a"), request(2, b"b"), Cancel(id=2), Cancel(id=9)], None
    )
    assert ran == [b"a"]
    assert list(answers(frames)) == [
        (1, True, b"a", ""),
        (2, False, b"the host cancelled it", "cancelled"),
    ]


def test_the_thread_pool_loop_serves_concurrently() -> None:
    barrier = threading.Barrier(3, timeout=RUN_TIMEOUT_S)

    def meet(data: bytes, ctx: Context) -> bytes:
        barrier.wait()  # three handlers at once, or a BrokenBarrierError
        return data * 2

    frames = serve_over_pipes(meet, [request(i, b"x") for i in (1, 2, 3)], 3)
    assert frames[0] == Hello(max_concurrency=3)
    assert sorted(answers(frames)) == [(i, True, b"xx", "") for i in (1, 2, 3)]


def test_the_asyncio_loop_serves_concurrently_and_cancels() -> None:
    import asyncio

    seen: set[bytes] = set()
    both = asyncio.Event()

    async def wait_for_both(data: bytes, ctx: Context) -> bytes:
        if data == b"forever":
            await asyncio.Event().wait()
        seen.add(data)
        if len(seen) == 2:
            both.set()
        await both.wait()  # x finishes only once y runs too, and the other way round
        return data

    messages: list[Message] = [
        request(1, b"forever"),
        request(2, b"x"),
        request(3, b"y"),
        Cancel(id=1),
    ]
    frames = serve_over_pipes(wait_for_both, messages, None)
    assert frames[0] == Hello(max_concurrency=64)
    assert sorted(answers(frames)) == [
        (1, False, b"the host cancelled it", "cancelled"),
        (2, True, b"x", ""),
        (3, True, b"y", ""),
    ]
