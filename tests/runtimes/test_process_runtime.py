"""The process runtime with real processes: contract, limits, process groups, cancellation."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from spear.config import ProcessConfig
from spear.errors import ArtifactError, ConfigError, ValidationError
from spear.model import ErrorCode, ExecStatus, FunctionSpec
from spear.runtimes import ProcessRuntime
from tests.runtimes.conftest import GONE_WITHIN_S, ArtifactFactory, MiB, function_spec, wait_gone

FOREVER = math.inf
#: how long a SIGKILLed process may take to disappear from the process table


def command_spec(*argv: str, **fields: Any) -> FunctionSpec:
    return function_spec(runtime="process", command=argv, **fields)


def sh(script: str, **fields: Any) -> FunctionSpec:
    return command_spec("/bin/sh", "-c", script, **fields)


async def test_cat_echoes_stdin(process: ProcessRuntime) -> None:
    spec = command_spec("cat")
    await process.prepare(spec)
    outcome = await process.run(spec, b"hello, spear", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"hello, spear"
    assert outcome.exit_code == 0
    assert outcome.cold is True
    assert set(outcome.timings_ms) == {"acquire", "run"}


async def test_large_input_and_output(process: ProcessRuntime) -> None:
    data = os.urandom(3 * MiB)
    spec = command_spec("cat", max_output_bytes=4 * MiB)
    outcome = await process.run(spec, data, deadline=FOREVER)
    assert outcome.output == data


async def test_input_the_function_does_not_read(process: ProcessRuntime) -> None:
    outcome = await process.run(command_spec("true"), os.urandom(MiB), deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED


async def test_exit_code_3_with_logs(process: ProcessRuntime) -> None:
    outcome = await process.run(sh("echo oops >&2; exit 3"), b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.EXIT_NONZERO
    assert outcome.exit_code == 3
    assert outcome.logs == b"oops\n"


async def test_killed_by_a_signal(process: ProcessRuntime) -> None:
    outcome = await process.run(sh("kill -SEGV $$"), b"", deadline=FOREVER)
    assert outcome.error_code is ErrorCode.EXIT_NONZERO
    assert outcome.exit_code == -11
    assert outcome.error_message == "the function was killed by SIGSEGV"


async def test_timeout_kills_the_whole_group(process: ProcessRuntime) -> None:
    # The shell prints its background child's pid, then waits for it.
    spec = sh("sleep 60 & echo $!; wait", timeout_s=0.5)
    outcome = await process.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.TIMEOUT
    assert outcome.error_code is ErrorCode.TIMEOUT
    grandchild = int(outcome.output)
    assert await wait_gone(grandchild)


async def test_leftover_background_processes_are_killed(process: ProcessRuntime) -> None:
    spec = sh("sleep 60 >/dev/null 2>&1 & echo $!")
    outcome = await process.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert await wait_gone(int(outcome.output))


async def test_caller_deadline_shortens_the_timeout(process: ProcessRuntime) -> None:
    spec = command_spec("sleep", "60", timeout_s=60.0)
    outcome = await process.run(spec, b"", deadline=trio.current_time() + 0.3)
    assert outcome.status is ExecStatus.TIMEOUT


async def test_memory_limit(process: ProcessRuntime) -> None:
    spec = command_spec(sys.executable, "-c", "b = bytearray(1 << 30)", memory_limit_bytes=64 * MiB)
    outcome = await process.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.MEMORY_LIMIT
    assert b"MemoryError" in outcome.logs


async def test_output_limit_stops_yes_promptly(process: ProcessRuntime) -> None:
    spec = command_spec("yes", max_output_bytes=10_000, timeout_s=30.0)
    started = time.monotonic()
    outcome = await process.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.FAILED
    assert outcome.error_code is ErrorCode.OUTPUT_LIMIT
    assert len(outcome.output) <= 10_000
    assert time.monotonic() - started < 10  # killed, not timed out


async def test_logs_are_truncated_and_the_run_goes_on(process: ProcessRuntime) -> None:
    spec = sh("head -c 5000 /dev/zero | tr '\\0' x >&2; echo done", max_log_bytes=100)
    outcome = await process.run(spec, b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"done\n"
    assert outcome.logs.startswith(b"x" * 100)
    assert b"logs truncated: 4900 more bytes" in outcome.logs


async def test_environment_is_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEAR_SECRET", "must-not-leak")
    monkeypatch.setenv("LANG", "C.UTF-8")
    runtime = ProcessRuntime(ProcessConfig(pass_env=["PATH", "LANG"]), work_dir=tmp_path)
    outcome = await runtime.run(command_spec("env", env={"FOO": "bar"}), b"", deadline=FOREVER)
    variables = dict(line.split("=", 1) for line in outcome.output.decode().splitlines())
    assert variables == {"PATH": os.environ["PATH"], "LANG": "C.UTF-8", "FOO": "bar"}


async def test_rlimits_are_applied(process: ProcessRuntime) -> None:
    spec = sh("ulimit -v; ulimit -n; ulimit -S -t; ulimit -H -t", memory_limit_bytes=64 * MiB)
    outcome = await process.run(spec, b"", deadline=FOREVER)
    assert outcome.output.split() == [b"65536", b"256", b"10", b"11"]


async def test_cpu_time_limit(tmp_path: Path) -> None:
    runtime = ProcessRuntime(ProcessConfig(cpu_time_limit_s=1), work_dir=tmp_path)
    outcome = await runtime.run(sh("while :; do :; done"), b"", deadline=FOREVER)
    assert outcome.status is ExecStatus.TIMEOUT
    assert outcome.error_message is not None
    assert "RLIMIT_CPU" in outcome.error_message


async def test_artifact_script_runs_with_command_args(
    process: ProcessRuntime, artifact: ArtifactFactory
) -> None:
    script = b'#!/bin/sh\nprintf "%s:" "$1"\ntr a-z A-Z\n'
    process.validate_artifact(script)
    path, sha = artifact(script)
    spec = function_spec(
        runtime="process", artifact_path=path, artifact_sha256=sha, command=("arg",)
    )
    await process.prepare(spec)
    outcome = await process.run(spec, b"hello", deadline=FOREVER)
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output == b"arg:HELLO"
    staged = path.parent.parent / "work" / "artifacts" / sha
    assert staged.stat().st_mode & 0o777 == 0o755


async def test_artifact_is_staged_on_first_run(
    process: ProcessRuntime, artifact: ArtifactFactory
) -> None:
    path, sha = artifact(b"#!/bin/sh\necho staged\n")
    spec = function_spec(runtime="process", artifact_path=path, artifact_sha256=sha)
    outcome = await process.run(spec, b"", deadline=FOREVER)
    assert outcome.output == b"staged\n"


async def test_cancel_kills_the_process(process: ProcessRuntime, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    spec = sh(f"echo $$ > {pid_file}.tmp && mv {pid_file}.tmp {pid_file} && exec sleep 60")
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(process.run, spec, b"", deadline=FOREVER))
            await wait_for_file(pid_file)
            scope.cancel()
    assert scope.cancelled_caught
    assert process.statistics()["running"] == 0
    assert await wait_gone(int(pid_file.read_text()))


async def wait_for_file(path: Path) -> None:
    deadline = time.monotonic() + GONE_WITHIN_S
    while not await trio.Path(path).exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        await trio.sleep(0.01)


async def test_missing_command(process: ProcessRuntime) -> None:
    with pytest.raises(ValidationError, match="not an executable") as info:
        process.validate_task(command_spec("no-such-command-xyz"))
    assert info.value.field == "command"
    outcome = await process.run(command_spec("no-such-command-xyz"), b"", deadline=FOREVER)
    assert outcome.error_code is ErrorCode.START_FAILED


async def test_task_validation(process: ProcessRuntime) -> None:
    with pytest.raises(ValidationError, match="needs a command or an artifact"):
        process.validate_task(command_spec())
    process.validate_task(command_spec("cat", mode="worker"))  # served by spear.worker


async def test_bad_artifacts(process: ProcessRuntime) -> None:
    with pytest.raises(ArtifactError, match="empty"):
        process.validate_artifact(b"")
    with pytest.raises(ArtifactError, match="neither an ELF binary nor a script"):
        process.validate_artifact(b"hello")
    process.validate_artifact(await trio.Path("/bin/true").read_bytes())


async def test_isolate_network_needs_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Being non-root cannot be produced for real in a root container: fake the uid.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(ConfigError, match=r"runtimes\.process\.isolate_network"):
        ProcessRuntime(ProcessConfig(isolate_network=True), work_dir=tmp_path)


@pytest.mark.skipif(os.geteuid() != 0, reason="unshare -n needs root")
async def test_isolate_network_gives_a_new_namespace(tmp_path: Path) -> None:
    runtime = ProcessRuntime(ProcessConfig(isolate_network=True), work_dir=tmp_path)
    outcome = await runtime.run(
        command_spec("readlink", "/proc/self/ns/net"), b"", deadline=FOREVER
    )
    assert outcome.status is ExecStatus.SUCCEEDED
    assert outcome.output.strip() != os.readlink("/proc/self/ns/net").encode()


async def test_describe(process: ProcessRuntime) -> None:
    described = process.describe()
    assert described["available"] is True
    assert described["modes"] == ["per-call", "worker"]
