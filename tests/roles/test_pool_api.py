"""Worker-mode tasks through the HTTP API of an in-process node, on real worker processes."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import trio

from spear.config import load_config
from spear.node import NodeHandle, serve_node
from tests.roles.api_helpers import register, upload, wasm

HANDLER = """
import os
from pathlib import Path

HERE = Path(os.environ["TEST_DIR"])
if os.environ.get("ANNOUNCE_START"):  # the test reads this: an instance started
    with open(HERE / "started", "wb") as fifo:
        fifo.write(str(os.getpid()).encode())


def handle(data, ctx):
    if data == b"pid":
        return str(os.getpid()).encode()
    if data == b"block":
        with open(HERE / "started", "wb") as fifo:  # the test reads this: the call is running
            fifo.write(b"1")
        with open(HERE / "release", "rb") as fifo:  # the test writes this: the call may end
            fifo.read()
        return b"released"
    return data.upper()
"""

#: a bound on every blocking step of these tests (real processes on a shared machine)
STEP_S = 30


@pytest.fixture
def worker_dir(tmp_path: Path) -> Path:
    """A directory with the handler module and the two FIFOs it synchronises on."""
    folder = tmp_path / "worker"
    folder.mkdir()
    (folder / "handler.py").write_text(HANDLER)
    os.mkfifo(folder / "started")
    os.mkfifo(folder / "release")
    return folder


async def register_worker(
    api: httpx.AsyncClient,
    worker_dir: Path,
    name: str,
    env: dict[str, str] | None = None,
    **pool: Any,
) -> dict[str, Any]:
    return await register(
        api,
        name=name,
        runtime="process",
        mode="worker",
        command=[sys.executable, "-m", "spear.worker", "handler:handle"],
        env={"PYTHONPATH": str(worker_dir), "TEST_DIR": str(worker_dir), **(env or {})},
        memory_limit_bytes=1 << 30,
        pool=pool,
    )


async def fifo(path: Path, mode: str) -> bytes:
    """Read a FIFO to its end ("r") or write one byte to it ("w"), blocking in a thread."""

    def run() -> bytes:
        with path.open(mode + "b") as fh:
            if mode == "r":
                got: bytes = fh.read()
                return got
            fh.write(b"1")
            return b""

    with trio.fail_after(STEP_S):
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)


async def pools(api: httpx.AsyncClient, node: NodeHandle) -> dict[str, Any]:
    resp = await api.get(f"/api/v1/nodes/{node.node_id}")
    assert resp.status_code == 200, resp.text
    found: dict[str, Any] = resp.json()["statistics"]["spearlet"]["pools"]
    return found


async def test_worker_task_cold_then_warm(
    api: httpx.AsyncClient, node: NodeHandle, worker_dir: Path
) -> None:
    task = await register_worker(api, worker_dir, "shout")
    first = await api.post("/api/v1/tasks/shout/invoke", content=b"hello")
    second = await api.post("/api/v1/tasks/shout/invoke", content=b"again")
    assert (first.status_code, first.content) == (200, b"HELLO"), first.text
    assert (second.status_code, second.content) == (200, b"AGAIN"), second.text
    assert first.headers["x-spear-cold-start"] == "true"
    assert second.headers["x-spear-cold-start"] == "false"
    record = (await api.get(f"/api/v1/executions/{first.headers['x-spear-execution-id']}")).json()
    assert record["cold"] is True and record["timings"]["acquire"] > 0
    stats = (await pools(api, node))[task["task_id"]]
    assert stats["task"] == "shout"
    assert (stats["cold_starts"], stats["warm_hits"], stats["starts"]) == (1, 1, 1)
    assert (stats["instances"], stats["idle"], stats["busy"]) == (1, 1, 0)


async def test_saturated_task_answers_429_with_retry_after(
    api: httpx.AsyncClient, node: NodeHandle, worker_dir: Path
) -> None:
    task = await register_worker(api, worker_dir, "narrow", max_instances=1, acquire_timeout_ms=50)
    assert (await api.post("/api/v1/tasks/narrow/invoke", content=b"warm")).status_code == 200
    blocked: list[httpx.Response] = []

    async def block() -> None:
        blocked.append(await api.post("/api/v1/tasks/narrow/invoke", content=b"block"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(block)
        await fifo(worker_dir / "started", "r")  # the only instance is busy now
        refused = await api.post("/api/v1/tasks/narrow/invoke", content=b"x")
        await fifo(worker_dir / "release", "w")
    assert refused.status_code == 429, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "saturated"
    assert "pool.acquire_timeout_ms" in refused.json()["message"]
    assert (blocked[0].status_code, blocked[0].content) == (200, b"released")
    stats = (await pools(api, node))[task["task_id"]]
    assert stats["saturated"] == 1 and stats["waiting"] == 0 and stats["in_flight"] == 0
    listed = await api.get("/api/v1/executions", params={"task": "narrow"})
    assert [r["status"] for r in listed.json()["executions"]] == ["succeeded"] * 2  # not the 429


async def test_deleting_a_task_closes_its_instances(
    api: httpx.AsyncClient, node: NodeHandle, worker_dir: Path
) -> None:
    task = await register_worker(api, worker_dir, "doomed", max_instances=2)
    resp = await api.post("/api/v1/tasks/doomed/invoke", content=b"pid")
    assert resp.status_code == 200, resp.text
    pid = int(resp.content)
    assert psutil.pid_exists(pid)
    assert (await api.delete("/api/v1/tasks/doomed")).status_code == 200
    assert not _alive(pid)
    assert task["task_id"] not in await pools(api, node)


async def test_worker_pool_is_prewarmed_at_registration(
    api: httpx.AsyncClient, node: NodeHandle, worker_dir: Path
) -> None:
    task = await register_worker(
        api, worker_dir, "ready", env={"ANNOUNCE_START": "1"}, min_instances=1
    )
    await fifo(worker_dir / "started", "r")  # an instance started with no call at all
    resp = await api.post("/api/v1/tasks/ready/invoke", content=b"hi")
    assert (resp.status_code, resp.content) == (200, b"HI"), resp.text
    stats = (await pools(api, node))[task["task_id"]]
    assert stats["starts"] == 1 and stats["instances"] == 1


async def test_node_stop_closes_instances_and_node_start_prewarms(
    tmp_path: Path, worker_dir: Path
) -> None:
    settings = {
        "node.data_dir": str(tmp_path / "data"),
        "gateway.http": "127.0.0.1:0",
        "mesh.listen": "127.0.0.1:0",
    }
    pids = []
    for run in range(2):
        async with trio.open_nursery() as nursery:
            node = await nursery.start(serve_node, load_config(env={}, overrides=settings))
            if run == 0:
                async with httpx.AsyncClient(base_url=node.http_url, timeout=STEP_S) as api:
                    await register_worker(
                        api, worker_dir, "kept", env={"ANNOUNCE_START": "1"}, min_instances=1
                    )
            # At registration, then at the restart, with no call at all.
            pids.append(int(await fifo(worker_dir / "started", "r")))
            nursery.cancel_scope.cancel()
        assert not _alive(pids[-1])  # the stopping node closed it
    assert pids[0] != pids[1]


async def test_pool_settings_are_checked_at_registration(api: httpx.AsyncClient) -> None:
    resp = await api.post(
        "/api/v1/tasks",
        json={
            "name": "lopsided",
            "runtime": "process",
            "mode": "worker",
            "command": ["true"],
            "pool": {"min_instances": 3, "max_instances": 2},
        },
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == "pool.min_instances"
    assert "must be at most pool.max_instances (2)" in resp.json()["message"]


async def test_wasm_worker_concurrency_is_checked_at_registration(
    api: httpx.AsyncClient,
) -> None:
    file_id = await upload(api, wasm("upper"))
    resp = await api.post(
        "/api/v1/tasks",
        json={
            "name": "wide",
            "runtime": "wasm",
            "mode": "worker",
            "artifact": file_id,
            "pool": {"max_concurrency": 2},
        },
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["field"] == "pool.max_concurrency"


def _alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


async def test_a_worker_that_never_says_hello_times_out_with_a_hint(
    api: httpx.AsyncClient,
) -> None:
    # cat echoes the host's frames back instead of answering with a hello of its own
    await register(api, name="mute", runtime="process", mode="worker", command=["/bin/cat"])
    answer = await api.post("/api/v1/tasks/mute/invoke", content=b"x", params={"timeout_ms": 300})
    assert answer.status_code == 504, answer.text
    message = answer.json()["error"]["message"]
    assert "was not ready" in message and "hello frame (docs/workers.md)" in message
