"""Fixtures shared by the whole suite: a real `spear node` subprocess and the `spear` CLI."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.subprocesses import NodeProcess, SpearCli, run_spear


@pytest.fixture
def spear_node(tmp_path: Path) -> Iterator[NodeProcess]:
    """A running `spear node` subprocess; stopped (and checked for a clean exit) afterwards."""
    node = NodeProcess(data_dir=tmp_path / "node")
    node.start()
    try:
        yield node
        if node.proc is not None:
            node.stop()
    finally:
        node.kill()


@pytest.fixture
def spear_cli(tmp_path: Path) -> SpearCli:
    """Run `python -m spear ARGS...` in tmp_path: `spear_cli("tasks", "list", input=b"...")`."""
    return functools.partial(run_spear, cwd=tmp_path)
