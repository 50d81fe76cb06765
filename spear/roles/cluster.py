"""The mesh role of a node: transport, membership and Raft wired together (DESIGN.md section 3).

`serve_cluster` opens the authenticated WebSocket transport on `mesh.listen`, runs the SWIM
membership driver and the Raft driver over it, routes inbound messages to them, joins the
seeds in `mesh.join`, and bootstraps Raft Consul-style once `raft.bootstrap_expect`
voter-eligible nodes see each other. Its handle answers who leads (for the gateway of a
follower) and describes the cluster (`GET /api/v1/cluster`).

The cluster key comes from `mesh.join_token`, else from `<data-dir>/join-token` written by an
earlier start, else it is generated and written there (the first node of a cluster).
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio

from spear import wire
from spear.config import Config
from spear.errors import (
    ConfigError,
    ConflictError,
    FrameTooLargeError,
    NotFoundError,
    SpearError,
    WireError,
)
from spear.mesh import (
    RAFT_MESSAGES,
    RAFT_PROFILES,
    SWIM_MESSAGES,
    SWIM_PROFILES,
    BootstrapCandidate,
    ConfigChangeError,
    Inbound,
    MemberMeta,
    Membership,
    MemberState,
    MessageCodec,
    PeerUnreachableError,
    RaftCore,
    Transport,
    choose_bootstrap_voters,
    join_token,
    new_cluster_key,
    parse_join_token,
    serve_transport,
)
from spear.roles.artifact_sync import ARTIFACT_MESSAGES, ArtifactSync
from spear.roles.artifacts import ArtifactStore
from spear.roles.dispatch import SYNC_DIRECT
from spear.roles.gossip import GossipDriver
from spear.roles.raft_storage import RaftStorage
from spear.roles.replication import Replicator
from spear.roles.state import SmsState
from spear.store import Put, Store

log = logging.getLogger(__name__)
_T = TypeVar("_T")

JOIN_TOKEN_FILE = "join-token"
_INCARNATION = b"meta/incarnation"
_PEERS = b"meta/peers"
#: artifact requests from peers served at once, and waiting beyond those
ARTIFACT_WORKERS = 4
ARTIFACT_QUEUE = 64
#: messages for the node's other services (reports, dispatch) waiting to be taken
APP_QUEUE = 1024
_RAFT_TYPES = tuple(RAFT_MESSAGES.values())
_ARTIFACT_TYPES = tuple(ARTIFACT_MESSAGES.values())
#: what a Raft message may carry besides entry or snapshot data (envelope, ids, entry
#: headers, the configuration in each snapshot piece), kept free under mesh.max_frame_bytes
#: (or half of it, for a small cap)
RAFT_FRAME_HEADROOM_BYTES = 64 * 1024
#: the most data one Raft message carries: a larger frame would hold up the heartbeats
#: queued behind it on the link
RAFT_MAX_PAYLOAD_BYTES = 1024 * 1024


def raft_payload_bytes(max_frame_bytes: int) -> int:
    """The entry data per AppendEntries and the snapshot piece size for a frame cap."""
    room = max_frame_bytes - min(RAFT_FRAME_HEADROOM_BYTES, max_frame_bytes // 2)
    return min(RAFT_MAX_PAYLOAD_BYTES, room)


class MemberNotFoundError(NotFoundError):
    """A cluster change names no member of this cluster (HTTP 404)."""

    field = "node_id"


class ClusterChangeRefusedError(ConflictError):
    """A voter or member change was refused by its rule (HTTP 409)."""

    code = "config_change_refused"
    field = "node_id"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterHandle:
    """A running mesh role: its drivers and what the rest of the node asks of them."""

    node_id: str
    join_token: str
    transport: Transport
    gossip: GossipDriver
    replicator: Replicator
    artifacts: ArtifactSync
    #: inbound messages of the types given to serve_cluster as `app_messages`
    app_inbound: trio.MemoryReceiveChannel[Inbound]
    #: this run's gossip incarnation: above every earlier run's
    incarnation: int

    @property
    def mesh_address(self) -> str:
        return self.transport.address

    def leader_http(self) -> str | None:
        """The gateway address of the leader this node knows for the current term."""
        leader = self.replicator.soft_state.leader_id
        if leader is None:
            return None
        member = self.gossip.member(leader)
        if member is None or member.state in (MemberState.DEAD, MemberState.LEFT):
            return None
        return member.meta.http_address or None

    def leader_mesh(self) -> str | None:
        """The mesh address of the leader this node knows for the current term."""
        leader = self.replicator.soft_state.leader_id
        return None if leader is None else self.gossip.address_of(leader)

    async def request(self, node_id: str, message: object, timeout_s: float) -> Any:
        """A request to a member by node id (see Transport.request).

        Raises:
            PeerUnreachableError: the member has no known reachable address.
        """
        address = self.gossip.address_of(node_id)
        if address is None:
            raise PeerUnreachableError(f"node {node_id} has no reachable mesh address")
        return await self.transport.request(address, message, timeout_s=timeout_s)

    def send(self, node_id: str, message: object) -> None:
        """A one-way message to a member by node id; dropped if it has no known address."""
        address = self.gossip.address_of(node_id)
        if address is not None:
            self.transport.send(address, message)

    def is_leader(self) -> bool:
        return self.replicator.soft_state.role == "leader"

    async def replicate_file(self, file_id: str) -> None:
        """Store an uploaded blob on a majority of voters (before its upload is committed)."""
        await self.artifacts.replicate(file_id, self.replicator.core.voters)

    async def ensure_file(self, file_id: str) -> bool:
        """Hold a blob locally, fetched from a member if needed; False if nobody has it."""
        members = [m.node_id for m in self.gossip.members()]
        return await self.artifacts.ensure(file_id, members)

    # --- changes to the voters (the leader's gateway calls these) ---------------------------

    def resolve_member(self, ref: str) -> str:
        """The node id of a member of the Raft configuration or the mesh, by id or name.

        Raises:
            MemberNotFoundError: no member has that id, or no single member that name.
        """
        core = self.replicator.core
        gossip = {m.node_id: m for m in self.gossip.members()}
        if ref in gossip or ref in core.membership.members:
            return ref
        named = [m.node_id for m in gossip.values() if m.meta.name == ref]
        if len(named) == 1:
            return named[0]
        if named:
            raise MemberNotFoundError(
                f"node_id {ref!r} names {len(named)} nodes ({', '.join(sorted(named))});"
                " give a node id"
            )
        raise MemberNotFoundError(
            f"node_id {ref!r} is not a member of this cluster (give a node id or name)"
        )

    async def promote(self, ref: str) -> dict[str, Any]:
        """Make a caught-up learner a voter; the cluster document once committed. A learner
        still catching up is given one (longest) election timeout to match the leader.

        Raises:
            MemberNotFoundError: `ref` names no member.
            ClusterChangeRefusedError: not a learner, not caught up, or a change is pending.
        """
        node_id = self.resolve_member(ref)
        catch_up_s = self.replicator.core.timings.election_timeout_max_s
        await _refused_as_conflict(self.replicator.promote(node_id, catch_up_s=catch_up_s))
        return self.status()

    async def demote(self, ref: str) -> dict[str, Any]:
        """Make a voter a learner; the cluster document once committed.

        Raises:
            MemberNotFoundError: `ref` names no member.
            ClusterChangeRefusedError: not a voter, the last voter, or the voters left could
                not reach their quorum.
        """
        node_id = self.resolve_member(ref)
        await _refused_as_conflict(self.replicator.demote(node_id))
        return self.status()

    async def remove(self, ref: str) -> dict[str, Any]:
        """Take a failed member out of the Raft configuration; the cluster document once
        committed. A member the mesh still sees alive is refused: it would be admitted again
        as a learner at once (stop it first, or demote it).

        Raises:
            MemberNotFoundError: `ref` names no member.
            ClusterChangeRefusedError: alive, not a member of the configuration, the last
                voter, or the voters left could not reach their quorum.
        """
        node_id = self.resolve_member(ref)
        member = self.gossip.member(node_id)
        if member is not None and member.state in (MemberState.ALIVE, MemberState.SUSPECT):
            raise ClusterChangeRefusedError(
                f"node_id {node_id} is {member.state.value} in the mesh and would rejoin as a"
                " learner at once; stop it first, or demote it"
                f" (DELETE /api/v1/cluster/voters/{node_id})"
            )
        await _refused_as_conflict(self.replicator.remove_member(node_id))
        return self.status()

    async def transfer_leadership(self, ref: str) -> dict[str, Any]:
        """Hand leadership to another voter; the cluster document once this node stopped
        leading.

        Raises:
            MemberNotFoundError: `ref` names no member.
            ClusterChangeRefusedError: not another voter, or the transfer did not complete in
                time (this node still leads).
        """
        node_id = self.resolve_member(ref)
        if not await _refused_as_conflict(self.replicator.transfer_leadership(node_id)):
            raise ClusterChangeRefusedError(
                f"node_id {node_id} did not take over leadership in time (it may be behind or"
                " unreachable); this node still leads, retry"
            )
        return self.status()

    def status(self) -> dict[str, Any]:
        """The `GET /api/v1/cluster` document (DESIGN.md section 6)."""
        soft = self.replicator.soft_state
        voters = self.replicator.core.voters
        return {
            "leader_id": soft.leader_id,
            "term": soft.term,
            "voters": list(voters),
            "members": [
                {
                    "node_id": m.node_id,
                    "name": m.meta.name,
                    "state": m.state.value,
                    "voter": m.node_id in voters,
                    "mesh_address": m.meta.mesh_address,
                    "http_address": m.meta.http_address,
                    "runtimes": list(m.meta.runtimes),
                    "labels": dict(m.meta.labels),
                    "incarnation": m.incarnation,
                }
                for m in self.gossip.members()
            ],
            "raft": self.replicator.core.status(),
        }


async def _refused_as_conflict(change: Awaitable[_T]) -> _T:
    try:
        return await change
    except ConfigChangeError as exc:
        raise ClusterChangeRefusedError(str(exc)) from exc


def cluster_key(config: Config, data_dir: Path) -> tuple[bytes, str]:
    """The cluster key and its join token (see the module docstring).

    Raises:
        ConfigError: the join token (configured or stored) is malformed.
    """
    path = data_dir / JOIN_TOKEN_FILE
    if config.mesh.join_token:
        key = parse_join_token(config.mesh.join_token)
    elif path.exists():
        key = parse_join_token(path.read_text())
    elif config.mesh.join:
        raise ConfigError(
            "mesh.join_token is required to join a cluster (--join-token); it is in the first"
            f" node's <data-dir>/{JOIN_TOKEN_FILE}"
        )
    else:
        key = new_cluster_key()
    token = join_token(key)
    if not path.exists() or path.read_text().strip() != token:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        tmp.replace(path)
    return key, token


def is_voter(config: Config) -> bool:
    """Whether this node may be a Raft voter (raft.voter)."""
    if config.raft.voter != "auto":
        return config.raft.voter == "yes"
    return config.raft.bootstrap_expect > 1 or not config.mesh.join


async def serve_cluster(
    config: Config,
    *,
    node_id: str,
    data_dir: Path,
    store: Store,
    state: SmsState,
    artifacts: ArtifactStore,
    http_address: str,
    runtimes: Sequence[str],
    app_messages: dict[str, type] | None = None,
    task_status: trio.TaskStatus[ClusterHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run this node's mesh role until cancelled; `task_status.started(ClusterHandle)`.

    Args:
        app_messages: more message types (tag -> class) for the node's other services;
            inbound ones are queued on the handle's `app_inbound`.
    """
    key, token = await trio.to_thread.run_sync(cluster_key, config, data_dir)
    storage = RaftStorage(store, state)
    durable = await trio.to_thread.run_sync(storage.load)
    incarnation = await trio.to_thread.run_sync(_next_incarnation, store)
    app_messages = app_messages or {}
    codec = MessageCodec({**RAFT_MESSAGES, **SWIM_MESSAGES, **ARTIFACT_MESSAGES, **app_messages})
    app_send, app_inbound = trio.open_memory_channel[Inbound](APP_QUEUE)
    app_types = tuple(app_messages.values())
    async with trio.open_nursery() as nursery:
        try:
            transport: Transport = await nursery.start(
                lambda task_status: serve_transport(
                    node_id=node_id,
                    listen=config.mesh.listen,
                    cluster_key=key,
                    codec=codec,
                    max_frame_bytes=config.mesh.max_frame_bytes,
                    task_status=task_status,
                )
            )
        except* OSError as group:
            exc: BaseException = group
            while isinstance(exc, BaseExceptionGroup):
                exc = exc.exceptions[0]
            reason = (getattr(exc, "strerror", None) or str(exc)).lower()
            raise ConfigError(f"mesh.listen {config.mesh.listen} cannot be used: {reason}") from exc
        now = trio.current_time()
        has_state = (
            durable.hard_state is not None or bool(durable.entries) or bool(durable.snapshot)
        )
        meta = MemberMeta(
            node_id=node_id,
            name=config.node.display_name,
            mesh_address=transport.address,
            http_address=http_address,
            voter=is_voter(config),
            runtimes=tuple(runtimes),
            labels=tuple(sorted(config.node.labels.items())),
            has_raft_state=has_state,
            bootstrap_expect=config.raft.bootstrap_expect,
            features=(SYNC_DIRECT,),
        )
        swim = Membership(
            meta=meta,
            timings=SWIM_PROFILES[config.mesh.profile],
            rng=random.Random(),
            now=now,
            incarnation=incarnation,
        )
        gossip = GossipDriver(swim, transport.send)
        core = RaftCore(
            node_id=node_id,
            timings=RAFT_PROFILES[config.mesh.profile],
            rng=random.Random(),
            now=now,
            hard_state=durable.hard_state,
            entries=durable.entries,
            snapshot=durable.snapshot,
            applied=durable.applied,
            max_payload_bytes=raft_payload_bytes(config.mesh.max_frame_bytes),
        )

        def send_raft(to: str, message: object) -> None:
            address = gossip.last_address(to)
            if address is None:
                return
            try:
                transport.send(address, message)
            except FrameTooLargeError as exc:
                # Only an entry larger than the cap can cause this (pieces and batches are
                # cut to fit): the follower stays behind, the node keeps running.
                log.error("raft: %s to %s not sent: %s", type(message).__name__, to, exc)

        replicator = Replicator(core=core, storage=storage, state=state, send=send_raft)
        sync = ArtifactSync(
            node_id=node_id,
            artifacts=artifacts,
            transport=transport,
            address_of=gossip.address_of,
            max_bytes=config.gateway.max_upload_bytes,
            timeout_s=config.gateway.graceful_timeout_s * 6,
        )
        await nursery.start(gossip.serve)
        await nursery.start(replicator.serve)
        nursery.start_soon(_route_inbound, transport, gossip, replicator, sync, app_send, app_types)
        seeds = sorted({*config.mesh.join, *await trio.to_thread.run_sync(_known_peers, store)})
        if seeds:
            gossip.join(seeds)
        nursery.start_soon(_remember_peers, gossip, store)
        if not has_state and meta.voter:
            nursery.start_soon(_bootstrap_when_ready, gossip, replicator, meta, config)
        nursery.start_soon(_admit_learners, gossip, replicator)
        handle = ClusterHandle(
            node_id=node_id,
            join_token=token,
            transport=transport,
            gossip=gossip,
            replicator=replicator,
            artifacts=sync,
            app_inbound=app_inbound,
            incarnation=incarnation,
        )
        task_status.started(handle)


def _known_peers(store: Store) -> list[str]:
    raw = store.get(_PEERS)
    if raw is None:
        return []
    try:
        peers = wire.loads(raw)
    except WireError:
        return []
    return [p for p in peers if isinstance(p, str)] if isinstance(peers, list) else []


async def _remember_peers(gossip: GossipDriver, store: Store) -> None:
    """Keep the peers' addresses in the store: a restarted node rejoins through them even
    when it was the cluster's seed and has no `mesh.join` of its own."""
    stored: list[str] = []
    while True:
        peers = gossip.peer_addresses()
        if peers and peers != stored:
            await trio.to_thread.run_sync(store.write_batch, [Put(_PEERS, wire.dumps(peers))])
            stored = peers
        await gossip.wait_change()


def _next_incarnation(store: Store) -> int:
    """A restart starts above every incarnation others may hold for this node (rule 1)."""
    raw = store.get(_INCARNATION)
    incarnation = (int(raw) if raw else 0) + 1
    store.write_batch([Put(_INCARNATION, str(incarnation).encode())])
    return incarnation * 1_000_000  # room for refutations within one run


async def _route_inbound(
    transport: Transport,
    gossip: GossipDriver,
    replicator: Replicator,
    sync: ArtifactSync,
    app: trio.MemorySendChannel[Inbound],
    app_types: tuple[type, ...],
) -> None:
    requests_send, requests = trio.open_memory_channel[Inbound](ARTIFACT_QUEUE)
    async with trio.open_nursery() as nursery:
        for _ in range(ARTIFACT_WORKERS):
            nursery.start_soon(_serve_artifact_requests, sync, requests.clone())
        async for inbound in transport.inbound:
            message = inbound.message
            if isinstance(message, _RAFT_TYPES):
                replicator.deliver(message)
            elif isinstance(message, _ARTIFACT_TYPES):
                try:
                    requests_send.send_nowait(inbound)
                except trio.WouldBlock:
                    if inbound.reply is not None:  # bounded: a flood is refused, not queued
                        inbound.reply.fail_nowait("busy", "too many artifact requests; retry")
            elif app_types and isinstance(message, app_types):
                try:
                    app.send_nowait(inbound)
                except trio.WouldBlock:
                    if inbound.reply is not None:
                        inbound.reply.fail_nowait("busy", "this node is overloaded; retry")
            else:
                gossip.deliver(inbound.peer_address, message)


async def _serve_artifact_requests(
    sync: ArtifactSync, requests: trio.MemoryReceiveChannel[Inbound]
) -> None:
    async for inbound in requests:
        await sync.handle(inbound)


async def _bootstrap_when_ready(
    gossip: GossipDriver, replicator: Replicator, meta: MemberMeta, config: Config
) -> None:
    """Consul-style bootstrap: once the expected voter-eligible nodes see each other."""
    expect = config.raft.bootstrap_expect
    while True:
        candidates = [
            BootstrapCandidate(
                node_id=m.node_id,
                has_raft_state=m.meta.has_raft_state,
                bootstrap_expect=m.meta.bootstrap_expect,
            )
            for m in gossip.members()
            if m.meta.voter and m.state is MemberState.ALIVE
        ]
        if any(c.has_raft_state for c in candidates if c.node_id != meta.node_id):
            log.info("raft: a visible node already has raft state; not bootstrapping")
            return
        voters = choose_bootstrap_voters(candidates, expect)
        if voters is not None:
            if meta.node_id in voters:
                log.info("raft: bootstrapping with voters %s", ", ".join(voters))
                await replicator.bootstrap(voters)
                gossip.update_meta(_with_raft_state(meta))
            return
        await gossip.wait_change()


async def _admit_learners(gossip: GossipDriver, replicator: Replicator) -> None:
    """On the leader: every alive member outside the Raft configuration becomes a learner,
    so it follows the log (and knows the leader) without counting towards quorum.

    A refused addition is retried at the next change of the mesh, of leadership, or of the
    applied log (a new leader refuses changes until its term's first entry commits)."""
    while True:
        refused = False
        if replicator.soft_state.role == "leader":
            members = set(replicator.core.voters) | set(replicator.core.learners)
            for member in gossip.members():
                if member.node_id not in members and member.state is MemberState.ALIVE:
                    try:
                        await replicator.add_learner(member.node_id)
                        log.info("raft: %s joined as a learner", member.node_id)
                    except SpearError as exc:
                        log.info("raft: %s not added yet: %s", member.node_id, exc)
                        refused = True
                        break  # retried at the next change
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_cancel_after, gossip.wait_change, nursery.cancel_scope)
            nursery.start_soon(
                _cancel_after, replicator.wait_soft_state_change, nursery.cancel_scope
            )
            if refused:
                applied = partial(replicator.wait_applied, replicator.core.applied_index + 1)
                nursery.start_soon(_cancel_after, applied, nursery.cancel_scope)


async def _cancel_after(wait: Callable[[], Awaitable[object]], scope: trio.CancelScope) -> None:
    await wait()
    scope.cancel()


def _with_raft_state(meta: MemberMeta) -> MemberMeta:
    fields = {name: getattr(meta, name) for name in meta.__dataclass_fields__}
    return MemberMeta(**(fields | {"has_raft_state": True}))
