"""`spear nodes` end to end: `python -m spear nodes ...` against a real `spear node` process."""

from __future__ import annotations

import subprocess

from spear.cli.nodes import human_bytes
from tests.cli.test_cli_client import failed, header, ok, ok_json
from tests.subprocesses import NodeProcess, SpearCli


def usage_error(result: subprocess.CompletedProcess[bytes]) -> str:
    stderr = result.stderr.decode()
    assert result.returncode == 2, (result.returncode, stderr)
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, stderr
    return stderr


def test_nodes_table_json_and_get(spear_node: NodeProcess, spear_cli: SpearCli) -> None:
    server = ("--server", spear_node.url)
    listed = ok_json(spear_cli("nodes", "--json", *server))["nodes"]
    (node,) = listed
    assert (node["status"], node["leader"], node["voter"], node["draining"]) == (
        "online",
        True,
        True,
        False,
    )
    assert node["resources"]["cpu_count"] >= 1 and node["slots"] >= 8
    assert node["running"] == 0 and "wasm" in node["runtimes"]

    table = ok(spear_cli("nodes", *server))
    assert header(table)[:4] == ["NAME", "NODE_ID", "STATUS", "ROLE"]
    row = table.splitlines()[1]
    assert node["node_id"] in row and "online" in row and "leader" in row
    assert f"0/{node['slots']}" in row and "%" in row
    assert header(ok(spear_cli("nodes", "list", *server))) == header(table)

    by_name = ok_json(spear_cli("nodes", "get", node["name"], "--json", *server))
    assert by_name["node_id"] == node["node_id"]
    text = ok(spear_cli("nodes", "get", node["node_id"], *server))
    lines = dict(line.split(None, 1) for line in text.splitlines() if " " in line)
    assert lines["status"].strip() == "online"
    assert "memory_available_bytes" in lines and "cpu_percent" in lines


def test_nodes_drain_and_undo(spear_node: NodeProcess, spear_cli: SpearCli) -> None:
    server = ("--server", spear_node.url)
    node_id = ok_json(spear_cli("nodes", "--json", *server))["nodes"][0]["node_id"]
    said = ok(spear_cli("nodes", "drain", node_id, *server))
    assert said.startswith("node ") and "is draining" in said
    assert ok_json(spear_cli("nodes", "get", node_id, "--json", *server))["draining"] is True
    assert "yes" in ok(spear_cli("nodes", *server)).splitlines()[1].split()[-1]
    undone = ok_json(spear_cli("nodes", "drain", node_id, "--disable", "--json", *server))
    assert undone["draining"] is False
    assert "takes new work again" in ok(spear_cli("nodes", "drain", node_id, "--disable", *server))


def test_nodes_bad_input_is_one_line(spear_node: NodeProcess, spear_cli: SpearCli) -> None:
    server = ("--server", spear_node.url)
    assert "nd-nobody" in failed(spear_cli("nodes", "get", "nd-nobody", *server))
    assert "nd-nobody" in failed(spear_cli("nodes", "drain", "nd-nobody", *server))
    assert "required: ID" in usage_error(spear_cli("nodes", "drain", *server))
    assert "unrecognized" in usage_error(spear_cli("nodes", "drain", "x", "--off", *server))


def test_human_bytes() -> None:
    assert [human_bytes(v) for v in (0, 1536, 5 * 1024**3, None, True)] == [
        "0 B",
        "1.5 KiB",
        "5.0 GiB",
        "-",
        "-",
    ]
