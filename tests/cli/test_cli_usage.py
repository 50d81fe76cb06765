"""The CLI without a node: usage errors, config errors and an unreachable server.

Each case runs the real `python -m spear` and checks the contract: one readable line on
stderr, no traceback, exit 2 for usage/config and 1 for a failed request.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.subprocesses import SpearCli, free_port


def one_error_line(result: subprocess.CompletedProcess[bytes]) -> str:
    """The single `spear...: message` line a failing command must print on stderr."""
    stderr = result.stderr.decode()
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("spear"), stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["--http", "nope"], "gateway.http"),
        (["--listen", "127.0.0.1:99999"], "mesh.listen"),
        (["--join", "somewhere"], "mesh.join"),
        (["--bootstrap-expect", "0"], "raft.bootstrap_expect"),
        (["--bootstrap-expect", "many"], "raft.bootstrap_expect"),
    ],
)
def test_node_flag_with_a_bad_value_exits_2_naming_the_key(
    spear_cli: SpearCli, tmp_path: Path, args: list[str], key: str
) -> None:
    result = spear_cli("node", "--data-dir", str(tmp_path / "data"), *args)
    assert result.returncode == 2
    assert key in one_error_line(result)
    assert not (tmp_path / "data").exists(), "a bad config must not start anything"


def test_node_config_file_errors_exit_2(spear_cli: SpearCli, tmp_path: Path) -> None:
    missing = spear_cli("node", "--config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2
    assert "missing.toml" in one_error_line(missing)

    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nhttp = "127.0.0.1:8080"\nlisten_backlog = 5\n')
    unknown = spear_cli("node", "--config", str(bad))
    assert unknown.returncode == 2
    assert "gateway.listen_backlog" in one_error_line(unknown)


def test_node_env_var_errors_exit_2(spear_cli: SpearCli) -> None:
    result = spear_cli("node", SPEAR_GATEWAY__HTTP="not-an-address")
    assert result.returncode == 2
    assert "gateway.http" in one_error_line(result)


def test_invoke_on_a_server_that_is_down_is_one_line_exit_1(spear_cli: SpearCli) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = spear_cli("invoke", "upper", "--data", "hi", "--server", url)
    assert result.returncode == 1
    line = one_error_line(result)
    assert f"cannot reach spear at {url}: connection refused" in line
    assert "spear node" in line and "--server" in line
    assert result.stdout == b""


def test_default_server_is_the_configured_gateway(spear_cli: SpearCli, tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "spear.toml"
    config.write_text(f'[gateway]\nhttp = "0.0.0.0:{port}"\n')
    from_file = spear_cli("tasks", "list", "--config", str(config))
    assert from_file.returncode == 1
    assert f"http://127.0.0.1:{port}" in one_error_line(from_file)

    from_env = spear_cli("status", SPEAR_GATEWAY__HTTP=f"127.0.0.1:{port}")
    assert from_env.returncode == 1
    assert f"http://127.0.0.1:{port}" in one_error_line(from_env)


@pytest.mark.parametrize(
    "args",
    [
        ["bogus"],
        ["tasks"],
        ["tasks", "list", "--bogus"],
        ["tasks", "register", "--name", "x", "--runtime", "cobol"],
        ["tasks", "register", "--artifact", "a", "--file", "b", "--name", "x"],
        ["tasks", "register", "--runtime", "wasm"],
        ["tasks", "register", "--name", "x", "--runtime", "process", "--env", "NOEQUALS"],
        ["tasks", "register", "--from-json", "/nonexistent/task.json"],
        ["invoke"],
        ["invoke", "upper", "--data", "@/nonexistent/input"],
        ["invoke", "upper", "--timeout-ms", "soon"],
        ["executions", "list", "--status", "sleeping"],
        ["files", "upload", "/nonexistent/file.wasm"],
        ["status", "--server", "ftp://example.org"],
        ["--json", "node"],
    ],
)
def test_usage_errors_exit_2_with_one_line(spear_cli: SpearCli, args: list[str]) -> None:
    # A server that is down: a usage error must be reported before any request is made.
    result = spear_cli(*args, SPEAR_GATEWAY__HTTP=f"127.0.0.1:{free_port()}")
    assert result.returncode == 2, result.stderr
    one_error_line(result)


def test_register_from_json_rejects_bad_json(spear_cli: SpearCli) -> None:
    result = spear_cli("tasks", "register", "--from-json", "-", input=b"{not json")
    assert result.returncode == 2
    assert "not valid JSON" in one_error_line(result)


def test_help_exits_0(spear_cli: SpearCli) -> None:
    for args in (["--help"], ["node", "--help"], ["tasks", "register", "--help"]):
        result = spear_cli(*args)
        assert result.returncode == 0, result.stderr
        assert b"usage: spear" in result.stdout
    node_help = spear_cli("node", "--help").stdout.decode()
    for flag in (
        "--config",
        "--name",
        "--data-dir",
        "--http",
        "--listen",
        "--join",
        "--bootstrap-expect",
        "--join-token",
    ):
        assert flag in node_help
