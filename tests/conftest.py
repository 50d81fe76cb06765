"""Fixtures shared by the whole suite: a real `spear node` subprocess, the `spear` CLI, real
C programs compiled to WASM, and the rule for tests that need a real external part."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker_env import docker_api, docker_node_label, docker_runtime  # noqa: F401
from tests.subprocesses import NodeProcess, SpearCli, run_spear
from tests.wasm_programs import PROGRAMS, PROGRAMS_DIR, build_c_program, compiler_available


def require_real_part(name: str, ok: bool, reason: str) -> None:
    """Skip the test when a real part (Docker, a compiler, a browser) is missing, but fail it
    under CI (`CI=true`), where a missing part means a broken CI image, not a choice."""
    if ok:
        return
    message = f"{name} is not available: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message} (required under CI=true)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def compiled_wasm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The C programs of tests/programs compiled to wasm32-wasi: name -> .wasm path.

    Tests that use it are marked `@pytest.mark.compiler`.
    """
    ok, reason = compiler_available()
    require_real_part("the zig C compiler", ok, reason)
    out_dir = tmp_path_factory.mktemp("wasm-programs")
    built: dict[str, Path] = {}
    for name in PROGRAMS:
        try:
            built[name] = build_c_program(name, PROGRAMS_DIR / f"{name}.c", out_dir)
        except (OSError, subprocess.SubprocessError) as exc:
            # The compiler is there, so this is a real failure (a bad source, a full disk).
            detail = (getattr(exc, "stderr", None) or b"").decode(errors="replace")
            pytest.fail(f"building tests/programs/{name}.c failed: {exc}\n{detail}")
    return built


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
