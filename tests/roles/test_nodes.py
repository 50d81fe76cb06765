"""The node registry: status rules at explicit times, drain through the replicated state, the
documents, the routes of the real gateway app, the report loop, and reports over a real mesh."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from spear.config import GatewayConfig
from spear.errors import NotFoundError, UnavailableError
from spear.host import HostMetrics
from spear.mesh import Member, MemberMeta, MemberState, MessageCodec, RemoteError, Transport
from spear.mesh.transport import serve_transport
from spear.model import TaskRecord, TaskSpec, new_task_id
from spear.node import NodeHandle
from spear.roles.gateway import NodeInfo, build_control_app
from spear.roles.nodes import (
    NODE_MESSAGES,
    OFFLINE_INTERVALS,
    ONLINE_INTERVALS,
    NodeReport,
    NodeService,
    ReportAck,
    answer_report,
    pool_gauges,
    report_sender,
    resolve_slots,
    serve_reports,
)
from spear.roles.state import Command, DrainNode, RegisterTask, SmsState
from spear.store import open_store

INTERVAL_S = 1.0
LEADER = MemberMeta(
    node_id="nd-a",
    name="alpha",
    mesh_address="127.0.0.1:1",
    http_address="127.0.0.1:2",
    voter=True,
    runtimes=("wasm", "process"),
    labels=(("zone", "z1"),),
)
PEER = MemberMeta(node_id="nd-b", name="beta", mesh_address="127.0.0.1:3", runtimes=("wasm",))
TASK = TaskRecord(
    task_id=new_task_id(),
    spec=TaskSpec.model_validate({"name": "w", "runtime": "wasm", "artifact": "a" * 64}),
    created_at=1.0,
)


def member(meta: MemberMeta, state: MemberState = MemberState.ALIVE) -> Member:
    return Member(meta=meta, state=state, incarnation=1, state_changed_at=0.0)


def report(node_id: str, seq: int = 1, **fields: Any) -> NodeReport:
    values: dict[str, Any] = {
        "resources": {
            "cpu_count": 2,
            "cpu_percent": 12.5,
            "memory_total_bytes": 1000,
            "memory_available_bytes": 400,
            "load_1m": 0.5,
        },
        "slots": 16,
        "running": 1,
        "pools": {
            TASK.task_id: {"instances": 2, "idle": 1, "busy": 1, "waiting": 0, "max_instances": 4}
        },
        "runtimes": ("wasm",),
    } | fields
    return NodeReport(node_id=node_id, seq=seq, **values)


class Registry:
    """A NodeService over a real SmsState (in-memory store), with a gossip view to change."""

    def __init__(self, local: MemberMeta = LEADER) -> None:
        self.state = SmsState(open_store("memory", None))
        self.state.apply(RegisterTask(record=TASK))
        self.members = [member(local), member(PEER)]
        self.commits: list[Command] = []

        async def commit(command: Command) -> None:
            self.commits.append(command)
            self.state.apply(command)

        self.service = NodeService(
            local=local,
            state=self.state,
            commit=commit,
            interval_s=INTERVAL_S,
            members=lambda: self.members,
            voters=lambda: (local.node_id,),
            term=lambda: 7,
        )


@pytest.fixture
def registry() -> Registry:
    return Registry()


# --- status ------------------------------------------------------------------------------------


def status(registry: Registry, node_id: str, now: float) -> str:
    return str(registry.service.node(node_id, now)["status"])


def test_a_reporting_alive_node_is_online_until_its_reports_stop(registry: Registry) -> None:
    ack = registry.service.on_report(report("nd-b"), 100.0)
    assert ack == ReportAck(term=7, leader_id="nd-a")
    assert status(registry, "nd-b", 100.0) == "online"
    assert status(registry, "nd-b", 100.0 + ONLINE_INTERVALS * INTERVAL_S) == "online"
    late = 100.0 + ONLINE_INTERVALS * INTERVAL_S + 0.1
    assert status(registry, "nd-b", late) == "suspect"
    gone = 100.0 + OFFLINE_INTERVALS * INTERVAL_S + 0.1
    assert status(registry, "nd-b", gone) == "offline"
    registry.service.on_report(report("nd-b", seq=2), gone)
    assert status(registry, "nd-b", gone) == "online"


def test_gossip_verdicts_decide_suspect_and_offline(registry: Registry) -> None:
    registry.service.on_report(report("nd-b"), 10.0)
    registry.members[1] = member(PEER, MemberState.SUSPECT)
    assert status(registry, "nd-b", 10.0) == "suspect"
    for verdict in (MemberState.DEAD, MemberState.LEFT):
        registry.members[1] = member(PEER, verdict)
        assert status(registry, "nd-b", 10.0) == "offline"


def test_a_member_never_heard_from_is_suspect_then_offline(registry: Registry) -> None:
    assert status(registry, "nd-b", 50.0) == "suspect"  # first seen now
    assert registry.service.node("nd-b", 50.0)["resources"] is None
    assert status(registry, "nd-b", 50.0 + OFFLINE_INTERVALS * INTERVAL_S + 0.1) == "offline"


def test_late_duplicates_are_ignored_but_a_restarted_node_is_taken(registry: Registry) -> None:
    registry.service.on_report(report("nd-b", seq=5, running=3), 1.0)
    registry.service.on_report(report("nd-b", seq=4, running=9), 1.5)
    got = registry.service.report_of("nd-b")
    assert got is not None and (got[0].seq, got[0].running, got[1]) == (5, 3, 1.0)
    # seq 1 again, long after the last report: the node restarted
    restarted_at = 1.0 + ONLINE_INTERVALS * INTERVAL_S + 1
    registry.service.on_report(report("nd-b", seq=1, running=0), restarted_at)
    got = registry.service.report_of("nd-b")
    assert got is not None and (got[0].seq, got[1]) == (1, restarted_at)
    assert registry.service.report_of("nd-x") is None


def test_reports_of_nodes_that_are_no_longer_members_are_forgotten(registry: Registry) -> None:
    for i in range(40):
        registry.service.on_report(report(f"nd-gone-{i}"), 1.0)
    registry.service.on_report(report("nd-b"), 1.0)
    assert registry.service.report_of("nd-gone-0") is None
    assert registry.service.report_of("nd-b") is not None


# --- documents ---------------------------------------------------------------------------------


def test_the_node_document(registry: Registry) -> None:
    registry.service.on_report(report("nd-a", runtimes=("wasm", "process")), 20.0)
    doc = registry.service.node("alpha", 20.25)
    assert doc == {
        "node_id": "nd-a",
        "name": "alpha",
        "status": "online",
        "state": "alive",
        "draining": False,
        "voter": True,
        "leader": True,
        "http_address": "127.0.0.1:2",
        "mesh_address": "127.0.0.1:1",
        "labels": {"zone": "z1"},
        "runtimes": ["wasm", "process"],
        "running": 1,
        "slots": 16,
        "resources": report("nd-a").resources,
        "pools": report("nd-a").pools,
        "report_age_ms": 250.0,
    }
    listed = registry.service.nodes(20.25)["nodes"]
    assert [(d["node_id"], d["voter"], d["leader"]) for d in listed] == [
        ("nd-a", True, True),
        ("nd-b", False, False),
    ]
    assert listed[1]["runtimes"] == ["wasm"]  # from gossip until it reports


def test_unknown_and_ambiguous_names_are_not_found(registry: Registry) -> None:
    with pytest.raises(NotFoundError, match="'nd-zzz' is not a member"):
        registry.service.node("nd-zzz", 0.0)
    registry.members.append(member(MemberMeta(node_id="nd-c", name="beta", mesh_address="x")))
    with pytest.raises(NotFoundError, match="2 nodes are named 'beta'"):
        registry.service.node("beta", 0.0)
    assert registry.service.node("nd-c", 0.0)["name"] == "beta"


def test_resources_sum_pool_capacity_per_runtime(registry: Registry) -> None:
    registry.service.on_report(report("nd-a"), 5.0)
    unknown_task = {"tk-gone": dict.fromkeys(("instances", "idle", "busy", "waiting"), 1)}
    registry.service.on_report(report("nd-b", pools=report("nd-a").pools | unknown_task), 5.0)
    doc = registry.service.resources(5.0)
    first = doc["resources"][0]
    assert (first["node_id"], first["status"], first["cpu_percent"]) == ("nd-a", "online", 12.5)
    wasm = {"instances": 2, "idle": 1, "busy": 1, "waiting": 0, "max_instances": 4}
    assert first["capacity"] == {"wasm": wasm}
    assert doc["resources"][1]["capacity"] == {"wasm": wasm}  # tk-gone is skipped
    assert doc["totals"] == {
        "nodes": 2,
        "cpu_count": 4,
        "memory_total_bytes": 2000,
        "memory_available_bytes": 800,
        "running": 2,
        "slots": 32,
        "capacity": {"wasm": {k: 2 * v for k, v in wasm.items()}},
    }
    # an offline node is listed with its last report, and left out of the totals
    registry.members[1] = member(PEER, MemberState.DEAD)
    doc = registry.service.resources(5.0)
    assert doc["resources"][1]["status"] == "offline"
    assert doc["totals"]["nodes"] == 1 and doc["totals"]["slots"] == 16


def test_a_node_without_a_mesh_is_its_only_member() -> None:
    async def commit(command: Command) -> None:
        raise AssertionError("not used")

    state = SmsState(open_store("memory", None))
    alone = NodeService(local=LEADER, state=state, commit=commit, interval_s=INTERVAL_S)
    assert alone.on_report(report("nd-a"), 1.0) == ReportAck(term=1, leader_id="nd-a")
    (doc,) = alone.nodes(1.0)["nodes"]
    assert (doc["node_id"], doc["status"], doc["voter"], doc["leader"]) == (
        "nd-a",
        "online",
        True,
        True,
    )


def test_helpers_for_building_a_report() -> None:
    assert resolve_slots(0, 2) == 16 and resolve_slots(5, 2) == 5 and resolve_slots(0, 0) == 8
    stats = {
        "tk-1": {"task": "w", "instances": 3, "idle": 2, "busy": 1, "waiting": 0, "cold_starts": 9}
    }
    assert pool_gauges(stats) == {
        "tk-1": {"instances": 3, "idle": 2, "busy": 1, "waiting": 0, "max_instances": 0}
    }


# --- drain ---------------------------------------------------------------------------------------


async def test_drain_commits_once_and_is_undone(registry: Registry) -> None:
    assert await registry.service.drain("beta") == "nd-b"
    assert registry.state.drained() == {"nd-b"}
    assert registry.service.node("nd-b", 0.0)["draining"] is True
    assert await registry.service.drain("nd-b") == "nd-b"  # already drained: no new command
    assert registry.commits == [DrainNode(node_id="nd-b", draining=True)]
    await registry.service.drain("nd-b", enable=False)
    assert registry.state.drained() == frozenset()
    assert registry.commits[-1] == DrainNode(node_id="nd-b", draining=False)
    with pytest.raises(NotFoundError):
        await registry.service.drain("nd-nobody")


# --- the routes, through the real gateway app ---------------------------------------------------


@pytest.fixture
async def served(
    node: NodeHandle, tmp_path: Path
) -> AsyncIterator[tuple[httpx.AsyncClient, Registry]]:
    """The control app of a real node's TaskService, with a registry led by that node."""
    registry = Registry(local=dataclasses.replace(LEADER, node_id=node.node_id))
    info = NodeInfo(node_id=node.node_id, name="alpha", http_address="", mesh_address="")
    app = build_control_app(
        node.service, info, GatewayConfig(), cluster=node.cluster, nodes=registry.service
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://control") as client:
        yield client, registry


async def test_node_routes(served: tuple[httpx.AsyncClient, Registry], node: NodeHandle) -> None:
    control, registry = served
    now = trio.current_time()
    registry.service.on_report(report(node.node_id), now)
    registry.service.on_report(report("nd-b"), now)
    listed = (await control.get("/api/v1/nodes")).json()["nodes"]
    assert [d["node_id"] for d in listed] == [node.node_id, "nd-b"]
    assert listed[0]["status"] == "online" and listed[0]["statistics"]["tasks"] == 0
    assert "statistics" not in listed[1]  # only the serving node adds its own
    beta = (await control.get("/api/v1/nodes/beta")).json()
    assert (beta["node_id"], beta["draining"]) == ("nd-b", False)
    missing = await control.get("/api/v1/nodes/nobody")
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"
    resources = (await control.get("/api/v1/resources")).json()
    assert [r["node_id"] for r in resources["resources"]] == [node.node_id, "nd-b"]
    assert resources["totals"]["capacity"]["wasm"]["instances"] == 4


async def test_drain_route(served: tuple[httpx.AsyncClient, Registry]) -> None:
    control, registry = served
    drained = await control.post("/api/v1/nodes/beta/drain")
    assert drained.status_code == 200 and drained.json()["draining"] is True
    assert registry.state.drained() == {"nd-b"}
    again = await control.post("/api/v1/nodes/nd-b/drain", json={"enable": True})
    assert again.json()["draining"] is True
    undone = await control.post("/api/v1/nodes/nd-b/drain", json={"enable": False})
    assert undone.status_code == 200 and undone.json()["draining"] is False
    assert registry.state.drained() == frozenset()
    missing = await control.post("/api/v1/nodes/nobody/drain")
    assert missing.status_code == 404 and "nobody" in missing.json()["message"]


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"enable": "yes"}, "enable", "must be a valid boolean"),
        ({"enable": 1}, "enable", "must be a valid boolean"),
        ({"enabled": True}, "enabled", "is not a known field"),
        ([True], None, "must be a JSON object"),
    ],
)
async def test_drain_route_refuses_a_bad_body(
    served: tuple[httpx.AsyncClient, Registry], body: Any, field: str | None, words: str
) -> None:
    control, registry = served
    resp = await control.post("/api/v1/nodes/beta/drain", json=body)
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == field if field else "field" not in resp.json()
    assert words in resp.json()["message"]
    bad_json = await control.post(
        "/api/v1/nodes/beta/drain", content=b"{", headers={"Content-Type": "application/json"}
    )
    assert bad_json.status_code == 400
    assert registry.state.drained() == frozenset()


# --- the report loop ------------------------------------------------------------------------------


class Leader:
    """A fake leader to send reports to: answers, fails or hangs as told."""

    def __init__(self) -> None:
        self.received: list[tuple[int, float]] = []
        self.mode = "answer"

    async def send(self, report: NodeReport) -> ReportAck:
        self.received.append((report.seq, trio.current_time()))
        if self.mode == "fail":
            raise UnavailableError("no leader")
        if self.mode == "hang":
            await trio.sleep_forever()
        return ReportAck(term=3, leader_id="nd-a")


def make_report(seq: int) -> NodeReport:
    return report("nd-b", seq=seq)


async def test_the_loop_reports_every_interval_and_survives_failures(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    leader, acks = Leader(), []
    start = trio.current_time()
    await nursery.start(
        functools.partial(
            serve_reports,
            interval_s=INTERVAL_S,
            make_report=make_report,
            send=leader.send,
            on_ack=lambda ack, sent_at: acks.append((ack.term, sent_at - start)),
            first_seq=10,
        )
    )
    await trio.sleep(2.5)
    assert [(seq, at - start) for seq, at in leader.received] == [(10, 0), (11, 1), (12, 2)]
    assert acks == [(3, 0), (3, 1), (3, 2)]
    leader.mode = "fail"
    await trio.sleep(1)
    leader.mode = "hang"
    await trio.sleep(2)
    leader.mode = "answer"
    await trio.sleep(1)
    assert [at - start for _, at in leader.received] == [0, 1, 2, 3, 4, 5, 6]
    assert [seq for seq, _ in leader.received] == list(range(10, 17))
    assert acks[-1] == (3, 6)  # nothing acked while failing or hanging


async def test_a_wake_sends_a_report_at_once_but_never_floods(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    leader, changed = Leader(), trio.Event()

    async def wake() -> None:
        await changed.wait()

    start = trio.current_time()
    await nursery.start(
        functools.partial(
            serve_reports,
            interval_s=10.0,
            make_report=make_report,
            send=leader.send,
            wake=wake,
        )
    )
    await trio.sleep(2)
    changed.set()  # and never cleared: a wake that keeps firing
    await trio.sleep(2.5)
    assert [at - start for _, at in leader.received] == [0, 2, 3, 4]


async def test_the_sender_calls_the_local_registry_while_leading(registry: Registry) -> None:
    leading = True
    send = report_sender(
        registry=registry.service,
        leads=lambda: leading,
        leader_address=lambda: None,
        transport=None,
        timeout_s=1.0,
    )
    assert await send(report("nd-a")) == ReportAck(term=7, leader_id="nd-a")
    assert registry.service.report_of("nd-a") is not None
    leading = False
    with pytest.raises(UnavailableError, match="no leader is known"):
        await send(report("nd-a", seq=2))


# --- reports over a real mesh ---------------------------------------------------------------------

KEY = bytes(range(32))
CODEC = MessageCodec(NODE_MESSAGES)


@pytest.fixture
def start_transport(nursery: trio.Nursery) -> Callable[[str], Awaitable[Transport]]:
    async def start(node_id: str) -> Transport:
        serve = functools.partial(
            serve_transport, node_id=node_id, listen="127.0.0.1:0", cluster_key=KEY, codec=CODEC
        )
        transport: Transport = await nursery.start(serve)
        return transport

    return start


async def test_reports_travel_over_the_mesh_to_the_leader(
    registry: Registry,
    nursery: trio.Nursery,
    start_transport: Callable[[str], Awaitable[Transport]],
) -> None:
    leader, follower = await start_transport("nd-a"), await start_transport("nd-b")
    leading = [True]

    async def route() -> None:
        async for inbound in leader.inbound:
            assert await answer_report(
                inbound, registry.service, leading=leading[0], now=trio.current_time()
            )

    nursery.start_soon(route)
    send = report_sender(
        registry=registry.service,
        leads=lambda: False,
        leader_address=lambda: leader.address,
        transport=follower,
        timeout_s=5.0,
    )
    sent = report("nd-b", resources=HostMetrics(Path(".")).sample())
    assert await send(sent) == ReportAck(term=7, leader_id="nd-a")
    got = registry.service.report_of("nd-b")
    assert got is not None and got[0] == sent
    leading[0] = False  # a deposed leader refuses reports
    with pytest.raises(RemoteError) as refused:
        await send(report("nd-b", seq=2))
    assert refused.value.code == "not_leader"
