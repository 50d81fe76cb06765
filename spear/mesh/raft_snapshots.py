"""Snapshots in pieces: how a leader cuts its snapshot into `SnapshotChunk`s that fit the
mesh's frame cap, and how a follower puts them back together (Raft paper section 7).

The transfer is stop-and-wait, like the rest of Raft-lite's replication: the leader sends one
piece, the follower answers how many bytes it holds in order, and the leader sends the piece
from there. The follower installs the snapshot only when the last piece arrived and the
whole matches the announced size and sha256 checksum. A piece of another snapshot or of
another leader's transfer restarts the assembly (at offset 0), or asks for offset 0 when it
is not a first piece; a piece that does not continue the assembly is not used, and the answer
names the offset the follower wants. Pure: no I/O, no clock.
"""

from __future__ import annotations

import hashlib

from spear.mesh.raft_messages import SnapshotChunk
from spear.mesh.raft_types import Snapshot


def snapshot_checksum(snapshot: Snapshot) -> bytes:
    """The sha256 digest of the snapshot's data, as carried in every piece."""
    return hashlib.sha256(snapshot.data).digest()


def snapshot_chunk(
    snapshot: Snapshot, checksum: bytes, offset: int, max_bytes: int, *, term: int, sender: str
) -> SnapshotChunk:
    """The piece of `snapshot` that starts at `offset`, at most `max_bytes` of data."""
    data = snapshot.data[offset : offset + max_bytes]
    return SnapshotChunk(
        term=term,
        sender=sender,
        index=snapshot.index,
        snapshot_term=snapshot.term,
        voters=snapshot.voters,
        learners=snapshot.learners,
        size=len(snapshot.data),
        checksum=checksum,
        offset=offset,
        data=data,
        done=offset + len(data) >= len(snapshot.data),
    )


class SnapshotAssembly:
    """A follower's snapshot as its pieces arrive, from the first piece of one transfer.

    A transfer is one leader term's sending of one snapshot; its identity is what every
    piece repeats (see SnapshotChunk).
    """

    def __init__(self, first: SnapshotChunk) -> None:
        self._key = _identity(first)
        self._first = first
        self._data = bytearray()

    @property
    def received(self) -> int:
        """How many bytes are held, in order from offset 0."""
        return len(self._data)

    def belongs(self, chunk: SnapshotChunk) -> bool:
        """Whether `chunk` is a piece of this transfer."""
        return _identity(chunk) == self._key

    def add(self, chunk: SnapshotChunk) -> bool:
        """Take a piece of this transfer if it continues the data held; say whether it did."""
        end = chunk.offset + len(chunk.data)
        if chunk.offset != len(self._data) or end > self._first.size:
            return False
        self._data += chunk.data
        return True

    def finish(self) -> Snapshot | None:
        """The whole snapshot once every byte arrived and matches its checksum, else None."""
        if len(self._data) != self._first.size:
            return None
        data = bytes(self._data)
        if hashlib.sha256(data).digest() != self._first.checksum:
            return None
        first = self._first
        return Snapshot(
            index=first.index,
            term=first.snapshot_term,
            voters=first.voters,
            learners=first.learners,
            data=data,
        )


def _identity(chunk: SnapshotChunk) -> tuple[object, ...]:
    return (
        chunk.term,
        chunk.sender,
        chunk.index,
        chunk.snapshot_term,
        chunk.voters,
        chunk.learners,
        chunk.size,
        chunk.checksum,
    )
