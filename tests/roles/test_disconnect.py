"""A sync invocation whose client disconnects is cancelled, in every runtime, through a real
node: its record says `cancelled` and the guest is stopped (its slot is free again)."""

from __future__ import annotations

from typing import Any

import httpx
import psutil
import pytest
import trio

from spear.node import NodeHandle
from tests.roles.api_helpers import register, register_wasm

SPIN_COMMAND = ["/bin/sh", "-c", "while :; do :; done # test_disconnect"]
SPIN_PROCESS: dict[str, Any] = {
    "runtime": "process",
    "command": SPIN_COMMAND,
    "timeout_ms": 600_000,
}


async def invoke_and_hang_up(node: NodeHandle, task: str) -> None:
    # A client that gives up: its read timeout closes the connection mid-call.
    async with httpx.AsyncClient(base_url=node.http_url, timeout=httpx.Timeout(0.5)) as impatient:
        with pytest.raises(httpx.ReadTimeout):
            await impatient.post(f"/api/v1/tasks/{task}/invoke", content=b"x")


async def cancelled_record(api: httpx.AsyncClient, task: str) -> dict[str, Any]:
    listed = (await api.get("/api/v1/executions", params={"task": task})).json()["executions"]
    assert len(listed) == 1, listed
    record: dict[str, Any] = (
        await api.get(f"/api/v1/executions/{listed[0]['execution_id']}", params={"wait_ms": 20000})
    ).json()
    return record


@pytest.mark.parametrize("runtime", ["wasm", "process"])
async def test_a_client_that_disconnects_cancels_its_sync_invocation(
    api: httpx.AsyncClient, node: NodeHandle, runtime: str
) -> None:
    if runtime == "wasm":
        await register_wasm(api, "spin", "spin", timeout_ms=600_000)
    else:
        await register(api, name="spin", **SPIN_PROCESS)
    await invoke_and_hang_up(node, "spin")
    record = await cancelled_record(api, "spin")
    assert record["status"] == "cancelled", record
    assert node.service.statistics()["spearlet"]["running"] == 0
    spinning = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == SPIN_COMMAND]
    _, alive = await trio.to_thread.run_sync(psutil.wait_procs, spinning, 10)
    assert alive == []  # the guest process is gone too
