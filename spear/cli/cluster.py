"""`spear cluster`: run a whole cluster on this machine, and change a cluster's voters.

`spear cluster --nodes N` starts N `spear node` processes on loopback, each with its own data
directory under `--data-dir`, its output in `<data-dir>/<name>.log`, ports chosen by the OS,
and one fresh cluster key. The first min(N, 3) nodes are the voters (`--bootstrap-expect`);
the others join as non-voting Spearlets. It prints every node's addresses and the join token,
then waits. A node that exits (a crash, or a kill to try failover) is reported in one line on
stderr and the others keep serving; Ctrl-C or SIGTERM stops every node (SIGTERM, then SIGKILL
after a grace period) and exits 0; when every node has exited it exits 1.

`spear cluster promote|demote|remove|transfer-leader ID` change a running cluster's Raft
configuration through any node's gateway (`--server`); each returns once the change is
committed and prints the voters and learners after it (`--json`: the cluster document).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import quote

from spear.cli.commands import add_client_flags, open_client
from spear.cli.output import EXIT_FAILED, fail, print_json, print_table, program
from spear.client import SpearClient

STOP_GRACE_S = 10.0
MAX_NODES = 9
#: how often the launcher looks for nodes that exited
WATCH_INTERVAL_S = 0.2
#: how long `transfer-leader` waits for the node it asked to learn who leads now, and how often
#: it asks (the old leader hears of the new one with the new leader's first heartbeat)
LEADER_KNOWN_WAIT_S = 10.0
LEADER_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class _Node:
    name: str
    http: str
    listen: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of `spear cluster` (run N nodes here) and its change commands."""
    parser.description = (
        "Run a cluster of N nodes on this machine until Ctrl-C (with no command), or change "
        "a running cluster's voters (promote, demote, remove, transfer-leader)."
    )
    parser.add_argument("--nodes", type=int, default=3, metavar="N", help="how many (default 3)")
    parser.add_argument(
        "--data-dir",
        default="spear-cluster",
        metavar="DIR",
        help="parent of the nodes' data directories (default ./spear-cluster)",
    )
    parser.add_argument(
        "--profile",
        default="lan-fast",
        choices=("lan", "lan-fast", "loopback"),
        help="mesh.profile of every node (default lan-fast)",
    )
    _add_changes(parser)


# --- changes to a running cluster's voters ----------------------------------------------------

#: command -> (help, what it did, the client call)
_CHANGES: dict[str, tuple[str, str, Callable[[SpearClient, str], dict[str, Any]]]] = {
    "promote": (
        "make a caught-up learner a voter",
        "is a voter now",
        lambda client, node: _change(client, "POST", f"voters/{_seg(node)}"),
    ),
    "demote": (
        "make a voter a learner (it keeps the log, no longer votes)",
        "is a learner now",
        lambda client, node: _change(client, "DELETE", f"voters/{_seg(node)}"),
    ),
    "remove": (
        "remove a failed (dead or left) member from the Raft configuration",
        "is no longer a member",
        lambda client, node: _change(client, "DELETE", f"members/{_seg(node)}"),
    ),
    "transfer-leader": (
        "hand leadership to another voter",
        "leads now",
        lambda client, node: _change(client, "POST", "leader", json={"node_id": node}),
    ),
}


def _add_changes(parser: argparse.ArgumentParser) -> None:
    parser_class = type(parser)
    client = parser_class(add_help=False)
    add_client_flags(client)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=parser_class)
    for name, (help_text, _, _) in _CHANGES.items():
        change = sub.add_parser(
            name, parents=[client], help=help_text, description=help_text.capitalize() + "."
        )
        change.add_argument("node", metavar="ID", help="a node id or name")
        change.set_defaults(handler=cmd_cluster_change, change=name)


def cmd_cluster_change(args: argparse.Namespace) -> int:
    _, done, call = _CHANGES[args.change]
    with open_client(args) as client:
        doc = call(client, args.node)
        if args.change == "transfer-leader":
            doc = _wait_leader_known(client, doc)
    if args.json:
        print_json(doc)
        return 0
    print(f"node {_describe(doc, args.node)} {done}", flush=True)
    raft = doc.get("raft")
    learners = raft.get("learners") if isinstance(raft, Mapping) else None
    leader = doc.get("leader_id")
    if leader:
        print(f"leader    {_describe(doc, leader)} (term {doc.get('term')})")
    else:
        print(f"leader    - (term {doc.get('term')}; not known yet: `spear status` shows it)")
    print(f"voters    {_names(doc, doc.get('voters'))}")
    print(f"learners  {_names(doc, learners)}", flush=True)
    return 0


def _change(client: SpearClient, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    # SpearClient has no cluster-change methods yet; this is its own request helper.
    return client._json(method, f"/api/v1/cluster/{path}", **kwargs)


def _wait_leader_known(client: SpearClient, doc: dict[str, Any]) -> dict[str, Any]:
    """The cluster document once the node asked knows the leader (a transfer answers as soon
    as that node stepped down, before it heard from its successor), or the last one seen."""
    deadline = time.monotonic() + LEADER_KNOWN_WAIT_S
    while not doc.get("leader_id") and time.monotonic() < deadline:
        time.sleep(LEADER_POLL_S)
        doc = client.cluster()
    return doc


def _seg(value: str) -> str:
    """One URL path segment: a name or id typed by a user must not change the route."""
    return quote(value, safe="")


def _describe(doc: Mapping[str, Any], ref: Any) -> str:
    """`name (node id)` for a node id or name the cluster document knows, else as given."""
    for member in doc.get("members") or []:
        if isinstance(member, Mapping) and ref in (member.get("node_id"), member.get("name")):
            return f"{member.get('name')} ({member.get('node_id')})"
    return str(ref) if ref else "-"


def _names(doc: Mapping[str, Any], ids: Any) -> str:
    if not isinstance(ids, list) or not ids:
        return "-"
    return ", ".join(_describe(doc, node_id) for node_id in ids)


def cmd_cluster(args: argparse.Namespace) -> int:
    if not 1 <= args.nodes <= MAX_NODES:
        return fail(f"--nodes must be between 1 and {MAX_NODES}, got {args.nodes}", EXIT_FAILED)
    from spear.mesh.handshake import join_token, new_cluster_key

    token = join_token(new_cluster_key())
    root = Path(args.data_dir).resolve()
    voters = min(args.nodes, 3)
    stop = _StopFlag()
    nodes: list[_Node] = []
    try:
        for i in range(args.nodes):
            joins = [nodes[0].listen] if nodes else []
            nodes.append(_start(i + 1, root, token, voters if i < voters else 1, joins, args))
        _report(nodes, token)
        return _watch(nodes, stop)
    finally:
        _stop_all(nodes)


def _watch(nodes: list[_Node], stop: _StopFlag) -> int:
    """Report each node that exits and keep the others running, until a stop is requested
    (exit 0) or no node is left (exit 1)."""
    running = list(nodes)
    while not stop.requested:
        for node in [n for n in running if n.proc.poll() is not None]:
            running.remove(node)
            left = f"{len(running)} still running" if running else "none left"
            print(
                f"spear: node {node.name} (pid {node.proc.pid}) {_exit_status(node.proc)}; "
                f"its output: {node.log}; {left}",
                file=sys.stderr,
                flush=True,
            )
        if not running:
            return fail("every node has exited; stopping", EXIT_FAILED)
        time.sleep(WATCH_INTERVAL_S)
    return 0


def _exit_status(proc: subprocess.Popen[bytes]) -> str:
    code = proc.returncode
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


class _StopFlag:
    """Set by SIGINT or SIGTERM."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGINT, self._set)
        signal.signal(signal.SIGTERM, self._set)

    def _set(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start(
    number: int, root: Path, token: str, expect: int, joins: list[str], args: argparse.Namespace
) -> _Node:
    name = f"n{number}"
    http, listen = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    data_dir = root / name
    argv = [sys.executable, "-m", "spear", "node", "--name", name, "--data-dir", str(data_dir)]
    argv += ["--http", http, "--listen", listen, "--bootstrap-expect", str(expect)]
    for join in joins:
        argv += ["--join", join]
    # The token in the environment, not on the command line: any user can read a process's
    # arguments (ps), only its owner its environment.
    env = {**os.environ, "SPEAR_MESH__PROFILE": args.profile, "SPEAR_MESH__JOIN_TOKEN": token}
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}.log"
    # Its own session: a Ctrl-C reaches only this command, which then stops the nodes. Its own
    # log file: N nodes' lines interleaved on one terminal cannot be told apart. A lifeline:
    # should this command itself be killed outright, the kernel stops its nodes (Linux).
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_stop_with_parent,  # safe: this command runs no threads
        )
    return _Node(name, http, listen, data_dir, log, proc)


def _stop_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launcher dies (prctl PR_SET_PDEATHSIG;
    nothing where there is no such call)."""
    if sys.platform != "linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _report(nodes: list[_Node], token: str) -> None:
    rows = [[n.name, f"http://{n.http}", n.listen, n.proc.pid, n.data_dir] for n in nodes]
    print_table(["NAME", "HTTP", "MESH", "PID", "DATA DIR"], rows)
    print(f"node output: {nodes[0].log.parent / 'NAME.log'}")
    print(f"join token:  {token}")
    print(f"try: {program()} status --server http://{nodes[0].http}   (Ctrl-C stops the cluster)")
    sys.stdout.flush()


def _stop_all(nodes: list[_Node]) -> None:
    for node in nodes:
        if node.proc.poll() is None:
            node.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for node in nodes:
        try:
            node.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            node.proc.kill()
            node.proc.wait()
