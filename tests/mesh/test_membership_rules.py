"""One membership core driven by hand: each SWIM/Lifeguard rule on its own."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear.errors import ConfigError
from spear.mesh.members import EventKind, MemberState
from spear.mesh.membership import Membership, Output
from spear.mesh.swim_messages import (
    PROTOCOL_MAX,
    Ack,
    AliveUpdate,
    DeadUpdate,
    Gossip,
    MemberEntry,
    MemberMeta,
    Nack,
    Ping,
    PingRequest,
    PushPull,
    SuspectUpdate,
    Update,
)
from spear.mesh.swim_timings import LAN, SwimTimings


def meta(node: str, **changes: object) -> MemberMeta:
    return MemberMeta(node_id=node, name=node, mesh_address=f"{node}:7946", **changes)  # type: ignore[arg-type]


def alive(node: str, incarnation: int = 0, **changes: object) -> AliveUpdate:
    return AliveUpdate(node_id=node, incarnation=incarnation, meta=meta(node, **changes))


def core(peers: tuple[str, ...] = ("b", "c", "d", "e"), timings: SwimTimings = LAN) -> Membership:
    """Node "a" at time 0 that already knows `peers` as alive at incarnation 0."""
    node = Membership(meta=meta("a"), timings=timings, rng=random.Random(1), now=0.0)
    gossip(node, *(alive(p) for p in peers))
    return node


def gossip(node: Membership, *updates: Update, now: float = 0.0) -> Output:
    return node.step("x:1", Gossip(source_id="x", updates=updates), now)


def state(node: Membership, member: str) -> tuple[MemberState, int] | None:
    found = node.member(member)
    return None if found is None else (found.state, found.incarnation)


def kinds(output: Output) -> list[tuple[EventKind, str]]:
    return [(e.kind, e.member.node_id) for e in output.events]


def sent(output: Output, kind: type) -> list[tuple[str, object]]:
    return [(to, m) for to, m in output.messages if isinstance(m, kind)]


def run_until(
    node: Membership, end: float, answering: frozenset[str] = frozenset()
) -> list[Output]:
    """Tick `node` at each of its deadlines up to `end`; pings to `answering` peers are acked
    at once, every other message is lost."""
    outputs = []
    while node.next_deadline <= end:
        now = node.next_deadline
        out = node.tick(now)
        outputs.append(out)
        for to, message in out.messages:
            peer = to.split(":")[0]
            if isinstance(message, Ping) and peer in answering:
                outputs.append(node.step(to, Ack(seq=message.seq, source_id=peer), now))
    return outputs


EVERYONE = frozenset("bcde")


# --- incarnation precedence (rule 7) ---------------------------------------------------------


def test_new_members_join_and_a_ping_is_answered_with_piggybacked_news() -> None:
    node = core(peers=())
    assert kinds(gossip(node, alive("b"))) == [(EventKind.JOINED, "b")]
    out = node.step("c:7946", Ping(seq=9, target_id="a", source_id="c", source_address="c:7946"), 0)
    [(to, ack)] = sent(out, Ack)
    assert to == "c:7946" and isinstance(ack, Ack) and ack.seq == 9
    assert alive("b") in ack.updates


def test_a_ping_for_another_node_id_is_not_answered() -> None:
    node = core()
    ping = Ping(seq=1, target_id="old", source_id="b", source_address="b:7946")
    assert node.step("b:7946", ping, 0.0).messages == ()


@pytest.mark.parametrize(
    ("update", "expected"),
    [
        (alive("b", 0), (MemberState.ALIVE, 0)),
        (alive("b", 1), (MemberState.ALIVE, 1)),
        (SuspectUpdate(node_id="b", incarnation=0, accuser="c"), (MemberState.SUSPECT, 0)),
        (SuspectUpdate(node_id="b", incarnation=2, accuser="c"), (MemberState.SUSPECT, 2)),
        (DeadUpdate(node_id="b", incarnation=0, accuser="c"), (MemberState.DEAD, 0)),
        (DeadUpdate(node_id="b", incarnation=0, accuser="b"), (MemberState.LEFT, 0)),
    ],
)
def test_updates_about_an_alive_member(update: Update, expected: tuple[MemberState, int]) -> None:
    node = core()
    gossip(node, update)
    assert state(node, "b") == expected


def test_older_incarnations_are_ignored() -> None:
    node = core()
    gossip(node, alive("b", 3))
    out = gossip(
        node,
        SuspectUpdate(node_id="b", incarnation=2, accuser="c"),
        DeadUpdate(node_id="b", incarnation=2, accuser="c"),
        alive("b", 3),
    )
    assert out.events == () and state(node, "b") == (MemberState.ALIVE, 3)


def test_alive_needs_a_higher_incarnation_to_clear_suspect_or_dead() -> None:
    node = core()
    gossip(node, SuspectUpdate(node_id="b", incarnation=1, accuser="c"))
    gossip(node, alive("b", 1))
    assert state(node, "b") == (MemberState.SUSPECT, 1)
    assert kinds(gossip(node, alive("b", 2))) == [(EventKind.ALIVE, "b")]
    gossip(node, DeadUpdate(node_id="b", incarnation=2, accuser="c"))
    gossip(node, alive("b", 2), SuspectUpdate(node_id="b", incarnation=5, accuser="c"))
    assert state(node, "b") == (MemberState.DEAD, 2)
    assert kinds(gossip(node, alive("b", 3))) == [(EventKind.ALIVE, "b")]


def test_new_metadata_at_a_higher_incarnation_is_an_update() -> None:
    node = core()
    out = gossip(node, alive("b", 1, http_address="b:8080", runtimes=("wasm",)))
    assert kinds(out) == [(EventKind.UPDATED, "b")]
    assert out.events[0].member.meta.runtimes == ("wasm",)


# --- refutation (rule 6) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "accusation",
    [
        SuspectUpdate(node_id="a", incarnation=4, accuser="b"),
        DeadUpdate(node_id="a", incarnation=4, accuser="b"),
        alive("a", 4, voter=True),  # someone claims a different self at our incarnation
    ],
)
def test_accusations_are_refuted_with_max_plus_one(accusation: Update) -> None:
    node = Membership(meta=meta("a"), timings=LAN, rng=random.Random(1), now=0.0, incarnation=4)
    gossip(node, alive("b"), accusation)
    assert node.incarnation == 5
    assert node.health_score == 1  # being accused hints that we are the slow one
    ping = Ping(seq=1, target_id="a", source_id="b", source_address="b:7946")
    [(_, ack)] = sent(node.step("b:7946", ping, 0.0), Ack)
    assert isinstance(ack, Ack) and alive("a", 5) in ack.updates
    assert node.statistics().refutations == 1


def test_stale_accusations_about_self_only_repeat_the_current_alive() -> None:
    node = Membership(meta=meta("a"), timings=LAN, rng=random.Random(1), now=0.0, incarnation=4)
    gossip(node, alive("b"), alive("a", 4))
    for _ in range(10):  # use up the retransmit budget of what was queued so far
        node.tick(node.next_deadline)
    # the accuser missed our refutation: the buddy probe's ack must carry it again
    suspect = SuspectUpdate(node_id="a", incarnation=3, accuser="b")
    health = node.health_score
    ping = Ping(seq=1, target_id="a", source_id="b", source_address="b:7946", updates=(suspect,))
    [(_, ack)] = sent(node.step("b:7946", ping, 30.0), Ack)
    assert isinstance(ack, Ack) and ack.updates[0] == alive("a", 4)  # newest first
    assert node.incarnation == 4 and node.health_score == health
    assert node.statistics().refutations == 0


def test_a_refutation_jumps_past_the_accused_incarnation() -> None:
    node = core()
    gossip(node, DeadUpdate(node_id="a", incarnation=9, accuser="b"))
    assert node.incarnation == 10


# --- probing, indirect probes, nacks, awareness (rules 2-4) --------------------------------


def first_probe(node: Membership) -> tuple[float, Ping]:
    while True:
        when = node.next_deadline
        pings = sent(node.tick(when), Ping)
        if pings:
            ping = pings[0][1]
            assert isinstance(ping, Ping)
            return when, ping


def test_a_silent_target_gets_indirect_probes_and_a_direct_retry_then_suspicion() -> None:
    node = core()
    start, ping = first_probe(node)
    target = ping.target_id
    out = node.tick(start + LAN.probe_timeout_s)
    requests = sent(out, PingRequest)
    assert len(requests) == 3 and {to for to, _ in requests}.isdisjoint({f"{target}:7946"})
    assert [to for to, _ in sent(out, Ping)] == [f"{target}:7946"]
    for to, _ in requests:
        node.step(to, Nack(seq=ping.seq, source_id=to[0]), start + 0.7)
    out = node.tick(start + LAN.probe_interval_s)
    assert kinds(out) == [(EventKind.SUSPECT, target)]
    assert node.health_score == 0  # every helper nacked: our own links work


def test_a_member_that_moved_during_a_probe_is_not_accused_for_its_old_address() -> None:
    """§C22: the round probed incarnation 0 at the old address; the member meanwhile came
    back at a new address with incarnation 1: the old silence convicts only incarnation 0."""
    node = core()
    start, ping = first_probe(node)
    target = ping.target_id
    moved = MemberMeta(node_id=target, name=target, mesh_address=f"{target}-new:7946")
    gossip(node, AliveUpdate(node_id=target, incarnation=1, meta=moved), now=start + 0.1)
    out = node.tick(start + LAN.probe_timeout_s)
    out = node.tick(start + LAN.probe_interval_s)
    assert kinds(out) == []
    assert state(node, target) == (MemberState.ALIVE, 1)


def test_missing_nacks_raise_local_health_which_stretches_the_probe_interval() -> None:
    node = core()
    start, _ = first_probe(node)
    node.tick(start + LAN.probe_timeout_s)
    second = start + LAN.probe_interval_s
    [(_, ping)] = sent(node.tick(second), Ping)  # the verdict, and the next round begins
    assert isinstance(ping, Ping)
    assert node.health_score == 3  # three helpers, no nack
    # this round waits 4 x the timeout before going indirect and 4 x the interval in all
    assert sent(node.tick(second + 1.9), PingRequest) == []
    # helpers exclude the target and the member the first round left suspect
    assert len(sent(node.tick(second + 2.0), PingRequest)) == 2
    node.step("x:1", Ack(seq=ping.seq, source_id=ping.target_id), second + 2.5)
    assert node.health_score == 2
    assert [m for _, m in node.tick(second + 3.99).messages if isinstance(m, Ping)] == []
    assert sent(node.tick(second + 4.0), Ping) != []


def test_an_indirect_ack_relayed_by_a_helper_saves_the_target() -> None:
    node = core()
    start, ping = first_probe(node)
    [(helper, _), *_] = sent(node.tick(start + LAN.probe_timeout_s), PingRequest)
    node.step(helper, Ack(seq=ping.seq, source_id=helper[0]), start + 0.8)
    assert kinds(node.tick(start + LAN.probe_interval_s)) == []
    assert node.statistics().probes_failed == 0


def test_a_helper_relays_the_ack_or_nacks_after_the_probe_timeout() -> None:
    node = core()
    request = PingRequest(
        seq=77, target_id="c", target_address="c:7946", source_id="b", source_address="b:7946"
    )
    [(to, ping)] = sent(node.step("b:7946", request, 10.0), Ping)
    assert to == "c:7946" and isinstance(ping, Ping)
    [(to, ack)] = node.step("c:7946", Ack(seq=ping.seq, source_id="c"), 10.1).messages
    assert to == "b:7946" and isinstance(ack, Ack) and ack.seq == 77
    # a second request whose target stays silent gets a nack at the probe timeout
    node.step("b:7946", request, 20.0)
    assert node.next_deadline <= 20.0 + LAN.probe_timeout_s
    assert sent(node.tick(20.49), Nack) == []
    assert sent(node.tick(20.5), Nack) == [("b:7946", Nack(seq=77, source_id="a"))]


def test_probes_to_a_suspect_carry_the_suspicion_first() -> None:
    node = core(peers=("b",))
    gossip(node, SuspectUpdate(node_id="b", incarnation=0, accuser="c"))
    _, ping = first_probe(node)
    assert ping.updates[0] == SuspectUpdate(node_id="b", incarnation=0, accuser="c")


# --- suspicion timers inside the core (rule 5) ---------------------------------------------


def death_time(node: Membership, member: str, end: float) -> float | None:
    for out in run_until(node, end, EVERYONE):
        if (EventKind.DEAD, member) in kinds(out):
            found = node.member(member)
            assert found is not None
            return found.state_changed_at
    return None


def test_suspicion_expires_at_the_max_without_confirmations() -> None:
    node = core()
    gossip(node, SuspectUpdate(node_id="b", incarnation=0, accuser="c"), now=1.0)
    gossip(node, SuspectUpdate(node_id="b", incarnation=0, accuser="c"), now=2.0)  # no news
    # n = 5: min = 4 s, max = 24 s, k = 2; the timer runs from when suspicion began
    assert death_time(node, "b", 40.0) == pytest.approx(25.0)


def test_independent_confirmations_shrink_the_timer_to_the_minimum() -> None:
    node = core()
    gossip(node, SuspectUpdate(node_id="b", incarnation=0, accuser="c"), now=1.0)
    out = gossip(node, SuspectUpdate(node_id="b", incarnation=0, accuser="d"), now=2.0)
    assert out.events == ()  # a confirmation is not a new suspicion...
    gossip(node, SuspectUpdate(node_id="b", incarnation=0, accuser="e"), now=3.0)
    [(_, relayed)] = sent(node.tick(3.0), Gossip)[:1]
    assert isinstance(relayed, Gossip)  # ...but it is spread, so others' timers shrink too
    assert SuspectUpdate(node_id="b", incarnation=0, accuser="e") in relayed.updates
    assert death_time(node, "b", 40.0) == pytest.approx(5.0)


# --- push-pull, leave, reconnect, tombstones (rules 8-11) ----------------------------------


def push_pull(*entries: MemberEntry, reply: bool = False, versions: int = 1) -> PushPull:
    return PushPull(
        source_id="b",
        source_address="b:7946",
        protocol_min=versions,
        protocol_max=versions,
        join=False,
        reply=reply,
        members=entries,
    )


def entry(node: str, incarnation: int, state: MemberState) -> MemberEntry:
    return MemberEntry(meta=meta(node), incarnation=incarnation, state=str(state))


def test_join_sends_push_pull_to_seeds_and_retries_until_a_peer_is_known() -> None:
    node = Membership(meta=meta("a"), timings=LAN, rng=random.Random(1), now=0.0)
    out = node.join(["s1:7946", "a:7946", "s2:7946"], 0.0)
    assert [to for to, m in out.messages if isinstance(m, PushPull) and m.join] == [
        "s1:7946",
        "s2:7946",
    ]
    assert len(sent(node.tick(1.0), PushPull)) == 2
    reply = push_pull(entry("b", 0, MemberState.ALIVE), reply=True)
    out = node.step("s1:7946", reply, 1.2)
    assert kinds(out) == [(EventKind.JOINED, "b")] and sent(out, PushPull) == []
    assert all(not m.join for _, m in sent(node.tick(2.0), PushPull) if isinstance(m, PushPull))


def test_push_pull_merges_and_answers_with_local_state() -> None:
    node = core(peers=("c", "d"))
    out = node.step(
        "b:7946",
        push_pull(
            entry("b", 0, MemberState.ALIVE),
            entry("c", 0, MemberState.DEAD),  # remote dead -> local suspect only
            entry("d", 0, MemberState.LEFT),
            entry("zz", 0, MemberState.DEAD),  # unknown dead: nothing to do
        ),
        5.0,
    )
    [(to, answer)] = sent(out, PushPull)
    assert to == "b:7946" and isinstance(answer, PushPull) and answer.reply
    assert {e.meta.node_id for e in answer.members} == {"a", "c", "d"}
    assert state(node, "c") == (MemberState.SUSPECT, 0)
    assert state(node, "d") == (MemberState.LEFT, 0)
    assert state(node, "b") == (MemberState.ALIVE, 0)
    assert node.member("zz") is None


def test_incompatible_protocol_versions_are_refused() -> None:
    node = core()
    out = node.step(
        "b:7946", push_pull(entry("q", 0, MemberState.ALIVE), versions=PROTOCOL_MAX + 1), 0
    )
    assert out.messages == () and node.member("q") is None
    assert node.statistics().incompatible_peers == 1


def test_leave_gossips_a_self_signed_dead_and_stops_probing() -> None:
    node = core()
    out = node.leave(3.0)
    assert kinds(out) == [(EventKind.LEFT, "a")]
    gossips = sent(out, Gossip)
    assert len(gossips) == LAN.gossip_fanout
    left = DeadUpdate(node_id="a", incarnation=0, accuser="a")
    assert all(isinstance(m, Gossip) and left in m.updates for _, m in gossips)
    outputs = run_until(node, 100.0)
    assert not any(sent(o, Ping) or sent(o, PushPull) for o in outputs)
    gossip(node, SuspectUpdate(node_id="a", incarnation=0, accuser="b"))
    assert node.incarnation == 0  # a left node refutes nothing


def test_left_members_are_recorded_as_left_and_never_reconnected() -> None:
    node = core(peers=("b", "c"))
    gossip(node, DeadUpdate(node_id="b", incarnation=0, accuser="b"), now=1.0)
    gossip(node, DeadUpdate(node_id="c", incarnation=0, accuser="d"), now=1.0)
    targets = [to for out in run_until(node, 65.0) for to, _ in sent(out, PushPull)]
    assert targets.count("c:7946") >= 1  # reconnect: push-pull to the dead member
    assert "b:7946" not in targets


def test_tombstones_expire_and_forgotten_members_are_removed() -> None:
    timings = SwimTimings(tombstone_expiry_s=100.0)
    node = core(peers=("b", "c"), timings=timings)
    gossip(node, DeadUpdate(node_id="b", incarnation=0, accuser="c"), now=10.0)
    events = [
        (e.kind, e.member.node_id) for o in run_until(node, 200.0, EVERYONE) for e in o.events
    ]
    assert events == [(EventKind.REMOVED, "b")]
    assert node.member("b") is None and state(node, "c") == (MemberState.ALIVE, 0)
    assert "b" not in [m for o in run_until(node, 300.0, EVERYONE) for m, _ in o.messages]


def test_update_meta_bumps_the_incarnation_and_gossips() -> None:
    node = core()
    out = node.update_meta(meta("a", voter=True, labels=(("zone", "z1"),)), 1.0)
    assert kinds(out) == [(EventKind.UPDATED, "a")] and node.incarnation == 1
    gossips = [m for o in run_until(node, 1.5) for _, m in sent(o, Gossip)]
    assert any(
        isinstance(m, Gossip)
        and any(isinstance(u, AliveUpdate) and u.meta.voter for u in m.updates)
        for m in gossips
    )
    with pytest.raises(ConfigError, match="node_id is permanent"):
        node.update_meta(meta("z"), 2.0)


def test_next_deadline_is_finite_while_members_exist_and_statistics_count_states() -> None:
    node = core()
    assert math.isfinite(node.next_deadline)
    gossip(node, DeadUpdate(node_id="b", incarnation=0, accuser="c"))
    stats = node.statistics()
    assert (stats.alive, stats.dead, stats.suspect, stats.left) == (4, 1, 0, 0)
    assert [m.node_id for m in node.members()] == ["a", "b", "c", "d", "e"]


def test_unknown_messages_and_foreign_updates_are_ignored() -> None:
    node = core()
    assert node.step("b:7946", object(), 0.0) == Output()
    weird = Gossip(source_id="b", updates=("junk",))  # type: ignore[arg-type]
    assert node.step("b:7946", weird, 0.0).events == ()
    mismatched = AliveUpdate(node_id="q", incarnation=0, meta=meta("other"))
    assert gossip(node, mismatched).events == ()


# --- properties over arbitrary update sequences ---------------------------------------------

subjects = st.sampled_from(["a", "b"])
small = st.integers(min_value=0, max_value=6)
any_update = st.one_of(
    st.builds(lambda n, i: alive(n, i), subjects, small),
    st.builds(
        lambda n, i, by: SuspectUpdate(node_id=n, incarnation=i, accuser=by),
        subjects,
        small,
        st.sampled_from("bcd"),
    ),
    st.builds(
        lambda n, i, by: DeadUpdate(node_id=n, incarnation=i, accuser=by),
        subjects,
        small,
        st.sampled_from("bcd"),
    ),
)


@given(st.lists(any_update, max_size=30))
def test_incarnations_never_go_back_and_accusations_about_self_are_always_beaten(
    updates: list[Update],
) -> None:
    node = core(peers=("b", "c", "d"))
    seen_b = 0
    for update in updates:
        before = state(node, "b")
        gossip(node, update)
        after = state(node, "b")
        assert before is not None and after is not None
        assert after[1] >= before[1]
        seen_b = max(seen_b, after[1])
        if before[0] in (MemberState.DEAD, MemberState.LEFT) and after[0] != before[0]:
            assert isinstance(update, AliveUpdate) and update.incarnation > before[1]
        if update.node_id == "a" and not isinstance(update, AliveUpdate):
            assert node.incarnation > update.incarnation
    assert state(node, "a") == (MemberState.ALIVE, node.incarnation)
    final = state(node, "b")
    assert final is not None and final[1] == seen_b
    stats = node.statistics()
    assert node._table.live_count() == stats.alive + stats.suspect  # the incremental count
