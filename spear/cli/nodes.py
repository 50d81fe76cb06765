"""`spear nodes`: the node registry as a table, one node's document, and drain."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from spear.cli.commands import open_client, show
from spear.cli.output import print_doc, print_json, print_table, runtime_names

COLUMNS = (
    "NAME",
    "NODE_ID",
    "STATUS",
    "ROLE",
    "RUNTIMES",
    "CPU",
    "MEM FREE",
    "LOAD",
    "RUNNING",
    "DRAINING",
)
#: the fields of a node's document that `spear nodes get` prints beside its resources
_NESTED = ("resources", "pools", "statistics")


def cmd_nodes_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        nodes = client.list_nodes()
    if args.json:
        print_json({"nodes": nodes})
        return 0
    print_table(COLUMNS, [_row(node) for node in nodes])
    return 0


def cmd_nodes_get(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        doc = client.get_node(args.node)
    if args.json:
        print_json(doc)
        return 0
    flat = {key: value for key, value in doc.items() if key not in _NESTED}
    resources = doc.get("resources")
    if isinstance(resources, Mapping):
        flat |= {key: value for key, value in resources.items() if key not in flat}
    flat["pools"] = doc.get("pools")
    print_doc(flat)
    return 0


def cmd_nodes_drain(args: argparse.Namespace) -> int:
    enable = not args.disable
    with open_client(args) as client:
        doc = client.drain_node(args.node, enable=enable)
    if args.json:
        return show(args, doc)
    who = f"node {doc.get('name')} ({doc.get('node_id')})"
    if enable:
        print(f"{who} is draining: no new work goes to it; its running work finishes", flush=True)
    else:
        print(f"{who} takes new work again", flush=True)
    return 0


def _row(node: Mapping[str, Any]) -> list[Any]:
    resources = node.get("resources")
    metrics: Mapping[str, Any] = resources if isinstance(resources, Mapping) else {}
    return [
        node.get("name"),
        node.get("node_id"),
        node.get("status"),
        role(node),
        runtime_names(node.get("runtimes")),
        _percent(metrics.get("cpu_percent")),
        human_bytes(metrics.get("memory_available_bytes")),
        _number(metrics.get("load_1m")),
        _running(node),
        node.get("draining"),
    ]


def role(node: Mapping[str, Any]) -> str:
    """leader, voter or learner (a member outside the Raft voters)."""
    if node.get("leader"):
        return "leader"
    return "voter" if node.get("voter") else "learner"


def human_bytes(value: Any) -> str:
    """Bytes in binary units, e.g. 1536 -> "1.5 KiB"; "-" if not a number."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _percent(value: Any) -> str:
    return f"{value:.0f}%" if _is_number(value) else "-"


def _number(value: Any) -> str:
    return f"{value:.2f}" if _is_number(value) else "-"


def _running(node: Mapping[str, Any]) -> str:
    running, slots = node.get("running"), node.get("slots")
    if not (_is_number(running) and _is_number(slots)):
        return "-"
    return f"{running}/{slots}"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
