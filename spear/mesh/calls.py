"""The requests a transport is waiting on: trio waiters around the pure RPC table.

Each request gets a waiter (a bounded channel: 1 answer for a unary request, a buffer of items
for a stream) registered in spear.mesh.rpc's RpcTable under the address it went to. The link
reader hands every answer frame to `answer`, which asks the table whether to accept it (late,
duplicate and foreign answers are ignored there) and puts it in the waiter; a link failure
fails every waiter of that address at once. The caller waits with its own timeout.
"""

from __future__ import annotations

from typing import Any

import trio

from spear.errors import UnavailableError
from spear.mesh.frames import Failure, FrameKind
from spear.mesh.links import RemoteError, RequestTimeoutError
from spear.mesh.rpc import ReplyKind, RpcStatistics, RpcTable

_REPLY_KINDS = {
    FrameKind.REPLY: ReplyKind.REPLY,
    FrameKind.ITEM: ReplyKind.ITEM,
    FrameKind.END: ReplyKind.END,
    FrameKind.ERROR: ReplyKind.ERROR,
}


class Waiter:
    """Where the reader puts the answers to one request, or the error that ends it."""

    def __init__(self, size: int, address: str) -> None:
        self._send, self._receive = trio.open_memory_channel[tuple[FrameKind, Any]](size)
        self._address = address
        self._error: Exception | None = None

    def put(self, kind: FrameKind, message: Any) -> bool:
        """Hand over one answer; False if the consumer is too far behind (buffer full)."""
        try:
            self._send.send_nowait((kind, message))
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # already failed: nobody waits any more
        return True

    def fail(self, error: Exception) -> None:
        """End the request with `error` (raised by `next` once buffered answers are read)."""
        self._error = error
        self._send.close()

    async def next(self, timeout_s: float) -> tuple[FrameKind, Any]:
        """The next answer (REPLY, ITEM or END).

        Raises:
            RemoteError: the peer answered with an error.
            RequestTimeoutError: nothing came within timeout_s.
            The error given to `fail` (link closed, peer unreachable, transport closed).
        """
        with trio.move_on_after(timeout_s):
            try:
                kind, message = await self._receive.receive()
            except trio.EndOfChannel:
                assert self._error is not None
                raise self._error from None
            if kind is FrameKind.ERROR:
                assert isinstance(message, Failure)
                raise RemoteError(message.message, code=message.code, peer_id=self._address)
            return kind, message
        raise RequestTimeoutError(f"no answer from {self._address} within {timeout_s:g} s")


class Calls:
    """The waiting requests of one transport."""

    def __init__(self, *, stream_buffer_items: int) -> None:
        self._table: RpcTable[Waiter] = RpcTable()
        self._stream_buffer_items = stream_buffer_items

    def open(self, address: str, *, timeout_s: float, stream: bool) -> tuple[Waiter, int]:
        """Register a request to `address`; return its waiter and id."""
        waiter = Waiter(self._stream_buffer_items if stream else 1, address)
        request_id = self._table.open(
            peer=address, now=trio.current_time(), timeout_s=timeout_s, waiter=waiter, stream=stream
        )
        return waiter, request_id

    def forget(self, request_id: int) -> None:
        """The caller stopped waiting; later answers are ignored."""
        self._table.cancel(request_id)

    def answer(self, kind: FrameKind, request_id: int, message: Any, address: str | None) -> None:
        """An answer frame arrived on the link dialled to `address` (None: an inbound link)."""
        verdict = self._table.on_reply(
            peer=address, request_id=request_id, kind=_REPLY_KINDS[kind], now=trio.current_time()
        )
        if verdict is not None and not verdict.waiter.put(kind, message):
            behind = self._stream_buffer_items
            self.fail(request_id, UnavailableError(f"stream consumer fell {behind} items behind"))

    def fail(self, request_id: int, error: Exception) -> None:
        """Fail one request (its frame could not be sent)."""
        waiter = self._table.cancel(request_id)
        if waiter is not None:
            waiter.fail(error)

    def fail_address(self, address: str, error: Exception) -> None:
        """Fail every request sent to `address` (its link broke or could not be made)."""
        for waiter in self._table.fail_peer(address):
            waiter.fail(error)

    def statistics(self) -> RpcStatistics:
        return self._table.statistics()
