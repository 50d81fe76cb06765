"""A failure inside an async execution costs that attempt, never the node."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from spear.node import NodeHandle
from tests.roles.api_helpers import register_wasm


async def test_an_unexpected_error_fails_the_attempt_and_the_retry_runs(
    api: httpx.AsyncClient, node: NodeHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    await register_wasm(api, "upper", "upper")
    spearlet = node.service._spearlet
    real_execute = spearlet.execute
    calls = 0

    async def broken_once(*args: Any, **kwargs: Any) -> Any:
        # Stands in for a bug below the service: the one failure a real part cannot produce.
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("disk on fire")
        return await real_execute(*args, **kwargs)

    monkeypatch.setattr(spearlet, "execute", broken_once)
    first = (await api.post("/api/v1/tasks/upper/invoke", params={"mode": "async"})).json()
    record = (
        await api.get(f"/api/v1/executions/{first['execution_id']}", params={"wait_ms": 20000})
    ).json()
    # The first attempt failed on the bug; the retry (retry.max_attempts = 2) succeeded.
    assert (record["status"], record["attempts"]) == ("succeeded", 2)
    assert [h["status"] for h in record["history"]] == ["failed", "succeeded"]
    assert record["history"][0]["error"] == {
        "code": "start_failed",
        "message": "spear could not run it: disk on fire",
    }
    second = await api.post("/api/v1/tasks/upper/invoke", params={"mode": "async"}, content=b"ok")
    done = (
        await api.get(
            f"/api/v1/executions/{second.json()['execution_id']}", params={"wait_ms": 20000}
        )
    ).json()
    assert done["status"] == "succeeded"
