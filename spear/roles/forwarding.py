"""A follower's gateway: API requests are forwarded to the leader's gateway, streamed.

Clients may talk to any node (DESIGN.md section 6): a follower relays the request (method,
path, query, headers and body, streamed both ways) to the gateway of the leader it knows for
the current term and relays the answer back unchanged. With no leader known, or the leader
unreachable, it answers 503 with `Retry-After` itself and never serves stale state.

Sync invocations are the exception once the node's execution plane has attached its
`DirectInvoke` (spear.roles.direct_invoke): the leader only places them, and their input and
output go from this node to the chosen Spearlet and back, never through the leader.

A forwarded request carries `X-Spear-Forwarded-By`; a node that is not the leader refuses to
forward such a request again (503), so a leader change can never make requests loop.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Final

import httpx

from spear.errors import UnavailableError
from spear.roles.direct_invoke import DirectInvoke
from spear.roles.invoke_path import Receive, Scope, Send, error_doc_answer

log = logging.getLogger(__name__)

FORWARDED_BY: Final = "x-spear-forwarded-by"
# Hop-by-hop headers (RFC 9110 section 7.6.1) and those httpx sets from the URL and body.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
#: not relayed from the leader's answer: hop-by-hop, and what this node's server adds itself
_RELAY_DROPS: Final = (_HOP_BY_HOP - {"content-length"}) | {"date", "server"}

#: answers the gateway address ("host:port") of the leader, or None when none is known
LeaderLocator = Callable[[], str | None]


class ForwardingApp:
    """The ASGI app a follower serves: a streaming reverse proxy to the current leader."""

    def __init__(
        self,
        locate_leader: LeaderLocator,
        *,
        node_id: str,
        client: httpx.AsyncClient,
        retry_after_s: float = 1.0,
    ) -> None:
        """
        Args:
            locate_leader: who leads now (asked per request, so a new leader is used at once).
            node_id: this node, named in `X-Spear-Forwarded-By`.
            client: the HTTP client; its timeouts bound each forwarded request.
            retry_after_s: what `Retry-After` says when no leader can be reached.
        """
        self._locate_leader = locate_leader
        self._node_id = node_id
        self._client = client
        self._retry_after_s = retry_after_s
        self._direct: DirectInvoke | None = None
        self._relayed = 0

    def attach_direct(self, direct: DirectInvoke) -> None:
        """Serve sync invocations through `direct` from now on (see the module docstring)."""
        self._direct = direct

    def statistics(self) -> dict[str, object]:
        """Requests relayed to the leader's gateway, and the direct path's counters."""
        direct = None if self._direct is None else self._direct.statistics()
        return {"relayed": self._relayed, "direct": direct}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if self._direct is not None:
            task = self._direct.takes(scope)
            if task is not None:
                await self._direct.serve(scope, receive, send, task)
                return
        self._relayed += 1
        leader = self._locate_leader()
        headers = _forwarded_headers(scope["headers"])
        if leader is None or any(name == FORWARDED_BY for name, _ in headers):
            reason = "no leader is known yet" if leader is None else "the leader just changed"
            await self._unavailable(send, f"{reason}; retry shortly")
            return
        headers.append((FORWARDED_BY, self._node_id))
        url = _target_url(leader, scope)
        request = self._client.build_request(
            scope["method"], url, headers=headers, content=_request_body(receive)
        )
        try:
            response = await self._client.send(request, stream=True)
        except httpx.TransportError as exc:
            log.info("forwarding to the leader at %s failed: %s", leader, exc)
            await self._unavailable(send, f"the leader at {leader} cannot be reached; retry")
            return
        try:
            await _relay_response(response, send, self._node_id)
        finally:
            await response.aclose()

    async def _unavailable(self, send: Send, message: str) -> None:
        exc = UnavailableError(message, retry_after_s=self._retry_after_s)
        await error_doc_answer(exc, "forwarding").send(send)


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to set up or tear down: acknowledge the server's lifespan events."""
    while True:
        event = await receive()
        if event["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif event["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _forwarded_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in raw]
    return [(k, v) for k, v in headers if k not in _HOP_BY_HOP]


def _target_url(leader: str, scope: Scope) -> str:
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope.get("raw_path") or scope["path"].encode()
    target = path.decode("latin-1") if isinstance(path, bytes) else str(path)
    return f"http://{leader}{target}" + (f"?{query}" if query else "")


async def _request_body(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body"):
            return


async def _relay_response(response: httpx.Response, send: Send, node_id: str) -> None:
    """The leader's answer, as it is but for the hop-by-hop headers and those this node's
    server sets itself (`date`, `server`: they would be there twice); it names this node in
    `X-Spear-Forwarded-By`."""
    headers = [
        (k.encode("latin-1"), v.encode("latin-1"))
        for k, v in response.headers.multi_items()
        if k.lower() not in _RELAY_DROPS
    ]
    headers.append((FORWARDED_BY.encode(), node_id.encode("latin-1")))
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    async for chunk in response.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})
