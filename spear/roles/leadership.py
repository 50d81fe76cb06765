"""Leadership: the leader's services run exactly while this node leads (DESIGN.md section 2).

`serve_leadership` watches the Raft driver. When this node becomes leader it first waits for
a read barrier (its state machine then holds every committed write, so it never serves a
stale view), then opens a cancel scope running the TaskService's async workers (they pick
up the accepted executions) and publishes the leader's gateway app. When leadership is lost,
the scope is cancelled and the app withdrawn at once.

`RoleRouter` is the ASGI app every node serves on its HTTP port: the leader's app while this
node leads, otherwise the follower's forwarding proxy; `GET /health` is always answered here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from spear.errors import SpearError, UnavailableError
from spear.roles.invoke_path import ASGIApp, Receive, Scope, Send, error_doc_answer
from spear.roles.replication import Replicator
from spear.roles.sms import TaskService

log = logging.getLogger(__name__)


@dataclass(slots=True)
class LeaderServices:
    """What runs on this node while it leads: the TaskService and the leader's gateway app."""

    service: TaskService | None = None
    app: ASGIApp | None = None
    term: int = 0
    _changed: trio.Event = field(default_factory=trio.Event)

    def _publish(self, service: TaskService | None, app: ASGIApp | None, term: int) -> None:
        self.service, self.app, self.term = service, app, term
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self) -> None:
        """Wait until this node starts or stops serving as leader."""
        await self._changed.wait()

    async def wait_serving(self) -> TaskService:
        """Wait until this node leads and serves; return its TaskService."""
        while self.service is None:
            await self._changed.wait()
        return self.service


async def serve_leadership(
    replicator: Replicator,
    services: LeaderServices,
    *,
    service: TaskService,
    app: ASGIApp,
    before_leading: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the leader's services whenever this node leads (published in `services`).

    `before_leading` runs after the read barrier, before the API is served (e.g. fetching
    the artifacts this node lacks)."""
    task_status.started()
    while True:
        soft = replicator.soft_state
        if soft.role != "leader":
            await replicator.wait_soft_state_change()
            continue
        with trio.CancelScope() as scope:
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_cancel_on_loss, replicator, soft.term, scope)
                    nursery.start_soon(_lead, replicator, services, service, app, before_leading)
            finally:
                services._publish(None, None, 0)


async def _lead(
    replicator: Replicator,
    services: LeaderServices,
    service: TaskService,
    app: ASGIApp,
    before_leading: Callable[[], Awaitable[None]] | None,
) -> None:
    term = replicator.soft_state.term
    try:
        await replicator.read_barrier()
    except SpearError as exc:  # leadership ended before the barrier held; the watcher sees it
        log.info("leadership in term %d ended before serving: %s", term, exc)
        return
    if before_leading is not None:
        await before_leading()
    async with trio.open_nursery() as nursery:
        await nursery.start(service.serve_async_workers)
        services._publish(service, app, term)
        log.info("leading in term %d: serving the API", term)


async def _cancel_on_loss(replicator: Replicator, term: int, scope: trio.CancelScope) -> None:
    soft = replicator.soft_state
    while True:
        if soft.role != "leader" or soft.term != term:
            log.info("no longer leading (now %s in term %d)", soft.role, soft.term)
            scope.cancel()
            return
        soft = await replicator.wait_soft_state_change()


class RoleRouter:
    """Every node's HTTP app: the leader's gateway while leading, else the forwarding proxy."""

    def __init__(
        self,
        services: LeaderServices,
        follower_app: ASGIApp,
        health: Callable[[], dict[str, object]],
        leads_now: Callable[[], bool] = lambda: True,
    ) -> None:
        """
        Args:
            leads_now: whether this node may answer as leader at this moment (a leader that
                was paused past its check-quorum window must not answer before it steps down).
        """
        self._services = services
        self._follower_app = follower_app
        self._health = health
        self._leads_now = leads_now

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._follower_app(scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] == "/health":
            await _send_json(send, self._health())
            return
        app = self._services.app
        if app is not None and not self._leads_now():
            exc = UnavailableError("this node's leadership is being re-checked; retry shortly")
            await error_doc_answer(exc, "routing").send(send)
            return
        await (app or self._follower_app)(scope, receive, send)


async def _send_json(send: Send, doc: dict[str, object]) -> None:
    body = json.dumps(doc, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
