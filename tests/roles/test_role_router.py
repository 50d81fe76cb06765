"""Every node's HTTP app: leader's app while leading, the proxy otherwise, /health always."""

from __future__ import annotations

import httpx

from spear.roles.invoke_path import Receive, Scope, Send
from spear.roles.leadership import LeaderServices, RoleRouter


def answering(text: str) -> object:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        body = text.encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


async def test_routes_by_role_and_a_leader_out_of_quorum_contact_answers_503() -> None:
    services = LeaderServices()
    leads = [True]
    router = RoleRouter(
        services,
        answering("follower"),  # type: ignore[arg-type]
        lambda: {"status": "ok", "role": "test"},
        lambda: leads[0],
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=router), base_url="http://node"
    ) as client:
        assert (await client.get("/api/v1/tasks")).text == "follower"
        services._publish(None, answering("leader"), 3)  # type: ignore[arg-type]
        assert (await client.get("/api/v1/tasks")).text == "leader"
        leads[0] = False  # paused past the check-quorum window, not yet stepped down
        refused = await client.get("/api/v1/tasks")
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "re-checked" in refused.json()["message"]
        assert (await client.get("/health")).json() == {"status": "ok", "role": "test"}
