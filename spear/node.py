"""A spear node: one nursery tree running store → runtimes → Spearlet → gateway → mesh →
leadership watcher → (while leading) SMS (DESIGN.md section 2).

Every node serves HTTP: the leader's API while it leads, else a proxy to the leader. A node
with no `mesh.join` and `raft.bootstrap_expect = 1` is a one-node cluster that leads at once.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import trio

from spear.config import Config
from spear.errors import ConfigError, SpearError, UnavailableError
from spear.host import HostMetrics
from spear.model import new_node_id
from spear.roles import (
    ArtifactStore,
    NodeInfo,
    SmsState,
    Spearlet,
    TaskService,
    build_app,
    serve_gateway,
)
from spear.roles.cluster import ClusterHandle, is_voter, serve_cluster
from spear.roles.execution_plane import (
    PLANE_MESSAGES,
    build_execution_plane,
    serve_execution_plane,
)
from spear.roles.forwarding import ForwardingApp
from spear.roles.leadership import LeaderServices, RoleRouter, serve_leadership
from spear.runtimes import RuntimeManager, open_runtime_manager
from spear.store import Store, open_store

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class NodeHandle:
    """A running node, as `serve_node` reports it once it serves HTTP (and, for a lone
    node, once it leads)."""

    node_id: str
    name: str
    http_url: str
    data_dir: Path
    cluster: ClusterHandle
    leader: LeaderServices
    #: the gateway app this node serves as a follower (relay and direct invocations)
    follower: ForwardingApp

    @property
    def service(self) -> TaskService:
        """The TaskService of this node while it leads (tests and the demo use it)."""
        if self.leader.service is None:
            raise UnavailableError(f"node {self.name} is not leading right now")
        return self.leader.service


def store_path(config: Config) -> Path:
    if config.store.path:
        return Path(config.store.path)
    return config.data_dir / f"store.{config.store.backend}"


def is_lone(config: Config) -> bool:
    """A node that forms a one-node cluster by itself (the embedded default)."""
    return is_voter(config) and config.raft.bootstrap_expect == 1 and not config.mesh.join


async def serve_node(
    config: Config, *, task_status: trio.TaskStatus[NodeHandle] = trio.TASK_STATUS_IGNORED
) -> None:
    """Run a node until cancelled; `task_status.started(NodeHandle)` once it serves HTTP."""
    data_dir = config.data_dir.resolve()
    if data_dir.exists() and not data_dir.is_dir():
        raise ConfigError(f"node.data_dir {data_dir} is not a directory")
    data_dir.mkdir(parents=True, exist_ok=True)
    with _lock_data_dir(data_dir):
        await _serve_node_locked(config, data_dir, task_status=task_status)


async def _serve_node_locked(
    config: Config, data_dir: Path, *, task_status: trio.TaskStatus[NodeHandle]
) -> None:
    store: Store = await trio.to_thread.run_sync(
        open_store, config.store.backend, store_path(config).resolve()
    )
    try:
        state = SmsState(store)
        await trio.to_thread.run_sync(state.load)
        node_id = state.node_id(new_node_id())
        artifacts = ArtifactStore(data_dir / "files")
        async with open_runtime_manager(
            config.runtimes, data_dir=data_dir, node_id=node_id
        ) as runtimes:
            spearlet = Spearlet(
                node_id=node_id,
                runtimes=runtimes,
                limits=config.runtimes,
                artifacts=artifacts,
                pool=config.pool,
            )
            await _prepare_tasks(spearlet, state)
            # The client outlives the nursery: the gateway forwards with it until the end.
            async with (
                httpx.AsyncClient(
                    timeout=httpx.Timeout(None, connect=config.gateway.graceful_timeout_s)
                ) as upstream,
                trio.open_nursery() as nursery,
            ):
                await nursery.start(spearlet.serve)
                handle = await _serve_roles(
                    nursery, config, data_dir, store, state, spearlet, runtimes, artifacts, upstream
                )
                log.info("node %s (%s) serving %s", handle.name, node_id, handle.http_url)
                if is_lone(config):
                    await handle.leader.wait_serving()
                task_status.started(handle)
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(store.close)


async def _prepare_tasks(spearlet: Spearlet, state: SmsState) -> None:
    for task in state.tasks():
        try:
            await spearlet.prepare(task)
        except SpearError as exc:
            log.warning("task %s (%s) cannot run on this node: %s", task.name, task.task_id, exc)


async def _serve_roles(
    nursery: trio.Nursery,
    config: Config,
    data_dir: Path,
    store: Store,
    state: SmsState,
    spearlet: Spearlet,
    runtimes: RuntimeManager,
    artifacts: ArtifactStore,
    upstream: httpx.AsyncClient,
) -> NodeHandle:
    """Start the gateway, the mesh role and the leadership watcher, in that order."""
    node_id, name = spearlet.node_id, config.node.display_name
    leader = LeaderServices()
    cluster: ClusterHandle | None = None

    def locate_leader() -> str | None:
        return None if cluster is None else cluster.leader_http()

    def health() -> dict[str, object]:
        soft = cluster.replicator.soft_state if cluster else None
        return {
            "status": "ok",
            "node_id": node_id,
            "name": name,
            "role": soft.role if soft else "starting",
            "leader_id": soft.leader_id if soft else None,
            "serving": leader.service is not None,
            # this node's own gossip view (/api/v1/cluster shows the leader's)
            "members": _count_states(cluster) if cluster else {},
        }

    def leads_now() -> bool:
        return cluster is not None and cluster.replicator.leads_now()

    follower = ForwardingApp(locate_leader, node_id=node_id, client=upstream)
    router = RoleRouter(leader, follower, health, leads_now)
    url: str = await nursery.start(serve_gateway, router, config.gateway)
    mesh: ClusterHandle = await nursery.start(
        partial(
            serve_cluster,
            config,
            node_id=node_id,
            data_dir=data_dir,
            store=store,
            state=state,
            artifacts=artifacts,
            http_address=url.removeprefix("http://"),
            runtimes=runtimes.available,
            app_messages=PLANE_MESSAGES,
        )
    )
    cluster = mesh
    info = NodeInfo(
        node_id=node_id,
        name=name,
        http_address=url.removeprefix("http://"),
        mesh_address=mesh.mesh_address,
        labels=dict(config.node.labels),
        runtimes=runtimes.describe(),
    )
    host = HostMetrics(data_dir)
    replicator = mesh.replicator

    # One TaskService and one web app for the node's life: each leadership term only runs
    # the service's async workers (building the app costs a few hundred milliseconds, which
    # would otherwise lengthen every failover).
    plane = build_execution_plane(config, mesh=mesh, spearlet=spearlet, state=state, leader=leader)
    follower.attach_direct(plane.direct)  # sync invocations received as a follower
    await nursery.start(
        partial(
            serve_execution_plane,
            config,
            plane,
            mesh=mesh,
            spearlet=spearlet,
            host=host,
            runtimes=tuple(runtimes.available),
            leader=leader,
        )
    )
    service = TaskService(
        config=config.sms,
        state=state,
        spearlet=spearlet,
        functions=plane.functions,
        dispatcher=plane.dispatcher,
        artifacts=artifacts,
        commit=replicator.commit,
        replicate_file=mesh.replicate_file,
    )
    app = build_app(
        service, info, config.gateway, watchers=nursery, cluster=mesh, nodes=plane.nodes
    )

    async def before_leading() -> None:
        # A new leader may lack blobs uploaded through another: fetch them first.
        for task in state.tasks():
            file_id = task.spec.artifact
            if file_id is not None and not await mesh.ensure_file(file_id):
                log.warning("no member holds artifact %s of task %s", file_id, task.name)
        await _prepare_tasks(spearlet, state)

    await nursery.start(
        partial(
            serve_leadership,
            replicator,
            leader,
            service=service,
            app=app,
            before_leading=before_leading,
        )
    )
    return NodeHandle(
        node_id=node_id,
        name=name,
        http_url=url,
        data_dir=data_dir,
        cluster=mesh,
        leader=leader,
        follower=follower,
    )


def _count_states(cluster: ClusterHandle) -> dict[str, int]:
    counts: dict[str, int] = {}
    for member in cluster.gossip.members():
        counts[member.state.value] = counts.get(member.state.value, 0) + 1
    return counts


@contextmanager
def _lock_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the data directory: two nodes must never share one."""
    fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(
                f"node.data_dir {data_dir} is in use by another spear node (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def run_node(
    config: Config, *, after_start: Callable[[NodeHandle], Awaitable[None]] | None = None
) -> int:
    """Run a node in the foreground until SIGINT or SIGTERM; return the exit code.

    `after_start(handle)`, if given, runs once the node serves (e.g. the demo's walkthrough);
    the node keeps running after it returns. Startup failures (a port in use, a broken store)
    and SpearErrors from `after_start` print one line and return 1.
    """
    failure: BaseException | None = None
    try:
        trio.run(_main, config, after_start)
    except* (SpearError, OSError) as group:
        failure = _first_leaf(group)
    if failure is not None:
        print(f"spear: {_describe_startup_error(failure)}", file=sys.stderr)
        return 1
    return 0


async def _main(
    config: Config, after_start: Callable[[NodeHandle], Awaitable[None]] | None
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_on_signal, signals, nursery.cancel_scope)
            handle = await nursery.start(serve_node, config)
            # Everything loaded so far lives as long as the process: keep the cyclic GC from
            # walking it again at every full collection (measured: lower p50 and p99 under load).
            gc.freeze()
            print(
                f"spear node {handle.name} ({handle.node_id}) is serving {handle.http_url}"
                f" (API docs: {handle.http_url}/docs)",
                flush=True,
            )
            if after_start is not None:
                await after_start(handle)


async def _cancel_on_signal(signals: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for signum in signals:
        log.info("received %s, stopping", signal.Signals(signum).name)
        scope.cancel()
        return


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        exc = exc.exceptions[0]
    return exc


def _describe_startup_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"cannot start the node:{where} {exc.strerror.lower()}"
    return str(exc)
