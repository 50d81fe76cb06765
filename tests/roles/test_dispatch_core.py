"""The pure dispatch rules: the Spearlet's Fence, the leader's LeaseBook, the retry backoff."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from spear.model import RetrySpec
from spear.roles.dispatch import (
    LEASE_MARGIN_MIN_S,
    Dispatch,
    Fence,
    LeaseBook,
    retry_delay_s,
)


def dispatch(
    execution_id: str = "ex-1",
    *,
    term: int = 1,
    mode: str = "async",
    attempt: int = 1,
    epoch: int = 1,
) -> Dispatch:
    return Dispatch(
        term=term,
        leader_id="n1",
        execution_id=execution_id,
        attempt=attempt,
        mode=mode,  # type: ignore[arg-type]
        task=b"",
        data=b"",
        timeout_ms=1000,
        acquire_timeout_ms=-1,
        lease_epoch=epoch,
    )


def test_a_command_from_an_older_term_is_refused() -> None:
    fence = Fence()
    fence.renew(term=5, sent_at=0.0, lease_s=4.0)
    refusal = fence.admit(dispatch(term=4), now=1.0)
    assert refusal is not None and refusal[0] == "stale_term"
    assert "term 4" in refusal[1] and "term 5" in refusal[1]
    assert fence.admit(dispatch(term=6), now=1.0) is None
    assert fence.term == 6
    # the newer term now fences the one the lease came from
    assert fence.admit(dispatch("ex-2", term=5), now=1.0) is not None


def test_one_execution_id_never_runs_twice_at_once() -> None:
    fence = Fence()
    fence.renew(term=1, sent_at=0.0, lease_s=4.0)
    assert fence.admit(dispatch(), now=1.0) is None
    refusal = fence.admit(dispatch(attempt=2), now=1.0)
    assert refusal is not None and refusal[0] == "duplicate"
    fence.finish("ex-1")
    assert fence.admit(dispatch(attempt=2), now=1.0) is None


def test_a_cancel_of_at_least_the_admitting_term_stops_the_execution() -> None:
    fence = Fence()
    assert fence.admit(dispatch("ex-5", term=5, mode="sync"), now=0.0) is None
    fence.observe(6)  # a newer leader was heard of meanwhile
    assert not fence.may_cancel("ex-5", 4)  # older than its admission: stale
    assert fence.may_cancel("ex-5", 5)  # its placement's own term still may
    assert not fence.may_cancel("ex-other", 5)  # not running here, and stale
    assert fence.may_cancel("ex-other", 7) and fence.term == 7  # the newest term always may


def test_async_work_needs_a_lease_sync_work_does_not() -> None:
    fence = Fence()
    refusal = fence.admit(dispatch(), now=0.0)
    assert refusal is not None and refusal[0] == "no_lease"
    assert fence.admit(dispatch("ex-sync", mode="sync"), now=0.0) is None
    fence.renew(term=1, sent_at=10.0, lease_s=4.0)
    assert fence.admit(dispatch(), now=13.9) is None
    assert fence.lapsed(13.9) == []
    # the lease counts from when the acknowledged report was sent, not when the ack came
    assert fence.lapsed(14.0) == ["ex-1"]
    assert fence.admit(dispatch("ex-3"), now=14.0) == (
        "no_lease",
        "this node holds no lease from the leader yet (or it lapsed)",
    )


def test_an_ack_from_a_deposed_leader_does_not_renew() -> None:
    fence = Fence()
    fence.renew(term=3, sent_at=0.0, lease_s=4.0)
    fence.renew(term=2, sent_at=3.0, lease_s=4.0)
    assert not fence.holds_lease(4.0)


def test_the_leader_declares_work_lost_only_after_the_spearlet_stopped_it() -> None:
    book = LeaseBook(lease_s=4.0, since=100.0)
    # Nothing heard yet: the leases of the previous leader count from this term's start.
    assert not book.lost("n2", 104.0)
    assert book.lost("n2", 100.0 + 4.0 + max(LEASE_MARGIN_MIN_S, 0.4))
    book.heard("n2", 103.0)
    assert not book.live("n3", 103.0)
    assert book.live("n2", 106.9) and not book.live("n2", 107.0)
    assert book.expires_at("n2") == 103.0 + 4.0 + 0.4
    book.heard("n2", 101.0)  # a late report never moves it back
    assert book.last_heard("n2") == 103.0


@given(
    sent=st.floats(min_value=0, max_value=1000),
    delay=st.floats(min_value=0, max_value=10),
    lease=st.floats(min_value=0.1, max_value=60),
)
def test_the_spearlet_always_stops_before_the_leader_gives_up_on_it(
    sent: float, delay: float, lease: float
) -> None:
    # A report sent at `sent` reaches the leader `delay` later; its ack renews the Spearlet.
    fence = Fence()
    fence.renew(term=1, sent_at=sent, lease_s=lease)
    book = LeaseBook(lease_s=lease, since=0.0)
    book.heard("n2", sent + delay)
    assert fence.lease_until < book.expires_at("n2")


def test_backoff_doubles_with_jitter_up_to_its_cap() -> None:
    retry = RetrySpec(max_attempts=5, backoff_ms=1000, max_backoff_ms=3000)
    rng = random.Random(7)
    for failed, base in [(1, 1.0), (2, 2.0), (3, 3.0), (4, 3.0)]:
        delays = [retry_delay_s(retry, failed, rng) for _ in range(200)]
        assert all(base / 2 <= d <= base for d in delays)
        assert max(delays) - min(delays) > base / 4  # jittered, not fixed
    assert retry_delay_s(retry, 0, rng) == 0.0
    assert retry_delay_s(RetrySpec(backoff_ms=0), 3, rng) == 0.0


def test_a_lease_regained_after_it_lapsed_is_a_new_epoch() -> None:
    fence = Fence()
    fence.renew(term=1, sent_at=0.0, lease_s=4.0, now=0.1)
    assert fence.epoch == 1
    fence.renew(term=1, sent_at=1.0, lease_s=4.0, now=1.1)  # renewed in time: same epoch
    assert fence.epoch == 1
    assert fence.admit(dispatch("ex-b", epoch=1), now=2.0) is None
    fence.renew(term=1, sent_at=9.0, lease_s=4.0, now=9.1)  # lapsed at 5.0: a new epoch
    assert fence.epoch == 2
    # a dispatch sent under the old lease, held up past its lapse, is refused
    refusal = fence.admit(dispatch("ex-c", epoch=1), now=9.2)
    assert refusal is not None and refusal[0] == "stale_lease"


def test_an_attempt_probed_as_not_held_is_refused_when_its_dispatch_comes() -> None:
    fence = Fence()
    fence.renew(term=1, sent_at=0.0, lease_s=4.0)
    assert fence.admit(dispatch("ex-1"), now=1.0) is None
    assert fence.probe("ex-1", 1)
    assert not fence.probe("ex-2", 1)
    refusal = fence.admit(dispatch("ex-2"), now=1.0)
    assert refusal is not None and refusal[0] == "superseded"
    # the next attempt of that execution is a different dispatch: it is taken
    assert fence.admit(dispatch("ex-2", attempt=2), now=1.0) is None
