"""Placement and dispatch across three in-process nodes on real loopback sockets: pins and
labels are honoured, and the async work of a Spearlet that is lost runs again elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from tests.roles.api_helpers import cluster_client, register, register_wasm
from tests.roles.test_cluster import start_three, wait_leader

FAST_LEASES: dict[str, Any] = {"node.report_interval_ms": 100, "sms.spearlet_lease_ms": 1000}


def zones(**by_name: str) -> dict[str, dict[str, Any]]:
    return {name: FAST_LEASES | {"node.labels": {"zone": zone}} for name, zone in by_name.items()}


async def test_pinned_and_labelled_tasks_run_where_they_must(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    nodes, _ = await start_three(tmp_path, nursery, zones(n1="a", n2="b", n3="b"))
    with trio.fail_after(30):
        leader = await wait_leader(nodes)
    by_name = {n.name: n for n in nodes}
    async with cluster_client(by_name["n2"].http_url) as api:
        await register_wasm(api, "upper", "upper")
        upper = (await api.get("/api/v1/tasks/upper")).json()
        pinned = {**upper, "name": "pinned", "placement": {"node_id": by_name["n3"].node_id}}
        zoned = {**upper, "name": "zoned", "placement": {"labels": {"zone": "a"}}}
        for spec in (pinned, zoned):
            for key in ("task_id", "created_at"):
                spec.pop(key)
            await register(api, **spec)
        for _ in range(4):
            answer = await api.post("/api/v1/tasks/pinned/invoke", content=b"x")
            assert answer.headers["x-spear-node"] == by_name["n3"].node_id
            answer = await api.post("/api/v1/tasks/zoned/invoke", content=b"y")
            assert answer.headers["x-spear-node"] == by_name["n1"].node_id
        accepted = await api.post("/api/v1/tasks/pinned/invoke?mode=async", content=b"later")
        execution_id = accepted.json()["execution_id"]
        record = (
            await api.get(f"/api/v1/executions/{execution_id}", params={"wait_ms": 20000})
        ).json()
        assert (record["status"], record["node_id"]) == ("succeeded", by_name["n3"].node_id)
        output = await api.get(f"/api/v1/executions/{execution_id}/output")
        assert output.content == b"LATER"
        # A label no node carries: a clear refusal, nothing runs.
        nowhere = {**pinned, "name": "nowhere", "placement": {"labels": {"zone": "z"}}}
        await register(api, **nowhere)
        refused = await api.post("/api/v1/tasks/nowhere/invoke", content=b"z")
        assert refused.status_code == 503
        assert "zone" in refused.json()["message"]
    assert leader.leader.service is not None


async def test_async_work_of_a_lost_spearlet_runs_again_elsewhere(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    nodes, scopes = await start_three(tmp_path, nursery, zones(n1="a", n2="a", n3="a"))
    with trio.fail_after(30):
        leader = await wait_leader(nodes)
    async with cluster_client(leader.http_url) as api:
        await register(
            api, name="slow", runtime="process", command=["/bin/sh", "-c", "sleep 2; cat"]
        )
        ids = []
        for i in range(6):
            accepted = await api.post("/api/v1/tasks/slow/invoke?mode=async", content=b"%d" % i)
            assert accepted.status_code == 202
            ids.append(accepted.json()["execution_id"])
        # Wait until each runs somewhere, then lose a follower that runs some of them.
        with trio.fail_after(20):
            while True:
                records = [(await api.get(f"/api/v1/executions/{e}")).json() for e in ids]
                if all(r["status"] == "running" for r in records):
                    break
                await trio.sleep(0.05)
        followers = {n.node_id for n in nodes if n is not leader}
        busy = [r["node_id"] for r in records if r["node_id"] in followers]
        assert busy, "placement put no work on a follower"
        victim = busy[0]
        scopes[victim].cancel()
        finals = [
            (await api.get(f"/api/v1/executions/{e}", params={"wait_ms": 30000})).json()
            for e in ids
        ]
    for record, first in zip(finals, records, strict=True):
        assert record["status"] == "succeeded", record
        if first["node_id"] == victim:
            assert record["attempts"] == 2 and record["node_id"] != victim
            lost = record["history"][0]
            assert (lost["node_id"], lost["error"]["code"]) == (victim, "node_lost")
            assert victim in lost["error"]["message"]
        else:
            assert record["attempts"] == 1, record


async def test_a_drained_node_gets_no_new_work(tmp_path: Path, nursery: trio.Nursery) -> None:
    nodes, _ = await start_three(tmp_path, nursery, zones(n1="a", n2="b", n3="b"))
    with trio.fail_after(30):
        await wait_leader(nodes)
    by_name = {n.name: n for n in nodes}
    async with cluster_client(by_name["n1"].http_url) as api:
        await register(
            api,
            name="cat",
            runtime="process",
            command=["/bin/cat"],
            placement={"labels": {"zone": "b"}},
        )
        drained = await api.post(f"/api/v1/nodes/{by_name['n3'].node_id}/drain")
        assert drained.status_code == 200, drained.text
        assert drained.json()["draining"] is True
        # committed drains take effect at the leader's next placement
        for _ in range(20):
            answer = await api.post("/api/v1/tasks/cat/invoke", content=b"x")
            assert answer.headers["x-spear-node"] == by_name["n2"].node_id
        await api.post(f"/api/v1/nodes/{by_name['n2'].node_id}/drain")
        refused = await api.post("/api/v1/tasks/cat/invoke", content=b"x")
        assert refused.status_code == 503
        assert "draining" in refused.json()["message"]
        resumed = await api.post(
            f"/api/v1/nodes/{by_name['n3'].node_id}/drain", json={"enable": False}
        )
        assert resumed.json()["draining"] is False


SPIN_COMMAND = ["/bin/sh", "-c", "while :; do :; done # test_dispatch_cluster"]


async def test_a_hang_up_cancels_the_call_on_the_node_that_runs_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    nodes, _ = await start_three(tmp_path, nursery, zones(n1="a", n2="b", n3="b"))
    with trio.fail_after(30):
        leader = await wait_leader(nodes)
    other = next(n for n in nodes if n is not leader)
    async with cluster_client(leader.http_url) as api:
        await register(
            api,
            name="spin",
            runtime="process",
            command=SPIN_COMMAND,
            timeout_ms=600_000,
            placement={"node_id": other.node_id},
        )
        # Until the leader has heard the pinned node's first report it cannot place there
        # (503, which this client retries): a quick call pinned there waits for that.
        quick = {"name": "quick", "runtime": "process", "command": ["cat"]}
        await register(api, **quick, placement={"node_id": other.node_id})
        ready = await api.post("/api/v1/tasks/quick/invoke", content=b"ready")
        assert (ready.status_code, ready.headers["x-spear-node"]) == (200, other.node_id)
        async with httpx.AsyncClient(
            base_url=leader.http_url, timeout=httpx.Timeout(0.5)
        ) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                await impatient.post("/api/v1/tasks/spin/invoke", content=b"x")
        (listed,) = (await api.get("/api/v1/executions", params={"task": "spin"})).json()[
            "executions"
        ]
        record = (
            await api.get(f"/api/v1/executions/{listed['execution_id']}", params={"wait_ms": 20000})
        ).json()
        assert (record["status"], record["node_id"]) == ("cancelled", other.node_id)
    # The node that ran it was told to stop: its guest process goes (waited for in a thread:
    # the nodes share this test's event loop).
    spinning = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == SPIN_COMMAND]
    _, alive = await trio.to_thread.run_sync(psutil.wait_procs, spinning, 10)
    assert alive == []
