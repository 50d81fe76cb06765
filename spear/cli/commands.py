"""The client commands: each one calls the HTTP API through spear.client and prints the answer.

Lists print as aligned tables, single documents as `key  value` lines, and `--json` prints the
server's JSON instead. Outputs and logs are written to stdout byte for byte.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from spear.cli.output import (
    EXIT_FAILED,
    fail,
    print_doc,
    print_json,
    print_table,
    runtime_names,
    when,
    write_bytes,
)
from spear.cli.reading import UsageError, open_input, parse_env, read_data, read_json_object
from spear.client import Doc, Invocation, SpearClient
from spear.config import load_config, parse_hostport

#: the statuses of an execution that has ended
ENDED_STATUSES = frozenset({"succeeded", "failed", "timeout", "cancelled"})
#: how long `executions cancel` waits for a running execution to be stopped
CANCEL_WAIT_MS = 5_000


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--server",
        metavar="URL",
        help="gateway URL (default: http:// + gateway.http of the config)",
    )
    parser.add_argument("--config", metavar="FILE", help="spear.toml naming the gateway")
    parser.add_argument("--json", action="store_true", help="print raw JSON for scripts")


def open_client(args: argparse.Namespace) -> SpearClient:
    """A client for --server, or for the local node's gateway.http from the layered config."""
    server: str | None = args.server
    if server is None:
        config = load_config(Path(args.config) if args.config else None)
        host, port = parse_hostport(config.gateway.http)
        # A node listening on every interface is reached on loopback.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        server = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    elif not server.startswith(("http://", "https://")):
        raise UsageError(f"--server must be an http:// or https:// URL, got {server!r}")
    return SpearClient(server)


def show(args: argparse.Namespace, doc: Mapping[str, Any]) -> int:
    if args.json:
        print_json(doc)
    else:
        print_doc(doc)
    return 0


# --- files ----------------------------------------------------------------------------------


def cmd_files_upload(args: argparse.Namespace) -> int:
    path: str = args.path
    name: str | None = args.name or (None if path == "-" else Path(path).name)
    with open_client(args) as client, open_input(path) as data:
        doc = client.upload_file(data, name=name)
    if args.json:
        print_json(doc)
    else:
        print(doc.get("file_id"), flush=True)  # the id alone: `ID=$(spear files upload f)`
    return 0


def cmd_files_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        files = client.list_files()
    if args.json:
        print_json({"files": files})
    else:
        rows = [
            (f.get("file_id"), f.get("size"), f.get("name"), when(f.get("created_at")))
            for f in files
        ]
        print_table(("FILE_ID", "SIZE", "NAME", "CREATED"), rows)
    return 0


def cmd_files_get(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        return show(args, client.get_file(args.file_id))


def cmd_files_content(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        write_bytes(client.file_content(args.file_id))
    return 0


# --- tasks ----------------------------------------------------------------------------------


def cmd_tasks_register(args: argparse.Namespace) -> int:
    spec = read_json_object(args.from_json) if args.from_json else {}
    if not (args.name or "name" in spec):
        raise UsageError("tasks register needs --name and --runtime, or --from-json FILE")
    flags = {
        "name": args.name,
        "runtime": args.runtime,
        "mode": args.mode,
        "artifact": args.artifact,
        "image": args.image,
        "command": [*(args.command or []), *args.argv],
        "env": parse_env(args.env or []),
        "timeout_ms": args.timeout_ms,
        "memory_limit_bytes": args.memory_limit_bytes,
        "description": args.description,
    }
    spec.update({key: value for key, value in flags.items() if value not in (None, [], {})})
    with open_client(args) as client:
        if args.file:
            with open_input(args.file) as data:
                spec["artifact"] = client.upload_file(data, name=Path(args.file).name)["file_id"]
        return _show_task(args, client.register_task(spec))


def cmd_tasks_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        tasks = client.list_tasks()
    if args.json:
        print_json({"tasks": tasks})
    else:
        rows = [
            (
                t.get("name"),
                t.get("task_id"),
                t.get("runtime"),
                t.get("mode"),
                _source(t),
                when(t.get("created_at")),
            )
            for t in tasks
        ]
        print_table(("NAME", "TASK_ID", "RUNTIME", "MODE", "SOURCE", "CREATED"), rows)
    return 0


def cmd_tasks_get(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        return _show_task(args, client.get_task(args.task))


def _show_task(args: argparse.Namespace, task: Mapping[str, Any]) -> int:
    """A task document; in table mode without `pool` unless it runs workers (per-call tasks
    have no pool: its settings are all unset)."""
    if not args.json and task.get("mode") != "worker":
        task = {key: value for key, value in task.items() if key != "pool"}
    return show(args, task)


def cmd_tasks_delete(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        doc = client.delete_task(args.task)
    if args.json:
        print_json(doc)
    else:
        print(f"deleted task {doc.get('name')} ({doc.get('task_id')})", flush=True)
    return 0


def _source(task: Mapping[str, Any]) -> str:
    if task.get("image"):
        return str(task["image"])
    if task.get("command"):
        return " ".join(str(arg) for arg in task["command"])
    return f"file {str(task['artifact'])[:12]}" if task.get("artifact") else "-"


# --- invoke ---------------------------------------------------------------------------------


def cmd_invoke(args: argparse.Namespace) -> int:
    data = read_data(args.data)
    with open_client(args) as client:
        if args.run_async:
            execution_id = client.invoke_async(
                args.task, data, idempotency_key=args.idempotency_key
            )
            if args.json:
                print_json({"execution_id": execution_id})
            else:
                print(execution_id, flush=True)
            return 0
        result = client.invoke(
            args.task, data, timeout_ms=args.timeout_ms, idempotency_key=args.idempotency_key
        )
        if args.json:
            record = result.record or client.get_execution(result.execution_id)
            print_json({**record, **_output_fields(result.output)})
        else:
            write_bytes(result.output)
    if args.verbose:
        print(f"spear: {_describe(result)}", file=sys.stderr, flush=True)
    if result.succeeded:
        return 0
    error = (result.record or {}).get("error") or {}
    return fail(
        f"{args.task} {result.status}: {error.get('code', 'no error code')}: "
        f"{error.get('message', 'no message')} (execution {result.execution_id}; "
        f"`spear executions logs {result.execution_id}` shows its logs)",
        EXIT_FAILED,
    )


def _describe(result: Invocation) -> str:
    cold = {True: "cold start", False: "warm", None: "cold start unknown"}[result.cold]
    duration = "-" if result.duration_ms is None else f"{result.duration_ms:.1f} ms"
    return (
        f"execution {result.execution_id} {result.status} on {result.node_id or '-'} "
        f"({cold}, {duration})"
    )


def _output_fields(output: bytes) -> dict[str, str]:
    """The output inside a --json record: as text when it is UTF-8, else base64."""
    try:
        return {"output": output.decode()}
    except UnicodeDecodeError:
        return {"output_base64": base64.b64encode(output).decode()}


# --- executions and status ------------------------------------------------------------------


def cmd_executions_list(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        records = client.list_executions(
            task=args.task, status=args.status, limit=args.limit, dead_letter=args.dead_letter
        )
    if args.json:
        print_json({"executions": records})
    else:
        rows = [
            (
                r.get("execution_id"),
                r.get("task_name"),
                r.get("status"),
                r.get("mode"),
                r.get("node_id"),
                r.get("cold"),
                _duration(r),
                when(r.get("created_at")),
            )
            for r in records
        ]
        columns = ("EXECUTION_ID", "TASK", "STATUS", "MODE", "NODE", "COLD", "DURATION", "CREATED")
        print_table(columns, rows)
    return 0


def _duration(record: Doc) -> str:
    started, finished = record.get("started_at"), record.get("finished_at")
    if isinstance(started, int | float) and isinstance(finished, int | float):
        return f"{(finished - started) * 1000:.1f} ms"
    return "-"


def cmd_executions_get(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        return show(args, client.get_execution(args.execution_id, wait_ms=args.wait_ms))


def cmd_executions_output(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        write_bytes(client.execution_output(args.execution_id))
    return 0


def cmd_executions_logs(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        write_bytes(client.execution_logs(args.execution_id))
    return 0


def cmd_executions_cancel(args: argparse.Namespace) -> int:
    """Cancel, then show the record once the execution ended (a running one takes a moment to
    be stopped), or as it is after CANCEL_WAIT_MS with a note that the cancel was requested."""
    execution_id: str = args.execution_id
    with open_client(args) as client:
        record = client.cancel_execution(execution_id)
        if record.get("status") not in ENDED_STATUSES:
            record = client.get_execution(execution_id, wait_ms=CANCEL_WAIT_MS)
    show(args, record)
    if record.get("status") not in ENDED_STATUSES:
        print(
            f"spear: cancel requested; execution {execution_id} is still {record.get('status')} "
            f"(`spear executions get {execution_id} --wait-ms 60000` waits for its end)",
            file=sys.stderr,
            flush=True,
        )
    return 0


def cmd_executions_redrive(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        return show(args, client.redrive_execution(args.execution_id))


def cmd_status(args: argparse.Namespace) -> int:
    with open_client(args) as client:
        health = client.health()
        cluster = client.cluster()
    if args.json:
        print_json({"health": health, "cluster": cluster})
        return 0
    print(
        f"node    {health.get('name')} ({health.get('node_id')}) {health.get('status')} "
        f"at {client.base_url}"
    )
    print(f"leader  {cluster.get('leader_id')} (term {cluster.get('term')})")
    print(f"voters  {', '.join(cluster.get('voters') or []) or '-'}\n")
    members = cluster.get("members") or []
    rows = [
        (
            m.get("name"),
            m.get("node_id"),
            m.get("state"),
            m.get("voter"),
            m.get("http_address"),
            m.get("mesh_address"),
            runtime_names(m.get("runtimes")),
        )
        for m in members
    ]
    print_table(("NAME", "NODE_ID", "STATE", "VOTER", "HTTP", "MESH", "RUNTIMES"), rows)
    return 0
