"""The argparse tree of `spear`: every command, its flags, and the handler that runs it."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn, TypeAlias

from spear.cli import commands
from spear.cli.cluster import add_cluster_flags, cmd_cluster
from spear.cli.nodes import cmd_nodes_drain, cmd_nodes_get, cmd_nodes_list
from spear.cli.output import EXIT_USAGE, fail
from spear.cli.serve import add_node_flags, cmd_demo, cmd_node

Handler = Callable[[argparse.Namespace], int]
STATUSES = ("pending", "running", "succeeded", "failed", "timeout", "cancelled")

# argparse's subparser action has no public type; this is the one place that handles it.
Subcommands: TypeAlias = "argparse._SubParsersAction[Parser]"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports a usage error as one line and exits 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> Parser:
    parser = Parser(prog="spear", description="spear: a self-contained serverless platform.")
    parser.add_argument(
        "--traceback", action="store_true", help="show the traceback of an unexpected error (a bug)"
    )
    # Also before the command (`spear --json tasks list`); each client command has its own.
    parser.add_argument(
        "--json",
        dest="json_first",
        action="store_true",
        help="print raw JSON (client commands; also accepted after the command)",
    )
    sub = _subcommands(parser)

    node_flags = Parser(add_help=False)
    add_node_flags(node_flags)
    _command(
        sub, "node", cmd_node, node_flags, "run a node in the foreground until Ctrl-C or SIGTERM"
    )
    _command(
        sub,
        "demo",
        cmd_demo,
        node_flags,
        "start a node, register and invoke the `upper` WASM function, keep serving",
    )

    cluster = _command(
        sub,
        "cluster",
        cmd_cluster,
        Parser(add_help=False),
        "run a cluster of N nodes on this machine until Ctrl-C",
    )
    add_cluster_flags(cluster)

    client = Parser(add_help=False)
    commands.add_client_flags(client)
    _add_files(_subcommands(sub.add_parser("files", help="upload and list artifacts")), client)
    _add_tasks(_subcommands(sub.add_parser("tasks", help="register, list, delete tasks")), client)
    _add_invoke(_command(sub, "invoke", commands.cmd_invoke, client, "invoke a task"))
    _add_executions(
        _subcommands(sub.add_parser("executions", help="execution records, outputs, logs")),
        client,
    )
    _command(sub, "status", commands.cmd_status, client, "node health and cluster members")
    _add_nodes(
        _command(sub, "nodes", cmd_nodes_list, client, "nodes with status and resources; drain"),
        client,
    )
    return parser


def _subcommands(parser: argparse.ArgumentParser) -> Subcommands:
    parser.set_defaults(handler=lambda _args: _missing_command(parser))
    return parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)


def _missing_command(parser: argparse.ArgumentParser) -> int:
    return fail(f"`{parser.prog}` needs a command (see `{parser.prog} --help`)", EXIT_USAGE)


def _command(
    sub: Subcommands, name: str, handler: Handler, parent: Parser, help_text: str
) -> Parser:
    parser: Parser = sub.add_parser(
        name,
        parents=[parent],
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
    )
    parser.set_defaults(handler=handler)
    return parser


def _add_files(sub: Subcommands, client: Parser) -> None:
    upload = _command(sub, "upload", commands.cmd_files_upload, client, "upload an artifact")
    upload.add_argument("path", metavar="PATH", help="the file to upload; - reads stdin")
    upload.add_argument("--name", help="its display name (default: the file's name)")
    _command(sub, "list", commands.cmd_files_list, client, "list artifacts")
    get = _command(sub, "get", commands.cmd_files_get, client, "show an artifact's metadata")
    get.add_argument("file_id", metavar="FILE_ID")
    content = _command(
        sub, "content", commands.cmd_files_content, client, "write an artifact's bytes to stdout"
    )
    content.add_argument("file_id", metavar="FILE_ID")


def _add_tasks(sub: Subcommands, client: Parser) -> None:
    register = _command(
        sub,
        "register",
        commands.cmd_tasks_register,
        client,
        "register a task from flags or a JSON definition (flags override it)",
    )
    register.add_argument("--from-json", metavar="FILE", help="a task definition; - = stdin")
    register.add_argument("--name", help="the task's unique name")
    register.add_argument("--runtime", choices=("wasm", "process", "docker"))
    register.add_argument("--mode", choices=("per-call", "worker"))
    source = register.add_mutually_exclusive_group()
    source.add_argument("--artifact", metavar="FILE_ID", help="an uploaded artifact")
    source.add_argument("--file", metavar="PATH", help="upload PATH and use it as the artifact")
    register.add_argument("--image", help="the Docker image (runtime docker)")
    register.add_argument("--env", metavar="KEY=VALUE", action="append", help="repeatable")
    register.add_argument("--timeout-ms", type=int, metavar="N")
    register.add_argument("--memory-limit-bytes", type=int, metavar="N")
    register.add_argument("--description")
    register.add_argument(
        "--command",
        nargs="+",
        metavar="ARG",
        help="the argv (process, docker); arguments that start with - go after `--`",
    )
    register.add_argument(
        "argv",
        nargs="*",
        metavar="-- ARG",
        help="more of the argv, appended to --command (anything after `--` is taken as is)",
    )
    _command(sub, "list", commands.cmd_tasks_list, client, "list tasks")
    for name, handler, help_text in (
        ("get", commands.cmd_tasks_get, "show a task"),
        ("delete", commands.cmd_tasks_delete, "unregister a task"),
    ):
        _command(sub, name, handler, client, help_text).add_argument(
            "task", metavar="NAME", help="a task name or id"
        )


def _add_invoke(invoke: Parser) -> None:
    invoke.description = (
        "Invoke a task. Sync: the output goes to stdout as-is and a failed "
        "function exits 1. --async prints the execution id."
    )
    invoke.add_argument("task", metavar="NAME", help="a task name or id")
    invoke.add_argument(
        "-d",
        "--data",
        metavar="DATA",
        help="the input: TEXT, @FILE, or - (or @-) for stdin; default empty",
    )
    invoke.add_argument(
        "--async", dest="run_async", action="store_true", help="do not wait; print the execution id"
    )
    invoke.add_argument(
        "--timeout-ms", type=int, metavar="N", help="a shorter deadline than the task's"
    )
    invoke.add_argument("--idempotency-key", metavar="KEY")
    invoke.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="report the execution id, status, node, cold start on stderr",
    )


def _add_executions(sub: Subcommands, client: Parser) -> None:
    listing = _command(sub, "list", commands.cmd_executions_list, client, "list executions")
    listing.add_argument("--task", metavar="NAME", help="only this task's executions")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--limit", type=int, metavar="N", help="at most N (server default 100)")
    listing.add_argument(
        "--dead-letter",
        action="store_true",
        help="the dead-letter list: async executions whose attempts ran out (see redrive)",
    )
    get = _command(sub, "get", commands.cmd_executions_get, client, "show an execution record")
    get.add_argument("execution_id", metavar="ID")
    get.add_argument(
        "--wait-ms",
        type=int,
        metavar="N",
        help="wait up to N ms (at most 60000) for the execution to end",
    )
    for name, handler, help_text in (
        ("output", commands.cmd_executions_output, "write an execution's output to stdout"),
        ("logs", commands.cmd_executions_logs, "write an execution's logs to stdout"),
        ("cancel", commands.cmd_executions_cancel, "cancel a pending or running execution"),
        (
            "redrive",
            commands.cmd_executions_redrive,
            "run a dead-lettered async execution again, with a fresh budget of attempts",
        ),
    ):
        _command(sub, name, handler, client, help_text).add_argument("execution_id", metavar="ID")


def _add_nodes(nodes: Parser, client: Parser) -> None:
    nodes.description = (
        "List the nodes with their status, role, resources and running work (the default "
        "command), show one, or drain one."
    )
    sub = nodes.add_subparsers(title="commands", metavar="COMMAND", parser_class=Parser)
    _command(sub, "list", cmd_nodes_list, client, "list the nodes (the same as `spear nodes`)")
    get = _command(sub, "get", cmd_nodes_get, client, "show a node and its resource report")
    get.add_argument("node", metavar="ID", help="a node id or name")
    drain = _command(
        sub, "drain", cmd_nodes_drain, client, "drain a node: no new work; its running work ends"
    )
    drain.add_argument("node", metavar="ID", help="a node id or name")
    drain.add_argument(
        "--disable", action="store_true", help="undo a drain: the node takes new work again"
    )
