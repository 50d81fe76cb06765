"""The process runtime: a native executable per call (the CGI/watchdog contract).

The executable is `command[0]` (looked up on the clean PATH), or the uploaded artifact staged
as `<work_dir>/artifacts/<sha256>` (mode 0755) followed by `command` as its arguments. Input
goes to stdin, output is read from stdout, logs from stderr, exit code 0 means success. The
working directory is `<work_dir>/scratch`, shared by all calls and never cleaned by spear (a
fresh directory per call cost 0.6 ms of mkdir/rmdir on overlay filesystems).

Limits and how they hold:
- time: a trio deadline; at it the whole process group gets SIGKILL and is reaped. RLIMIT_CPU
  (soft = the timeout rounded up or `cpu_time_limit_s`, hard = soft + 1) is a backstop.
- processes: each call is a new session and process group (`start_new_session`); when the
  main process exits, times out, overflows or is cancelled, the group is killed. A process
  that calls setsid() itself leaves the group and is not reached (cgroups would; later).
- memory: RLIMIT_AS = memory_limit_bytes (address space, so runtimes that reserve large
  virtual ranges, e.g. the JVM or Go, need a generous limit).
- files: RLIMIT_NOFILE; RLIMIT_NPROC when `rlimit_nproc > 0` (not enforced for root).
- output: stdout is read incrementally; past `max_output_bytes` the group is killed at once.
- environment: only `pass_env` names copied from the node's environment, plus the task's env.
- network: with `isolate_network`, the call runs under `unshare -n` (an empty network
  namespace; needs root, checked at start).

Why rlimits are set by `/bin/sh -c 'ulimit ...; exec "$0" "$@"'`: any `preexec_fn` makes
CPython leave its vfork fast path (measured: /bin/true 5.0 ms instead of 1.25 ms), and
`prlimit` on the pid after spawn races with the child's first allocations. The shell's
builtins cost one extra exec (1.7 ms in all) and take the arguments as "$@", never parsed.
Limits are only ever lowered (raising a hard limit fails without CAP_SYS_RESOURCE): each
value is clamped to the node's own hard limit.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any, Final

import trio

from spear.config import ProcessConfig
from spear.errors import ArtifactError, ConfigError, RuntimeFailure, ValidationError
from spear.model import ErrorCode, ExecStatus, FunctionSpec, RunOutcome
from spear.runtimes.base import PER_CALL, check_mode, effective_timeout_s
from spear.runtimes.outcomes import (
    SUCCEEDED,
    LogCapture,
    OutputCapture,
    Verdict,
    early_outcome,
    failed,
    output_overflowed,
    timed_out,
)

log = logging.getLogger(__name__)

SHELL: Final = "/bin/sh"
READ_CHUNK_BYTES: Final = 65536
#: after the main process exits and its group is killed, how long the pipes may take to close
DRAIN_S: Final = 1.0
#: stderr fragments that say an allocation failed (Python, C, glibc, C++, Rust, Go)
MEMORY_MARKERS: Final = (
    b"MemoryError",
    b"Cannot allocate memory",
    b"out of memory",
    b"std::bad_alloc",
    b"memory allocation of",
)


class ProcessRuntime:
    """Runs native executables per call (see the module docstring for the limits)."""

    name = "process"

    def __init__(self, config: ProcessConfig, *, work_dir: Path) -> None:
        """Check the config and create the work directories.

        Args:
            config: the `[runtimes.process]` section.
            work_dir: absolute directory for staged artifacts (`artifacts/`) and the calls'
                working directory (`scratch/`).

        Raises:
            ConfigError: `isolate_network` is set but this node cannot use `unshare -n`.
        """
        self._config = config
        self._prefix: tuple[str, ...] = ()
        if config.isolate_network:
            unshare = shutil.which("unshare")
            if os.geteuid() != 0 or unshare is None:
                raise ConfigError(
                    "runtimes.process.isolate_network needs root and the unshare command"
                    " (util-linux); run the node as root or set it to false"
                )
            self._prefix = (unshare, "--net", "--")
        self._artifacts = work_dir / "artifacts"
        self._scratch = work_dir / "scratch"
        self._artifacts.mkdir(parents=True, exist_ok=True)
        self._scratch.mkdir(parents=True, exist_ok=True)
        self._base_env = {k: os.environ[k] for k in config.pass_env if k in os.environ}
        self._staged: set[str] = set()
        self._resolved: dict[tuple[str, str], str | None] = {}
        self._running = 0

    # --- the Runtime protocol -----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return {
            "available": True,
            "version": f"{os.uname().sysname} {os.uname().release}",
            "modes": [PER_CALL],
            "isolate_network": self._config.isolate_network,
        }

    def validate_task(self, spec: FunctionSpec) -> None:
        check_mode(self.name, spec)
        if spec.artifact_sha256 is None and not spec.command:
            raise ValidationError(
                "runtime 'process' needs a command or an artifact", field="command"
            )
        if spec.artifact_sha256 is None and self._resolve(spec.command[0], spec) is None:
            raise ValidationError(
                f"command {spec.command[0]!r} is not an executable on this node's PATH"
                " (runtimes.process.pass_env decides the PATH)",
                field="command",
            )

    def validate_artifact(self, data: bytes) -> None:
        if not data:
            raise ArtifactError("the artifact is empty; upload an executable file")
        if not data.startswith((b"\x7fELF", b"#!")):
            raise ArtifactError(
                "the artifact is not an executable: it is neither an ELF binary nor a script"
                " starting with #!"
            )

    async def prepare(self, spec: FunctionSpec) -> None:
        self.validate_task(spec)
        if spec.artifact_sha256 is not None:
            await trio.to_thread.run_sync(self._stage, spec)

    async def run(self, spec: FunctionSpec, data: bytes, *, deadline: float) -> RunOutcome:
        started = time.perf_counter()
        timeout_s = effective_timeout_s(spec, deadline)
        if timeout_s <= 0:
            return early_outcome(timed_out(max(timeout_s, 0.0)))
        try:
            argv = await self._argv(spec, timeout_s)
        except (ArtifactError, RuntimeFailure) as exc:
            return early_outcome(failed(ErrorCode.START_FAILED, str(exc)))
        self._running += 1
        try:
            return await self._run(_Call(spec, timeout_s, started), argv, data)
        finally:
            self._running -= 1

    async def aclose(self) -> None:
        """Nothing to release: every call reaps its own processes."""

    def statistics(self) -> dict[str, Any]:
        return {"running": self._running, "staged_artifacts": len(self._staged)}

    # --- one call -----------------------------------------------------------------------

    async def _run(self, call: _Call, argv: list[str], data: bytes) -> RunOutcome:
        try:
            proc = await _spawn(argv, env={**self._base_env, **call.spec.env}, cwd=self._scratch)
        except (OSError, ValueError) as exc:  # ValueError: e.g. a NUL byte in argv or env
            message = f"cannot start the function: {exc}"
            return early_outcome(failed(ErrorCode.START_FAILED, message))
        call.spawned = time.perf_counter()
        try:
            with trio.move_on_after(call.timeout_s) as guard:
                await self._supervise(call, proc, data)
            if guard.cancelled_caught:
                call.stop(ErrorCode.TIMEOUT)
        finally:
            with trio.CancelScope(shield=True):
                _kill_group(proc.pid)
                await proc.wait()
        return call.outcome(proc.returncode)

    async def _supervise(self, call: _Call, proc: trio.Process, data: bytes) -> None:
        """Feed stdin and read stdout/stderr until the main process exits and pipes close."""
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None

        def on_stdout(chunk: bytes) -> None:
            if not call.output.write(chunk):
                call.stop(ErrorCode.OUTPUT_LIMIT)
                _kill_group(proc.pid)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(_feed, proc.stdin, data)
            pumps_done = trio.Event()
            nursery.start_soon(
                _pump_both, proc.stdout, on_stdout, proc.stderr, call.logs.write, pumps_done
            )
            await _wait_exited(proc)
            _kill_group(proc.pid)  # stragglers (the leader is a zombie: its pgid is not reused)
            with trio.move_on_after(DRAIN_S):
                await pumps_done.wait()
            nursery.cancel_scope.cancel()

    # --- the command line ---------------------------------------------------------------

    async def _argv(self, spec: FunctionSpec, timeout_s: float) -> list[str]:
        if spec.artifact_sha256 is not None:
            if spec.artifact_sha256 not in self._staged:
                await trio.to_thread.run_sync(self._stage, spec)
            target = [str(self._artifacts / spec.artifact_sha256), *spec.command]
        else:
            exe = self._resolve(spec.command[0], spec)
            if exe is None:
                raise RuntimeFailure(
                    f"command {spec.command[0]!r} is not an executable on this node's PATH"
                )
            target = [exe, *spec.command[1:]]
        return [*self._prefix, SHELL, "-c", self._limits_script(spec, timeout_s), *target]

    def _limits_script(self, spec: FunctionSpec, timeout_s: float) -> str:
        cpu_s = self._config.cpu_time_limit_s or max(1, math.ceil(timeout_s))
        steps = [
            ("-v", _clamp(resource.RLIMIT_AS, spec.memory_limit_bytes) // 1024),
            ("-n", _clamp(resource.RLIMIT_NOFILE, self._config.rlimit_nofile)),
            ("-c", 0),
            ("-t", _clamp(resource.RLIMIT_CPU, cpu_s + 1)),
            ("-S -t", _clamp(resource.RLIMIT_CPU, cpu_s)),
        ]
        if self._config.rlimit_nproc:
            steps.append(("-p", _clamp(resource.RLIMIT_NPROC, self._config.rlimit_nproc)))
        limits = " && ".join(f"ulimit {flag} {value}" for flag, value in steps)
        # unset PWD: the shell exports it, the function's environment must not show it
        return f'{limits} && unset PWD && exec "$0" "$@"'

    def _resolve(self, command: str, spec: FunctionSpec) -> str | None:
        """The executable `command` names on the call's PATH (cached: a lookup costs
        about 0.25 ms; an executable removed later fails at exec with exit code 127)."""
        path = spec.env.get("PATH", self._base_env.get("PATH", os.defpath))
        key = (command, path)
        if key not in self._resolved:
            self._resolved[key] = shutil.which(command, path=path)
        return self._resolved[key]

    def _stage(self, spec: FunctionSpec) -> None:
        """Copy the artifact to `<work_dir>/artifacts/<sha256>` with mode 0755 (blocking)."""
        assert spec.artifact_sha256 is not None
        target = self._artifacts / spec.artifact_sha256
        if not target.exists():
            if spec.artifact_path is None:
                raise RuntimeFailure(f"artifact {spec.artifact_sha256} has no file on this node")
            fd, partial = tempfile.mkstemp(dir=self._artifacts, suffix=".tmp")
            try:
                os.close(fd)
                shutil.copyfile(spec.artifact_path, partial)
                os.chmod(partial, 0o755)
                os.replace(partial, target)  # atomic: a concurrent stager's copy is the same
            except OSError as exc:
                with suppress(OSError):
                    os.unlink(partial)
                raise RuntimeFailure(
                    f"cannot stage artifact {spec.artifact_sha256}: {exc.strerror}"
                ) from exc
        self._staged.add(spec.artifact_sha256)


class _Call:
    """One call's captures, stop reason and timings."""

    __slots__ = ("logs", "output", "spawned", "spec", "started", "stop_reason", "timeout_s")

    def __init__(self, spec: FunctionSpec, timeout_s: float, started: float) -> None:
        self.spec = spec
        self.timeout_s = timeout_s
        self.started = started
        self.spawned = started
        self.output = OutputCapture(spec.max_output_bytes)
        self.logs = LogCapture(spec.max_log_bytes)
        self.stop_reason: ErrorCode | None = None

    def stop(self, reason: ErrorCode) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def outcome(self, returncode: int | None) -> RunOutcome:
        done = time.perf_counter()
        return self._verdict(returncode).outcome(
            self.output,
            self.logs,
            acquire_s=self.spawned - self.started,
            run_s=done - self.spawned,
        )

    def _verdict(self, returncode: int | None) -> Verdict:
        if self.stop_reason is ErrorCode.TIMEOUT:
            return timed_out(self.timeout_s)
        if self.stop_reason is ErrorCode.OUTPUT_LIMIT:
            return output_overflowed(self.output.limit)
        code = -1 if returncode is None else returncode
        if code == 0:
            return SUCCEEDED
        if code == -signal.SIGXCPU:
            message = "the function used up its CPU time limit (RLIMIT_CPU) and was killed"
            return Verdict(ExecStatus.TIMEOUT, ErrorCode.TIMEOUT, message, code)
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with code {code}"
        if self.logs.contains(MEMORY_MARKERS):
            message = (
                f"the function {how} after an allocation failed under its memory_limit_bytes"
                f" ({self.spec.memory_limit_bytes}, enforced as RLIMIT_AS)"
            )
            return failed(ErrorCode.MEMORY_LIMIT, message, code)
        return failed(ErrorCode.EXIT_NONZERO, f"the function {how}", code)


# --- process plumbing -------------------------------------------------------------------


async def _spawn(argv: list[str], *, env: dict[str, str], cwd: Path) -> trio.Process:
    for attempt in range(3):
        try:
            return await trio.lowlevel.open_process(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            # A freshly staged artifact can still be open for writing in a child that another
            # thread forked meanwhile (until that child execs): "text file busy", retry.
            if exc.errno != errno.ETXTBSY or attempt == 2:
                raise
            await trio.sleep(0.01)
    raise AssertionError("unreachable")


async def _wait_exited(proc: trio.Process) -> None:
    """Wait until the main process has exited, without reaping it (so its pgid stays ours)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:  # pragma: no cover - kernels before 5.3: reap, then kill the group
        await proc.wait()
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)


async def _feed(stream: trio.abc.SendStream, data: bytes) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            if data:
                await stream.send_all(data)


async def _pump_both(
    out: trio.abc.ReceiveStream,
    on_out: Callable[[bytes], None],
    err: trio.abc.ReceiveStream,
    on_err: Callable[[bytes], None],
    done: trio.Event,
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, out, on_out)
        nursery.start_soon(_pump, err, on_err)
    done.set()


async def _pump(stream: trio.abc.ReceiveStream, sink: Callable[[bytes], None]) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        async with stream:
            while chunk := await stream.receive_some(READ_CHUNK_BYTES):
                sink(bytes(chunk))


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError:  # pragma: no cover - a member changed its uid
        log.warning("cannot kill process group %d", pgid)


def _clamp(which: int, value: int) -> int:
    """`value`, or the node's own hard limit if that is lower (limits can only go down)."""
    _soft, hard = resource.getrlimit(which)
    return value if hard == resource.RLIM_INFINITY else min(value, hard)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
