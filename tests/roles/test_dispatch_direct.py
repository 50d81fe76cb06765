"""The direct path of sync invocations a follower receives, across three in-process nodes on
real loopback sockets: the leader only places them; the input and output go from the
follower to the chosen Spearlet and back (or nowhere, when the follower runs it itself); the
leader keeps the record; node loss, hang-ups and cancels follow docs/dispatch.md."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from spear.errors import SaturatedError, ValidationError
from spear.mesh.codec import MessageCodec
from spear.mesh.members import Member
from spear.node import NodeHandle
from spear.roles import direct_invoke, direct_sync
from spear.roles.direct_invoke import DirectInvoke
from spear.roles.dispatch import SYNC_DIRECT, DispatchProbe, SyncOutcome, SyncPlace, SyncPlaced
from spear.roles.execution_plane import PLANE_MESSAGES
from tests.roles.api_helpers import cluster_client, register, register_wasm
from tests.roles.test_cluster import start_three, wait_leader
from tests.roles.test_dispatch_cluster import FAST_LEASES

Roles = tuple[NodeHandle, NodeHandle, NodeHandle]


async def three_roles(tmp_path: Path, nursery: trio.Nursery) -> tuple[Roles, Any]:
    """(leader, follower, spearlet): the follower receives, the spearlet runs; and the scopes."""
    nodes, scopes = await start_three(
        tmp_path, nursery, dict.fromkeys(("n1", "n2", "n3"), FAST_LEASES)
    )
    with trio.fail_after(30):
        leader = await wait_leader(nodes)
    follower, spearlet = (n for n in nodes if n is not leader)
    return (leader, follower, spearlet), scopes


async def pin(api: httpx.AsyncClient, name: str, node: NodeHandle, **spec: Any) -> None:
    """Register a task pinned to `node`, and wait until the leader can place there."""
    await register(api, name=name, placement={"node_id": node.node_id}, **spec)


async def spin_and_quick(
    admin: httpx.AsyncClient, api: httpx.AsyncClient, node: NodeHandle
) -> None:
    """Pin a spinning task and a quick one to `node`, and wait (one quick call through `api`)
    until the leader can place there."""
    await pin(admin, "spin", node, runtime="process", command=SPIN, timeout_ms=600_000)
    await cat_on(admin, api, "quick", node)


async def cat_on(
    admin: httpx.AsyncClient, api: httpx.AsyncClient, name: str, node: NodeHandle
) -> None:
    """Pin a `/bin/cat` task to `node`, and wait (one call through `api`) until it answers."""
    await pin(admin, name, node, runtime="process", command=["/bin/cat"])
    assert (await api.post(f"/api/v1/tasks/{name}/invoke", content=b"ready")).is_success


def direct_of(follower: NodeHandle) -> DirectInvoke:
    direct = follower.follower._direct
    assert direct is not None
    return direct


async def spin_through(url: str) -> None:
    """One sync call of the spinning task through the node at `url`, on a client of its own
    (cancelling it hangs up)."""
    async with httpx.AsyncClient(base_url=url) as client:
        await client.post("/api/v1/tasks/spin/invoke", content=b"x")


async def running_record(api: httpx.AsyncClient, task: str) -> dict[str, Any]:
    """The record of the task's one execution, once the leader shows it placed."""
    with trio.fail_after(20):
        while True:
            listed = (await api.get("/api/v1/executions", params={"task": task})).json()
            if listed["executions"] and listed["executions"][0].get("node_id"):
                record: dict[str, Any] = listed["executions"][0]
                return record
            await trio.sleep(0.05)


async def test_a_followers_sync_invocations_run_without_the_leader(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (leader, follower, spearlet), _ = await three_roles(tmp_path, nursery)
    big = bytes(range(256)) * 4096  # 1 MiB
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await pin(admin, "there", spearlet, runtime="process", command=["/bin/cat"])
        await pin(admin, "here", follower, runtime="process", command=["/bin/cat"])
        await register_wasm(admin, "upper", "upper")
        # the first call to a pinned node waits (503, retried) until the leader has its report
        for task in ("there", "here"):
            assert (await api.post(f"/api/v1/tasks/{task}/invoke", content=b"ready")).is_success
        before = follower.follower.statistics()
        answer = await api.post("/api/v1/tasks/there/invoke", content=big)
        assert answer.status_code == 200, answer.text
        assert answer.content == big
        assert answer.headers["x-spear-node"] == spearlet.node_id
        assert answer.headers["x-spear-status"] == "succeeded"
        execution_id = answer.headers["x-spear-execution-id"]
        local = await api.post("/api/v1/tasks/here/invoke", content=b"stay")
        assert (local.content, local.headers["x-spear-node"]) == (b"stay", follower.node_id)
        upper = await api.post("/api/v1/tasks/upper/invoke", content=b"hello")
        assert (upper.status_code, upper.content) == (200, b"HELLO")
        after = follower.follower.statistics()
        # Nothing went to the leader's gateway; the runs went straight to their node (one of
        # them on the follower itself), or ran on the leader when it placed one there.
        assert after["relayed"] == before["relayed"]
        assert isinstance(after["direct"], dict) and isinstance(before["direct"], dict)
        grew = {key: after["direct"][key] - before["direct"][key] for key in before["direct"]}
        assert grew["runs"] + grew["leader_answers"] == 3, grew
        assert grew["runs"] >= 2 and grew["local_runs"] >= 1, grew
        # The leader keeps the record and the output, as for the invocations it receives.
        record = (await admin.get(f"/api/v1/executions/{execution_id}")).json()
        assert (record["status"], record["node_id"]) == ("succeeded", spearlet.node_id)
        assert record["output_bytes"] == len(big)
        output = await admin.get(f"/api/v1/executions/{execution_id}/output")
        assert output.content == big
        assert leader.leader.service is not None
        assert leader.leader.service.statistics()["sync_records"] >= 3


async def test_an_idempotent_retry_at_a_follower_gets_the_first_answer(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (leader, follower, spearlet), _ = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await pin(
            admin, "stamp", spearlet, runtime="process", command=["/bin/sh", "-c", "cat; date +%N"]
        )
        key = {"Idempotency-Key": "k-1"}
        first = await api.post("/api/v1/tasks/stamp/invoke", content=b"x", headers=key)
        again = await api.post("/api/v1/tasks/stamp/invoke", content=b"x", headers=key)
        assert first.status_code == again.status_code == 200, first.text
        assert again.content == first.content
        assert again.headers["x-spear-execution-id"] == first.headers["x-spear-execution-id"]
        missing = await api.post("/api/v1/tasks/nope/invoke", content=b"x")
        assert (missing.status_code, missing.json()["error"]) == (404, "not_found")


async def test_a_spearlet_lost_midway_is_a_502_node_lost_recorded_on_the_leader(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (leader, follower, spearlet), scopes = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await pin(
            admin, "slow", spearlet, runtime="process", command=["/bin/sh", "-c", "sleep 30; cat"]
        )
        await cat_on(admin, api, "quick", spearlet)
        answers: list[httpx.Response] = []

        async def call() -> None:
            answers.append(await api.post("/api/v1/tasks/slow/invoke", content=b"x"))

        async with trio.open_nursery() as calls:
            calls.start_soon(call)
            running = await running_record(admin, "slow")
            assert running["node_id"] == spearlet.node_id
            scopes[spearlet.node_id].cancel()
        (answer,) = answers
        assert answer.status_code == 502, answer.text
        error = answer.json()["error"]
        assert error["code"] == "node_lost" and spearlet.node_id in error["message"]
        record = (await admin.get(f"/api/v1/executions/{running['execution_id']}")).json()
        assert (record["status"], record["error"]["code"]) == ("failed", "node_lost")
        assert record["node_id"] == spearlet.node_id
    assert follower.follower.statistics() == {
        "relayed": 0,
        "direct": {"runs": 2, "local_runs": 0, "leader_answers": 0},
    }


SPIN = ["/bin/sh", "-c", "while :; do :; done # test_dispatch_direct"]


def _spinning() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == SPIN]


async def spinning_gone() -> list[psutil.Process]:
    """The spin processes still alive after up to 10 s (waited in a thread: the nodes share
    this test's event loop)."""
    _, alive = await trio.to_thread.run_sync(psutil.wait_procs, _spinning(), 10)
    return list(alive)


async def spinning_started() -> None:
    """Once a spin process runs (so that `spinning_gone` has one to see go)."""
    with trio.fail_after(20):
        while True:
            if await trio.to_thread.run_sync(_spinning):
                return
            await trio.sleep(0.05)


async def ended(api: httpx.AsyncClient, execution_id: str) -> dict[str, Any]:
    """The execution's record once it has ended (or, after 20 s, as it is)."""
    answer = await api.get(f"/api/v1/executions/{execution_id}", params={"wait_ms": 20000})
    assert answer.status_code == 200, (answer.status_code, answer.text)
    record: dict[str, Any] = answer.json()
    return record


@pytest.mark.parametrize(
    ("how", "where"),
    [
        ("hang-up", "spearlet"),
        ("cancel", "spearlet"),
        ("hang-up", "leader"),
        ("cancel", "leader"),
        ("hang-up", "follower"),
        ("cancel", "follower"),
    ],
)
async def test_a_hang_up_or_a_cancel_stops_the_run_on_its_node(
    tmp_path: Path, nursery: trio.Nursery, how: str, where: str
) -> None:
    (leader, follower, spearlet), _ = await three_roles(tmp_path, nursery)
    runner = {"spearlet": spearlet, "leader": leader, "follower": follower}[where]
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await spin_and_quick(admin, api, runner)
        answers: list[httpx.Response] = []

        async def call() -> None:
            if how == "cancel":
                answers.append(await api.post("/api/v1/tasks/spin/invoke", content=b"x"))
                return
            async with httpx.AsyncClient(base_url=follower.http_url) as impatient:
                with trio.move_on_after(60) as hung_up:
                    await impatient.post("/api/v1/tasks/spin/invoke", content=b"x")
                    raise AssertionError("a spinning call answered")
                assert hung_up.cancelled_caught

        async with trio.open_nursery() as calls:
            calls.start_soon(call)
            running = await running_record(admin, "spin")
            if how == "cancel":
                cancelled = await admin.post(f"/api/v1/executions/{running['execution_id']}/cancel")
                assert cancelled.status_code == 200, cancelled.text
            else:
                calls.cancel_scope.cancel()
        if how == "cancel":
            (answer,) = answers
            assert answer.status_code == 409, answer.text
            assert answer.headers["x-spear-status"] == "cancelled"
        record = await ended(admin, running["execution_id"])
        assert (record["status"], record["node_id"]) == ("cancelled", runner.node_id)
    assert await spinning_gone() == []


async def test_an_invocation_placed_on_the_leader_runs_there_and_stays_there(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (leader, follower, _), _ = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await pin(admin, "small", leader, runtime="process", command=["/bin/cat"])
        before = follower.follower.statistics()["direct"]
        answer = await api.post("/api/v1/tasks/small/invoke", content=b"tiny")
        assert (answer.status_code, answer.content) == (200, b"tiny")
        assert answer.headers["x-spear-node"] == leader.node_id
        big = b"b" * (256 * 1024)  # too large to travel with the placement request
        answer = await api.post("/api/v1/tasks/small/invoke", content=big)
        assert (answer.content, answer.headers["x-spear-node"]) == (big, leader.node_id)
        after = follower.follower.statistics()
        assert after["relayed"] == 0
        assert isinstance(before, dict) and isinstance(after["direct"], dict)
        # both ran on the leader, answered there: the small one with its placement, the
        # large one in a second request (the output is never sent back to the leader)
        assert after["direct"]["leader_answers"] - before["leader_answers"] == 2
        assert after["direct"]["runs"] - before["runs"] == 1
        execution_id = answer.headers["x-spear-execution-id"]
        record = (await admin.get(f"/api/v1/executions/{execution_id}")).json()
        assert (record["status"], record["output_bytes"]) == ("succeeded", len(big))


async def test_a_follower_lost_midway_ends_its_record_and_stops_the_run(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (leader, follower, spearlet), scopes = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin:
        async with cluster_client(follower.http_url) as api:
            await spin_and_quick(admin, api, spearlet)

            async with trio.open_nursery() as calls:
                calls.start_soon(spin_through, follower.http_url)
                running = await running_record(admin, "spin")
                scopes[follower.node_id].cancel()  # the follower and its client's call go
                calls.cancel_scope.cancel()
        record = await ended(admin, running["execution_id"])
        # A stopping follower tells the leader it gave up (cancelled); when it cannot, the
        # leader declares the follower lost once its lease has run out.
        assert record["status"] in ("failed", "cancelled"), record
        if record["status"] == "failed":
            assert record["error"]["code"] == "node_lost"
            assert follower.node_id in record["error"]["message"]
    assert await spinning_gone() == []


async def test_a_placement_never_reported_on_ends_its_record(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (leader, follower, spearlet), _ = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin:
        await pin(admin, "quick", spearlet, runtime="process", command=["/bin/cat"])
        async with cluster_client(follower.http_url) as api:
            assert (await api.post("/api/v1/tasks/quick/invoke", content=b"ready")).is_success
        # A follower asks for a placement, then never sends the dispatch nor reports (its
        # answer was lost on the way, say) while it keeps reporting to the leader.
        place = SyncPlace(task="quick", input_bytes=1, timeout_ms=100)
        placed = await follower.cluster.request(leader.node_id, place, 10)
        assert isinstance(placed, SyncPlaced) and placed.node_id == spearlet.node_id
        execution_id = placed.dispatch.execution_id
        record = (await admin.get(f"/api/v1/executions/{execution_id}")).json()
        assert (record["status"], record["node_id"]) == ("running", spearlet.node_id)
        record = (
            await admin.get(f"/api/v1/executions/{execution_id}", params={"wait_ms": 30000})
        ).json()
    assert (record["status"], record["error"]["code"]) == ("failed", "node_lost"), record
    assert follower.node_id in record["error"]["message"]
    assert "deadline" in record["error"]["message"]


@pytest.mark.parametrize("killed", [True, False])
async def test_a_follower_lost_while_the_leader_runs_its_invocation_stops_it(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, killed: bool
) -> None:
    (leader, follower, _), scopes = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin:
        async with cluster_client(follower.http_url) as api:
            await spin_and_quick(admin, api, leader)

            async with trio.open_nursery() as calls:
                calls.start_soon(spin_through, follower.http_url)
                running = await running_record(admin, "spin")
                assert running["node_id"] == leader.node_id
                await spinning_started()
                if killed:  # a node killed outright cancels none of its requests: its links close
                    monkeypatch.setattr(follower.cluster.transport, "_cancel", lambda *_: None)
                scopes[follower.node_id].cancel()
                calls.cancel_scope.cancel()
        record = await ended(admin, running["execution_id"])
        assert record["status"] in ("cancelled", "failed"), record
    assert await spinning_gone() == []


async def test_a_hang_up_after_the_spearlet_heard_a_newer_term_stops_the_guest(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    (leader, follower, spearlet), _ = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await spin_and_quick(admin, api, spearlet)

        async with trio.open_nursery() as calls:
            calls.start_soon(spin_through, follower.http_url)
            running = await running_record(admin, "spin")
            await spinning_started()
            # The Spearlet hears of a newer term, as after a change of leader: the follower's
            # cancel still carries the placement's term, the one the run was admitted under.
            term = leader.leader.term + 1
            probe = DispatchProbe(term=term, leader_id="x", execution_ids=(), attempts=())
            await follower.cluster.request(spearlet.node_id, probe, 5)
            calls.cancel_scope.cancel()  # the client hangs up
        record = await ended(admin, running["execution_id"])
        assert (record["status"], record["node_id"]) == ("cancelled", spearlet.node_id), record
    assert await spinning_gone() == []


async def test_a_report_after_the_leader_gave_up_on_it_is_answered_with_its_output(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    (leader, follower, spearlet), _ = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await cat_on(admin, api, "quick", spearlet)
        direct = direct_of(follower)
        request = direct._request

        async def late(node_id: str, message: object, timeout_s: float) -> object:
            if isinstance(message, SyncOutcome):
                # held up until the leader has ended the record node_lost (no report within
                # the invocation's deadline plus the grace)
                record = await ended(admin, message.execution_id)
                assert record["error"]["code"] == "node_lost", record
            return await request(node_id, message, timeout_s)

        monkeypatch.setattr(direct, "_request", late)
        answer = await api.post(
            "/api/v1/tasks/quick/invoke", content=b"payload", params={"timeout_ms": 100}
        )
        assert (answer.status_code, answer.content) == (200, b"payload"), answer.text
        execution_id = answer.headers["x-spear-execution-id"]
        # the leader took the real outcome into the record it had closed
        record = (await admin.get(f"/api/v1/executions/{execution_id}")).json()
        assert (record["status"], record["node_id"]) == ("succeeded", spearlet.node_id), record
        output = await admin.get(f"/api/v1/executions/{execution_id}/output")
        assert output.content == b"payload"


async def test_a_hang_up_while_an_inline_placement_is_answered_frees_the_slot(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_slot = FAST_LEASES | {"node.max_running": 1}
    nodes, _ = await start_three(tmp_path, nursery, dict.fromkeys(("n1", "n2", "n3"), one_slot))
    with trio.fail_after(30):
        leader = await wait_leader(nodes)
    follower, spearlet = (n for n in nodes if n is not leader)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await cat_on(admin, api, "quick", spearlet)
        direct = direct_of(follower)
        request = direct._request
        placements: list[SyncPlaced] = []
        crossed = trio.Event()

        async def crossing(node_id: str, message: object, timeout_s: float) -> object:
            reply = await request(node_id, message, timeout_s)
            if isinstance(reply, SyncPlaced) and not crossed.is_set():
                placements.append(reply)
                crossed.set()
                await trio.sleep_forever()  # the hang-up lands as the answer comes
            return reply

        monkeypatch.setattr(direct, "_request", crossing)

        async def impatient() -> None:
            async with httpx.AsyncClient(base_url=follower.http_url) as client:
                await client.post("/api/v1/tasks/quick/invoke", content=b"x")

        async with trio.open_nursery() as calls:
            calls.start_soon(impatient)
            with trio.fail_after(20):
                await crossed.wait()
            calls.cancel_scope.cancel()  # the client hangs up
        monkeypatch.setattr(direct, "_request", request)
        (placed,) = placements
        record = await ended(admin, placed.dispatch.execution_id)
        assert record["status"] == "cancelled", record
        again = await api.post("/api/v1/tasks/quick/invoke", content=b"y")  # the one slot
        assert (again.status_code, again.content) == (200, b"y"), again.text


async def test_a_long_run_does_not_keep_the_records_that_ended_after_it(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    few = FAST_LEASES | {"sms.sync_record_limit": 2}
    nodes, _ = await start_three(tmp_path, nursery, dict.fromkeys(("n1", "n2", "n3"), few))
    with trio.fail_after(30):
        leader = await wait_leader(nodes)
    follower, spearlet = (n for n in nodes if n is not leader)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await spin_and_quick(admin, api, spearlet)

        async with trio.open_nursery() as calls:
            calls.start_soon(spin_through, follower.http_url)
            await running_record(admin, "spin")
            for _ in range(4):
                answer = await api.post("/api/v1/tasks/quick/invoke", content=b"q")
                assert answer.status_code == 200, answer.text
            service = leader.leader.service
            assert service is not None
            # the oldest record still runs: the ended ones after it go beyond the limit
            assert service.statistics()["sync_records"] == 2
            calls.cancel_scope.cancel()
    assert await spinning_gone() == []


async def test_a_placement_on_the_follower_by_a_deposed_leader_is_refused_there(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    (leader, follower, _), _ = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await pin(admin, "here", follower, runtime="process", command=["/bin/cat"])
        first = await api.post("/api/v1/tasks/here/invoke", content=b"ready")
        assert (first.status_code, first.headers["x-spear-node"]) == (200, follower.node_id)
        # The follower's Raft state has heard of a newer term than the placing leader's
        # (an election it took part in), which its Spearlet's fence has not learnt yet.
        term = leader.cluster.replicator.soft_state.term
        direct = direct_of(follower)
        monkeypatch.setattr(direct, "_term", lambda: term + 1)
        refused = await api.post("/api/v1/tasks/here/invoke", content=b"stale")
        assert refused.status_code == 503, refused.text
        assert "stale_term" in refused.text or "term" in refused.json()["message"]
        assert refused.content != b"stale"  # it did not run


async def test_a_failure_of_the_followers_own_is_no_hang_up(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    (leader, follower, _), _ = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await cat_on(admin, api, "here", follower)
        direct = direct_of(follower)

        async def broken(dispatch: object) -> object:
            raise RuntimeError("a bug in this node")

        monkeypatch.setattr(direct._functions, "handle", broken)
        answer = await api.post("/api/v1/tasks/here/invoke", content=b"x")
        assert answer.status_code == 500 and answer.json()["error"] == "internal", answer.text
        listed = (await admin.get("/api/v1/executions", params={"task": "here"})).json()
        record = listed["executions"][0]  # the newest
        assert record["status"] == "failed", record
        assert record["error"]["code"] == "node_lost", record  # its fate unknown, not a hang-up


async def test_a_record_the_follower_ends_itself_times_by_one_clock(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    (leader, follower, spearlet), _ = await three_roles(tmp_path, nursery)
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await cat_on(admin, api, "quick", spearlet)
        direct = direct_of(follower)

        async def unanswered(leader: str | None, execution_id: str, result: object) -> None:
            return None  # the leader keeps no record of it: the follower builds its own

        monkeypatch.setattr(direct, "_report_to", unanswered)
        # The wall clock steps an hour ahead once the leader has stamped the start, as the
        # clock of a follower an hour ahead of the leader's would look.
        real = time.time
        placed = direct._run

        async def then_skewed(*args: Any) -> object:
            monkeypatch.setattr(time, "time", lambda: real() + 3600)
            return await placed(*args)

        monkeypatch.setattr(direct, "_run", then_skewed)
        answer = await api.post("/api/v1/tasks/quick/invoke", content=b"x")
        monkeypatch.undo()
        assert (answer.status_code, answer.content) == (200, b"x"), answer.text
        assert 0 <= float(answer.headers["x-spear-duration-ms"]) < 60_000


def test_a_refusal_for_invalid_input_keeps_the_field_it_names() -> None:
    codec = MessageCodec(PLANE_MESSAGES)
    refused = direct_sync._refused("ex-1", ValidationError("too long", field="timeout_ms"))
    carried = codec.decode(codec.encode(refused)).message
    error = direct_invoke._placement_error(carried)
    assert isinstance(error, ValidationError)
    assert (str(error), error.field) == ("too long", "timeout_ms")
    busy = direct_invoke._placement_error(
        codec.decode(codec.encode(direct_sync._refused("ex-2", SaturatedError("full")))).message
    )
    assert isinstance(busy, SaturatedError) and busy.retry_after_s >= 1.0


async def test_a_leader_without_the_direct_path_gets_its_invocations_relayed(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    (leader, follower, spearlet), _ = await three_roles(tmp_path, nursery)
    # every node of this version says it speaks the direct path
    for node in (leader, follower, spearlet):
        seen = follower.cluster.gossip.member(node.node_id)
        assert seen is not None and SYNC_DIRECT in seen.meta.features
    async with cluster_client(leader.http_url) as admin, cluster_client(follower.http_url) as api:
        await cat_on(admin, api, "quick", spearlet)
        before = follower.follower.statistics()
        gossip = follower.cluster.gossip
        real = gossip.member

        def as_older(node_id: str) -> Member | None:  # a leader of an older version
            member = real(node_id)
            if member is None or node_id != leader.node_id:
                return member
            return replace(member, meta=replace(member.meta, features=()))

        monkeypatch.setattr(gossip, "member", as_older)
        answer = await api.post("/api/v1/tasks/quick/invoke", content=b"old")
        assert (answer.status_code, answer.content) == (200, b"old"), answer.text
        after = follower.follower.statistics()
        assert isinstance(before["relayed"], int)
        assert (after["relayed"], after["direct"]) == (before["relayed"] + 1, before["direct"])
