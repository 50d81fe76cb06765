"""`spear node` and `spear demo`: run a node in this process until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spear.cli.output import program
from spear.config import Config, load_config

if TYPE_CHECKING:
    from spear.node import NodeHandle

#: `spear node` flag → dotted config key (DESIGN.md section 7; scripts rely on these names)
NODE_FLAGS = {
    "name": "node.name",
    "data_dir": "node.data_dir",
    "http": "gateway.http",
    "listen": "mesh.listen",
    "join": "mesh.join",
    "bootstrap_expect": "raft.bootstrap_expect",
    "join_token": "mesh.join_token",
}


def add_node_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="spear.toml to load")
    parser.add_argument("--name", help="node name (node.name)")
    parser.add_argument("--data-dir", metavar="DIR", help="node.data_dir")
    parser.add_argument("--http", metavar="HOST:PORT", help="HTTP gateway (gateway.http)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="mesh address (mesh.listen)")
    parser.add_argument(
        "--join",
        metavar="HOST:PORT",
        action="append",
        help="a node to join (mesh.join); repeatable",
    )
    # A string, so that a bad value is reported by the config with its dotted key.
    parser.add_argument("--bootstrap-expect", metavar="N", help="raft.bootstrap_expect")
    parser.add_argument("--join-token", metavar="TOKEN", help="mesh.join_token")


def node_config(args: argparse.Namespace) -> Config:
    """The layered config with the node flags on top (raises ConfigError)."""
    overrides = {key: getattr(args, flag) for flag, key in NODE_FLAGS.items()}
    return load_config(Path(args.config) if args.config else None, overrides=overrides)


def cmd_node(args: argparse.Namespace) -> int:
    config = node_config(args)
    configure_logging(config.node.log_level, config.node.log_format)
    # Imported here: client commands need not pay for importing the whole server.
    from spear.node import run_node

    return run_node(config)


def cmd_demo(args: argparse.Namespace) -> int:
    config = node_config(args)
    # The terminal shows the walkthrough; the node reports only problems.
    configure_logging("warning", config.node.log_format)
    from spear.node import run_node

    return run_node(config, after_start=_walk_through_demo)


async def _walk_through_demo(handle: NodeHandle) -> None:
    import trio  # here, like spear.node: client commands start faster without it

    from spear.demo import run_demo

    walk_through = functools.partial(run_demo, handle.http_url, sys.stdout, program=program())
    # The client is synchronous: in a thread it cannot block the node it talks to.
    await trio.to_thread.run_sync(walk_through, abandon_on_cancel=True)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def configure_logging(level: str, log_format: str) -> None:
    """Log to stderr at `level` as text or JSON lines (node.log_level, node.log_format)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    # httpx logs every request at INFO: a follower would log each one it relays
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
