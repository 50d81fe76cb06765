"""The Raft core's durable state in the node's Store, next to the state machine it feeds.

Store layout (values are CBOR):
    raft/hard                  {"term", "voted_for"}
    raft/log/<index, 20 digits> {"index", "term", "kind", "data"}
    raft/snapshot              {"index", "term", "voters", "learners", "data"}

The replicated state machine (spear.roles.state) lives in the same store, so installing a
snapshot received from the leader (new state, snapshot record, log wiped) is one atomic batch:
a crash leaves either the old state and log or the new ones, never a mix. Every batch is
synced by the store before `persist` returns, which is what lets the driver send the Ready's
messages afterwards (research/mesh.md rule 14).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from spear import wire
from spear.errors import StoreError, WireError
from spear.mesh import Entry, HardState, Ready, Snapshot
from spear.roles.state import SmsState
from spear.store import Delete, Put, Store, WriteOp

_HARD = b"raft/hard"
_LOG = b"raft/log/"
_SNAPSHOT = b"raft/snapshot"


def _log_key(index: int) -> bytes:
    return _LOG + b"%020d" % index


@dataclass(frozen=True, slots=True, kw_only=True)
class DurableRaftState:
    """What a restarting node hands its RaftCore."""

    hard_state: HardState | None
    entries: tuple[Entry, ...]
    snapshot: Snapshot | None
    applied: int


class RaftStorage:
    """Loads and persists a node's Raft state; blocking (drivers call it in a worker thread)."""

    def __init__(self, store: Store, state: SmsState) -> None:
        self._store = store
        self._state = state

    def load(self) -> DurableRaftState:
        """The durable state as the last synced batch left it.

        Raises:
            StoreError: a stored record is malformed (named by its key).
        """
        hard = self._store.get(_HARD)
        snap = self._store.get(_SNAPSHOT)
        entries = tuple(_entry(key, value) for key, value in self._store.scan(_LOG))
        snapshot = None if snap is None else _snapshot(_doc(_SNAPSHOT, snap))
        applied = max(self._state.applied_index(), snapshot.index if snapshot else 0)
        return DurableRaftState(
            hard_state=None if hard is None else _hard_state(_doc(_HARD, hard)),
            entries=entries,
            snapshot=snapshot,
            applied=applied,
        )

    def persist(self, ready: Ready) -> None:
        """Durably write the Ready's snapshot, truncation, entries and hard state, in order."""
        ops: list[WriteOp] = []
        if ready.snapshot is not None:
            ops += [Delete(key) for key, _ in self._store.scan(_LOG)]
            ops.append(Put(_SNAPSHOT, wire.dumps(_snapshot_doc(ready.snapshot))))
        elif ready.truncate_from is not None:
            start = _log_key(ready.truncate_from - 1) if ready.truncate_from > 0 else None
            ops += [Delete(key) for key, _ in self._store.scan(_LOG, start_after=start)]
        ops += [Put(_log_key(e.index), wire.dumps(_entry_doc(e))) for e in ready.entries]
        if ready.hard_state is not None:
            hard = {"term": ready.hard_state.term, "voted_for": ready.hard_state.voted_for}
            ops.append(Put(_HARD, wire.dumps(hard)))
        if ready.snapshot is not None:
            self._state.restore(ready.snapshot.data, index=ready.snapshot.index, extra=ops)
        elif ops:
            self._store.write_batch(ops)

    def save_snapshot(self, snapshot: Snapshot) -> None:
        """Store a snapshot this node took of its applied state; drop the entries it covers."""
        ops: list[WriteOp] = [Put(_SNAPSHOT, wire.dumps(_snapshot_doc(snapshot)))]
        covered = self._store.scan(_LOG, start_after=None)
        ops += [Delete(key) for key, _ in covered if int(key[len(_LOG) :]) <= snapshot.index]
        self._store.write_batch(ops)


def _doc(key: bytes, raw: bytes) -> dict[str, Any]:
    try:
        doc = wire.loads(raw, max_bytes=len(raw))
    except WireError as exc:
        raise StoreError(f"the Raft record {key.decode()} is corrupt: {exc}") from exc
    if not isinstance(doc, dict):
        raise StoreError(f"the Raft record {key.decode()} is corrupt: not a map")
    return doc


def _entry_doc(entry: Entry) -> dict[str, Any]:
    return {"index": entry.index, "term": entry.term, "kind": entry.kind, "data": entry.data}


def _entry(key: bytes, raw: bytes) -> Entry:
    doc = _doc(key, raw)
    try:
        return Entry(
            index=int(doc["index"]),
            term=int(doc["term"]),
            kind=str(doc["kind"]),
            data=bytes(doc["data"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"the Raft record {key.decode()} is corrupt: {exc}") from exc


def _snapshot_doc(snapshot: Snapshot) -> dict[str, Any]:
    return {
        "index": snapshot.index,
        "term": snapshot.term,
        "voters": list(snapshot.voters),
        "learners": list(snapshot.learners),
        "data": snapshot.data,
    }


def _snapshot(doc: dict[str, Any]) -> Snapshot:
    try:
        return Snapshot(
            index=int(doc["index"]),
            term=int(doc["term"]),
            voters=tuple(str(v) for v in doc["voters"]),
            learners=tuple(str(v) for v in doc["learners"]),
            data=bytes(doc["data"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"the Raft record raft/snapshot is corrupt: {exc}") from exc


def _hard_state(doc: dict[str, Any]) -> HardState:
    voted = doc.get("voted_for")
    try:
        return HardState(term=int(doc["term"]), voted_for=None if voted is None else str(voted))
    except (KeyError, TypeError, ValueError) as exc:
        raise StoreError(f"the Raft record raft/hard is corrupt: {exc}") from exc
