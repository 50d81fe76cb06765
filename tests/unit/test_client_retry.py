"""The client retries a 503 that reached no leader (an election, a failover), and only that."""

from __future__ import annotations

import httpx
import pytest

from spear.client import SpearClient
from spear.errors import UnavailableError


def answers(*replies: tuple[int, str]) -> tuple[httpx.MockTransport, list[str]]:
    """A fake gateway answering with the given (status, error code) in turn, then 200."""
    seen: list[str] = []
    queue = list(replies)

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if queue:
            status, code = queue.pop(0)
            body = {"error": code, "message": f"{code} for the test"}
            return httpx.Response(status, json=body, headers={"Retry-After": "0"})
        return httpx.Response(200, json={"tasks": []})

    return httpx.MockTransport(handle), seen


def test_no_leader_yet_is_retried_until_one_serves() -> None:
    transport, seen = answers((503, "unavailable"), (503, "not_leader"))
    with SpearClient("http://spear", transport=transport) as client:
        assert client.list_tasks() == []
    assert len(seen) == 3


@pytest.mark.parametrize("code", ["write_lost", "write_outcome_unknown"])
def test_a_write_that_may_have_reached_a_leader_is_not_retried(code: str) -> None:
    transport, seen = answers((503, code))
    with (
        SpearClient("http://spear", transport=transport) as client,
        pytest.raises(UnavailableError) as info,
    ):
        client.list_tasks()
    assert (info.value.code, len(seen)) == (code, 1)


def test_retrying_can_be_turned_off() -> None:
    transport, seen = answers((503, "unavailable"))
    with (
        SpearClient("http://spear", transport=transport, retry_s=0) as client,
        pytest.raises(UnavailableError),
    ):
        client.list_tasks()
    assert len(seen) == 1
