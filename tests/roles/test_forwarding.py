"""A follower's gateway forwards every request to the leader, streamed, and never loops."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio

from spear.config import GatewayConfig
from spear.node import NodeHandle
from spear.roles.forwarding import FORWARDED_BY, ForwardingApp
from spear.roles.gateway import serve_gateway
from tests.roles.api_helpers import register_wasm

UPPER = "upper"


class Leader:
    """Which gateway the follower should forward to (changed by tests)."""

    def __init__(self) -> None:
        self.address: str | None = None

    def __call__(self) -> str | None:
        return self.address


@pytest.fixture
def leader() -> Leader:
    return Leader()


@pytest.fixture
async def follower(nursery: trio.Nursery, leader: Leader) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as upstream:
        app = ForwardingApp(leader, node_id="nd-follower", client=upstream, retry_after_s=2)
        config = GatewayConfig(http="127.0.0.1:0")
        url: str = await nursery.start(serve_gateway, app, config)
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            yield client


def _hostport(node: NodeHandle) -> str:
    return node.http_url.removeprefix("http://").rstrip("/")


async def test_every_api_call_is_relayed_to_the_leader(
    node: NodeHandle, leader: Leader, follower: httpx.AsyncClient
) -> None:
    leader.address = _hostport(node)
    upload = await follower.post("/api/v1/files", content=b"x" * 300_000)
    assert upload.status_code == 201
    file_id = upload.json()["file_id"]
    listed = await follower.get("/api/v1/files", params={"limit": 10})
    assert [f["file_id"] for f in listed.json()["files"]] == [file_id]
    content = await follower.get(f"/api/v1/files/{file_id}/content")
    assert content.content == b"x" * 300_000


async def test_invocations_and_their_headers_pass_through(
    node: NodeHandle, leader: Leader, follower: httpx.AsyncClient
) -> None:
    leader.address = _hostport(node)
    await register_wasm(follower, UPPER, "upper")
    answer = await follower.post(f"/api/v1/tasks/{UPPER}/invoke", content=b"hello")
    assert answer.status_code == 200, answer.text
    assert answer.content == b"HELLO"
    assert answer.headers["x-spear-status"] == "succeeded"
    assert answer.headers["x-spear-node"] == node.node_id
    assert answer.headers[FORWARDED_BY] == "nd-follower"  # the relaying node names itself
    for once in ("date", "server"):  # the follower's server sets these, not the leader's
        assert len(answer.headers.get_list(once)) == 1, answer.headers
    missing = await follower.get("/api/v1/tasks/nope")
    assert missing.status_code == 404
    assert missing.json()["error"] == "not_found"


async def test_no_known_leader_is_a_503_with_retry_after(follower: httpx.AsyncClient) -> None:
    answer = await follower.get("/api/v1/tasks")
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "2"
    assert "no leader" in answer.json()["message"]


async def test_an_unreachable_leader_is_a_503(leader: Leader, follower: httpx.AsyncClient) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        leader.address = f"127.0.0.1:{sock.getsockname()[1]}"  # bound, not listening
        answer = await follower.get("/api/v1/tasks")
    assert answer.status_code == 503
    assert "cannot be reached" in answer.json()["message"]


async def test_an_already_forwarded_request_is_not_forwarded_again(
    node: NodeHandle, leader: Leader, follower: httpx.AsyncClient
) -> None:
    leader.address = _hostport(node)
    answer = await follower.get("/api/v1/tasks", headers={FORWARDED_BY: "nd-other"})
    assert answer.status_code == 503
    assert "leader just changed" in answer.json()["message"]
