"""The RPC correlation core (pure): ids, peers, deadlines, late and duplicate replies, streams."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from spear.mesh.rpc import ReplyKind, RpcTable


def test_ids_are_positive_increasing_and_unique() -> None:
    table: RpcTable[str] = RpcTable()
    ids = [table.open(peer="p", now=0.0, timeout_s=1.0, waiter=f"w{i}") for i in range(5)]
    assert ids == sorted(set(ids)) and ids[0] >= 1
    table.cancel(ids[-1])
    assert table.open(peer="p", now=0.0, timeout_s=1.0, waiter="x") not in ids


def test_a_reply_goes_to_its_waiter_once() -> None:
    table: RpcTable[str] = RpcTable()
    rid = table.open(peer="p", now=0.0, timeout_s=1.0, waiter="w")
    verdict = table.on_reply(peer="p", request_id=rid, kind=ReplyKind.REPLY, now=0.5)
    assert verdict is not None and (verdict.waiter, verdict.finished) == ("w", True)
    assert table.on_reply(peer="p", request_id=rid, kind=ReplyKind.REPLY, now=0.6) is None
    assert table.statistics().ignored_replies == 1 and len(table) == 0


def test_a_reply_from_another_peer_or_of_the_wrong_kind_is_ignored() -> None:
    table: RpcTable[str] = RpcTable()
    rid = table.open(peer="p", now=0.0, timeout_s=1.0, waiter="w")
    assert table.on_reply(peer="q", request_id=rid, kind=ReplyKind.REPLY, now=0.1) is None
    assert table.on_reply(peer="p", request_id=rid, kind=ReplyKind.ITEM, now=0.1) is None
    assert table.on_reply(peer="p", request_id=rid + 7, kind=ReplyKind.REPLY, now=0.1) is None
    assert table.on_reply(peer="p", request_id=rid, kind=ReplyKind.ERROR, now=0.1) is not None


def test_expiry_removes_exactly_the_overdue_requests() -> None:
    table: RpcTable[str] = RpcTable()
    table.open(peer="p", now=0.0, timeout_s=1.0, waiter="a")
    late = table.open(peer="p", now=0.0, timeout_s=3.0, waiter="b")
    assert table.next_deadline() == 1.0
    assert table.expire(0.999) == []
    assert table.expire(1.0) == ["a"]
    assert table.next_deadline() == 3.0 == table.deadline_of(late)
    assert table.expire(10.0) == ["b"]
    assert table.next_deadline() is None
    assert table.statistics().expired == 2


def test_a_late_reply_after_expiry_is_ignored() -> None:
    table: RpcTable[str] = RpcTable()
    rid = table.open(peer="p", now=0.0, timeout_s=1.0, waiter="w")
    table.expire(2.0)
    assert table.on_reply(peer="p", request_id=rid, kind=ReplyKind.REPLY, now=2.1) is None


def test_stream_items_extend_the_idle_deadline_until_the_end() -> None:
    table: RpcTable[str] = RpcTable()
    rid = table.open(peer="p", now=0.0, timeout_s=1.0, waiter="s", stream=True)
    for t in (0.9, 1.8, 2.7):
        verdict = table.on_reply(peer="p", request_id=rid, kind=ReplyKind.ITEM, now=t)
        assert verdict is not None and not verdict.finished
    assert table.expire(3.0) == []  # the stale first deadline (1.0) does not expire it
    assert table.next_deadline() == pytest.approx(3.7)
    assert table.on_reply(peer="p", request_id=rid, kind=ReplyKind.REPLY, now=3.0) is None
    end = table.on_reply(peer="p", request_id=rid, kind=ReplyKind.END, now=3.1)
    assert end is not None and end.finished and len(table) == 0


def test_fail_peer_returns_only_that_peers_waiters() -> None:
    table: RpcTable[str] = RpcTable()
    table.open(peer="p", now=0.0, timeout_s=1.0, waiter="p1")
    table.open(peer="q", now=0.0, timeout_s=1.0, waiter="q1")
    table.open(peer="p", now=0.0, timeout_s=1.0, waiter="p2", stream=True)
    assert sorted(table.fail_peer("p")) == ["p1", "p2"]
    assert len(table) == 1 and table.statistics().failed == 2


def test_cancel_forgets_a_request() -> None:
    table: RpcTable[str] = RpcTable()
    rid = table.open(peer="p", now=0.0, timeout_s=1.0, waiter="w")
    assert table.cancel(rid) == "w" and table.cancel(rid) is None
    assert table.expire(5.0) == [] and table.next_deadline() is None


def test_a_timeout_must_be_positive() -> None:
    table: RpcTable[str] = RpcTable()
    with pytest.raises(ValueError, match="timeout_s must be > 0, got 0"):
        table.open(peer="p", now=0.0, timeout_s=0.0, waiter="w")


@given(
    st.lists(
        st.tuples(st.sampled_from(["open", "reply", "expire", "cancel"]), st.floats(0, 10)),
        max_size=60,
    )
)
def test_every_request_ends_exactly_once(ops: list[tuple[str, float]]) -> None:
    table: RpcTable[int] = RpcTable()
    now = 0.0
    opened: list[int] = []
    ended: list[int] = []
    for op, x in ops:
        now += x / 10
        if op == "open":
            opened.append(table.open(peer="p", now=now, timeout_s=x + 0.01, waiter=len(opened)))
        elif op == "reply" and opened:
            verdict = table.on_reply(
                peer="p", request_id=opened[int(x) % len(opened)], kind=ReplyKind.REPLY, now=now
            )
            ended += [verdict.waiter] if verdict else []
        elif op == "expire":
            ended += table.expire(now)
        elif op == "cancel" and opened:
            w = table.cancel(opened[int(x) % len(opened)])
            ended += [w] if w is not None else []
        if op == "expire":
            deadline = table.next_deadline()
            assert deadline is None or deadline > now
    ended += table.expire(float("inf"))
    assert sorted(ended) == list(range(len(opened)))
