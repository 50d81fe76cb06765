"""`spear cluster promote|demote|remove|transfer-leader` end to end: `python -m spear ...`
against two real `spear node` processes (a voter and a member that joins as a learner)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cli.test_cli_client import failed, ok, ok_json
from tests.cli.test_cli_nodes import usage_error
from tests.subprocesses import NodeProcess, SpearCli

#: how often, and how far apart, the test asks whether the learner was admitted
ATTEMPTS, BACKOFF_S = 200, 0.05


@pytest.fixture
def two_nodes(tmp_path: Path) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """n1 (the only voter, leading) and n2 (joined: a learner once the leader admits it)."""
    config = tmp_path / "spear.toml"
    config.write_text('[mesh]\nprofile = "lan-fast"\n')
    first = NodeProcess(tmp_path / "n1", extra_args=["--config", str(config), "--name", "n1"])
    second: NodeProcess | None = None
    try:
        first.start()
        token = (first.data_dir / "join-token").read_text().strip()
        join = ["--join", first.listen, "--join-token", token, "--name", "n2"]
        second = NodeProcess(
            tmp_path / "n2",
            extra_args=["--config", str(config), *join],
            ready_when_serving=False,
        )
        second.start()
        yield first, second
        second.stop()
        first.stop()
    finally:
        if second is not None:
            second.kill()
        first.kill()


def wait_learner(node: NodeProcess, name: str) -> str:
    """The node id of member `name` once the leader lists it as a learner."""
    for _ in range(ATTEMPTS):
        doc = httpx.get(f"{node.url}/api/v1/cluster", timeout=5.0).json()
        ids = [m["node_id"] for m in doc["members"] if m["name"] == name]
        if ids and ids[0] in doc["raft"]["learners"]:
            return str(ids[0])
        time.sleep(BACKOFF_S)
    pytest.fail(f"{name} was not admitted as a learner")


def test_promote_demote_and_refusals(
    two_nodes: tuple[NodeProcess, NodeProcess], spear_cli: SpearCli
) -> None:
    first, second = two_nodes
    n2 = wait_learner(first, "n2")
    via_leader, via_follower = ("--server", first.url), ("--server", second.url)

    said = ok(spear_cli("cluster", "promote", "n2", *via_follower))
    lines = said.splitlines()
    assert lines[0] == f"node n2 ({n2}) is a voter now", said
    assert lines[2].startswith("voters") and f"n2 ({n2})" in lines[2]
    assert lines[3].split() == ["learners", "-"]

    doc = ok_json(spear_cli("cluster", "demote", n2, "--json", *via_leader))
    assert n2 not in doc["voters"] and doc["raft"]["learners"] == [n2]
    n1 = doc["leader_id"]

    # One line on stderr and exit 1 for every refusal; exit 2 for a usage error.
    assert "'nd-nobody' is not a member" in failed(
        spear_cli("cluster", "promote", "nd-nobody", *via_leader)
    )
    voter = failed(spear_cli("cluster", "promote", "n1", *via_leader))
    assert f"node {n1} is not a learner: it is a voter already" in voter
    assert f"node {n2} is not a voter" in failed(spear_cli("cluster", "demote", "n2", *via_leader))
    assert "alive in the mesh" in failed(spear_cli("cluster", "remove", "n2", *via_follower))
    assert "not another voter" in failed(spear_cli("cluster", "transfer-leader", "n2", *via_leader))
    assert "would leave no voter" in failed(spear_cli("cluster", "demote", "n1", *via_leader))
    assert "required: ID" in usage_error(spear_cli("cluster", "promote", *via_leader))


def test_transfer_leader_names_the_new_leader(
    two_nodes: tuple[NodeProcess, NodeProcess], spear_cli: SpearCli
) -> None:
    first, _ = two_nodes
    n2 = wait_learner(first, "n2")
    ok(spear_cli("cluster", "promote", "n2", "--server", first.url))
    # Through the leader that hands over: it answers once it stepped down, before it heard
    # from its successor; the command waits until the new leader is known.
    lines = ok(spear_cli("cluster", "transfer-leader", "n2", "--server", first.url)).splitlines()
    assert lines[0] == f"node n2 ({n2}) leads now", lines
    assert lines[1].startswith(f"leader    n2 ({n2}) (term "), lines
