"""InstallSnapshot in pieces: a snapshot many times the payload cap reaches a follower whole,
through loss, duplication, reordering, restarts and a newer compaction; a piece that does not
fit the assembly is never used."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from spear.mesh.raft import RaftCore
from spear.mesh.raft_messages import AppendEntries, SnapshotChunk, SnapshotChunkReply
from spear.mesh.raft_snapshots import SnapshotAssembly, snapshot_checksum, snapshot_chunk
from spear.mesh.raft_types import SIM, Entry, Snapshot
from tests.mesh.raft_harness import Cluster, Envelope

PAYLOAD = 512


def lagging_cluster(seed: int = 0) -> tuple[Cluster, str, str]:
    """Three voters with small messages; one follower is cut off while the leader compacts
    past it, so it can only catch up from a snapshot much larger than one piece."""
    cluster = Cluster(["a", "b", "c"], seed=seed, auto_compact=True, max_payload_bytes=PAYLOAD)
    leader = cluster.elect()
    lagging = next(n for n in cluster.nodes if n != leader)
    cluster.isolate(lagging)
    for i in range(2 * SIM.snapshot_threshold_entries):
        cluster.propose(leader, f"value {i:04d}".encode() * 3)
        cluster.deliver_all()
    snapshot = cluster.core(leader)._log.snapshot
    assert snapshot is not None and len(snapshot.data) > 8 * PAYLOAD
    assert snapshot.index > cluster.core(lagging).last_index
    cluster.heal()
    return cluster, leader, lagging


def caught_up(cluster: Cluster, leader: str, follower: str) -> bool:
    return cluster.core(follower).commit_index == cluster.core(leader).commit_index


def chunks_in(sent: list[Envelope]) -> list[SnapshotChunk]:
    return [m for _, _, m in sent if isinstance(m, SnapshotChunk)]


def record(cluster: Cluster) -> list[Envelope]:
    """Every message handed to the network from now on (the pool, as it fills)."""
    sent: list[Envelope] = []
    handle = cluster.handle

    def recording(node_id: str, ready: object) -> None:
        sent.extend((node_id, to, m) for to, m in getattr(ready, "messages", ()))
        handle(node_id, ready)  # type: ignore[arg-type]

    cluster.handle = recording  # type: ignore[method-assign]
    return sent


def one_by_one(cluster: Cluster, condition: Callable[[], bool]) -> None:
    """Deliver one message at a time (time moves only when none is in flight) until
    `condition()` holds."""
    for _ in range(1000):
        if condition():
            return
        if cluster.pool:
            cluster.deliver()
        else:
            cluster.advance(SIM.heartbeat_interval_s / 2, deliver=False)
    raise AssertionError("condition not reached")


def test_a_snapshot_many_times_the_cap_arrives_in_pieces() -> None:
    cluster, leader, lagging = lagging_cluster()
    sent = record(cluster)
    cluster.run_until(lambda: caught_up(cluster, leader, lagging))
    pieces = chunks_in(sent)
    assert len(pieces) >= 8
    assert all(len(p.data) <= PAYLOAD for p in pieces)
    assert [p.offset for p in pieces] == sorted(p.offset for p in pieces)  # stop-and-wait
    assert pieces[-1].done and not any(p.done for p in pieces[:-1])
    assert cluster.nodes[lagging].applied == cluster.nodes[leader].applied
    assert cluster.nodes[lagging].disk.snapshot == cluster.core(leader)._log.snapshot


@pytest.mark.parametrize("seed", range(12))
def test_pieces_lost_duplicated_and_reordered_still_make_the_whole(seed: int) -> None:
    cluster, leader, lagging = lagging_cluster(seed)
    rng = random.Random(seed)

    def lossy_step() -> None:
        cluster.advance(SIM.heartbeat_interval_s / 2, deliver=False)
        for _ in range(10_000):
            if not cluster.pool:
                return
            src, dst, message = cluster.pool.pop(rng.randrange(len(cluster.pool)))
            if rng.random() < 0.2:
                continue  # lost
            if rng.random() < 0.1:
                cluster.pool.append((src, dst, message))  # duplicated
            if dst not in cluster.down:
                cluster.handle(dst, cluster.core(dst).step(message, cluster.now))

    for _ in range(2000):
        if caught_up(cluster, leader, lagging) and cluster.leader() == leader:
            break
        lossy_step()
        leader = cluster.leader() or leader
    assert caught_up(cluster, leader, lagging)
    assert cluster.nodes[lagging].applied == cluster.nodes[leader].applied


def test_a_follower_restarted_mid_transfer_starts_again_from_zero() -> None:
    cluster, leader, lagging = lagging_cluster()
    sent = record(cluster)
    one_by_one(cluster, lambda: len(chunks_in(sent)) >= 3)
    cluster.crash(lagging)
    cluster.restart(lagging)  # its half-built snapshot was only in memory
    offsets_before = len(chunks_in(sent))
    cluster.run_until(lambda: caught_up(cluster, leader, lagging))
    later = chunks_in(sent)[offsets_before:]
    assert 0 in [p.offset for p in later]
    assert cluster.nodes[lagging].applied == cluster.nodes[leader].applied


def test_a_transfer_keeps_its_snapshot_when_the_leader_compacts_again() -> None:
    cluster, leader, lagging = lagging_cluster()
    first = cluster.core(leader)._log.snapshot
    assert first is not None
    sent = record(cluster)
    one_by_one(cluster, lambda: len(chunks_in(sent)) >= 2)
    # The leader moves on and compacts again while the transfer is under way.
    cluster.blocked |= {(lagging, leader), (leader, lagging)}
    for i in range(SIM.snapshot_threshold_entries + 1):
        cluster.propose(leader, f"more {i}".encode())
        cluster.deliver_all()
    assert cluster.core(leader)._log.snapshot != first
    before = len(chunks_in(sent))
    cluster.heal()
    cluster.run_until(lambda: caught_up(cluster, leader, lagging))
    resumed = chunks_in(sent)[before]
    assert (resumed.index, resumed.offset) == (first.index, PAYLOAD)  # not started over
    assert cluster.nodes[lagging].applied == cluster.nodes[leader].applied


def test_append_entries_carry_at_most_the_payload_cap() -> None:
    cluster = Cluster(["a", "b", "c"], max_payload_bytes=PAYLOAD)
    leader = cluster.elect()
    lagging = next(n for n in cluster.nodes if n != leader)
    cluster.isolate(lagging)
    for i in range(20):
        cluster.propose(leader, bytes([i]) * 200)
    cluster.propose(leader, b"x" * 3 * PAYLOAD)  # larger than the cap: sent alone
    cluster.deliver_all()
    cluster.heal()
    sent = record(cluster)
    cluster.run_until(lambda: caught_up(cluster, leader, lagging))
    batches = [m.entries for _, _, m in sent if isinstance(m, AppendEntries) and m.entries]
    assert all(sum(len(e.data) for e in b) <= PAYLOAD or len(b) == 1 for b in batches)
    assert max(len(b) for b in batches) > 1


# --- one follower core fed pieces by hand -----------------------------------------------------


def big_snapshot() -> Snapshot:
    data = bytes(random.Random(1).getrandbits(8) for _ in range(5 * PAYLOAD + 7))
    return Snapshot(index=40, term=2, voters=("a", "b"), learners=("f",), data=data)


def pieces(snapshot: Snapshot, *, term: int = 3, sender: str = "a") -> list[SnapshotChunk]:
    checksum = snapshot_checksum(snapshot)
    return [
        snapshot_chunk(snapshot, checksum, offset, PAYLOAD, term=term, sender=sender)
        for offset in range(0, len(snapshot.data), PAYLOAD)
    ]


def follower() -> RaftCore:
    return RaftCore(node_id="f", timings=SIM, rng=random.Random(0), now=0.0)


def feed(core: RaftCore, chunk: SnapshotChunk) -> tuple[SnapshotChunkReply, Snapshot | None]:
    ready = core.step(chunk, 1.0)
    (reply,) = [m for _, m in ready.messages if isinstance(m, SnapshotChunkReply)]
    return reply, ready.snapshot


def test_a_follower_installs_only_when_the_last_piece_arrived() -> None:
    core, snapshot = follower(), big_snapshot()
    parts = pieces(snapshot)
    for part in parts[:-1]:
        reply, installed = feed(core, part)
        assert installed is None and reply.match_index == 0
        assert reply.received == part.offset + len(part.data)
    reply, installed = feed(core, parts[-1])
    assert installed == snapshot and reply.match_index == 40
    assert core.commit_index == 40 and core.learners == ("f",)


def test_a_piece_out_of_order_is_not_used_and_names_the_offset_wanted() -> None:
    core, parts = follower(), pieces(big_snapshot())
    reply, _ = feed(core, parts[2])  # nothing held yet: start again
    assert reply.received == 0 and reply.match_index == 0
    feed(core, parts[0])
    reply, _ = feed(core, parts[2])  # a gap
    assert reply.received == PAYLOAD
    reply, _ = feed(core, parts[0])  # a duplicate
    assert reply.received == PAYLOAD
    for part in parts[1:-1]:
        feed(core, part)
    reply, installed = feed(core, parts[-1])
    assert installed is not None and reply.match_index == 40


def test_a_piece_of_another_leader_term_restarts_the_assembly() -> None:
    core, snapshot = follower(), big_snapshot()
    old, new = pieces(snapshot, term=3), pieces(snapshot, term=4, sender="b")
    feed(core, old[0])
    feed(core, old[1])
    reply, _ = feed(core, new[2])  # the new leader's transfer is not this one
    assert reply.received == 0 and reply.term == 4
    reply, _ = feed(core, new[0])
    assert reply.received == PAYLOAD
    # A piece of the old leader's transfer now comes from a stale term: answered, not used.
    stale = core.step(old[1], 1.0)
    assert stale.snapshot is None
    assert [m.term for _, m in stale.messages] == [4]


def test_a_whole_that_does_not_match_its_checksum_is_refused() -> None:
    core, snapshot = follower(), big_snapshot()
    parts = pieces(snapshot)
    bad = SnapshotChunk(
        **{
            **{f: getattr(parts[1], f) for f in SnapshotChunk.__dataclass_fields__},
            "data": bytes(len(parts[1].data)),
        }
    )
    for part in [parts[0], bad, *parts[2:]]:
        reply, installed = feed(core, part)
        assert installed is None
    assert reply.received == 0 and reply.match_index == 0 and core.commit_index == 0


def test_a_snapshot_the_follower_already_covers_is_acknowledged_at_once() -> None:
    core = follower()
    parts = pieces(big_snapshot())
    for part in parts:
        feed(core, part)
    reply, installed = feed(core, parts[0])
    assert installed is None and reply.match_index == 40


def test_an_assembly_refuses_data_past_the_announced_size() -> None:
    snapshot = big_snapshot()
    parts = pieces(snapshot)
    assembly = SnapshotAssembly(parts[0])
    assert assembly.add(parts[0])
    long = SnapshotChunk(
        **{
            **{f: getattr(parts[1], f) for f in SnapshotChunk.__dataclass_fields__},
            "data": b"x" * (len(snapshot.data) + 1),
        }
    )
    assert not assembly.add(long)
    assert assembly.received == PAYLOAD
    assert assembly.finish() is None  # not whole yet


def test_a_payload_cap_below_one_byte_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="max_payload_bytes must be >= 1, got 0"):
        RaftCore(node_id="f", timings=SIM, rng=random.Random(0), now=0.0, max_payload_bytes=0)


def test_entries_of_a_restored_follower_follow_the_snapshot() -> None:
    core = follower()
    for part in pieces(big_snapshot()):
        feed(core, part)
    message = AppendEntries(
        term=3,
        sender="a",
        prev_index=40,
        prev_term=2,
        entries=(Entry(index=41, term=3, kind="command", data=b"next"),),
        commit_index=41,
    )
    ready = core.step(message, 2.0)
    assert [e.index for e in ready.committed] == [41]
