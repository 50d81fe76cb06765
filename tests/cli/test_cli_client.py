"""The client commands end to end: `python -m spear ...` against a real `spear node` process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import wasmtime

from tests.subprocesses import NodeProcess, SpearCli, spear_env

REPO = Path(__file__).resolve().parents[2]
EXECUTION_ID = re.compile(r"^ex-[0-9a-f]{20}$")
FILE_ID = re.compile(r"^[0-9a-f]{64}$")
TRAP_WAT = '(module (memory (export "memory") 1) (func (export "_start") unreachable))'
#: how often, and how far apart, a test asks whether an execution started
ATTEMPTS, BACKOFF_S = 200, 0.05
SPIN_WAT = '(module (memory (export "memory") 1) (func (export "_start") (loop $l (br $l))))'


def wasm_file(directory: Path, name: str, wat: str | None = None) -> Path:
    """A WASM module on disk: the demo upper-caser, or the given WAT."""
    source = (REPO / "spear" / "demo" / "upper.wat").read_text() if wat is None else wat
    path = directory / f"{name}.wasm"
    path.write_bytes(bytes(wasmtime.wat2wasm(source)))
    return path


def ok(result: subprocess.CompletedProcess[bytes]) -> str:
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b"", result.stderr.decode()
    return result.stdout.decode()


def ok_json(result: subprocess.CompletedProcess[bytes]) -> Any:
    return json.loads(ok(result))


def failed(result: subprocess.CompletedProcess[bytes]) -> str:
    """The one stderr line of a command that failed with exit 1."""
    stderr = result.stderr.decode()
    assert result.returncode == 1, (result.returncode, stderr)
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("spear: "), stderr
    return lines[0]


def header(output: str) -> list[str]:
    return output.splitlines()[0].split()


def register_upper(cli: SpearCli, node: NodeProcess, tmp_path: Path, name: str = "upper") -> Any:
    wasm = wasm_file(tmp_path, "upper")
    args = ["--name", name, "--runtime", "wasm", "--file", str(wasm), "--json"]
    return ok_json(cli("tasks", "register", *args, "--server", node.url))


def test_files_upload_list_get_content(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    server = ("--server", spear_node.url)
    wasm = wasm_file(tmp_path, "upper")
    file_id = ok(spear_cli("files", "upload", str(wasm), *server)).strip()
    assert FILE_ID.match(file_id)
    doc = ok_json(
        spear_cli(
            "files", "upload", "-", "--name", "again", "--json", *server, input=wasm.read_bytes()
        )
    )
    assert doc["file_id"] == file_id, "the same bytes give the same id"
    assert doc["size"] == wasm.stat().st_size

    table = ok(spear_cli("files", "list", *server))
    assert header(table) == ["FILE_ID", "SIZE", "NAME", "CREATED"]
    assert file_id in table
    listed = ok_json(spear_cli("files", "list", "--json", *server))
    assert file_id in [f["file_id"] for f in listed["files"]]

    assert "file_id" in ok(spear_cli("files", "get", file_id, *server))
    content = spear_cli("files", "content", file_id, *server)
    assert content.returncode == 0 and content.stdout == wasm.read_bytes()
    failed(spear_cli("files", "get", "0" * 64, *server))


def test_tasks_register_list_get_delete(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    server = ("--server", spear_node.url)
    wasm = wasm_file(tmp_path, "upper")
    text = ok(
        spear_cli(
            "tasks",
            "register",
            "--name",
            "upper",
            "--runtime",
            "wasm",
            "--file",
            str(wasm),
            "--timeout-ms",
            "5000",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--description",
            "shouts",
            *server,
        )
    )
    assert re.search(r"^task_id\s+tk-[0-9a-f]{16}$", text, re.MULTILINE), text
    assert not re.search(r"^pool ", text, re.MULTILINE), "a per-call task has no pool"
    assert not re.search(r"^pool ", ok(spear_cli("tasks", "get", "upper", *server)), re.MULTILINE)
    task = ok_json(spear_cli("tasks", "get", "upper", "--json", *server))
    assert "pool" in task, "--json prints the document as it is"
    assert task["runtime"] == "wasm" and task["timeout_ms"] == 5000
    assert task["env"] == {"A": "1", "B": "x=y"} and task["description"] == "shouts"
    assert ok_json(spear_cli("tasks", "get", task["task_id"], "--json", *server)) == task

    assert "upper" in failed(
        spear_cli(
            "tasks",
            "register",
            "--name",
            "upper",
            "--runtime",
            "wasm",
            "--artifact",
            task["artifact"],
            *server,
        )
    )
    assert "artifact" in failed(
        spear_cli("tasks", "register", "--name", "noart", "--runtime", "wasm", *server)
    )

    # A definition from stdin with a flag overriding its name; commands with dash arguments.
    spec = json.dumps({"name": "ignored", "runtime": "process", "command": ["/bin/echo"]})
    register = ("tasks", "register", "--runtime", "process")
    ok(spear_cli(*register, "--from-json", "-", "--name", "cat", *server, input=spec.encode()))
    ok(spear_cli(*register, "--name", "cat2", "--command", "/bin/cat", *server))  # flags after
    ok(
        spear_cli(
            *register,
            "--name",
            "py",
            *server,
            "--command",
            sys.executable,
            "--",
            "-c",
            "print('hi')",
        )
    )
    assert ok_json(spear_cli("tasks", "get", "cat", "--json", *server))["command"] == ["/bin/echo"]
    assert ok_json(spear_cli("tasks", "get", "cat2", "--json", *server))["command"] == ["/bin/cat"]
    failed_dash = spear_cli(*register, "--name", "py2", "--command", "python3", "-c", "x", *server)
    assert failed_dash.returncode == 2 and b"go after `--`" in failed_dash.stderr
    py = ok_json(spear_cli("tasks", "get", "py", "--json", *server))
    assert py["command"] == [sys.executable, "-c", "print('hi')"]

    table = ok(spear_cli("tasks", "list", *server))
    assert header(table) == ["NAME", "TASK_ID", "RUNTIME", "MODE", "SOURCE", "CREATED"]
    names = {line.split()[0] for line in table.splitlines()[1:]}
    assert names == {"upper", "cat", "cat2", "py"}
    assert {
        t["name"] for t in ok_json(spear_cli("tasks", "list", "--json", *server))["tasks"]
    } == names

    assert ok(spear_cli("tasks", "delete", "cat", *server)).startswith("deleted task cat (tk-")
    assert "cat" in failed(spear_cli("tasks", "get", "cat", *server))


def test_invoke_sync_writes_the_output_as_is(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    server = ("--server", spear_node.url)
    register_upper(spear_cli, spear_node, tmp_path)
    result = spear_cli("invoke", "upper", "--data", "hello from spear", *server)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"HELLO FROM SPEAR", b"")

    binary = tmp_path / "input.bin"
    binary.write_bytes(b"abc\x00\xff\n" * 1000)
    from_file = spear_cli("invoke", "upper", "--data", f"@{binary}", *server)
    assert from_file.stdout == b"ABC\x00\xff\n" * 1000
    for stdin_flag in ("-", "@-"):
        assert (
            spear_cli("invoke", "upper", "--data", stdin_flag, *server, input=b"piped").stdout
            == b"PIPED"
        )
    assert spear_cli("invoke", "upper", *server).stdout == b""

    verbose = spear_cli("invoke", "upper", "-d", "x", "-v", *server)
    assert verbose.stdout == b"X"
    assert re.fullmatch(
        r"spear: execution ex-[0-9a-f]{20} succeeded on \S+ \(.*ms\)\n", verbose.stderr.decode()
    ), verbose.stderr

    record = ok_json(spear_cli("invoke", "upper", "--data", "json", "--json", *server))
    assert record["status"] == "succeeded" and record["output"] == "JSON"
    assert EXECUTION_ID.match(record["execution_id"])


def test_invoke_failures_are_one_line_exit_1(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    server = ("--server", spear_node.url)
    for name, wat in (("trap", TRAP_WAT), ("spin", SPIN_WAT)):
        ok(
            spear_cli(
                "tasks",
                "register",
                "--name",
                name,
                "--runtime",
                "wasm",
                "--file",
                str(wasm_file(tmp_path, name, wat)),
                *server,
            )
        )

    line = failed(spear_cli("invoke", "trap", *server))
    assert line.startswith("spear: trap failed: trap") and "executions logs ex-" in line
    trapped = spear_cli("invoke", "trap", "--json", *server)
    failed(trapped)
    assert json.loads(trapped.stdout)["status"] == "failed"

    line = failed(spear_cli("invoke", "spin", "--timeout-ms", "200", *server))
    assert line.startswith("spear: spin timeout: timeout")

    assert "nothere" in failed(spear_cli("invoke", "nothere", *server))


def test_async_invoke_and_executions(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    server = ("--server", spear_node.url)
    register_upper(spear_cli, spear_node, tmp_path)
    execution_id = ok(spear_cli("invoke", "upper", "--async", "--data", "abc", *server)).strip()
    assert EXECUTION_ID.match(execution_id)

    record = ok_json(
        spear_cli("executions", "get", execution_id, "--wait-ms", "30000", "--json", *server)
    )
    assert record["status"] == "succeeded" and record["mode"] == "async"
    text = ok(spear_cli("executions", "get", execution_id, *server))
    assert re.search(r"^status\s+succeeded$", text, re.MULTILINE), text
    # Times as local times, also inside the history: no raw Unix timestamps.
    assert re.search(r'^history .*"started_at":"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"', text, re.M), text
    output = spear_cli("executions", "output", execution_id, *server)
    assert (output.returncode, output.stdout) == (0, b"ABC")
    assert spear_cli("executions", "logs", execution_id, *server).returncode == 0

    keyed = ("invoke", "upper", "--async", "--idempotency-key", "k-1", "--json", *server)
    first = ok_json(spear_cli(*keyed))["execution_id"]
    assert ok_json(spear_cli(*keyed))["execution_id"] == first

    table = ok(spear_cli("executions", "list", *server))
    assert header(table) == [
        "EXECUTION_ID",
        "TASK",
        "STATUS",
        "MODE",
        "NODE",
        "COLD",
        "DURATION",
        "CREATED",
    ]
    assert execution_id in table
    listed = ok_json(spear_cli("executions", "list", "--task", "upper", "--json", *server))
    assert execution_id in [r["execution_id"] for r in listed["executions"]]
    one = ok_json(spear_cli("executions", "list", "--limit", "1", "--json", *server))
    assert len(one["executions"]) == 1
    assert "ex-00000000000000000000" in failed(
        spear_cli("executions", "get", "ex-00000000000000000000", *server)
    )


def test_status_shows_health_and_members(spear_node: NodeProcess, spear_cli: SpearCli) -> None:
    server = ("--server", spear_node.url)
    text = ok(spear_cli("status", *server))
    assert text.startswith("node ") and "\nleader " in text
    assert ["NAME", "NODE_ID", "STATE", "VOTER", "HTTP", "MESH", "RUNTIMES"] in [
        line.split() for line in text.splitlines()
    ]
    row = text.splitlines()[-1].split()
    doc = ok_json(spear_cli("status", "--json", *server))
    (member,) = doc["cluster"]["members"]
    assert "wasm" in member["runtimes"] and "process" in member["runtimes"]
    assert row[-1] == ",".join(member["runtimes"]), text  # like `spear nodes`, not JSON
    assert doc["health"]["status"] == "ok"
    assert [m["node_id"] for m in doc["cluster"]["members"]] == [doc["health"]["node_id"]]
    # --json is also accepted before the command.
    assert ok_json(spear_cli("--json", "status", *server)).keys() == doc.keys()


def test_default_server_comes_from_the_config(spear_node: NodeProcess, spear_cli: SpearCli) -> None:
    doc = ok_json(spear_cli("status", "--json", SPEAR_GATEWAY__HTTP=spear_node.http))
    assert doc["health"]["status"] == "ok"


def test_output_to_a_closed_pipe_exits_quietly(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(b"\x01" * (4 * 1024 * 1024))  # far more than a pipe buffer holds
    file_id = ok(spear_cli("files", "upload", str(big), "--server", spear_node.url)).strip()
    proc = subprocess.Popen(
        [sys.executable, "-m", "spear", "files", "content", file_id, "--server", spear_node.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=spear_env(),
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `| head -c0`: the reader is gone before the output comes
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert stderr == b""


def test_tasks_survive_a_restart(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    task = register_upper(spear_cli, spear_node, tmp_path)
    spear_node.restart()
    server = ("--server", spear_node.url)
    assert ok_json(spear_cli("tasks", "get", "upper", "--json", *server)) == task
    assert spear_cli("invoke", "upper", "--data", "again", *server).stdout == b"AGAIN"


def test_waits_beyond_the_limits_are_capped_or_refused_in_one_line(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    server = ("--server", spear_node.url)
    register_upper(spear_cli, spear_node, tmp_path)
    huge = "99999999999999999999"  # more than a socket timeout can hold
    invoked = spear_cli("invoke", "upper", "-d", "big", "--timeout-ms", huge, *server)
    assert (invoked.returncode, invoked.stdout, invoked.stderr) == (0, b"BIG", b"")
    execution_id = ok(spear_cli("invoke", "upper", "--async", *server)).strip()
    line = failed(spear_cli("executions", "get", execution_id, "--wait-ms", huge, *server))
    assert "wait_ms must be less than or equal to 60000" in line, line


def test_cancel_shows_the_record_once_it_ended(
    spear_node: NodeProcess, spear_cli: SpearCli
) -> None:
    server = ("--server", spear_node.url)
    register = ("tasks", "register", "--name", "sleep", "--runtime", "process")
    ok(spear_cli(*register, "--command", "/bin/sleep", "60", *server))
    execution_id = ok(spear_cli("invoke", "sleep", "--async", *server)).strip()
    wait_running(spear_node, execution_id)
    text = ok(spear_cli("executions", "cancel", execution_id, *server))
    assert re.search(r"^status\s+cancelled$", text, re.MULTILINE), text


def wait_running(node: NodeProcess, execution_id: str) -> None:
    """A bounded probe: the execution's record says it is running."""
    for _ in range(ATTEMPTS):
        record = httpx.get(f"{node.url}/api/v1/executions/{execution_id}", timeout=5.0).json()
        if record["status"] == "running":
            return
        assert record["status"] == "pending", record
        time.sleep(BACKOFF_S)
    pytest.fail(f"{execution_id} did not start")


def test_dead_letters_are_listed_and_redriven(
    spear_node: NodeProcess, spear_cli: SpearCli, tmp_path: Path
) -> None:
    server = ("--server", spear_node.url)
    retry = {"max_attempts": 1}
    spec = {"name": "fails", "runtime": "process", "command": ["/bin/false"], "retry": retry}
    (tmp_path / "fails.json").write_text(json.dumps(spec))
    ok(spear_cli("tasks", "register", "--from-json", str(tmp_path / "fails.json"), *server))
    execution_id = ok(spear_cli("invoke", "fails", "--async", *server)).strip()
    ended = ("executions", "get", execution_id, "--wait-ms", "30000", "--json", *server)
    assert ok_json(spear_cli(*ended))["dead_letter"] is True
    listed = ok_json(spear_cli("executions", "list", "--dead-letter", "--json", *server))
    assert [r["execution_id"] for r in listed["executions"]] == [execution_id]
    again = ok_json(spear_cli("executions", "redrive", execution_id, "--json", *server))
    assert (again["status"], again["dead_letter"]) == ("pending", False)
    assert ok_json(spear_cli(*ended))["dead_letter"] is True  # it failed once more
    refused = spear_cli("executions", "redrive", "ex-00000000000000000000", *server)
    assert refused.returncode == 1 and b"ex-00000000000000000000" in refused.stderr
