"""Artifact blobs across the cluster: replicated at upload, fetched when missing.

The Raft log carries only an artifact's metadata; its bytes travel beside it over the mesh.
Before the leader commits an upload it pushes the blob to every other voter and requires a
majority of voters (itself included) to hold it, so a leader elected after a crash can find it
on some peer. A node that lacks a blob it needs (a new leader, say) fetches it from whichever
member holds it. Every blob is verified against its sha256 before it is stored, so a node
never runs a wrong or partial artifact.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from spear.errors import SpearError, UnavailableError
from spear.mesh import Inbound, Transport
from spear.roles.artifacts import ArtifactStore

log = logging.getLogger(__name__)

CHUNK_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactPush:
    """Bytes [offset, offset + len(data)) of a blob of `total` bytes (request)."""

    file_id: str
    offset: int
    total: int
    data: bytes


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactPushed:
    """The answer to a push: whether the whole blob is now stored and verified."""

    file_id: str
    complete: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactFetch:
    """Ask a peer for up to `length` bytes of a blob from `offset` (request)."""

    file_id: str
    offset: int
    length: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ArtifactChunk:
    """Part of a blob; `total` is -1 when the peer does not hold it."""

    file_id: str
    offset: int
    total: int
    data: bytes


#: append-only wire tags
ARTIFACT_MESSAGES: dict[str, type] = {
    "artifact.push": ArtifactPush,
    "artifact.pushed": ArtifactPushed,
    "artifact.fetch": ArtifactFetch,
    "artifact.chunk": ArtifactChunk,
}


class ArtifactSync:
    """Moves blobs between this node's ArtifactStore and its peers'."""

    def __init__(
        self,
        *,
        node_id: str,
        artifacts: ArtifactStore,
        transport: Transport,
        address_of: Callable[[str], str | None],
        max_bytes: int,
        timeout_s: float,
    ) -> None:
        """
        Args:
            address_of: a member's mesh address (None while it is unreachable).
            max_bytes: the largest blob accepted from a peer (gateway.max_upload_bytes).
            timeout_s: the time one transfer may take.
        """
        self._node_id = node_id
        self._artifacts = artifacts
        self._transport = transport
        self._address_of = address_of
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._partial: dict[str, bytearray] = {}

    async def replicate(self, file_id: str, voters: Sequence[str]) -> None:
        """Push a stored blob to the other voters; return once a majority of voters hold it.

        Raises:
            UnavailableError: too few voters took it within the time allowed.
        """
        peers = [v for v in voters if v != self._node_id]
        needed = len(voters) // 2 + 1 - (0 if self._node_id not in voters else 1)
        if needed <= 0 or not peers:
            return
        data = await trio.to_thread.run_sync(self._artifacts.read, file_id)
        stored: list[str] = []
        with trio.move_on_after(self._timeout_s):
            async with trio.open_nursery() as nursery:
                for peer in peers:
                    nursery.start_soon(self._push_counted, peer, file_id, data, stored)
        if len(stored) < needed:
            raise UnavailableError(
                f"artifact {file_id} reached {len(stored)} of the {needed} other voters it"
                " must be stored on before it is acknowledged; retry"
            )

    async def _push_counted(self, peer: str, file_id: str, data: bytes, stored: list[str]) -> None:
        try:
            await self._push(peer, file_id, data)
            stored.append(peer)
        except SpearError as exc:
            log.info("artifact %s was not stored on %s: %s", file_id, peer, exc)

    async def _push(self, peer: str, file_id: str, data: bytes) -> None:
        address = self._address_of(peer)
        if address is None:
            raise UnavailableError(f"node {peer} is not reachable")
        for offset in range(0, max(len(data), 1), CHUNK_BYTES):
            chunk = data[offset : offset + CHUNK_BYTES]
            push = ArtifactPush(file_id=file_id, offset=offset, total=len(data), data=chunk)
            reply = await self._transport.request(address, push, timeout_s=self._timeout_s)
            if isinstance(reply, ArtifactPushed) and reply.complete:
                return
        raise UnavailableError(f"node {peer} did not confirm artifact {file_id}")

    async def ensure(self, file_id: str, members: Sequence[str]) -> bool:
        """Make sure this node holds a blob, fetching it from a member; False if none has it."""
        if self._artifacts.has(file_id):
            return True
        for member in members:
            if member == self._node_id or (address := self._address_of(member)) is None:
                continue
            try:
                data = await self._fetch(address, file_id)
            except SpearError as exc:
                log.info("fetching artifact %s from %s failed: %s", file_id, member, exc)
                continue
            if data is not None:
                await trio.to_thread.run_sync(self._artifacts.put, data)
                return True
        return False

    async def _fetch(self, address: str, file_id: str) -> bytes | None:
        parts: list[bytes] = []
        offset, total = 0, None
        while total is None or offset < total:
            ask = ArtifactFetch(file_id=file_id, offset=offset, length=CHUNK_BYTES)
            reply = await self._transport.request(address, ask, timeout_s=self._timeout_s)
            if not isinstance(reply, ArtifactChunk) or reply.total < 0:
                return None
            total = reply.total
            if reply.offset != offset or (not reply.data and offset < total):
                return None
            parts.append(reply.data)
            offset += len(reply.data)
        data = b"".join(parts)
        return data if hashlib.sha256(data).hexdigest() == file_id else None

    # --- serving peers -------------------------------------------------------------------

    async def handle(self, inbound: Inbound) -> bool:
        """Answer an artifact request from a peer; False if the message is not one."""
        message: Any = inbound.message
        if inbound.reply is None:
            return isinstance(message, ArtifactPush | ArtifactFetch)
        if isinstance(message, ArtifactPush):
            await inbound.reply.send(await self._take_push(message))
        elif isinstance(message, ArtifactFetch):
            await inbound.reply.send(await self._serve_fetch(message))
        else:
            return False
        return True

    async def _take_push(self, push: ArtifactPush) -> ArtifactPushed:
        def answer(complete: bool) -> ArtifactPushed:
            return ArtifactPushed(file_id=push.file_id, complete=complete)

        if self._artifacts.has(push.file_id):
            return answer(True)
        if not 0 <= push.total <= self._max_bytes:
            return answer(False)
        buffer = self._partial.setdefault(push.file_id, bytearray())
        if push.offset != len(buffer) or len(buffer) + len(push.data) > push.total:
            self._partial.pop(push.file_id, None)  # out of order: the pusher starts over
            return answer(False)
        buffer += push.data
        if len(buffer) < push.total:
            return answer(False)
        data = bytes(self._partial.pop(push.file_id))
        if hashlib.sha256(data).hexdigest() != push.file_id:
            log.warning("a pushed artifact did not match its id %s; dropped", push.file_id)
            return answer(False)
        await trio.to_thread.run_sync(self._artifacts.put, data)
        return answer(True)

    async def _serve_fetch(self, fetch: ArtifactFetch) -> ArtifactChunk:
        if not self._artifacts.has(fetch.file_id) or fetch.offset < 0 or fetch.length <= 0:
            return ArtifactChunk(file_id=fetch.file_id, offset=fetch.offset, total=-1, data=b"")
        data = await trio.to_thread.run_sync(self._artifacts.read, fetch.file_id)
        length = min(fetch.length, CHUNK_BYTES)
        chunk = data[fetch.offset : fetch.offset + length]
        return ArtifactChunk(
            file_id=fetch.file_id, offset=fetch.offset, total=len(data), data=chunk
        )
