"""Async retries through a real node: attempts and their history, the dead-letter list,
redrive, and the refusal of a redrive of what is not dead-lettered."""

from __future__ import annotations

from typing import Any

import httpx

from tests.roles.api_helpers import register


async def finished(api: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    record: dict[str, Any] = (
        await api.get(f"/api/v1/executions/{execution_id}", params={"wait_ms": 20000})
    ).json()
    return record


async def test_a_failing_execution_is_retried_then_dead_lettered_then_redriven(
    api: httpx.AsyncClient,
) -> None:
    await register(
        api,
        name="fails",
        runtime="process",
        command=["/bin/sh", "-c", "echo try >&2; exit 3"],
        retry={"max_attempts": 3, "backoff_ms": 10, "max_backoff_ms": 20},
    )
    accepted = await api.post("/api/v1/tasks/fails/invoke?mode=async", content=b"input")
    execution_id = accepted.json()["execution_id"]
    record = await finished(api, execution_id)
    assert (record["status"], record["attempts"], record["dead_letter"]) == ("failed", 3, True)
    assert [h["attempt"] for h in record["history"]] == [1, 2, 3]
    assert {h["error"]["code"] for h in record["history"]} == {"exit_nonzero"}
    assert record["error"]["code"] == "exit_nonzero"
    listed = (await api.get("/api/v1/executions", params={"dead_letter": "true"})).json()
    assert [r["execution_id"] for r in listed["executions"]] == [execution_id]

    redriven = await api.post(f"/api/v1/executions/{execution_id}/redrive")
    assert redriven.status_code == 200, redriven.text
    assert (redriven.json()["status"], redriven.json()["dead_letter"]) == ("pending", False)
    again = await finished(api, execution_id)
    # the second drive ran its own 3 attempts on the kept input, after the first drive's
    assert (again["status"], again["attempts"], again["dead_letter"]) == ("failed", 3, True)
    attempts = [h.get("attempt") for h in again["history"]]
    assert attempts == [1, 2, 3, None, 1, 2, 3]
    assert "redriven_at" in again["history"][3]
    logs = await api.get(f"/api/v1/executions/{execution_id}/logs")
    assert logs.text == "try\n"


async def test_only_dead_letters_can_be_redriven(api: httpx.AsyncClient) -> None:
    await register(api, name="cat", runtime="process", command=["/bin/cat"])
    accepted = await api.post("/api/v1/tasks/cat/invoke?mode=async", content=b"fine")
    execution_id = accepted.json()["execution_id"]
    record = await finished(api, execution_id)
    assert (record["status"], record["attempts"], record["dead_letter"]) == ("succeeded", 1, False)
    refused = await api.post(f"/api/v1/executions/{execution_id}/redrive")
    assert refused.status_code == 409
    assert "not dead-lettered" in refused.json()["message"]
    missing = await api.post("/api/v1/executions/ex-00000000000000000000/redrive")
    assert missing.status_code == 404
    listed = (await api.get("/api/v1/executions", params={"dead_letter": "true"})).json()
    assert listed["executions"] == []


async def test_a_retry_policy_out_of_range_is_refused_naming_the_field(
    api: httpx.AsyncClient,
) -> None:
    spec = {"name": "bad", "runtime": "process", "command": ["/bin/cat"]}
    resp = await api.post("/api/v1/tasks", json=spec | {"retry": {"max_attempts": 0}})
    assert resp.status_code == 422
    assert "retry.max_attempts" in resp.json()["message"]
    resp = await api.post("/api/v1/tasks", json=spec | {"retry": {"backoff_ms": "soon"}})
    assert resp.status_code == 422
    assert "retry.backoff_ms" in resp.json()["message"]
