"""An in-process node on real loopback sockets, and WAT-built WASM functions for it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from spear.config import load_config
from spear.node import NodeHandle, serve_node


@pytest.fixture
async def start_node(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Callable[..., Any]]:
    """Start nodes in this test's nursery: `await start_node(**dotted_overrides)`."""

    async def start(**overrides: Any) -> NodeHandle:
        settings: dict[str, Any] = {
            "node.data_dir": str(tmp_path / "data"),
            "gateway.http": "127.0.0.1:0",
            "mesh.listen": "127.0.0.1:0",
        }
        settings |= {key.replace("__", "."): value for key, value in overrides.items()}
        handle: NodeHandle = await nursery.start(
            serve_node, load_config(env={}, overrides=settings)
        )
        return handle

    yield start


@pytest.fixture
async def node(start_node: Callable[..., Any]) -> NodeHandle:
    handle: NodeHandle = await start_node()
    return handle


@pytest.fixture
async def api(node: NodeHandle) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=node.http_url, timeout=30) as client:
        yield client
