"""Serving a Python handler over the worker protocol: inline, on threads, or on asyncio.

- a plain function with concurrency 1 (the default) runs inline on the main thread: read a
  request, call the handler, write the response; the fastest round trip.
- a plain function with concurrency N > 1 runs on a pool of N threads (worth it when the
  handler waits on I/O or releases the GIL).
- an `async def` function runs as one asyncio task per request (default concurrency 64); a
  cancel frame cancels its task.

A handler's exception becomes an error response (`handler_error`, or `memory_limit` for a
MemoryError; the traceback goes to the logs) and the worker keeps serving. A cancelled
request is still answered (`cancelled`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Awaitable, Callable
from time import monotonic as _monotonic
from typing import TYPE_CHECKING, Any, Final

from spear.worker.channel import Channel
from spear.worker.context import Context
from spear.worker_protocol import (
    Cancel,
    Hello,
    Message,
    Request,
    Response,
    encode,
    encode_answer,
)

if TYPE_CHECKING:
    from concurrent.futures import Future

Handler = Callable[[bytes, Context], Any]
#: requests in flight at once for an `async def` handler unless told otherwise
ASYNC_CONCURRENCY: Final = 64
#: an error message longer than this is cut (hosts cap a frame near the output limit)
MAX_ERROR_MESSAGE_CHARS: Final = 2000
_CO_COROUTINE: Final = 0x80  # inspect.CO_COROUTINE, without importing inspect (slow to load)


def is_async(handler: Handler) -> bool:
    """Whether `handler` is an `async def` function (or a bound method of one)."""
    code = getattr(getattr(handler, "__func__", handler), "__code__", None)
    return code is not None and bool(code.co_flags & _CO_COROUTINE)


def serve(handler: Handler, channel: Channel, *, concurrency: int | None = None) -> None:
    """Say hello, then serve requests until the host closes the pipe.

    Raises:
        WireError: the host broke the protocol.
        OSError: the pipe to the host broke.
    """
    if is_async(handler):
        import asyncio  # only async workers pay for loading it

        asyncio.run(_serve_async(handler, channel, concurrency or ASYNC_CONCURRENCY))
    elif concurrency is None or concurrency == 1:
        _serve_inline(handler, channel)
    else:
        _serve_threads(handler, channel, concurrency)


# --- answers -------------------------------------------------------------------------------


def answer(request: Request, ctx: Context, result: object) -> Response:
    """The response carrying a handler's return value (bytes, or str sent as UTF-8)."""
    if isinstance(result, bytes | bytearray | memoryview):
        return Response(
            id=request.id, ok=True, data=bytes(result), content_type=ctx.response_content_type
        )
    if isinstance(result, str):
        content_type = ctx.response_content_type
        if content_type == "application/octet-stream":
            content_type = "text/plain; charset=utf-8"
        return Response(id=request.id, ok=True, data=result.encode(), content_type=content_type)
    message = f"the handler returned {type(result).__name__}; it must return bytes or str"
    return Response(id=request.id, ok=False, error_code="bad_result", error_message=message)


def failure(request: Request, exc: BaseException) -> Response:
    """The response for a handler that raised; its traceback goes to the logs."""
    import traceback

    traceback.print_exception(exc, file=sys.stderr)
    message = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if len(message) > MAX_ERROR_MESSAGE_CHARS:  # the whole traceback is in the logs anyway
        message = message[:MAX_ERROR_MESSAGE_CHARS] + "..."
    code = "memory_limit" if isinstance(exc, MemoryError) else "handler_error"
    return Response(id=request.id, ok=False, error_code=code, error_message=message)


def cancelled(request_id: int) -> Response:
    return Response(
        id=request_id, ok=False, error_code="cancelled", error_message="the host cancelled it"
    )


def _call(handler: Handler, request: Request, ctx: Context) -> Response:
    try:
        return answer(request, ctx, handler(request.data, ctx))
    except Exception as exc:
        return failure(request, exc)


def _call_encoded(handler: Handler, request: Request) -> bytes:
    """The response frame of `handler` on `request`; bytes out skip the Response object."""
    ctx = Context(  # Context.for_request(request), inlined
        execution_id=request.execution_id,
        content_type=request.content_type,
        deadline=_monotonic() + request.deadline_ms / 1000,
    )
    try:
        result = handler(request.data, ctx)
    except Exception as exc:
        return encode(failure(request, exc))
    if type(result) is bytes:
        return encode_answer(request.id, result, ctx.response_content_type)
    return encode(answer(request, ctx, result))


# --- a plain function, one request at a time -------------------------------------------------


def _serve_inline(handler: Handler, channel: Channel) -> None:
    channel.send(Hello(max_concurrency=1))
    receive, send_frame = channel.receive, channel.send_frame
    while (messages := receive()) is not None:
        if len(messages) == 1 and type(request := messages[0]) is Request:  # the usual read
            send_frame(_call_encoded(handler, request))
            continue
        # A cancel read in the same batch as its request means: answer it without running it.
        dropped = {m.id for m in messages if isinstance(m, Cancel)}
        for message in messages:
            if not isinstance(message, Request):
                continue
            if message.id in dropped:
                channel.send(cancelled(message.id))
            else:
                channel.send_frame(_call_encoded(handler, message))


# --- a plain function on N threads -------------------------------------------------------------


def _serve_threads(handler: Handler, channel: Channel, concurrency: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    running: dict[int, tuple[Context, Future[None]]] = {}

    def run(request: Request, ctx: Context) -> None:
        response = _call(handler, request, ctx)
        running.pop(request.id, None)
        channel.send(response)

    channel.send(Hello(max_concurrency=concurrency))
    with ThreadPoolExecutor(concurrency, thread_name_prefix="spear-handler") as pool:
        while (messages := channel.receive()) is not None:
            for message in messages:
                if isinstance(message, Request):
                    ctx = Context.for_request(message)
                    running[message.id] = (ctx, pool.submit(run, message, ctx))
                elif isinstance(message, Cancel) and (entry := running.get(message.id)):
                    entry[0].cancelled = True
                    if entry[1].cancel():  # not started yet: answer for it
                        running.pop(message.id, None)
                        channel.send(cancelled(message.id))


# --- an async def function on asyncio ----------------------------------------------------------


async def _serve_async(handler: Handler, channel: Channel, concurrency: int) -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    running: dict[int, tuple[Context, asyncio.Task[None]]] = {}
    closed = loop.create_future()

    async def run(request: Request, ctx: Context) -> None:
        # A cancelled task ends in `_dispatch_async`'s done callback (maybe before it started).
        try:
            awaitable: Awaitable[object] = handler(request.data, ctx)
            response = answer(request, ctx, await awaitable)
        except Exception as exc:
            response = failure(request, exc)
        running.pop(request.id, None)
        channel.send(response)

    def on_readable() -> None:
        try:
            messages = channel.read_once()
        except Exception as exc:
            messages = None
            closed.set_exception(exc)
        if messages is None:
            loop.remove_reader(channel.in_fd)
            if not closed.done():
                closed.set_result(None)
            return
        for message in messages:
            _dispatch_async(message, run, running, channel)

    os.set_blocking(channel.in_fd, False)
    channel.send(Hello(max_concurrency=concurrency))
    loop.add_reader(channel.in_fd, on_readable)
    try:
        await closed
    except BaseException:
        for _ctx, task in list(running.values()):
            task.cancel()
        raise
    finally:
        # At the end of the input the requests in flight still finish, as in the other loops.
        await asyncio.gather(*[task for _ctx, task in running.values()], return_exceptions=True)


def _dispatch_async(
    message: Message, run: Callable[..., Any], running: dict[int, Any], channel: Channel
) -> None:
    import asyncio

    if isinstance(message, Request):
        ctx = Context.for_request(message)
        task = asyncio.get_running_loop().create_task(run(message, ctx))
        running[message.id] = (ctx, task)

        def answer_if_cancelled(task: asyncio.Task[None], id_: int = message.id) -> None:
            if task.cancelled():
                running.pop(id_, None)
                channel.send(cancelled(id_))

        task.add_done_callback(answer_if_cancelled)
    elif isinstance(message, Cancel) and (entry := running.get(message.id)):
        entry[0].cancelled = True
        entry[1].cancel()
